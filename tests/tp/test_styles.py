"""tp.styles.CompressedRowwiseParallel on 2 gloo ranks: a parallelize_module model, eager and
compiled, equals tp.all_reduce called by hand on each rank's partial and the single-process
emulator, bit for bit; and tp.compile rewrites a stock RowwiseParallel (DTensor) model."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import tp
from tests.tp.multirank import run_ranks
from tests.tp.comm.test_compile import _fresh_cache, _warm_inductor  # noqa: F401  - the autouse fixture
from tp.styles import CompressedRowwiseParallel, SiteCall, bind_sites

D, FF, T, HEAD = 64, 128, 32, 8
FMT = "int4_b32"
HEAD_THRESHOLD = 64 * 1024  # the head's 32x8 fp32 partial (1 KiB) stays below it: plain all-reduce
TIMEOUT = 240.0


class Block(nn.Module):
    """Column-parallel up (w1), row-parallel down (w2), residual: a TP MLP."""

    def __init__(self, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=bias)

    def forward(self, x):
        return x + self.w2(torch.relu(self.w1(x)))


class Net(nn.Module):
    def __init__(self, bias=(False, True)):
        super().__init__()
        self.layers = nn.ModuleList(Block(b) for b in bias)
        self.head = nn.Linear(D, HEAD, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x, self.head(x)


def _net(bias=(False, True)) -> Net:
    torch.manual_seed(0)  # identical full weights on every rank (and in the reference)
    return Net(bias)


def _input():
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1))


COMPRESSED_PLAN = {
    "layers.*.w1": ColwiseParallel(),
    "layers.0.w2": CompressedRowwiseParallel(FMT, "gather"),
    "layers.1.w2": CompressedRowwiseParallel(FMT, "two_shot"),  # this one has a bias
    "head": CompressedRowwiseParallel(FMT, input_layouts=Replicate(), min_bytes=HEAD_THRESHOLD),
}
ALGORITHMS = ("gather", "two_shot")


def _shard(w: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return w.chunk(world, dim)[rank].contiguous()


def _by_hand(full: Net, x, rank, world, reduce):
    """The same model on this rank's shards, the row-parallel sum of block i done by ``reduce(partial, i)``."""
    for i, blk in enumerate(full.layers):
        h = torch.relu(F.linear(x, _shard(blk.w1.weight, 0, rank, world)))
        y = reduce(F.linear(h, _shard(blk.w2.weight, 1, rank, world)), i)
        if blk.w2.bias is not None:
            y = y + blk.w2.bias
        x = x + y
    return x


def _emulated(full: Net, x, world):
    """The single-process emulator: every rank's partial computed here, summed by tp.emulate_all_reduce."""
    for i, blk in enumerate(full.layers):
        parts = [F.linear(torch.relu(F.linear(x, _shard(blk.w1.weight, 0, r, world))), _shard(blk.w2.weight, 1, r, world))
                 for r in range(world)]
        y = tp.emulate_all_reduce(parts, FMT, ALGORITHMS[i])
        if blk.w2.bias is not None:
            y = y + blk.w2.bias
        x = x + y
    return x


class CountCollectives(CustomGraphPass):
    """Counts the compressed and the plain all-reduces of each post-grad graph."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        targets = [n.target for n in graph.nodes if n.op == "call_function"]
        self.graphs.append(dict(compressed=targets.count(torch.ops.qformats.all_reduce.default),
                                plain=targets.count(torch.ops._c10d_functional.all_reduce.default)))

    def uuid(self):
        return None  # never cached: the count must run


def _rank_style(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    mesh = init_device_mesh("cpu", (world,))
    full, x = _net(), _input()
    model = parallelize_module(_net(), mesh, COMPRESSED_PLAN)
    with torch.no_grad():
        eager = model(x)
        counter = CountCollectives()
        compiled = torch.compile(model, fullgraph=True, options={"post_grad_custom_post_pass": counter})(x)
        by_hand = _by_hand(full, x, rank, world, lambda p, i: tp.all_reduce(p, FMT, None, ALGORITHMS[i]))
        head_plain = F.linear(_shard(by_hand, 1, rank, world), _shard(full.head.weight, 1, rank, world))
        dist.all_reduce(head_plain)

        emulated = _emulated(full, x, world)

        # use_local_output=False: a Replicate DTensor with the same local values
        lin = parallelize_module(nn.Linear(FF, D, bias=False), mesh,
                                 CompressedRowwiseParallel(FMT, use_local_output=False))
        torch.manual_seed(2)
        w = torch.randn(D, FF)
        lin.weight.to_local().copy_(_shard(w, 1, rank, world))
        h = torch.randn(T, FF, generator=torch.Generator().manual_seed(3))
        dt = lin(_shard(h, 1, rank, world))
        dt_want = tp.all_reduce(F.linear(_shard(h, 1, rank, world), _shard(w, 1, rank, world)), FMT)
    try:
        parallelize_module(nn.Embedding(16, D), mesh, CompressedRowwiseParallel(FMT))
        embedding_error = ""
    except NotImplementedError as e:
        embedding_error = str(e)
    return dict(eager=eager, compiled=compiled, by_hand=by_hand, head_plain=head_plain, emulated=emulated,
                counts=counter.graphs, dt_type=type(dt).__name__, dt_placements=str(dt.placements),
                dt_local=dt.to_local(), dt_want=dt_want, embedding_error=embedding_error)


def test_compressed_rowwise_eager_and_compiled_equal_by_hand_and_emulator(tmp_path):
    res = run_ranks(_rank_style, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, r in enumerate(res):
        x, head = r["eager"]
        assert torch.equal(x, r["by_hand"]), f"rank {rank}: eager style != tp.all_reduce by hand"
        assert torch.equal(x, r["emulated"]), f"rank {rank}: eager style != emulator"
        assert torch.equal(head, r["head_plain"]), f"rank {rank}: head below min_bytes must be the plain sum"
        for got, want in zip(r["compiled"], r["eager"]):
            assert torch.equal(got, want), f"rank {rank}: compiled != eager"
        # one graph: the two compressed reductions as the custom op, the head's plain all-reduce
        assert r["counts"] == [dict(compressed=2, plain=1)], r["counts"]
        assert r["dt_type"] == "DTensor" and r["dt_placements"] == "(Replicate(),)"
        assert torch.equal(r["dt_local"], r["dt_want"])
        assert "nn.Linear only" in r["embedding_error"]
    assert torch.equal(res[0]["eager"][0], res[1]["eager"][0]), "ranks disagree"
    plain = _net()
    with torch.no_grad():
        assert not torch.equal(res[0]["eager"][0], plain(_input())[0]), "nothing was compressed"


def _rank_tp_compile_dtensor(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    mesh = init_device_mesh("cpu", (world,))
    x = _input()
    stock = parallelize_module(_net((False, False)), mesh, {"layers.*.w1": ColwiseParallel(),
                                                           "layers.*.w2": RowwiseParallel(),
                                                           "head": RowwiseParallel(input_layouts=Replicate())})
    policy = tp.CollectivePolicy(FMT, modules=("layers.*.w2",), min_bytes=0)
    compiled = tp.compile(stock, policy, cache=False)
    with torch.no_grad():
        got = compiled(x)
        style = parallelize_module(_net((False, False)), mesh, {
            "layers.*.w1": ColwiseParallel(), "layers.*.w2": CompressedRowwiseParallel(FMT),
            "head": RowwiseParallel(input_layouts=Replicate())})
        # DTensor's eager redistribute returns AsyncCollectiveTensors: wait before they leave the
        # rank (torch.save of an unwaited one may serialise the buffer before the sum lands)
        want = tuple(funcol.wait_tensor(t) for t in style(x))
    rep = tp.compile_report(compiled)
    return dict(got=got, want=want, modules=[e.site.module for e in rep.rewritten],
                alone=[(e.site.module, e.reason) for e in rep.left_alone])


def test_tp_compile_rewrites_a_stock_rowwise_parallel_model(tmp_path):
    """DTensor's Partial -> Replicate redistribute is a functional all-reduce, matched by module path."""
    res = run_ranks(_rank_tp_compile_dtensor, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, r in enumerate(res):
        assert r["modules"] == ["layers.0.w2", "layers.1.w2"], r["modules"]
        assert r["alone"] == [("head", "module not selected")], r["alone"]
        for got, want in zip(r["got"], r["want"]):
            assert torch.equal(got, want), f"rank {rank}: tp.compile(stock) != CompressedRowwiseParallel"


# One style for every row-parallel entry; the policy gives layer 1 a finer format and two_shot
# a second hop for the reduced sum. FMT2 is also the default of the policy's unbound decision.
FMT2, SECOND = "mxfp8_e4m3", "int8/b32/bf16"
POLICY = tp.CommPolicy(FMT, "two_shot", 0, rules=(tp.Rule(FMT2, layers=(1, None)),), second_fmt=SECOND)


def _rank_policy_style(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    mesh = init_device_mesh("cpu", (world,))
    full, x = _net(), _input()
    style = CompressedRowwiseParallel(POLICY)
    model = parallelize_module(_net(), mesh, {"layers.*.w1": ColwiseParallel(), "layers.*.w2": style})
    try:
        model(x)
        unbound = ""
    except RuntimeError as e:
        unbound = str(e)
    calls = bind_sites(model)
    fmts = (FMT, FMT2)
    with torch.no_grad():
        eager = model(x)[0]
        compiled = torch.compile(model, fullgraph=True)(x)[0]
        by_hand = _by_hand(full, x, rank, world,
                           lambda p, i: tp.all_reduce(p, fmts[i], None, "two_shot", second_fmt=SECOND))
    return dict(unbound=unbound, calls=calls, eager=eager, compiled=compiled, by_hand=by_hand)


def test_policy_style_decides_per_layer_after_bind_sites(tmp_path):
    """A CommPolicy with a layer rule and a second hop: each w2 gets its layer's format once
    bind_sites ran (before: a clear error), eager and compiled == tp.all_reduce by hand."""
    res = run_ranks(_rank_policy_style, 2, str(tmp_path), timeout=TIMEOUT)
    f1, f2, sec = (str(tp.comm.call.resolve_format(f)) for f in (FMT, FMT2, SECOND))
    for rank, r in enumerate(res):
        assert "bind_sites" in r["unbound"], r["unbound"]
        assert r["calls"] == {"layers.0.w2": SiteCall(f1, sec, "two_shot", 0),
                              "layers.1.w2": SiteCall(f2, sec, "two_shot", 0)}
        assert torch.equal(r["eager"], r["by_hand"]), f"rank {rank}: policy style != tp.all_reduce by hand"
        assert torch.equal(r["compiled"], r["eager"]), f"rank {rank}: compiled != eager"
    assert torch.equal(res[0]["eager"], res[1]["eager"]), "ranks disagree"


def test_style_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unsupported communication format"):
        CompressedRowwiseParallel("fp4_e9m9")
    with pytest.raises(ValueError, match="unknown algorithm"):
        CompressedRowwiseParallel(FMT, "ring")
    with pytest.raises(ValueError, match="output_layouts must be Replicate"):
        CompressedRowwiseParallel(FMT, output_layouts=Shard(1))
    with pytest.raises(ValueError, match="min_bytes"):
        CompressedRowwiseParallel(FMT, min_bytes=-1)
    s = CompressedRowwiseParallel("mxfp4", "two_shot")
    assert s.fmt == "fp4_e2m1/b32/e8m0" and "two_shot" in repr(s) and s.min_bytes == 0
    assert CompressedRowwiseParallel(None).fmt is None
    # a policy says its own algorithm and size floor; fmt= stays the shorthand for one
    p = CompressedRowwiseParallel(POLICY)
    assert p.policy is POLICY and p.algorithm == "two_shot" and "1 rules" in repr(p)
    assert CompressedRowwiseParallel(FMT, "two_shot", second_fmt=SECOND).policy == \
        tp.CommPolicy(FMT, "two_shot", 0, second_fmt=SECOND)
    with pytest.raises(ValueError, match="says its own algorithm"):
        CompressedRowwiseParallel(POLICY, "gather")
    with pytest.raises(ValueError, match="second hop"):
        CompressedRowwiseParallel(FMT, "gather", second_fmt=SECOND)
    with pytest.raises(ValueError, match="choose"):
        CompressedRowwiseParallel(tp.CommPolicy(FMT, choose=lambda site: None))
    with pytest.raises(ValueError, match="no module"):
        bind_sites(nn.Linear(2, 2))
