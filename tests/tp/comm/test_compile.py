"""tp.compile: a TP model written with functional collectives, compiled with the rewrite pass,
equals the same model calling the compressed collectives explicitly, bit for bit (2 gloo ranks).

Each multi-rank test compiles once per rank (inductor, ~10-20 s on 2 shared cores) into a fresh
TORCHINDUCTOR_CACHE_DIR per rank and test: an FX-graph-cache hit would skip the pass.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import tp
from tests.tp.multirank import run_ranks
from tp.comm.compile import compile as tp_compile, installed, print_collectives, report
from tp.comm.policy import CollectivePolicy

D, FF, T, HEAD = 64, 128, 512, 8  # block all-reduce: 512x64 fp32 = 128 KiB; head: 512x8 = 16 KiB
FMT = "int4_b32"
TIMEOUT = 240.0


class Block(nn.Module):
    """Column-parallel up, row-parallel down, residual: the TP MLP of gpt-fast."""

    def __init__(self, rank, world, seed, reduce, out=D):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1, w2 = torch.randn(FF, D, generator=g) / D**0.5, torch.randn(out, FF, generator=g) / FF**0.5
        per = FF // world
        self.w1 = nn.Parameter(w1[rank * per : (rank + 1) * per].clone(), requires_grad=False)
        self.w2 = nn.Parameter(w2[:, rank * per : (rank + 1) * per].clone(), requires_grad=False)
        self.reduce, self.residual = reduce, out == D

    def forward(self, x):
        y = self.reduce(F.linear(torch.relu(F.linear(x, self.w1)), self.w2), self)
        return x + y if self.residual else y


class Net(nn.Module):
    """3 blocks, a row-parallel head with a small all-reduce, optionally an all-gather of x."""

    def __init__(self, rank, world, reduce, gather=None):
        super().__init__()
        self.layers = nn.ModuleList(Block(rank, world, 10 + i, reduce) for i in range(3))
        self.head = Block(rank, world, 99, reduce, out=HEAD)
        self.gather = gather

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        h = self.head(x)
        return (x, h) if self.gather is None else (self.gather(x), h)


def functional_reduce(p, mod):
    return funcol.all_reduce(p, "sum", dist.group.WORLD)


def functional_gather(x):
    return funcol.all_gather_tensor(x, 0, dist.group.WORLD)


def _reduce_explicitly(model):
    """Make ``model`` call the compressed collective itself where the policy would compress
    (the eager reference a compiled model must equal); the head stays a plain all-reduce."""
    def explicit(p, mod):
        if mod is model.head:
            return funcol.all_reduce(p, "sum", dist.group.WORLD)
        return tp.all_reduce(p, FMT, None, "gather")

    for m in model.modules():
        if isinstance(m, Block):
            m.reduce = explicit


def _input(rank):
    # the same activations on every rank (as after an all-reduce / embedding)
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def _warm_inductor():
    """Pay inductor's per-process start-up once, in the parent, before ranks are forked.

    Its lazy imports (~15 s) and the vector-ISA probe (g++ test builds, ~20 s with a fresh cache
    dir, memoised per process) would otherwise be paid again by every rank of every test.
    """
    import torch._inductor.codegen.cpp  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()


def _fresh_cache(cache_root, rank):
    # one cache dir per test and rank: an FX-graph-cache hit (e.g. of the other rank's
    # identical graph) would skip the pass. One compile thread: no worker pool to start.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, f"rank{rank}")
    torch._inductor.config.compile_threads = 1


class CountingPass(CustomGraphPass):
    """A pass someone installed before us: counts the all-reduces it sees."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def __call__(self, graph):
        self.calls += 1
        self.seen.append(sum(1 for n in graph.nodes if "all_reduce" in str(n.target)))

    def uuid(self):
        return b"counting-pass-v1"


# ---------------------------------------------------------------------------------------------
def _rank_gather_chained(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    x = _input(rank)
    mine = CountingPass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=mine):
        model = Net(rank, world, functional_reduce)
        compiled = tp_compile(model, CollectivePolicy(FMT, "gather"))  # min_bytes: the 64 KiB default
        got = compiled(x)
        still_mine = torch._inductor.config.post_grad_custom_post_pass is mine
    after = torch._inductor.config.post_grad_custom_post_pass

    _reduce_explicitly(model)  # eager reference: the compressed collective called explicitly
    want = model(x)
    for m in model.modules():
        if isinstance(m, Block):
            m.reduce = functional_reduce
    plain = model(x)
    rep = report(compiled)
    return dict(got=got, want=want, plain=plain, calls=mine.calls, seen=mine.seen, still_mine=still_mine,
                restored=after is None, count=rep.count(), formats=rep.formats(),
                alone=[(e.site.module, e.reason) for e in rep.left_alone], table=print_collectives(compiled))


def test_compiled_equals_eager_compressed_and_chains_existing_pass(tmp_path):
    res = run_ranks(_rank_gather_chained, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, r in enumerate(res):
        for got, want in zip(r["got"], r["want"]):
            assert torch.equal(got, want), f"rank {rank}: compiled != eager compressed"
        assert not torch.equal(r["got"][0], r["plain"][0]), "the compressed result equals the plain one"
        assert r["count"] == 3 and r["formats"] == {str(tp.comm.call.resolve_format(FMT)): 3}
        assert r["alone"] == [("head", "< 65536 B")], r["alone"]
        # the pass installed before ours ran (once, on the graph with all 4 all-reduces) and is still installed
        assert r["calls"] == 1 and r["seen"] == [4], (r["calls"], r["seen"])
        assert r["still_mine"] and r["restored"]
        assert "3 of 4 collectives rewritten" in r["table"]
    assert torch.equal(res[0]["got"][0], res[1]["got"][0])


# ---------------------------------------------------------------------------------------------
def _rank_two_shot_gather(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    x = _input(rank)
    model = Net(rank, world, functional_reduce, functional_gather)
    policy = CollectivePolicy(FMT, "two_shot", min_bytes=0, skip_first=1, modules=("layers.*", ""),
                              all_gather=True)  # "": the root module, where the all-gather is
    from tp.comm.compile import compile_pass

    pass_ = compile_pass(policy)
    before = torch._inductor.config.post_grad_custom_post_pass
    with installed(pass_):
        got = torch.compile(model, fullgraph=True)(x)
    restored = torch._inductor.config.post_grad_custom_post_pass is before

    def explicit(p, mod):
        if mod is model.layers[1] or mod is model.layers[2]:
            return tp.all_reduce(p, FMT, None, "two_shot")
        return funcol.all_reduce(p, "sum", dist.group.WORLD)

    for m in model.modules():
        if isinstance(m, Block):
            m.reduce = explicit
    model.gather = lambda t: tp.all_gather(t, FMT)
    want = model(x)
    rep = pass_.report
    return dict(got=got, want=want, restored=restored, ar=rep.count("all_reduce"), ag=rep.count("all_gather"),
                modules=[e.site.module for e in rep.rewritten], alone=sorted((e.site.module, e.reason) for e in rep.left_alone))


def test_two_shot_positions_modules_and_all_gather(tmp_path):
    res = run_ranks(_rank_two_shot_gather, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, r in enumerate(res):
        assert r["ar"] == 2 and r["ag"] == 1, (r["ar"], r["ag"], r["alone"])
        assert r["modules"] == ["layers.1", "layers.2", ""], r["modules"]
        assert r["alone"] == [("head", "module not selected"), ("layers.0", "first/last skipped")], r["alone"]
        for got, want in zip(r["got"], r["want"]):
            assert got.shape == want.shape and torch.equal(got, want), f"rank {rank}: compiled != eager compressed"
        assert r["restored"]
    assert torch.equal(res[0]["got"][0], res[1]["got"][0])


# ---------------------------------------------------------------------------------------------
SECOND = "int8/b32/bf16"  # two_shot's second hop in the compiled op's last argument


def _rank_second_hop(rank, world, cache_root):
    _fresh_cache(cache_root, rank)
    x = _input(rank)
    model = Net(rank, world, functional_reduce)
    compiled = tp_compile(model, tp.CommPolicy(FMT, "two_shot", min_bytes=0, second_fmt=SECOND), cache=False)
    got = compiled(x)
    rep = report(compiled)

    def explicit(hop):
        return lambda p, mod: tp.all_reduce(p, FMT, None, "two_shot", second_fmt=hop)

    wants = {}
    for hop in (SECOND, None):
        for m in model.modules():
            if isinstance(m, Block):
                m.reduce = explicit(hop)
        wants[hop] = model(x)
    return dict(got=got, want=wants[SECOND], one_format=wants[None], table=print_collectives(compiled),
                seconds=[e.second_fmt for e in rep.rewritten])


def test_compiled_second_hop_equals_eager(tmp_path):
    res = run_ranks(_rank_second_hop, 2, str(tmp_path), timeout=TIMEOUT)
    for rank, r in enumerate(res):
        for got, want, one in zip(r["got"], r["want"], r["one_format"]):
            assert torch.equal(got, want), f"rank {rank}: compiled != eager with second_fmt"
        assert not torch.equal(r["got"][0], r["one_format"][0]), "the second format changed nothing"
        assert r["seconds"] == [SECOND] * 4, r["seconds"]
        assert f"-> {SECOND} (two_shot)" in r["table"], r["table"]
    assert torch.equal(res[0]["got"][0], res[1]["got"][0])


def test_compiled_op_checks_its_second_format():
    with pytest.raises(ValueError, match="no second hop"):
        torch.ops.qformats.all_reduce(torch.ones(2, 32), "mxfp4", "0", "gather", "mxfp8_e4m3")


# ---------------------------------------------------------------------------------------------
def test_compile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown algorithm"):
        tp_compile(nn.Linear(2, 2), CollectivePolicy("mxfp4", "ring"))
    with pytest.raises(TypeError, match="CommPolicy"):
        tp_compile(nn.Linear(2, 2), {"fmt": "mxfp4"})
    with pytest.raises(ValueError, match="mode="):
        tp_compile(nn.Linear(2, 2), CollectivePolicy("mxfp4"), mode="reduce-overhead")
    with pytest.raises(ValueError, match="unsupported communication format|unknown|format"):
        CollectivePolicy("int99")
    with pytest.raises(ValueError, match="not a model returned by tp.compile"):
        report(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="not initialised"):
        torch.ops.qformats.all_reduce(torch.ones(2, 32), "mxfp4", "0", "gather")


def test_report_before_compiling_says_why_empty():
    compiled = tp_compile(nn.Linear(2, 2), CollectivePolicy("mxfp4"))
    assert "no graph went through the pass" in str(report(compiled))


# ---------------------------------------------------------------------------------------------
# GPU (2 GPUs, NCCL): not in CI. Command: pytest tests/tp/comm/test_compile.py -k gpu -m multigpu
def _gpu_rank(rank, world, store_path, q):
    import lowering

    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world)
    from datetime import timedelta

    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT))
    try:
        tp.set_codec(lowering.LoweredCodec())
        x = _input(rank).cuda()
        model = Net(rank, world, functional_reduce).cuda()
        out = {}
        for cg in (False, True):
            compiled = tp_compile(model, CollectivePolicy(FMT, "gather"), cudagraphs=cg, cache=False)
            for _ in range(3):  # warm-up, record, replay
                got = compiled(x)
            out[cg] = [t.clone().cpu() for t in got]
            out[f"count{cg}"] = report(compiled).count()

        _reduce_explicitly(model)
        out["want"] = [t.cpu() for t in model(x)]
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs with NCCL (compiled + CUDA graphs vs eager compressed)")
def test_gpu_compiled_and_cudagraphs_equal_eager_compressed(tmp_path):
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gpu_rank, args=(r, 2, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = dict(q.get(timeout=TIMEOUT) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for rank, out in res.items():
        for cg in (False, True):
            assert out[f"count{cg}"] == 3
            for got, want in zip(out[cg], out["want"]):
                assert torch.equal(got, want), f"rank {rank}, cudagraphs={cg}: compiled != eager compressed"


# ---------------------------------------------------------------------------------------------
# Which module a modules= glob sees, and the FX graph cache (issue: a cached compile of one
# model was reused for another whose graph code is the same but whose collectives come from
# other modules). One rank (world 1: the compressed all-reduce is quantise-dequantise), so
# that a test costs a few small compiles.
PD = 64  # 256 x 64 fp32 = 64 KiB messages: compressed under the default min_bytes


class Proj(nn.Module):
    """A row-parallel projection; ``reduce_inside``: it issues the all-reduce itself."""

    def __init__(self, seed, reduce_inside):
        super().__init__()
        w = torch.randn(PD, PD, generator=torch.Generator().manual_seed(seed)) / PD**0.5
        self.weight = nn.Parameter(w, requires_grad=False)
        self.reduce_inside = reduce_inside

    def forward(self, x):
        y = F.linear(x, self.weight)
        return funcol.all_reduce(y, "sum", dist.group.WORLD) if self.reduce_inside else y


class Placed(nn.Module):
    """Block whose all-reduce is placed as ``where`` says; the graph code is the same for all."""

    def __init__(self, seed, where):
        super().__init__()
        self.name = "other_proj" if where == "other" else "down_proj"
        setattr(self, self.name, Proj(seed, reduce_inside=where == "inside"))
        self.where = where
        if where == "hook":  # gpt-fast's tp.py: a forward hook on the block
            self.register_forward_hook(lambda mod, inp, out: funcol.all_reduce(out, "sum", dist.group.WORLD))

    def forward(self, x):
        y = getattr(self, self.name)(x)
        if self.where in ("block", "other"):  # gpt-fast / torchtitan: in the block's forward
            y = funcol.all_reduce(y, "sum", dist.group.WORLD)
        return y


class PlacedNet(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.layers = nn.ModuleList(Placed(20 + i, where) for i in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _placed_reference(where, x):
    """The eager model with the policy applied by hand: tp.all_reduce where it should compress."""
    model = PlacedNet(where)
    y = x
    for layer in model.layers:
        p = F.linear(y, getattr(layer, layer.name).weight)
        y = y + (p if where == "other" else tp.all_reduce(p, FMT))
    return y


def _rank_placements(rank, world, cache_root, orders):
    torch._inductor.config.compile_threads = 1
    x = torch.randn(256, PD, generator=torch.Generator().manual_seed(3))
    policy = CollectivePolicy(FMT, modules=("*.down_proj",))
    out = {}
    for order in orders:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, order)  # one cache per order
        for where in order.split("+"):
            torch._dynamo.reset()  # no in-memory reuse: only inductor's on-disk caches are shared
            compiled = tp_compile(PlacedNet(where), policy)
            got = compiled(x)
            rep = report(compiled)
            out[(order, where)] = dict(
                equal=torch.equal(got, _placed_reference(where, x)), plain=torch.equal(got, PlacedNet(where)(x)),
                sites=[(e.site.module, getattr(e.site, "producer", None), e.fmt is not None) for e in rep.entries])
    return out


def test_module_globs_match_the_issuing_or_the_producing_module_and_the_cache_keeps_them_apart(tmp_path):
    orders = ("inside+other", "other+inside", "block+hook")
    res = run_ranks(_rank_placements, 1, str(tmp_path), orders, timeout=TIMEOUT)[0]
    for (order, where), r in res.items():
        # compiled == the eager model with the policy applied by hand, whichever compiled first
        assert r["equal"], f"{where} after {order}: compiled != eager reference ({r})"
        assert r["plain"] == (where == "other"), (order, where, r)
    # what the globs were matched against, where the pass ran (a correct cache hit skips it)
    sites = {w: r["sites"] for (o, w), r in res.items() if r["sites"]}
    assert sites["inside"] == [(f"layers.{i}.down_proj", f"layers.{i}.down_proj", True) for i in range(2)]
    assert sites["block"] == [(f"layers.{i}", f"layers.{i}.down_proj", True) for i in range(2)]
    assert sites["hook"][0][1:] == ("layers.0.down_proj", True), sites["hook"]
    assert sites["other"] == [(f"layers.{i}", f"layers.{i}.other_proj", False) for i in range(2)]


def _op_grad(rank, world):
    x = torch.randn(4, 64, requires_grad=True)
    y = torch.ops.qformats.all_reduce(x, FMT, dist.group.WORLD.group_name, "gather")
    (2 * y).sum().backward()
    return x.grad


def test_the_compressed_op_is_straight_through():
    assert torch.equal(run_ranks(_op_grad, 1, timeout=60)[0], torch.full((4, 64), 2.0))
