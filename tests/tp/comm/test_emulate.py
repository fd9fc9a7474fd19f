"""The single-process emulator: its arithmetic, written out independently here, and its checks."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qformats
import tp
from tp.comm.emulate import predicted_error


def _shards(world, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 2).to(dtype) for _ in range(world)]


def _qdq32(x, fmt):
    """fp32 value a receiver decodes (independent of tp: straight through the qformats API)."""
    return qformats.decode(qformats.encode(x, fmt), torch.float32)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4/b32/bf16", "flash_int4", "nvfp4"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_is_rank_order_fp32_sum_of_decoded_shards(fmt, world):
    shards = _shards(world, (6, 96), torch.bfloat16)
    acc = _qdq32(shards[0], fmt)
    for s in shards[1:]:
        acc = acc + _qdq32(s, fmt)
    assert torch.equal(tp.emulate_all_reduce(shards, fmt, "gather"), acc.to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["mxfp4", "flash_int4"])
@pytest.mark.parametrize("world,rows", [(2, 6), (4, 5), (3, 1)])
def test_two_shot_reduces_chunks_then_requantises(fmt, world, rows):
    shards = _shards(world, (rows, 64))
    c = -(-rows // world)
    padded = [torch.cat([s, s.new_zeros(c * world - rows, 64)]) for s in shards]
    out = []
    for j in range(world):
        acc = _qdq32(padded[0][j * c : (j + 1) * c], fmt)
        for p in padded[1:]:
            acc = acc + _qdq32(p[j * c : (j + 1) * c], fmt)
        out.append(_qdq32(acc, fmt))
    expect = torch.cat(out)[:rows]
    got = tp.emulate_all_reduce(shards, fmt, "two_shot")
    assert torch.equal(got, expect)
    assert not torch.equal(got, tp.emulate_all_reduce(shards, fmt, "gather"))  # quantised twice


def test_world_one_is_quantize_dequantize():
    (x,) = _shards(1, (4, 64), torch.bfloat16)
    for algo in ("gather", "two_shot"):
        assert torch.equal(tp.emulate_all_reduce([x], "mxfp4", algo), qformats.quantize_dequantize(x, "mxfp4"))
        assert torch.equal(tp.all_reduce(x, "mxfp4", algorithm=algo), qformats.quantize_dequantize(x, "mxfp4"))
    assert torch.equal(tp.all_reduce(x, None), x)


def test_uncompressed_and_threshold_are_the_plain_sum():
    shards = _shards(3, (4, 64))
    exact = shards[0] + shards[1] + shards[2]
    assert torch.equal(tp.emulate_all_reduce(shards, None), exact)
    assert torch.equal(tp.emulate_all_reduce(shards, "mxfp4", min_bytes=4 * 64 * 4 + 1), exact)
    assert not torch.equal(tp.emulate_all_reduce(shards, "mxfp4", min_bytes=4 * 64 * 4), exact)


def test_plain_sum_is_exact_for_int64_and_float64():
    """The uncompressed path sums integers exactly and float64 in float64, as the backends do
    (through fp32, 2**40 + 1 + 2**41 + 2 lost its low bits)."""
    a, b = torch.tensor([2**40 + 1, -(2**62), 7]), torch.tensor([2**41 + 2, 2**62 - 1, -7])
    assert torch.equal(tp.emulate_all_reduce([a, b]), torch.tensor([2**40 + 1 + 2**41 + 2, -1, 0]))
    assert tp.emulate_all_reduce([a, b]).dtype == torch.int64
    f64 = torch.float64
    f = [torch.tensor([2.0**40 + 1, 1e-300], dtype=f64), torch.tensor([2.0**41 + 2, 1e-300], dtype=f64)]
    assert torch.equal(tp.emulate_all_reduce(f), torch.tensor([2.0**40 + 2.0**41 + 3, 2e-300], dtype=torch.float64))
    i8 = [torch.tensor([100], dtype=torch.int8), torch.tensor([27], dtype=torch.int8)]
    assert tp.emulate_all_reduce(i8).item() == 127
    # fp16/bf16/fp32 still accumulate in fp32 (the compressed paths' sum)
    h = [torch.tensor([2048.0], dtype=torch.float16), torch.tensor([1.0], dtype=torch.float16),
         torch.tensor([1.0], dtype=torch.float16)]
    assert tp.emulate_all_reduce(h).item() == 2050.0  # fp16 accumulation would give 2048


@given(
    world=st.integers(1, 4),
    rows=st.integers(1, 5),
    width=st.sampled_from([32, 40, 64, 100]),
    fmt=st.sampled_from(["mxfp4", "int4_b32", "fp5_b64", "mxint8"]),
    seed=st.integers(0, 2**16),
)
def test_error_within_format_bound(world, rows, width, fmt, seed):
    """gather: each shard is rounded once, so the error is at most sum_i bound * blockmax(x_i)."""
    shards = _shards(world, (rows, width), seed=seed)
    f = qformats.as_format(fmt)
    err = predicted_error(shards, f, "gather")
    pad = -width % f.block
    bound = torch.zeros(rows, width)
    for s in shards:
        b = torch.nn.functional.pad(s.abs(), (0, pad)).reshape(rows, -1, f.block).amax(-1, keepdim=True)
        bound += (b.expand(-1, -1, f.block).reshape(rows, -1)[:, :width]) * f.relative_error_bound
    assert (err <= bound * (1 + 1e-6) + 1e-30).all()


def test_nan_is_not_hidden():
    shards = _shards(2, (2, 64))
    shards[1][0, 5] = float("nan")
    y = tp.emulate_all_reduce(shards, "mxfp4")
    assert torch.isnan(y[0, :32]).all() and torch.isfinite(y[1]).all() and torch.isfinite(y[0, 32:]).all()


@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
@pytest.mark.parametrize("fmt,dtype", [("int4/b32/bf16", torch.bfloat16), ("fp4_e2m1/b32/fp16", torch.float16)])
def test_finite_partials_at_the_dtype_max_sum_finite(algorithm, fmt, dtype):
    """One rank at the dtype's max, the others 0: the exact sum is finite, so the compressed one
    must be (the decoded value rounds past the max: the cast saturates; issue 14)."""
    big = torch.full((6, 64), torch.finfo(dtype).max, dtype=dtype)
    big[1] *= -1
    shards = [big, torch.zeros_like(big), torch.zeros_like(big)]
    outs = [tp.emulate_all_reduce(shards, fmt, algorithm), tp.emulate_all_gather(shards, fmt),
            *tp.emulate_reduce_scatter(shards, fmt)]
    for y in outs:
        assert y.dtype == dtype and torch.isfinite(y).all(), (algorithm, fmt)


def test_reduce_scatter_and_all_gather_emulation():
    shards = _shards(2, (4, 64))
    rs = tp.emulate_reduce_scatter(shards, "mxfp4")
    for j in range(2):
        expect = _qdq32(shards[0][2 * j : 2 * j + 2], "mxfp4") + _qdq32(shards[1][2 * j : 2 * j + 2], "mxfp4")
        assert torch.equal(rs[j], expect)
    ag = tp.emulate_all_gather(shards, "mxfp4")
    assert torch.equal(ag, torch.cat([_qdq32(s, "mxfp4") for s in shards]))
    with pytest.raises(ValueError, match="must divide by the world size"):
        tp.emulate_reduce_scatter(_shards(3, (4, 64)), "mxfp4")


def test_bad_input():
    shards = _shards(2, (4, 64))
    with pytest.raises(ValueError, match="empty"):
        tp.emulate_all_reduce([], "mxfp4")
    with pytest.raises(TypeError, match="list of tensors"):
        tp.emulate_all_reduce(shards[0], "mxfp4")
    with pytest.raises(ValueError, match="same shape and dtype"):
        tp.emulate_all_reduce([shards[0], shards[1][:2]], "mxfp4")
    with pytest.raises(ValueError, match="same shape and dtype"):
        tp.emulate_all_reduce([shards[0], shards[1].to(torch.bfloat16)], "mxfp4")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tp.emulate_all_reduce([s.to(torch.int32) for s in shards], "mxfp4")
    with pytest.raises(ValueError, match="unknown algorithm"):
        tp.emulate_all_reduce(shards, "mxfp4", "ring")
    with pytest.raises(ValueError, match="unsupported communication format"):
        tp.emulate_all_reduce(shards, "fp9_e9m9/b32/e8m0")
    with pytest.raises(ValueError, match="scalar"):
        tp.emulate_all_reduce([torch.tensor(1.0)] * 2, "mxfp4")
    with pytest.raises(ValueError, match="features"):
        tp.emulate_all_reduce(shards, qformats.static_outlier_format("int4", (0,), [1.0] * 10))


def test_wire_bytes():
    s = tp.wire_bytes((8, 4096), torch.bfloat16, "mxfp4", "gather", 2)
    assert s.sent_bytes == qformats.as_format("mxfp4").nbytes((8, 4096)) and s.plain_bytes == 8 * 4096 * 2
    s4 = tp.wire_bytes((8, 4096), torch.bfloat16, "mxfp4", "two_shot", 4)
    assert s4.sent_bytes == 2 * 3 * qformats.as_format("mxfp4").nbytes((2, 4096))


def test_two_shot_second_format_is_the_sum_of_first_hop_decodes_requantised():
    """An oracle outside the emulator: qdq(fp32 rank-order sum of qdq(x_r, fmt), second)."""
    g = torch.Generator().manual_seed(7)
    shards = [torch.randn(6, 80, generator=g) * (1 + 3 * torch.rand(80, generator=g)) for _ in range(4)]
    for fmt, second in (("mxfp4", "mxfp8_e4m3"), ("int4/b32/bf16", "int8/b32/bf16")):
        acc = qformats.quantize_dequantize(shards[0], fmt).float()
        for x in shards[1:]:
            acc = acc + qformats.quantize_dequantize(x, fmt).float()
        got = tp.emulate_all_reduce(shards, fmt, "two_shot", second_fmt=second)
        assert torch.equal(got, qformats.quantize_dequantize(acc, second))
        # the finer second hop is closer to the exact sum than re-quantising in the first format
        exact = tp.plain_sum(shards)
        one = tp.emulate_all_reduce(shards, fmt, "two_shot")
        assert (got - exact).abs().mean() < (one - exact).abs().mean()
    with pytest.raises(ValueError, match="no second hop"):
        tp.emulate_all_reduce(shards, "mxfp4", "gather", second_fmt="mxfp8_e4m3")
    # fused computes two_shot's bits from 4 ranks, second hop included; at 3 ranks it is the gather
    assert torch.equal(tp.emulate_all_reduce(shards, "mxfp4", "fused", second_fmt="mxfp8_e4m3"),
                       tp.emulate_all_reduce(shards, "mxfp4", "two_shot", second_fmt="mxfp8_e4m3"))
    with pytest.raises(ValueError, match="runs the one-shot gather"):
        tp.emulate_all_reduce(shards[:3], "mxfp4", "fused", second_fmt="mxfp8_e4m3")
