"""Rotated formats (``+h{N}``) in lowering: TorchCodec and the Triton kernels (interpreted on the
CPU, compiled on a GPU) are bitwise the reference. (test_kernels runs the rotated presets and
more rotated formats through every kernel step too.)"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowering
import qformats
from lowering import ops, torch_codec
from lowering.codec import ReferenceCodec
from lowering import launch
from lowering.constants import lower, unsupported_reason
from lowering.torch_codec import TorchCodec
from qformats import Format

from .test_torch_codec import DTYPES, _bits, _check, adversarial

ROTATED = [Format.parse(s) for s in (
    "mxfp4_h32", "int4_b32_bf16_h32", "fp4_e2m1/b64/e8m0+h64", "int4/b64/e8m0+h16", "uint4/b32/fp16+zp+h8",
    "uint4/b16/bf16+zp+h16", "fp4_e2m1/b16/e4m3+ts+h16", "fp4_e2m1/b32/e8m0+h2+o[3,40]", "int4/b16/bf16+h4+o[0,9]",
    "fp8_e4m3/b24/fp32+h8", "fp6_e3m2/b32/e8m0+h32")]


def _id(f):
    return str(f)


@pytest.mark.parametrize("f", ROTATED, ids=_id)
def test_adversarial_partial_blocks_and_nonfinite(f):
    """Blocks across the dtype's range (ties, subnormals, +-0, 1e38 and the dtype's max, whose
    butterfly sums overflow), NaN/+-Inf, partial trailing blocks (width 203), every dtype."""
    for i, dt in enumerate(DTYPES):
        _check(adversarial(f, 6, 203, dt, seed=17 + i, nonfinite=i != 1), f)
        _check(adversarial(f, 4, 128, dt, seed=29 + i, nonfinite=i == 1), f)


@pytest.mark.parametrize("f", ROTATED[:4] + ROTATED[6:8], ids=_id)
@settings(max_examples=15)
@given(rows=st.integers(1, 5), width=st.integers(1, 260), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1), nonfinite=st.booleans(), outlier=st.floats(0, 1e6))
def test_random_shapes_and_outliers(f, rows, width, dtype, seed, nonfinite, outlier):
    if f.outliers:
        width = max(width, f.outliers[-1] + 1)
    x = adversarial(f, rows, width, dtype, seed, nonfinite)
    x[0, seed % width] = outlier  # one large value in a block of otherwise ordinary ones
    _check(x.to(dtype), f)


@pytest.mark.parametrize("f", ROTATED[:3] + ROTATED[4:5] + ROTATED[7:8], ids=_id)
def test_dequant_sum_and_dequant_sum_requant_equal_the_reference_codec(f):
    ref, fast = ReferenceCodec(), TorchCodec()
    shape = (5, 200)
    bufs = [ref.quantize(adversarial(f, *shape, torch.float32, 40 + i, nonfinite=i == 1), f) for i in range(4)]
    for n in (1, 2, 4):
        want = ref.dequant_sum(bufs[:n], f, shape)
        assert torch.equal(_bits(fast.dequant_sum(bufs[:n], f, shape)), _bits(want))
        assert torch.equal(fast.dequant_sum_requant(bufs[:n], f, shape), ref.dequant_sum_requant(bufs[:n], f, shape))
    g = torch.Generator().manual_seed(1)  # arbitrary wire bytes too (NaN payloads through the butterfly)
    buf = torch.randint(0, 256, (f.nbytes(shape),), generator=g, dtype=torch.uint8)
    assert torch.equal(_bits(torch_codec.dequantize(buf, f, shape)), _bits(ref.dequantize(buf, f, shape)))


def test_torch_codec_runs_its_fast_path_for_rotated_formats():
    for f in ROTATED:
        assert torch_codec.fallback_reason(f) is None, f


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _same(a, b):
    """Bitwise, NaNs by position (a GPU's canonical NaN payload differs from the CPU's)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and torch.equal(_bits(a.masked_fill(an, 0)), _bits(b.masked_fill(bn, 0)))


@pytest.mark.parametrize("f", [f for f in ROTATED if not f.outliers], ids=_id)
def test_kernels_run_rotation_bitwise_the_reference(f):
    """Every kernel step of a rotated format: quantize (and its decode), dequantize, dequant-sum
    of 1-3 buffers (+ residual) and dequant-sum-requant, on adversarial inputs whose butterfly
    sums overflow, partial blocks (width 203) and whole-block rows (width 256)."""
    assert unsupported_reason(f) is None and lowering.path(f, DEV) in ("kernel", "interpreter")
    for width in (203, 256):
        kc = lower(f, width, DEV)
        xs = [adversarial(f, 6, width, dt, seed=3 + 7 * i + width, nonfinite=i == 1).to(DEV)
              for i, dt in enumerate(DTYPES)]
        bufs = []
        for x, out in zip(xs, DTYPES[1:] + DTYPES[:1]):
            buf, deq = launch.quantize(x, kc, deq_dtype=out)
            ref = ops.reference_quantize(x.cpu(), f)
            assert torch.equal(buf.cpu(), ref), (width, x.dtype)
            assert _same(deq.cpu(), ops.reference_dequantize(ref, f, [6, width], out)), (width, x.dtype, out)
            bufs.append(buf)
        bufs = torch.stack(bufs)
        res = torch.randn(6, width).to(DEV)
        for n in (1, 2, 3):
            for dt in DTYPES:
                got = launch.dequantize(bufs[:n], kc, 6, width, dt, res if n == 2 else None)
                want = ops.reference_dequant_sum(bufs[:n].cpu(), f, [6, width], dt, res.cpu() if n == 2 else None)
                assert _same(got.cpu(), want), (width, n, dt)
            b2, d2 = launch.quantize(None, kc, shape=(6, width), bufs=bufs[:n], deq_dtype=torch.bfloat16)
            rb, rd = ops.reference_dequant_sum_requant(bufs[:n].cpu(), f, [6, width], torch.bfloat16)
            assert torch.equal(b2.cpu(), rb) and _same(d2.cpu(), rd), (width, n)


def test_ops_run_rotated_formats_on_the_kernels():
    x = torch.randn(4, 96)
    x[1, 3] = 30.0
    for f in ("mxfp4_h32", "int4_b32_bf16_h32"):
        assert lowering.path(f, "cuda") == "kernel"
        buf = torch.ops.qformats.quantize(x, f)
        assert torch.equal(buf, qformats.encode(x, f).data)
        dec = torch.ops.qformats.dequantize(buf, f, [4, 96], torch.bfloat16)
        assert torch.equal(_bits(dec), _bits(ops.reference_dequantize(buf, f, [4, 96], torch.bfloat16)))
        bufs = torch.stack([buf, qformats.encode(-2 * x, f).data])
        s = torch.ops.qformats.dequant_sum(bufs, f, [4, 96], torch.float32)
        assert torch.equal(_bits(s), _bits(ops.reference_dequant_sum(bufs, f, [4, 96], torch.float32)))
        b2, d2 = torch.ops.qformats.dequant_sum_requant(bufs, f, [4, 96], torch.float32)
        rb, rd = ops.reference_dequant_sum_requant(bufs, f, [4, 96], torch.float32)
        assert torch.equal(b2, rb) and torch.equal(_bits(d2), _bits(rd))
    # the rotated format is encoded, not the plain one
    assert not torch.equal(torch.ops.qformats.quantize(x, "mxfp4_h32"), qformats.encode(x, "mxfp4").data)
