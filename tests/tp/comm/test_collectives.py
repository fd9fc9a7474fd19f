"""Distributed compressed collectives on 2 and 4 fork-started gloo ranks vs the emulator, bit for bit."""
import pytest
import torch

import qformats
import tp
from tests.tp.multirank import MultiRankError, RankError, run_ranks

FORMATS = ["mxfp4", "int4/b32/bf16", "flash_int4", "nvfp4", "fp3_b64", "int8/row/fp32",
           "int4/b64/bf16+h32+o[3,41]"]  # the eval's outlier_int4_dyn_h32: rotation around bf16 outliers
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
        if f.scale != "static" and not f.rotation:  # (a rotated format's bound holds in rotated coordinates)
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
        out[("thr", str(dtype))] = tp.all_reduce(x, "mxfp4", min_bytes=x.numel() * x.element_size() + 1)
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


class CountingCodec(tp.ReferenceCodec):
    """The reference arithmetic plus a visible change (dequantize adds 1), to prove the seam is used."""

    name = "counting"

    def dequantize(self, buf, fmt, shape):
        return super().dequantize(buf, fmt, shape) + 1.0


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
    with pytest.raises(TypeError, match="dequant_sum"):
        tp.set_codec(type("Half", (), {"quantize": lambda *a: None, "dequantize": lambda *a: None})())
    old = tp.set_codec(CountingCodec())
    try:
        assert isinstance(tp.get_codec(), CountingCodec)
    finally:
        tp.set_codec(old)


# ---- bad input: every rank raises the same clear error, nobody hangs ---------------------------
class ShortCodec(tp.ReferenceCodec):
    def quantize(self, x, fmt):
        return super().quantize(x, fmt)[:-1]


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


def _validated(rank, world):
    return tp.all_reduce(_shard(rank, (4, 64), torch.float32), "mxfp4", validate=True)


def test_validate_passes_when_ranks_agree():
    res = run_ranks(_validated, 2)
    assert torch.equal(res[0], res[1])


# ---- the helper itself must be able to fail ------------------------------------------------------
# (module-level rank functions: where CUDA exists, ranks come from a forkserver and fn is pickled)
def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("boom")
    return rank


def _hang_on_rank_0(rank, world):
    import torch.distributed as dist

    if rank == 0:
        dist.barrier()  # rank 1 never joins
    return rank


def test_helper_reports_a_failing_rank():
    with pytest.raises(MultiRankError, match="rank 1: KeyError"):
        run_ranks(_raise_on_rank_1, 2, timeout=20)


def test_helper_times_out_on_a_hang():
    with pytest.raises(MultiRankError, match=r"ranks \[0\] of 2 did not finish"):
        run_ranks(_hang_on_rank_0, 2, timeout=3)


def test_helper_refuses_a_lambda_where_ranks_are_not_forked():
    with pytest.raises(TypeError, match="lambda or a local function"):
        run_ranks(lambda r, w: r, 2, method="forkserver")


def test_helper_picks_a_cuda_safe_start_method(monkeypatch):
    """Forked ranks cannot use CUDA once the parent touched it: where CUDA exists, no fork."""
    from tests.tp import multirank

    monkeypatch.delenv("TP_TEST_START_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert multirank.start_method() == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert multirank.start_method() == "fork"
    monkeypatch.setenv("TP_TEST_START_METHOD", "vfork")
    with pytest.raises(ValueError, match="TP_TEST_START_METHOD='vfork'"):
        multirank.start_method()


def test_helper_forkserver_ranks_agree():
    """The path a GPU machine takes: ranks from a forkserver, fn pickled by reference."""
    res = run_ranks(_validated, 2, method="forkserver", timeout=120)
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], tp.emulate_all_reduce(
        [_shard(r, (4, 64), torch.float32) for r in range(2)], "mxfp4"))


# ---- ranks that disagree, under the default validate=None: the same ValueError on every rank ----
# (before the wire headers these returned garbage, NaNs on some ranks, or a gloo SIGABRT)
def _odd(rank, world):
    return rank == world - 1  # the last rank differs from the others


def _mismatch(rank, world, case):
    odd = _odd(rank, world)
    x = _shard(rank, (4, 64), torch.float32)
    if case == "shape_same_bytes":  # (4, 64) vs (2, 128): one byte count, two meanings
        tp.all_reduce(x.reshape(2, 128) if odd else x, "mxfp4")
    elif case == "shape_same_bytes_two_shot":
        tp.all_reduce(x.reshape(2, 128) if odd else x, "mxfp4", algorithm="two_shot")
    elif case == "format_same_bytes":  # mxfp4 vs int4/b32/e8m0: 4.25 bits each
        tp.all_reduce(x, "int4_b32" if odd else "mxfp4")
    elif case == "dtype_same_shape":
        tp.all_reduce(x.to(torch.bfloat16) if odd else x.to(torch.float16), "mxfp4")
    elif case == "rows_other_bytes":  # (4, 64) vs (8, 64)
        tp.all_reduce(torch.cat([x, x]) if odd else x, "mxfp4")
    elif case == "format_other_bytes":  # mxfp4 vs mxfp8
        tp.all_reduce(x, "mxfp8_e4m3" if odd else "mxfp4", algorithm="two_shot")
    elif case == "second_fmt":  # one first hop, another second hop: the all-gather sizes differ
        tp.all_reduce(x, "mxfp4", algorithm="two_shot", second_fmt="mxfp8_e4m3" if odd else None)
    elif case == "algorithm":  # all-gather vs all-to-all on the wire
        tp.all_reduce(x, "mxfp4", algorithm="two_shot" if odd else "gather")
    elif case == "op":
        tp.all_gather(x, "mxfp4") if odd else tp.all_reduce(x, "mxfp4")
    elif case == "reduce_scatter_shape":
        tp.reduce_scatter(x.new_zeros(world * 4, 64) if odd else x.new_zeros(world * 2, 64), "mxfp4")
    elif case == "after_agreement":  # agree twice, then the odd rank brings a new, larger call
        for _ in range(2):
            tp.all_reduce(x, "mxfp4")
        tp.all_reduce(torch.cat([x, x]) if odd else x, "mxfp4")
    elif case == "after_agreement_smaller":
        for _ in range(2):
            tp.all_reduce(x, "mxfp4", algorithm="two_shot")
        tp.all_reduce(x[:2] if odd else x, "mxfp4", algorithm="two_shot")
    elif case == "others_new":  # the odd rank repeats the agreed call, the others bring a new one
        tp.all_reduce(x, "mxfp4")
        tp.all_reduce(x if odd else torch.cat([x, x, x]), "mxfp4")
    return "no error"


MISMATCH = ["shape_same_bytes", "shape_same_bytes_two_shot", "format_same_bytes", "dtype_same_shape",
            "rows_other_bytes", "format_other_bytes", "second_fmt", "algorithm", "op", "reduce_scatter_shape", "after_agreement",
            "after_agreement_smaller", "others_new"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", MISMATCH)
def test_disagreeing_ranks_all_raise_the_same_error_by_default(case, world):
    res = run_ranks(_mismatch, world, case, timeout=30, expect_errors=True)
    for r in res:
        assert isinstance(r, RankError), f"{case}: a rank returned {r!r} without raising"
        # (WireError: tp.comm.wirecheck's ValueError)
        assert r.type == "WireError" and "ranks disagree on compressed collective" in r.message, str(r)
    assert len({r.message for r in res}) == 1, [r.message for r in res]  # built from every rank's header


def test_a_second_format_disagreement_names_both_hops():
    res = run_ranks(_mismatch, 2, "second_fmt", timeout=30, expect_errors=True)
    assert "fp4_e2m1/b32/e8m0->fp8_e4m3/b32/e8m0" in res[0].message, res[0].message


SECOND_HOPS = [("mxfp4", "mxfp8_e4m3"), ("int4/b32/bf16", "int8/b32/bf16")]


def _second_hop_cases(rank, world):
    out = {}
    for fmt, second in SECOND_HOPS:
        for shape in SHAPES[:2]:
            for dtype in (torch.bfloat16, torch.float32):
                x = _shard(rank, shape, dtype)
                out[(fmt, shape, str(dtype))] = tp.all_reduce(x, fmt, algorithm="two_shot", second_fmt=second)
    x = _shard(rank, SHAPES[0], torch.float32)  # the per-call check carries the second format too
    out["validated"] = tp.all_reduce(x, "mxfp4", algorithm="two_shot", second_fmt="mxfp8_e4m3", validate=True)
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_shot_second_format_equals_emulator_bitwise(world):
    results = run_ranks(_second_hop_cases, world, timeout=60)
    seconds = dict(SECOND_HOPS)
    for key, y0 in results[0].items():
        fmt, shape, dtype = key if key != "validated" else ("mxfp4", SHAPES[0], "torch.float32")
        dt = getattr(torch, dtype.replace("torch.", ""))
        shards = [_shard(r, shape, dt) for r in range(world)]
        expect = tp.emulate_all_reduce(shards, fmt, "two_shot", second_fmt=seconds[fmt])
        for r in range(world):
            assert torch.equal(_bits(results[r][key]), _bits(y0)), f"rank {r} differs from rank 0 for {key}"
        assert torch.equal(_bits(y0), _bits(expect)), f"distributed != emulator for {key}"
        assert not torch.equal(_bits(y0), _bits(tp.emulate_all_reduce(shards, fmt, "two_shot"))), key


def test_second_format_where_there_is_no_second_hop():
    x = _shard(0, (4, 64), torch.float32)
    with pytest.raises(ValueError, match="no second hop"):
        tp.all_reduce(x, "mxfp4", algorithm="gather", second_fmt="mxfp8_e4m3")
    with pytest.raises(ValueError, match="runs the one-shot gather"):  # fused at W <= 3 (here W = 1)
        tp.all_reduce(x, "mxfp4", algorithm="fused", second_fmt="mxfp8_e4m3")
    with pytest.raises(ValueError, match="needs a first-hop format"):
        tp.all_reduce(x, None, algorithm="two_shot", second_fmt="mxfp8_e4m3")
    # equal to the first hop's format (or None) is the one-format two_shot, also for gather
    for alg in ("gather", "two_shot"):
        assert torch.equal(tp.all_reduce(x, "mxfp4", algorithm=alg, second_fmt="mxfp4"),
                           tp.all_reduce(x, "mxfp4", algorithm=alg))


def test_wire_bytes_count_the_second_hop_in_its_format():
    # (6, 80) at W=4: chunks of 2 rows; a row is 3 blocks of 32 (80 padded to 96)
    # mxfp4: 48 B codes + 3 B scales = 51 B/row; mxfp8_e4m3: 96 + 3 = 99 B/row
    one = tp.wire_bytes((6, 80), torch.float32, "mxfp4", "two_shot", 4)
    two = tp.wire_bytes((6, 80), torch.float32, "mxfp4", "two_shot", 4, "mxfp8_e4m3")
    assert one.sent_bytes == 3 * (102 + 102) and one.second_fmt is None
    assert two.sent_bytes == 3 * (102 + 198) and two.second_fmt == "fp8_e4m3/b32/e8m0"
    assert tp.wire_bytes((6, 80), torch.float32, "mxfp4", "two_shot", 4, "mxfp4") == one
    with pytest.raises(ValueError, match="no second hop"):
        tp.wire_bytes((6, 80), torch.float32, "mxfp4", "gather", 4, "mxfp8_e4m3")


def _recover(rank, world):
    x = _shard(rank, (4, 64), torch.float32)
    try:
        tp.all_reduce(x[:2] if rank else x, "mxfp4")
    except ValueError:
        pass
    # after a failed call every rank starts over from the same (empty) history
    return [tp.all_reduce(x, "mxfp4", algorithm=a) for a in ("gather", "two_shot", "gather")]


def test_ranks_recover_after_a_disagreement():
    res = run_ranks(_recover, 3, timeout=30)
    shards = [_shard(r, (4, 64), torch.float32) for r in range(3)]
    for got in res:
        assert [torch.equal(g, tp.emulate_all_reduce(shards, "mxfp4", a))
                for g, a in zip(got, ("gather", "two_shot", "gather"))] == [True] * 3


def test_headers_reject_bytes_no_peer_wrote():
    from tp.comm import wirecheck

    sig = wirecheck.Signature("gather", "fp4_e2m1/b32/e8m0", torch.float32, (4, 64), 136)
    ex = wirecheck.Exchange(sig, wirecheck._GroupState(), 7, 2, torch.device("cpu"))
    slots = torch.zeros(2, wirecheck.HEADER_BYTES + 136, dtype=torch.uint8)
    ex.write(slots)
    ex.check(slots)
    stale = torch.zeros(1, wirecheck.HEADER_BYTES, dtype=torch.uint8)
    wirecheck.Exchange(sig, wirecheck._GroupState(), 6, 2, torch.device("cpu")).write(stale)  # an earlier call
    for other in (stale[0], torch.zeros(wirecheck.HEADER_BYTES, dtype=torch.uint8),
                  torch.full((wirecheck.HEADER_BYTES,), 0xA5, dtype=torch.uint8)):
        bad = slots.clone()
        bad[1, : wirecheck.HEADER_BYTES] = other
        with pytest.raises(ValueError, match="rank 1: (no header|gather .*call #6, sent as predicted)"):
            ex.check(bad)


def _steady(rank, world):
    from tp.comm import wirecheck

    x = _shard(rank, (4 * world, 64), torch.float32)
    out = {"ar": [tp.all_reduce(x, "mxfp4") for _ in range(4)]}
    out["checks_ar"] = wirecheck.checks()
    for _ in range(4):  # sequence parallelism: all-gather and reduce-scatter alternate
        tp.all_gather(x, "mxfp4")
        tp.reduce_scatter(x, "mxfp4")
    out["checks_sp"] = wirecheck.checks() - out["checks_ar"]
    out["bare"] = tp.all_reduce(x, "mxfp4", validate=False)  # the same on every rank: no header at all
    out["checks_end"] = wirecheck.checks()
    return out


def test_repeated_calls_are_predicted_and_send_no_check_message():
    res = run_ranks(_steady, 2, timeout=30)
    shards = [_shard(r, (8, 64), torch.float32) for r in range(2)]
    want = tp.emulate_all_reduce(shards, "mxfp4")
    for r in res:
        assert all(torch.equal(y, want) for y in r["ar"] + [r["bare"]])
        # the first call of the group is checked; then only the first two transitions of the pattern
        assert r["checks_ar"] == 1 and r["checks_sp"] == 3 and r["checks_end"] == 4, r


# ---- autograd: straight through, the same gradient for every format (no silent drop) ------------
def _grads(rank, world):
    out = {}
    for fmt in (None, "mxfp4"):
        for algorithm in ("gather", "two_shot"):
            x = _shard(rank, (4, 64), torch.float32).requires_grad_()
            y = tp.all_reduce(x, fmt, algorithm=algorithm)
            (y * torch.arange(64.0)).sum().backward()
            out[(fmt, algorithm)] = (y.detach(), x.grad, y.grad_fn is not None)
    x = _shard(rank, (4, 64), torch.float32).requires_grad_()
    for op in ("all_gather", "reduce_scatter"):
        for fmt in (None, "mxfp4"):
            try:
                getattr(tp, op)(x[:2] if op == "all_gather" else x, fmt)
                out[(op, fmt)] = "no error"
            except RuntimeError as e:
                out[(op, fmt)] = str(e)
        with torch.no_grad():
            getattr(tp, op)(x, "mxfp4")  # fine without grad mode
    return out


def test_all_reduce_is_straight_through_for_every_format():
    res = run_ranks(_grads, 2, timeout=30)
    shards = [_shard(r, (4, 64), torch.float32) for r in range(2)]
    for r in res:
        for algorithm in ("gather", "two_shot"):
            y, g, has_fn = r[("mxfp4", algorithm)]
            assert has_fn and torch.equal(y, tp.emulate_all_reduce(shards, "mxfp4", algorithm))  # bits unchanged
            # the plain all-reduce's gradient: the output's gradient, unchanged, on every rank
            assert torch.equal(g, torch.arange(64.0).expand(4, 64)) and torch.equal(g, r[(None, algorithm)][1])
        for op in ("all_gather", "reduce_scatter"):
            for fmt in (None, "mxfp4"):
                assert "does not propagate gradients" in r[(op, fmt)], r[(op, fmt)]


def test_emulator_is_straight_through_like_the_distributed_all_reduce():
    shards = [_shard(r, (4, 64), torch.bfloat16).requires_grad_() for r in range(3)]
    for algorithm in ("gather", "two_shot"):
        y = tp.emulate_all_reduce(shards, "mxfp4", algorithm)
        with torch.no_grad():
            assert torch.equal(_bits(y), _bits(tp.emulate_all_reduce(shards, "mxfp4", algorithm)))
        y.float().sum().backward()
        for s in shards:
            assert s.grad.dtype == torch.bfloat16 and torch.equal(s.grad, torch.ones_like(s))
            s.grad = None
    with pytest.raises(RuntimeError, match="does not propagate gradients"):
        tp.emulate_all_gather(shards, "mxfp4")
    with pytest.raises(RuntimeError, match="does not propagate gradients"):
        tp.emulate_reduce_scatter([torch.cat([s] * 3) for s in shards], "mxfp4")


def test_quantize_dequantize_is_straight_through():
    x = torch.randn(4, 64, dtype=torch.float16, requires_grad=True)
    y = qformats.quantize_dequantize(x, "mxfp4")
    assert y.grad_fn is not None and torch.equal(y.detach(), qformats.quantize_dequantize(x.detach(), "mxfp4"))
    (y.float() * 3).sum().backward()
    assert x.grad.dtype == torch.float16 and torch.equal(x.grad, torch.full_like(x, 3))


# ---- one-sided errors: an error only one rank sees leaves every rank's next call working ---------
# (before: the failing rank reset its call history alone, and the next identical call sent a
# CHECK message against its peers' data message: gloo size mismatch, SIGABRT or a hang)
class _FaultyCodec:
    """The reference codec, except that its reduce step raises (on the rank that uses it)."""

    def __init__(self):
        self.inner = tp.get_codec()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dequant_sum_requant(self, *a, **k):
        raise RuntimeError("boom: a codec failure on this rank only")


class _FaultyEncoder(_FaultyCodec):
    """The reference codec, except that quantize raises (before this rank's first message)."""

    def quantize(self, *a, **k):
        raise RuntimeError("boom: an encode failure on this rank only")


def _damage_next_receive(rank_from: int):
    """Make this rank's next received gloo message carry a damaged header from ``rank_from``."""
    import torch.distributed as dist

    real = {n: getattr(dist, n) for n in ("all_gather_into_tensor", "all_to_all_single")}

    def wrap(name):
        def f(out, inp, *a, **k):
            r = real[name](out, inp, *a, **k)
            out.view(dist.get_world_size(), -1)[rank_from, 10] ^= 0xFF  # the format-checksum field
            for n, fn in real.items():
                setattr(dist, n, fn)  # once
            return r
        return f

    for n in real:
        setattr(dist, n, wrap(n))


def _one_sided(rank, world, case):
    x = _shard(rank, (4, 64), torch.float32)
    alg = "two_shot" if "two_shot" in case else "gather"
    if case != "check_message":
        tp.all_reduce(x, "mxfp4", algorithm=alg)  # agreed once: the failing call is predicted (data first)
    codec = None
    if rank == 0:
        if case == "codec_two_shot":
            codec = _FaultyCodec()
        elif case.startswith("encode"):
            codec = _FaultyEncoder()
        else:
            _damage_next_receive(1)
    try:
        first = tp.all_reduce(x, "mxfp4", algorithm=alg, codec=codec)
    except ValueError as e:
        first = f"{type(e).__name__}: {e}"
    except RuntimeError as e:
        first = f"{type(e).__name__}: {e}"
    then = [tp.all_reduce(x, "mxfp4", algorithm=a) for a in (alg, alg, "gather", "two_shot")]
    return first, then


@pytest.mark.parametrize("case", ["gather", "two_shot", "check_message", "codec_two_shot", "encode_gather",
                                  "encode_two_shot"])
def test_a_one_sided_error_leaves_every_next_call_working(case):
    res = run_ranks(_one_sided, 2, case, timeout=60)
    shards = [_shard(r, (4, 64), torch.float32) for r in range(2)]
    alg = "two_shot" if "two_shot" in case else "gather"
    for first, then in res:
        assert [torch.equal(y, tp.emulate_all_reduce(shards, "mxfp4", a))
                for y, a in zip(then, (alg, alg, "gather", "two_shot"))] == [True] * 4
    first0, first1 = res[0][0], res[1][0]
    if case == "codec_two_shot" or case.startswith("encode"):
        assert first0.startswith("RuntimeError: boom"), first0
    else:
        assert first0.startswith("DamagedHeader") and "damaged" in first0, first0
    if case == "gather":  # one exchange: the peer saw intact headers and has its (correct) result
        assert torch.equal(first1, tp.emulate_all_reduce(shards, "mxfp4", "gather"))
    else:  # the failed rank still took part in the call's next exchange: its peer raises there
        assert isinstance(first1, str) and first1.startswith("PeerFailed") and "failed on rank(s) [0]" in first1, first1


# ---- ranks-agree: two formats whose canonical strings share a crc32 ------------------------------
CRC_TWINS = ("int4/b32/bf16+o[15,91,99]", "int4/b32/bf16+o[44,96,126]")  # found by a birthday search


def _crc_twins(rank, world, validate):
    x = _shard(rank, (4, 128), torch.float32)
    return tp.all_reduce(x, CRC_TWINS[rank % 2], validate=validate)


@pytest.mark.parametrize("validate", [None, True])
def test_formats_whose_checksums_collide_are_told_apart(validate):
    import zlib

    a, b = (qformats.as_format(s) for s in CRC_TWINS)
    assert zlib.crc32(str(a).encode()) == zlib.crc32(str(b).encode()) and a != b
    assert a.nbytes((4, 128)) == b.nbytes((4, 128))
    res = run_ranks(_crc_twins, 2, validate, timeout=30, expect_errors=True)
    for r in res:
        assert isinstance(r, RankError), "a rank returned a result although the ranks used different formats"
        assert r.type in ("ValueError", "WireError") and "disagree" in r.message, str(r)


def test_header_digest_separates_colliding_signatures():
    from tp.comm import wirecheck

    s1, s2 = (wirecheck.Signature("gather", f, torch.float32, (4, 128), 312) for f in CRC_TWINS)
    assert s1.header(wirecheck.DATA, 3) != s2.header(wirecheck.DATA, 3)
    assert len(s1.header(wirecheck.DATA, 3)) == wirecheck.HEADER_BYTES


# ---- clear errors ------------------------------------------------------------------------------
def test_compressed_reduce_scatter_of_a_1d_tensor_is_refused_clearly():
    with pytest.raises(ValueError, match="needs 2 or more dimensions; got a 1-D tensor"):
        tp.reduce_scatter(torch.ones(64), "mxfp4")
    with pytest.raises(ValueError, match="needs 2 or more dimensions; got a 1-D tensor"):
        tp.emulate_reduce_scatter([torch.ones(64), torch.ones(64)], "mxfp4")
    assert tp.emulate_reduce_scatter([torch.ones(64), torch.ones(64)])[0].shape == (32,)  # plain: fine


def _outside_subgroup(rank, world):
    import torch.distributed as dist

    sub = dist.new_group([0, 1])  # every rank creates it; rank 2 is not in it
    x = _shard(rank, (4, 64), torch.float32)
    try:
        return tp.all_reduce(x, "mxfp4", group=sub)
    except ValueError as e:
        return str(e)


def test_a_rank_outside_the_subgroup_gets_a_clear_error():
    res = run_ranks(_outside_subgroup, 3, timeout=30)
    want = tp.emulate_all_reduce([_shard(r, (4, 64), torch.float32) for r in range(2)], "mxfp4")
    assert torch.equal(res[0], want) and torch.equal(res[1], want)
    assert isinstance(res[2], str) and "not a member of the process group" in res[2] and "[0, 1]" in res[2], res[2]


def _gpu_view(rank, world):
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_cpu_only_ranks_see_no_gpu():
    """``run_ranks(cpu_only=True)``: ranks for code that binds whatever accelerator it finds
    (transformers' TP on a GPU machine) start with no GPU visible; the parent's setting is kept."""
    import os

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert run_ranks(_gpu_view, 2, cpu_only=True, timeout=120) == [("", False), ("", False)]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
