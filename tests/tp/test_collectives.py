"""Distributed compressed collectives on 2 and 4 fork-started gloo ranks vs the emulator, bit for bit."""
import pytest
import torch

import qformats
import tp
from tests.tp.multirank import MultiRankError, RankError, run_ranks

FORMATS = ["mxfp4", "int4/b32/bf16", "flash_int4", "nvfp4", "fp3_b64", "int8/row/fp32"]
# static outlier format (Dong et al.) for rows of 80 features: 2 outliers, 78 static scales
STATIC = qformats.static_outlier_format("int4", (3, 41), [6.0 + 0.05 * i for i in range(78)])
SHAPES = [(5, 80), (2, 3, 80), (1, 80)]  # rows not divisible by 4; H = 80 not a multiple of 32 or 64


def _shard(rank, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(shape, generator=g) * (1 + 3 * torch.rand(shape[-1], generator=g))
    return x.to(dtype)


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t


def _all_reduce_cases(rank, world, algorithm):
    out = {}
    for fmt in FORMATS + [STATIC]:
        for shape in SHAPES:
            for dtype in (torch.bfloat16, torch.float32):
                x = _shard(rank, shape, dtype)
                y = tp.all_reduce(x, fmt, algorithm=algorithm)
                assert y.shape == x.shape and y.dtype == x.dtype
                out[(str(fmt), shape, str(dtype))] = y
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
def test_all_reduce_equals_emulator_bitwise(world, algorithm):
    results = run_ranks(_all_reduce_cases, world, algorithm)
    assert len(results[0]) == len(FORMATS + [STATIC]) * len(SHAPES) * 2
    for key, y0 in results[0].items():
        fmt, shape, dtype = key
        dt = getattr(torch, dtype.replace("torch.", ""))
        shards = [_shard(r, shape, dt) for r in range(world)]
        expect = tp.emulate_all_reduce(shards, fmt, algorithm)
        for r in range(world):
            assert torch.equal(_bits(results[r][key]), _bits(y0)), f"rank {r} differs from rank 0 for {key}"
        assert torch.equal(_bits(y0), _bits(expect)), f"distributed != emulator for {key}"
        # and the compression did something: not the exact sum, but within the format's error bound
        exact = tp.plain_sum([s.float() for s in shards])
        assert not torch.equal(y0.float(), exact)
        f = qformats.as_format(fmt)
        if f.scale != "static":
            rb = f.relative_error_bound
            bound = rb * sum(s.float().abs().max() for s in shards)  # one rounding per shard
            if algorithm == "two_shot":
                bound = bound + rb * (exact.abs().max() + bound)  # plus the re-quantisation of the sum
            bound = bound + exact.abs().max() * 2**-7  # the final cast to bf16
            assert (y0.float() - exact).abs().max() <= bound, key


def _int_shard(rank, shape, dtype):
    g = torch.Generator().manual_seed(rank)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


def _plain_cases(rank, world):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = _int_shard(rank, (6, 40), dtype)
        out[("none", str(dtype))] = tp.all_reduce(x, None)
        # below the threshold a format is ignored: the plain all-reduce
        out[("thr", str(dtype))] = tp.all_reduce(x, "mxfp4", threshold_bytes=x.numel() * x.element_size() + 1)
    out["int"] = tp.all_reduce(torch.full((3,), rank + 1, dtype=torch.int64), None)
    xt = _int_shard(rank, (40, 6), torch.float32).t()  # non-contiguous input
    out["noncontig"] = tp.all_reduce(xt, None)
    out["noncontig_mxfp4"] = tp.all_reduce(xt, "mxfp4", algorithm="two_shot")
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_uncompressed_equals_plain_sum(world):
    results = run_ranks(_plain_cases, world)
    for dtype in (torch.float32, torch.bfloat16):
        # integer-valued data: every summation order is exact, so the backend's order does not matter
        exact = sum(_int_shard(r, (6, 40), dtype).double() for r in range(world))
        for r in range(world):
            for k in ("none", "thr"):
                y = results[r][(k, str(dtype))]
                assert y.dtype == dtype and torch.equal(y.double(), exact)
    assert all(torch.equal(res["int"], torch.full((3,), world * (world + 1) // 2)) for res in results)
    xts = [_int_shard(r, (40, 6), torch.float32).t() for r in range(world)]
    for res in results:
        assert torch.equal(res["noncontig"], sum(xts))
        assert torch.equal(res["noncontig_mxfp4"], tp.emulate_all_reduce(xts, "mxfp4", "two_shot"))


def _gather_scatter_cases(rank, world):
    out = {}
    for fmt in ("mxfp4", "flash_int4", None):
        x = _shard(rank, (world * 3, 48), torch.bfloat16, seed=7)
        out[("ag", fmt)] = tp.all_gather(x, fmt)
        out[("rs", fmt)] = tp.reduce_scatter(x, fmt)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_all_gather_and_reduce_scatter(world):
    results = run_ranks(_gather_scatter_cases, world)
    shards = [_shard(r, (world * 3, 48), torch.bfloat16, seed=7) for r in range(world)]
    for fmt in ("mxfp4", "flash_int4"):
        ag = tp.emulate_all_gather(shards, fmt)
        rs = tp.emulate_reduce_scatter(shards, fmt)
        assert ag.shape == (world * world * 3, 48) and not torch.equal(ag, torch.cat(shards))
        for r in range(world):
            assert torch.equal(_bits(results[r][("ag", fmt)]), _bits(ag))
            assert torch.equal(_bits(results[r][("rs", fmt)]), _bits(rs[r]))
    for r in range(world):
        assert torch.equal(results[r][("ag", None)], torch.cat(shards))
        exact = tp.plain_sum([s.float() for s in shards]).reshape(world, 3, 48)[r]
        assert torch.allclose(results[r][("rs", None)].float(), exact, rtol=2e-2, atol=2e-2)


class CountingCodec(tp.Codec):
    """The reference arithmetic plus a visible change (decode adds 1), to prove the seam is used."""

    name = "counting"

    def decode(self, buf, fmt, shape):
        return super().decode(buf, fmt, shape) + 1.0


def _codec_case(rank, world, algorithm):
    return tp.all_reduce(_shard(rank, (4, 64), torch.float32), "mxfp4", algorithm=algorithm, codec=CountingCodec())


@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
def test_codec_seam_is_the_only_arithmetic(algorithm):
    res = run_ranks(_codec_case, 2, algorithm)
    shards = [_shard(r, (4, 64), torch.float32) for r in range(2)]
    expect = tp.emulate_all_reduce(shards, "mxfp4", algorithm, codec=CountingCodec())
    ref = tp.emulate_all_reduce(shards, "mxfp4", algorithm)
    assert torch.equal(res[0], expect) and torch.equal(res[1], expect)
    assert not torch.equal(expect, ref)


def test_set_codec_rejects_incomplete_objects():
    with pytest.raises(TypeError, match="decode_sum"):
        tp.set_codec(type("Half", (), {"encode": lambda *a: None, "decode": lambda *a: None})())
    old = tp.set_codec(CountingCodec())
    try:
        assert isinstance(tp.get_codec(), CountingCodec)
    finally:
        tp.set_codec(old)


# ---- bad input: every rank raises the same clear error, nobody hangs ---------------------------
class ShortCodec(tp.Codec):
    def encode(self, x, fmt):
        return super().encode(x, fmt)[:-1]


def _bad_inputs(rank, world, case):
    x = _shard(rank, (4, 64), torch.float32)
    if case == "int_dtype":
        tp.all_reduce(x.to(torch.int32), "mxfp4")
    elif case == "fp8_dtype":
        tp.all_reduce(x.to(torch.float8_e4m3fn), "mxfp4")
    elif case == "static_width":
        tp.all_reduce(x, STATIC)  # calibrated for 80 features, x has 64
    elif case == "format":
        tp.all_reduce(x, "fp4_e2m1/b33/e8m0")
    elif case == "algorithm":
        tp.all_reduce(x, "mxfp4", algorithm="ring")
    elif case == "scatter_rows":
        tp.reduce_scatter(x[:3], "mxfp4")
    elif case == "shape_mismatch":
        tp.all_reduce(x[: 2 + rank], "mxfp4", validate=True)
    elif case == "dtype_mismatch":
        tp.all_reduce(x if rank == 0 else x.to(torch.bfloat16), "mxfp4", algorithm="two_shot", validate=True)
    elif case == "short_codec":
        tp.all_reduce(x, "mxfp4", codec=ShortCodec())
    return "no error"


BAD = {
    "int_dtype": (TypeError, "float32, bfloat16 or float16"),
    "fp8_dtype": (TypeError, "float32, bfloat16 or float16"),
    "static_width": (ValueError, "80 features"),
    "format": (ValueError, "unsupported communication format"),
    "algorithm": (ValueError, "unknown algorithm"),
    "scatter_rows": (ValueError, "must divide by the world size"),
    "shape_mismatch": (ValueError, "disagree with rank 0 on .*shape"),
    "dtype_mismatch": (ValueError, "disagree with rank 0 on dtype"),
    "short_codec": (RuntimeError, "expected uint8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_on_every_rank(case):
    import re

    etype, pattern = BAD[case]
    res = run_ranks(_bad_inputs, 2, case, timeout=30, expect_errors=True)
    for r in res:
        assert isinstance(r, RankError), f"{case}: a rank returned without raising"
        assert r.type == etype.__name__ and re.search(pattern, r.message), str(r)


def test_validate_passes_when_ranks_agree():
    res = run_ranks(lambda r, w: tp.all_reduce(_shard(r, (4, 64), torch.float32), "mxfp4", validate=True), 2)
    assert torch.equal(res[0], res[1])


# ---- the helper itself must be able to fail ------------------------------------------------------
def test_helper_reports_a_failing_rank():
    def f(rank, world):
        if rank == 1:
            raise KeyError("boom")
        return rank

    with pytest.raises(MultiRankError, match="rank 1: KeyError"):
        run_ranks(f, 2, timeout=20)


def test_helper_times_out_on_a_hang():
    import torch.distributed as dist

    def f(rank, world):
        if rank == 0:
            dist.barrier()  # rank 1 never joins
        return rank

    with pytest.raises(MultiRankError, match=r"ranks \[0\] of 2 did not finish"):
        run_ranks(f, 2, timeout=3)
