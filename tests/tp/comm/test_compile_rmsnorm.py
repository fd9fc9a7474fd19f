"""tp.compile(..., fuse_norm=True): an all-reduce whose result, plus the residual, feeds an RMSNorm
(F.rms_norm, or the hand-written HF LlamaRMSNorm) compiles into one torch.ops.qformats.all_reduce_rmsnorm
that equals the eager tp.all_reduce_rmsnorm and the emulator bit for bit (2 and 4 gloo ranks);
graphs that differ from the pattern (a broadcast addend, a norm over another dim, a non-constant
eps, a 2-D weight, the sum read elsewhere, no weight) keep the plain compressed all-reduce.

Each test compiles once per rank into a fresh TORCHINDUCTOR_CACHE_DIR (an FX-graph-cache hit would
skip the pass) with cache=False; helpers come from test_compile.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import tp
from tests.tp.comm.test_compile import TIMEOUT, _fresh_cache, _warm_inductor  # noqa: F401 (a fixture)
from tests.tp.multirank import run_ranks
from tp.comm.compile import compile as tp_compile, print_collectives, report
from tp.comm.emulate import emulate_all_reduce, emulate_all_reduce_rmsnorm

D, T, EPS = 99, 6, 1e-6  # an odd width (blocks of 32 padded in the norm's tree); 6 rows: padding at 4 ranks


def _ar(t):
    return funcol.all_reduce(t, "sum", dist.group.WORLD)


class LlamaRMSNorm(nn.Module):
    """HF's LlamaRMSNorm: widened to fp32, normalised, cast back, times the weight."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight, requires_grad=False), eps

    def forward(self, h):
        dtype = h.dtype
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _scales(world, dtype, site):
    """Each rank's [D] scale of the previous output: the partial of site ``site`` (same on every rank)."""
    g = torch.Generator().manual_seed(50 + site)
    return [(torch.rand(D, generator=g) + 0.5).to(dtype) for _ in range(world)]


def _weights(dtype):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(D, generator=g) * 0.3 + 1).to(dtype) for _ in range(3)]


def _inputs(world, dtype):
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(T, D, generator=g) * 2).to(dtype) for _ in range(world)]
    return xs, torch.randn(T, D, generator=g).to(dtype), (torch.randn(D, generator=g)).to(dtype)


class Net(nn.Module):
    """Two sites the pass fuses (F.rms_norm; the sum on the add's right and LlamaRMSNorm), then two
    it must not: a broadcast bias as the addend, and a norm over the rows."""

    def __init__(self, rank, world, dtype):
        super().__init__()
        g1, g2, g4 = _weights(dtype)
        self.g1 = nn.Parameter(g1, requires_grad=False)
        self.norm2 = LlamaRMSNorm(g2, EPS)
        self.g4 = nn.Parameter(g4, requires_grad=False)
        for site in (2, 3, 4):
            self.register_buffer(f"s{site}", _scales(world, dtype, site)[rank])

    def forward(self, x, residual, bias):
        h1 = _ar(x) + residual
        y1 = F.rms_norm(h1, (D,), self.g1, EPS)
        h2 = h1 + _ar(y1 * self.s2)
        y2 = self.norm2(h2)
        h3 = _ar(y2 * self.s3) + bias  # [T, D] + [D]: not h's shape
        y3 = F.rms_norm(h3, (D,), self.g1, EPS)
        # site 4's inputs are the fused op's outputs: inductor keeps a bf16 intermediate of its own
        # kernels (y3, h3) unrounded in fp32, so only those make an exact eager reference
        h4 = _ar(y2 * self.s4) + h2
        y4 = h4 * torch.rsqrt(h4.pow(2).mean(0, keepdim=True) + EPS) * self.g4  # over the rows
        return y1, h1, y2, h2, h3, y3, h4, y4


def _rank_fused(rank, world, cache_root, fmt, alg, dtype):
    _fresh_cache(cache_root, rank)
    xs, residual, bias = _inputs(world, dtype)
    model = Net(rank, world, dtype)
    compiled = tp_compile(model, tp.CommPolicy(fmt, alg, 0), fuse_norm=True, cache=False)
    with torch.no_grad():
        got = compiled(xs[rank], residual, bias)
        y1, h1, y2, h2, h3, y3, h4, y4 = got
        g1, g2, _ = _weights(dtype)
        # eager: the fused collective called explicitly
        e1 = tp.all_reduce_rmsnorm(xs[rank], residual, g1, EPS, fmt, None, alg)
        e2 = tp.all_reduce_rmsnorm(e1[0] * model.s2, e1[1], g2, EPS, fmt, None, alg)
        # the emulator of every rank's partial (each rank can form them all: the scales are seeded)
        m1 = emulate_all_reduce_rmsnorm(xs, residual, g1, EPS, fmt, alg)
        m2 = emulate_all_reduce_rmsnorm([y1 * s for s in _scales(world, dtype, 2)], h1, g2, EPS, fmt, alg)
        # the sites left unfused: still compressed (the add is pointwise: exact)
        e3 = tp.all_reduce(y2 * model.s3, fmt, None, alg) + bias
        m3 = emulate_all_reduce([y2 * s for s in _scales(world, dtype, 3)], fmt, alg) + bias
        e4 = tp.all_reduce(y2 * model.s4, fmt, None, alg) + h2
        plain1 = sum(x.float() for x in xs).to(dtype) + residual
    rep = report(compiled)
    return dict(got=(y1, h1, y2, h2), eager=(*e1, *e2), emulated=(*m1, *m2), h3=(h3, e3, m3), h4=(h4, e4),
                y3=(y3, F.rms_norm(h3, (D,), g1, EPS)), plain1=plain1,
                fused=[e.norm for e in rep.entries], count=rep.count(), norms=rep.norms,
                table=print_collectives(compiled))


@pytest.mark.parametrize("world,fmt,alg,dtype", [
    (2, "mxfp8_e4m3", "gather", torch.float32),
    (4, "int6/b32/bf16+h32", "two_shot", torch.bfloat16),
])
def test_compiled_norm_equals_eager_fused_and_emulator(tmp_path, world, fmt, alg, dtype):
    res = run_ranks(_rank_fused, world, str(tmp_path), fmt, alg, dtype, timeout=TIMEOUT)
    for rank, r in enumerate(res):
        names = ("y1", "h1", "y2", "h2")
        for name, got, eager, emulated in zip(names, r["got"], r["eager"], r["emulated"]):
            assert got.dtype == dtype and torch.equal(got, eager), f"rank {rank}: {name} != tp.all_reduce_rmsnorm"
            assert torch.equal(got, emulated), f"rank {rank}: {name} != the emulator"
        assert not torch.equal(r["got"][1], r["plain1"]), "h1 equals the uncompressed sum: nothing compressed"
        h3, e3, m3 = r["h3"]
        assert torch.equal(h3, e3) and torch.equal(h3, m3), f"rank {rank}: the unfused site 3 != compressed + bias"
        assert torch.equal(*r["h4"]), f"rank {rank}: the unfused site 4 != compressed + residual"
        torch.testing.assert_close(*r["y3"])  # inductor's own norm: close, not bitwise
        assert r["fused"] == [True, True, False, False] and r["count"] == 4 and r["norms"] == 2, r["table"]
        assert "2 with the add + RMSNorm fused" in r["table"] and r["table"].count("+ rmsnorm") == 2, r["table"]
    for r in res[1:]:
        for a, b in zip(r["got"], res[0]["got"]):
            assert torch.equal(a, b), "ranks disagree"


# ---------------------------------------------------------------------------------------------
# Graphs that are not the pattern, one rank (world 1: the compressed all-reduce is
# quantise-dequantise): each site keeps the plain compressed all-reduce, and its h is the eager one.
FMT1 = "mxfp8_e4m3"


class NearMisses(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = nn.Parameter(torch.rand(D, generator=g) + 0.5, requires_grad=False)
        self.w2d = nn.Parameter(torch.rand(1, D, generator=g) + 0.5, requires_grad=False)
        self.eps = nn.Parameter(torch.tensor(EPS), requires_grad=False)

    def forward(self, p, r):
        hs, ys = [], []
        h = _ar(p[0]) + r  # the pattern itself: the control
        ys.append(F.rms_norm(h, (D,), self.w, EPS)); hs.append(h)
        h = _ar(p[1]) + r  # eps a tensor
        ys.append(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.w); hs.append(h)
        h = _ar(p[2]) + r  # a [1, D] weight
        ys.append(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.w2d); hs.append(h)
        s = _ar(p[3])  # the sum itself is read too
        h = s + r
        ys.append(F.rms_norm(h, (D,), self.w, EPS) + s); hs.append(h)
        h = _ar(p[4]) + r  # no weight (the normed result read twice: nothing to take for one)
        y = F.rms_norm(h, (D,), None, EPS)
        ys.append(y + y.sum()); hs.append(h)
        h = _ar(p[5]) + r  # the mean without keepdim
        ys.append(h * torch.rsqrt(h.pow(2).mean(-1) + EPS)[:, None] * self.w); hs.append(h)
        return hs, ys


def _rank_near_misses(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    g = torch.Generator().manual_seed(5)
    p, r = torch.randn(6, T, D, generator=g), torch.randn(T, D, generator=g)
    model = NearMisses()
    compiled = tp_compile(model, tp.CommPolicy(FMT1, "gather", 0), fuse_norm=True, cache=False)
    with torch.no_grad():
        hs, ys = compiled(p, r)
        want = [tp.all_reduce(p[i], FMT1) + r for i in range(6)]
        y0 = tp.all_reduce_rmsnorm(p[0], r, model.w, EPS, FMT1)
    rep = report(compiled)
    return dict(hs=hs, want=want, y0=(ys[0], *y0), fused=[e.norm for e in rep.entries], count=rep.count())


def test_near_misses_keep_the_compressed_all_reduce(tmp_path):
    r = run_ranks(_rank_near_misses, 1, str(tmp_path), timeout=TIMEOUT)[0]
    assert r["fused"] == [True] + [False] * 5 and r["count"] == 6, r["fused"]
    for i, (got, want) in enumerate(zip(r["hs"], r["want"])):
        assert torch.equal(got, want), f"site {i}: h != the compressed all-reduce + residual"
    y, normed, h = r["y0"]
    assert torch.equal(y, normed) and torch.equal(r["hs"][0], h)


def _op_errors(rank, world):
    group = dist.group.WORLD.group_name
    x, res, w = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64), torch.ones(64)
    out = []
    for args in ((x, res, w), (x.detach(), res[:, :32], w), (x.detach(), res, w[:32])):
        try:
            torch.ops.qformats.all_reduce_rmsnorm(*args, EPS, "mxfp8_e4m3", group, "gather")
            out.append("no error")
        except (RuntimeError, ValueError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def test_op_refuses_grad_and_checks_shapes():
    grad, res, weight = run_ranks(_op_errors, 1, timeout=60)[0]
    assert grad.startswith("RuntimeError") and "does not propagate gradients" in grad, grad
    assert res.startswith("ValueError") and "residual must have x's shape" in res, res
    assert weight.startswith("ValueError") and "weight [64]" in weight, weight
    with pytest.raises(ValueError, match="no second hop"):  # the fake checks too: at trace time
        torch.ops.qformats.all_reduce_rmsnorm(torch.ones(2, 32), torch.ones(2, 32), torch.ones(32), EPS, "mxfp4", "0",
                                              "gather", "mxfp8_e4m3")


def _padded_width(rank, world):
    """The all-reduce op at a width that is no multiple of the block (mxfp8: 32; 99 features):
    eager its result must be contiguous, as its fake says, and a compiled call must run."""
    group = dist.group.WORLD.group_name
    x = torch.randn(6, 99)
    y = torch.ops.qformats.all_reduce(x, "mxfp8_e4m3", group, "gather")
    f = torch.compile(lambda t: torch.ops.qformats.all_reduce(t, "mxfp8_e4m3", group, "gather") * 2, fullgraph=True)
    return y.is_contiguous(), y.stride(), torch.equal(f(x), y * 2)


def test_the_all_reduce_op_is_contiguous_where_the_rows_pad():
    """The op's fake promises contiguous memory; gather at a width the blocks pad returned a
    padded view, and compiled code failed its stride assertion (fixed in the op)."""
    contiguous, stride, compiled_ok = run_ranks(_padded_width, 1, timeout=TIMEOUT)[0]
    assert contiguous and stride == (99, 1) and compiled_ok
