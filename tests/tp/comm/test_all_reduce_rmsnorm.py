"""tp.all_reduce_rmsnorm on 2, 3 and 4 fork-started gloo ranks equals
tp.comm.emulate.emulate_all_reduce_rmsnorm of the ranks' partials, bit for bit, on every rank:
gather (the fused op on the gathered buffers), two_shot (each reduced chunk decoded with the
epilogue, a second hop), the plain path (uncompressed and below the floor), and TPLlama with
fuse_norm on real ranks against its emulated run."""
import pytest
import torch

import tp
from tests.tp.multirank import run_ranks
from tp.comm.emulate import emulate_all_reduce_rmsnorm


CASES = [  # (fmt, algorithm, second_fmt, dtype)
    ("mxfp4", "gather", None, torch.bfloat16),
    ("mxfp4", "two_shot", None, torch.bfloat16),
    ("int8/b32/bf16", "gather", None, torch.float16),
    ("int8/b32/bf16", "two_shot", None, torch.float32),
    ("int5/b32/bf16+h32", "gather", None, torch.bfloat16),
    ("int5/b32/bf16+h32", "two_shot", None, torch.float16),
    ("mxfp4", "two_shot", "mxfp8_e4m3", torch.bfloat16),
    ("int4/b32/bf16", "two_shot", "int8/b32/bf16", torch.float32),
]
SHAPES = [(5, 64), (2, 3, 96)]  # 5 and 6 rows: padding rows at 2, 3 and 4 ranks
EPS = 1e-5


def _inputs(rank, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(100 * seed + rank)
    x = (torch.randn(shape, generator=g) * (1 + 3 * torch.rand(shape[-1], generator=g))).to(dtype)
    g = torch.Generator().manual_seed(100 * seed + 99)  # the same residual and weight on every rank
    res = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (torch.randn(shape[-1], generator=g) + 1).to(dtype)
    return x, res, w


def _int_inputs(rank, shape, dtype):
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(-50, 50, shape, generator=g).to(dtype)
    g = torch.Generator().manual_seed(99)
    return x, torch.randint(-20, 20, shape, generator=g).to(dtype), (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)


def _cases(rank, world):
    out = {}
    for i, (fmt, alg, second, dt) in enumerate(CASES):
        for shape in SHAPES:
            x, res, w = _inputs(rank, shape, dt, seed=i)
            out[(i, shape)] = tp.all_reduce_rmsnorm(x, res, w, EPS, fmt, None, alg, 0, second_fmt=second)
    for dt in (torch.float32, torch.bfloat16):  # plain: integer-valued, so the backend's sum is exact
        x, res, w = _int_inputs(rank, (6, 40), dt)
        out[("none", str(dt))] = tp.all_reduce_rmsnorm(x, res, w, EPS, None)
        out[("floor", str(dt))] = tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4",
                                                        min_bytes=x.numel() * x.element_size() + 1)
    x, res, w = _inputs(rank, SHAPES[0], torch.bfloat16)
    out["validated"] = tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4", algorithm="two_shot", validate=True)
    out["fused"] = tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4", algorithm="fused")
    return out


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def _expect(key, world):
    if key in ("validated", "fused"):
        alg = "two_shot" if key == "validated" else "fused"
        args = [_inputs(r, SHAPES[0], torch.bfloat16) for r in range(world)]
        return emulate_all_reduce_rmsnorm([a[0] for a in args], args[0][1], args[0][2], EPS, "mxfp4", alg)
    if key[0] in ("none", "floor"):
        dt = getattr(torch, key[1].replace("torch.", ""))
        args = [_int_inputs(r, (6, 40), dt) for r in range(world)]
        return emulate_all_reduce_rmsnorm([a[0] for a in args], args[0][1], args[0][2], EPS, None)
    i, shape = key
    fmt, alg, second, dt = CASES[i]
    args = [_inputs(r, shape, dt, seed=i) for r in range(world)]
    return emulate_all_reduce_rmsnorm([a[0] for a in args], args[0][1], args[0][2], EPS, fmt, alg,
                                      second_fmt=second)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_equals_the_emulator_bitwise_on_every_rank(world):
    results = run_ranks(_cases, world, timeout=150)
    assert len(results[0]) == len(CASES) * len(SHAPES) + 6
    for key, (y0, h0) in results[0].items():
        ey, eh = _expect(key, world)
        for r in range(world):
            y, h = results[r][key]
            assert _same(y, y0) and _same(h, h0), f"rank {r} differs from rank 0 for {key}"
        assert _same(h0, eh), f"h: distributed != emulator for {key}"
        assert _same(y0, ey), f"normed: distributed != emulator for {key}"


CFG = tp.LlamaConfig(250, 64, 128, 2, 8, 4, head_dim=8, rms_norm_eps=1e-6)
IDS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
MODELS = [("mxfp4", "gather", None), ("int8/b32/bf16", "two_shot", "int8/b32/bf16"),
          ("int4/b32/bf16", "two_shot", "int8/b32/bf16")]


def _model(ctx, fmt, algorithm, second, fuse=True):
    pol = tp.CommPolicy(fmt, algorithm, 0, second_fmt=second) if second else tp.CommPolicy(fmt, algorithm, 0)
    return tp.init_random_(tp.TPLlama(CFG, ctx, pol, fuse_norm=fuse), seed=3).eval()


@torch.no_grad()
def _model_logits(rank, world, fmt, algorithm, second):
    calls = []
    import tp.model.layers as layers
    real = layers.all_reduce_rmsnorm
    layers.all_reduce_rmsnorm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        return _model(tp.TPContext.from_group(), fmt, algorithm, second)(IDS), len(calls)
    finally:
        layers.all_reduce_rmsnorm = real


@pytest.mark.parametrize("fmt,algorithm,second", MODELS)
@torch.no_grad()
def test_fused_norm_model_on_ranks_equals_its_emulated_run(fmt, algorithm, second):
    res = run_ranks(_model_logits, 2, fmt, algorithm, second, timeout=120)
    emulated = _model(tp.TPContext.emulated(2), fmt, algorithm, second)(IDS)
    for logits, calls in res:
        assert calls == 2 * CFG.num_hidden_layers  # every row-parallel site took the fused collective
        assert _same(logits, res[0][0])
        assert _same(logits, emulated), (logits - emulated).abs().max()


def _bad(rank, world, case):
    x, res, w = _inputs(rank, (4, 64), torch.bfloat16)
    if case == "residual_shape":
        return tp.all_reduce_rmsnorm(x, res[:2], w, EPS, "mxfp4")
    if case == "second_on_gather":
        return tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4", second_fmt="mxfp8_e4m3")
    if case == "formats_differ":  # the wire headers of all_reduce: every rank raises
        return tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4" if rank == 0 else "int8/b32/bf16", algorithm="two_shot")
    if case == "recover":  # after a disagreement, the next call works on every rank
        try:
            tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4" if rank == 0 else "nvfp4")
        except ValueError:
            pass
        return tp.all_reduce_rmsnorm(x, res, w, EPS, "mxfp4")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["residual_shape", "second_on_gather", "formats_differ"])
def test_bad_input_raises_on_every_rank(case):
    res = run_ranks(_bad, 2, case, timeout=30, expect_errors=True)
    want = "WireError" if case == "formats_differ" else "ValueError"  # (WireError is a ValueError)
    assert all(getattr(r, "type", None) == want for r in res), res


def test_ranks_recover_after_a_disagreement():
    res = run_ranks(_bad, 2, "recover", timeout=30)
    args = [_inputs(r, (4, 64), torch.bfloat16) for r in range(2)]
    ey, eh = emulate_all_reduce_rmsnorm([a[0] for a in args], args[0][1], args[0][2], EPS, "mxfp4")
    for y, h in res:
        assert _same(y, ey) and _same(h, eh)
