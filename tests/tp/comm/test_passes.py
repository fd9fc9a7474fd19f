"""tp.comm.passes on single-process FX graphs: which collectives are rewritten, into what, and how
the pass installs, chains and hashes itself. (tests/tp/comm/test_compile.py runs it under torch.compile
on 2 gloo ranks.)

Graphs come from ``make_fx`` of functions calling the ``_c10d_functional`` ops on fake tensors
(no process group needed). The replacement ops here stand in for ``tp.compile``'s (the pass
takes its ops as arguments): a world-1 compressed all-reduce is quantise-dequantise.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.proxy_tensor import make_fx

import pytest
import qformats
from tp.comm import passes
from tp.comm.passes import CallSite, CollectivePass, compile_options, installed
from tp.comm.policy import CollectivePolicy

C10D = torch.ops._c10d_functional


@torch.library.custom_op("qformats_test::ar", mutates_args=())
def fake_all_reduce(x: torch.Tensor, fmt: str, group_name: str, algorithm: str) -> torch.Tensor:
    return qformats.quantize_dequantize(x, fmt)


@fake_all_reduce.register_fake
def _(x, fmt, group_name, algorithm):
    return torch.empty_like(x)


@torch.library.custom_op("qformats_test::ag", mutates_args=())
def fake_all_gather(x: torch.Tensor, fmt: str, group_size: int, group_name: str) -> torch.Tensor:
    return torch.cat([qformats.quantize_dequantize(x, fmt)] * group_size)


@fake_all_gather.register_fake
def _(x, fmt, group_size, group_name):
    return x.new_empty((group_size * x.shape[0],) + tuple(x.shape[1:]))


AR, AG = torch.ops.qformats_test.ar.default, torch.ops.qformats_test.ag.default
FMT = str(qformats.as_format("int4_b32"))


def ar(x, op="sum"):
    return C10D.wait_tensor(C10D.all_reduce(x, op, "tp"))


def ag(x):
    return C10D.wait_tensor(C10D.all_gather_into_tensor(x, 2, "tp"))


def trace(fn, *shapes, dtype=torch.float32):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(s).to(dtype) for s in shapes])


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def layers_fn(n_layers):
    def f(x):
        for i in range(n_layers):
            x = x + ar(torch.relu(x) * (i + 1))
        return x
    return f


# ---------------------------------------------------------------------------------------------
def test_rewrites_large_all_reduces_and_leaves_small_ones():
    def f(x, s):
        return ar(x * 2) + 1, ar(s * 2)  # 256x64 fp32 = 64 KiB (rewritten), 4x64 = 1 KiB (left)

    gm = trace(f, (256, 64), (4, 64))
    p = CollectivePass(CollectivePolicy(FMT), AR)
    assert p.rewrite(gm.graph) == 1
    gm.recompile()
    t = targets(gm)
    assert t.count(AR) == 1 and t.count(C10D.all_reduce.default) == 1 and t.count(C10D.wait_tensor.default) == 1
    new = next(n for n in gm.graph.nodes if n.target is AR)
    assert new.args[1:] == (FMT, "tp", "gather") and new.meta["val"].shape == (256, 64)
    e_new, e_small = sorted(p.report.entries, key=lambda e: e.site.shape[0], reverse=True)
    assert e_new.fmt == FMT and e_new.bytes_before == 65536 and e_new.bytes_after == qformats.as_format(FMT).nbytes((256, 64))
    assert e_small.fmt is None and e_small.reason == "< 65536 B" and e_small.bytes_after == e_small.bytes_before
    assert p.report.count() == 1 and p.report.formats() == {FMT: 1}
    assert "1 of 2 collectives rewritten" in p.report.table()


def test_rewritten_graph_computes_the_replacement():
    gm = trace(layers_fn(3), (256, 64))
    x = torch.randn(256, 64)
    CollectivePass(CollectivePolicy(FMT, min_bytes=0), AR).rewrite(gm.graph)
    gm.recompile()
    assert C10D.all_reduce.default not in targets(gm) and C10D.wait_tensor.default not in targets(gm)
    want = x
    for i in range(3):
        want = want + qformats.quantize_dequantize(torch.relu(want) * (i + 1), FMT)
    assert torch.equal(gm(x), want)


@pytest.mark.parametrize("skip_first,skip_last,expect", [(0, 0, [0, 1, 2, 3]), (1, 0, [1, 2, 3]), (1, 2, [1]),
                                                         (0, 4, [])])
def test_positions_skip_first_and_last(skip_first, skip_last, expect):
    gm = trace(layers_fn(4), (256, 64))
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0, skip_first=skip_first, skip_last=skip_last), AR)
    assert p.rewrite(gm.graph) == len(expect)
    assert [e.site.index for e in p.report.rewritten] == expect
    assert all(e.site.count == 4 for e in p.report.entries)


def test_modules_by_glob_from_nn_module_stack():
    gm = trace(layers_fn(4), (256, 64))
    spellings = ["L['self'].layers[0].self_attn.o_proj", "getattr(L['self'].layers, '1').mlp.down_proj",
                 "L['self']._modules['layers']._modules['2'].self_attn.o_proj", "L['self'].layers.3.mlp.down_proj"]
    nodes = [n for n in gm.graph.nodes if n.target == C10D.all_reduce.default]
    for n, path in zip(nodes, spellings):
        n.meta["nn_module_stack"] = {"outer": ("L['self']", torch.nn.Module), "inner": (path, torch.nn.Linear)}
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0, modules=("*.mlp.down_proj",)), AR)
    assert p.rewrite(gm.graph) == 2
    assert [e.site.module for e in p.report.rewritten] == ["layers.1.mlp.down_proj", "layers.3.mlp.down_proj"]
    assert [(e.site.module, e.reason) for e in p.report.left_alone] == [
        ("layers.0.self_attn.o_proj", "module not selected"), ("layers.2.self_attn.o_proj", "module not selected")]


def test_user_callable_decides_alone():
    gm = trace(layers_fn(3), (8, 64))  # 2 KiB: under the default threshold, but choose overrides it
    seen = []

    def choose(site: CallSite):
        seen.append((site.op, site.index, site.count, site.shape, site.dtype, site.nbytes))
        return {0: "mxfp4", 2: "int4_b32"}.get(site.index)

    p = CollectivePass(CollectivePolicy(choose=choose), AR)
    assert p.rewrite(gm.graph) == 2
    assert seen == [("all_reduce", i, 3, (8, 64), torch.float32, 2048) for i in range(3)]
    assert [e.fmt for e in p.report.rewritten] == [str(qformats.as_format("mxfp4")), FMT]
    assert p.report.left_alone[0].reason == "policy.choose"

    gm = trace(layers_fn(1), (8, 64))
    with pytest.raises(ValueError, match=r"policy.choose returned an unusable format for all_reduce #0"):
        CollectivePass(CollectivePolicy(choose=lambda s: "int99"), AR).rewrite(gm.graph)


def test_never_compressed_dtypes_and_reduce_ops():
    gm = trace(lambda x, i: (ar(x, "max"), ar(i)), (256, 64), (256, 64), dtype=torch.float32)
    gm_i = trace(lambda i: ar(i), (256, 64), dtype=torch.int32)
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0), AR)
    assert p.rewrite(gm.graph) == 1  # the "max" one stays
    assert p.rewrite(gm_i.graph) == 0
    assert sorted(e.reason for e in p.report.left_alone) == ["dtype torch.int32", "reduce op max"]


def test_all_gather_only_when_asked():
    f = lambda x: ag(ar(x) * 2)  # noqa: E731
    gm = trace(f, (256, 64))
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0), AR)
    assert p.rewrite(gm.graph) == 1 and p.report.left_alone[0].reason == "all_gather off"
    gm = trace(f, (256, 64))
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0, all_gather=True), AR, AG)
    assert p.rewrite(gm.graph) == 2 and p.report.count("all_gather") == 1
    gm.recompile()
    x = torch.randn(256, 64)
    y = qformats.quantize_dequantize(qformats.quantize_dequantize(x, FMT) * 2, FMT)
    assert torch.equal(gm(x), torch.cat([y, y]))
    with pytest.raises(ValueError, match="no all_gather_op"):
        CollectivePass(CollectivePolicy(FMT, all_gather=True), AR)


def test_format_that_does_not_fit_the_width_names_the_site():
    fmt = qformats.static_outlier_format("int4", outliers=(0,), scales=(1.0,) * 31)  # calibrated for width 32
    gm = trace(layers_fn(1), (256, 64))
    with pytest.raises(ValueError, match=r"all_reduce #0 .*shape \(256, 64\).*does not apply"):
        CollectivePass(CollectivePolicy(fmt, min_bytes=0), AR).rewrite(gm.graph)


def test_policy_errors():
    with pytest.raises(ValueError):
        CollectivePolicy("not-a-format")
    with pytest.raises(ValueError, match="min_bytes"):
        CollectivePolicy(FMT, min_bytes=-1)
    with pytest.raises(TypeError, match="list of glob patterns"):
        CollectivePolicy(FMT, modules="*.down_proj")
    with pytest.raises(TypeError, match="choose must be callable"):
        CollectivePolicy(choose="mxfp4")
    with pytest.raises(TypeError, match="CommPolicy"):
        CollectivePass({"fmt": FMT}, AR)
    assert CollectivePolicy("int4_b32") == CollectivePolicy(FMT)  # canonical string inside


# ---------------------------------------------------------------------------------------------
class Recorder(CustomGraphPass):
    def __init__(self, uuid=b"recorder-1"):
        self.graphs, self._uuid = [], uuid

    def __call__(self, graph):
        self.graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    def uuid(self):
        return self._uuid


def test_chained_pass_runs_first_on_the_original_graph():
    gm = trace(layers_fn(2), (256, 64))
    rec = Recorder()
    p = CollectivePass(CollectivePolicy(FMT), AR, chain=rec)
    p(gm.graph)
    assert len(rec.graphs) == 1 and sum("all_reduce" in t for t in rec.graphs[0]) == 2
    assert p.report.count() == 2
    rec2 = Recorder()
    p = CollectivePass(CollectivePolicy(FMT), AR, chain=[rec, rec2])
    p(trace(layers_fn(1), (256, 64)).graph)
    assert len(rec.graphs) == 2 and len(rec2.graphs) == 1


def test_uuid_hashes_source_policy_and_chain():
    u = lambda pol, **kw: CollectivePass(pol, AR, **kw).uuid()  # noqa: E731
    base = u(CollectivePolicy(FMT))
    assert isinstance(base, bytes) and base == u(CollectivePolicy("int4_b32"))
    assert len({base, u(CollectivePolicy("mxfp4")), u(CollectivePolicy(FMT, "two_shot")),
                u(CollectivePolicy(FMT, min_bytes=1)), u(CollectivePolicy(FMT), chain=Recorder(b"a")),
                u(CollectivePolicy(FMT), chain=Recorder(b"b"))}) == 6
    # layer rules read the layer off module paths (graph metadata): keyed on the attribution only
    assert u(CollectivePolicy(FMT, skip_first=1)) is None
    gm = trace(layers_fn(2), (256, 64))

    def attributed(pol):
        p = CollectivePass(pol, AR)
        with p.attributed(gm):
            return p.uuid()

    keyed = {attributed(CollectivePolicy(FMT, skip_first=1)), attributed(CollectivePolicy(FMT, skip_last=1)), base}
    assert None not in keyed and len(keyed) == 3
    # the source of this module is part of it
    old = passes._SOURCE_HASH
    try:
        passes._SOURCE_HASH = "edited"
        assert u(CollectivePolicy(FMT)) != base
    finally:
        passes._SOURCE_HASH = old
    # a chained pass without a uuid, or a chooser without source: never cached
    assert u(CollectivePolicy(FMT), chain=lambda g: None) is None
    assert u(CollectivePolicy(choose=eval("lambda s: None"))) is None


def test_installed_chains_and_restores_config():
    cfg = torch._inductor.config
    prior = Recorder()
    with cfg.patch(post_grad_custom_post_pass=prior):
        p = CollectivePass(CollectivePolicy(FMT), AR)
        with installed(p):
            assert cfg.post_grad_custom_post_pass is p and p.chain is prior
        assert cfg.post_grad_custom_post_pass is prior
        with pytest.raises(RuntimeError):
            with installed(CollectivePass(CollectivePolicy(FMT), AR)):
                raise RuntimeError("boom")
        assert cfg.post_grad_custom_post_pass is prior


def test_compile_options_chain_without_touching_global_config():
    cfg = torch._inductor.config
    prior, mine = Recorder(b"g"), Recorder(b"o")
    with cfg.patch(post_grad_custom_post_pass=prior):
        p = CollectivePass(CollectivePolicy(FMT), AR)
        opts = compile_options(p, {"max_autotune": False})
        assert opts == {"max_autotune": False, "post_grad_custom_post_pass": p} and p.chain is prior
        q = CollectivePass(CollectivePolicy(FMT), AR)
        given = {"post_grad_custom_post_pass": mine}
        assert compile_options(q, given)["post_grad_custom_post_pass"] is q and q.chain is mine
        assert given == {"post_grad_custom_post_pass": mine}
        assert cfg.post_grad_custom_post_pass is prior


def test_overload_packet_graphs_are_rewritten_too():
    # dynamo-level graphs name the overload packet, post-grad graphs .default
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(256, 64, device="meta")
    a = g.call_function(C10D.all_reduce, (x, "sum", "tp"))
    w = g.call_function(C10D.wait_tensor, (a,))
    w.meta["val"] = x.meta["val"]
    g.output(w)
    assert CollectivePass(CollectivePolicy(FMT), AR).rewrite(g) == 1
    assert [n.target for n in g.nodes if n.op == "call_function"] == [AR]


def test_producer_module_is_matched_too():
    # all_reduce(self.down_proj(h)) written in the block's forward: issued in "layers.N", input
    # computed by "layers.N.down_proj" (the gpt-fast placement); the glob sees both
    gm = trace(layers_fn(2), (256, 64))
    for i, n in enumerate(n for n in gm.graph.nodes if n.target == C10D.all_reduce.default):
        n.meta["nn_module_stack"] = {"b": (f"L['self'].layers[{i}]", torch.nn.Module)}
        n.args[0].meta["nn_module_stack"] = {"b": (f"L['self'].layers[{i}]", torch.nn.Module),
                                             "p": (f"L['self'].layers[{i}].{('o_proj', 'down_proj')[i]}", torch.nn.Linear)}
    p = CollectivePass(CollectivePolicy(FMT, min_bytes=0, modules=("*.down_proj",)), AR)
    assert p.rewrite(gm.graph) == 1
    assert [(e.site.module, e.site.producer, e.fmt is not None) for e in p.report.entries] == [
        ("layers.0", "layers.0.o_proj", False), ("layers.1", "layers.1.down_proj", True)]
    assert "layers.1 <- layers.1.down_proj" in p.report.table()


def test_module_reading_policies_are_cached_only_with_an_attribution():
    # inductor's cache key sees the graph's code, not its nn_module_stack: a policy that reads
    # modules must key on the attribution (tp.compile passes it) or bypass the cache (uuid None)
    gm_a, gm_b = trace(layers_fn(1), (256, 64)), trace(layers_fn(1), (256, 64))
    n_b = next(n for n in gm_b.graph.nodes if n.target == C10D.all_reduce.default)
    n_b.meta["nn_module_stack"] = {"p": ("L['self'].down_proj", torch.nn.Linear)}
    for pol in (CollectivePolicy(FMT, modules=("*.down_proj",)), CollectivePolicy(choose=lambda s: FMT)):
        assert pol.reads_modules
        p = CollectivePass(pol, AR)
        assert p.uuid() is None
        with p.attributed(gm_a):
            ua = p.uuid()
        with p.attributed(gm_b):
            ub = p.uuid()
        assert isinstance(ua, bytes) and isinstance(ub, bytes) and ua != ub and p.attribution is None
    # a policy that reads no module ignores the attribution (same key for both graphs)
    p = CollectivePass(CollectivePolicy(FMT), AR)
    with p.attributed(gm_a):
        ua = p.uuid()
    with p.attributed(gm_b):
        assert p.uuid() == ua == CollectivePass(CollectivePolicy(FMT), AR).uuid()
