"""torch.ops.qformats: opcheck, torch.compile(fullgraph) with the ops in the graph, explicit
reference fallback, errors. Kernels run interpreted on CPU (conftest), compiled on a GPU."""
import pytest
import torch

import qformats
import lowering
from lowering import ops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
Q = torch.ops.qformats


def _x(shape=(4, 96), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)


@pytest.mark.parametrize("fmt", ["mxfp4", "flash_int4"])  # e8m0 and zero-point paths
def test_opcheck(fmt):
    x = _x()
    torch.library.opcheck(Q.quantize.default, (x, fmt))
    b = Q.quantize(x, fmt)
    torch.library.opcheck(Q.dequantize.default, (b, fmt, [4, 96], torch.float32))
    bufs = torch.stack([b, Q.quantize(-2 * x, fmt)])
    torch.library.opcheck(Q.dequant_sum.default, (bufs, fmt, [4, 96], torch.bfloat16, _x(seed=1)))
    torch.library.opcheck(Q.dequant_sum_requant.default, (bufs, fmt, [4, 96], torch.float16))
    torch.library.opcheck(Q.dequant_sum_requant.default, (bufs, fmt, [4, 96], None))


def test_ops_equal_their_references():
    x = _x((2, 3, 80), torch.float16)
    for fmt in ("mxfp6_e2m3", "int5_b64", "flash_int6"):
        b = Q.quantize(x, fmt)
        assert torch.equal(b.cpu(), qformats.encode(x.cpu(), fmt).data)
        y = Q.dequantize(b, fmt, [2, 3, 80], torch.float32)
        assert torch.equal(y.cpu(), qformats.decode(qformats.QTensor.from_buffer(b.cpu(), fmt, x.shape), torch.float32))
        bufs = torch.stack([b, Q.quantize(x * 0.5, fmt)])
        assert torch.equal(Q.dequant_sum(bufs, fmt, [2, 3, 80], torch.float32, None).cpu(),
                           ops.reference_dequant_sum(bufs.cpu(), fmt, [2, 3, 80], torch.float32))
        nb, _ = Q.dequant_sum_requant(bufs, fmt, [2, 3, 80], None)
        assert torch.equal(nb.cpu(), ops.reference_dequant_sum_requant(bufs.cpu(), fmt, [2, 3, 80])[0])


def test_compile_fullgraph_keeps_the_ops():
    """The ops trace as single nodes under torch.compile(fullgraph=True); the compiled
    function gives the eager bytes."""
    seen = []

    def backend(gm, inputs):
        seen.append(gm)
        return gm.forward

    def step(x, r):
        b = Q.quantize(x, "mxfp4")
        bufs = torch.stack([b, b])
        s = Q.dequant_sum(bufs, "mxfp4", [8, 64], torch.float32, r)
        nb, d = Q.dequant_sum_requant(bufs, "mxfp4", [8, 64], torch.float32)
        return Q.dequantize(nb, "mxfp4", [8, 64], torch.bfloat16), s, d

    x, r = _x((8, 64)), _x((8, 64), torch.float32, 1)
    got = torch.compile(step, backend=backend, fullgraph=True)(x, r)
    want = step(x, r)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (gm,) = seen
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for op, k in ((Q.quantize, 1), (Q.dequant_sum, 1), (Q.dequant_sum_requant, 1), (Q.dequantize, 1)):
        assert sum(t in (op, op.default) for t in targets) == k, (op, targets)


def test_compile_aot_eager():
    """Through AOT autograd (fake tensors, functionalization) too: the fake impls carry it.
    (Inductor itself works the same way but costs a minute of C++ compile on CPU.)"""
    f = torch.compile(lambda x: Q.dequantize(Q.quantize(x * 2, "int4_b32"), "int4_b32", [4, 96], torch.float32),
                      fullgraph=True, backend="aot_eager")
    x = _x()
    assert torch.equal(f(x), Q.dequantize(Q.quantize(x * 2, "int4_b32"), "int4_b32", [4, 96], torch.float32))


def test_unsupported_formats_fall_back_to_the_reference():
    fmt = str(qformats.static_outlier_format("int4", (1, 5), [0.5] * 94))
    assert lowering.path(fmt, DEV).startswith("reference: outlier")
    assert lowering.path(str(qformats.static_outlier_format("int4", (), [0.5] * 8)), DEV).startswith("reference: static")
    assert lowering.path("int4/b32/e8m0+o[3]", DEV).startswith("reference: outlier")
    x = _x()
    for f in (fmt, "int4/b32/e8m0+o[3]"):
        b = Q.quantize(x, f)
        assert torch.equal(b.cpu(), qformats.encode(x.cpu(), f).data)
        assert torch.equal(Q.dequantize(b, f, [4, 96], torch.float32).cpu(),
                           ops.reference_dequantize(b.cpu(), f, [4, 96], torch.float32))
    assert lowering.path("mxfp4", "cpu") in ("interpreter", "reference: no GPU and TRITON_INTERPRET unset")
    if DEV.type == "cpu":
        assert lowering.path("mxfp4", "cpu") == "interpreter"  # so the tests above ran the kernels


def test_errors():
    x = _x()
    with pytest.raises(TypeError, match="dtype"):
        Q.quantize(x.to(torch.int32), "mxfp4")
    with pytest.raises(ValueError, match="element|not understood"):
        Q.quantize(x, "fp9_e9m9/b32/e8m0")
    with pytest.raises(ValueError, match="empty"):
        Q.quantize(x[:0], "mxfp4")
    b = Q.quantize(x, "mxfp4")
    with pytest.raises(ValueError, match="bytes"):
        Q.dequantize(b[:-1], "mxfp4", [4, 96], torch.float32)
    with pytest.raises(TypeError, match="decode to"):
        Q.dequantize(b, "mxfp4", [4, 96], torch.int8)
    with pytest.raises(ValueError, match=r"\[N >= 1, nbytes\]"):
        Q.dequant_sum(b, "mxfp4", [4, 96], torch.float32, None)
    with pytest.raises(ValueError, match="residual"):
        Q.dequant_sum(b.view(1, -1), "mxfp4", [4, 96], torch.float32, _x((4, 95)))


def test_lowered_codec_matches_reference_seam():
    codec = lowering.LoweredCodec()
    x = _x((6, 64), torch.float32)
    f = qformats.Format.parse("nvfp4")
    bufs = [codec.quantize(x * (i + 1), f) for i in range(3)]
    assert torch.equal(bufs[0].cpu(), qformats.encode(x.cpu(), f).data)
    s = codec.dequant_sum(bufs, f, (6, 64))
    assert torch.equal(s.cpu(), ops.reference_dequant_sum(torch.stack(bufs).cpu(), "nvfp4", [6, 64], torch.float32))
    assert torch.equal(codec.dequant_sum_requant(bufs, f, (6, 64)).cpu(),
                       ops.reference_dequant_sum_requant(torch.stack(bufs).cpu(), "nvfp4", [6, 64])[0])
