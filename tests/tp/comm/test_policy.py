"""tp.CommPolicy: one policy, one vocabulary, the same decision in every consumer, and JSON."""
import pytest
import torch

import qformats
import tp
from tp.comm.policy import CollectivePolicy, CommPolicy, Rule, Site
from tp.study.hf import Policy as HfPolicy
from tp.study.hf import find_sites

FP4, INT4, FP8 = (qformats.as_format(n) for n in ("mxfp4", "int4_b32", "mxfp8_e4m3"))
LAYERS = 4
PATHS = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in ("self_attn.o_proj", "mlp.down_proj")]


def _decisions(policy, sites):
    return [policy.format_for(s) for s in sites]


def test_site_of_a_module_path_reads_layer_and_kind():
    assert Site.of("model.layers.3.mlp.down_proj", 30) == Site("model.layers.3.mlp.down_proj", 3, 30, "mlp")
    assert Site.of("transformer.h.11.attn.c_proj").kind == "attn"
    assert Site.of("model.decoder.layers.2.fc2").kind == "mlp"
    assert [Site.of(f"layers.1.{m}").kind for m in ("attention.wo", "feed_forward.w2")] == ["attn", "mlp"]  # torchtitan
    assert Site.of("lm_head") == Site("lm_head", None, None, None)
    with pytest.raises(ValueError, match="site kind"):
        Site("x", kind="ffn")


def test_first_matching_rule_decides_then_the_default():
    p = CommPolicy(FP4, rules=(Rule(None, layers=(0, 1)), Rule(FP8, layers=(0, 2)), Rule(INT4, kind="mlp")))
    sites = [Site.of(m, LAYERS) for m in PATHS]
    assert _decisions(p, sites) == [None, None, FP8, FP8, FP4, INT4, FP4, INT4]
    assert p.decide(sites[0]) == (None, "rule")
    assert p.decide(sites[4], nbytes=10) == (None, f"< {tp.DEFAULT_MIN_BYTES} B")
    assert CommPolicy().decide(sites[0]) == (None, "no format")


def test_negative_layer_ranges_count_from_the_end_and_empty_ranges_are_errors():
    r = Rule(None, layers=(-2, None))
    assert list(r.layer_range(LAYERS)) == [2, 3] and list(Rule(None, layers=(-3, -1)).layer_range(LAYERS)) == [1, 2]
    assert not r.matches(Site("model.layers.3.mlp.down_proj"))  # no num_layers: a layer rule cannot match
    with pytest.raises(ValueError, match="out of range for a 4-layer model"):
        CommPolicy(FP4, rules=(Rule(None, layers=(7, 8)),)).check_layers(LAYERS)
    CommPolicy(FP4, rules=(Rule(None, layers=(-9, None)),)).check_layers(LAYERS)  # clamps: all layers
    with pytest.raises(ValueError, match="start, stop"):
        Rule(None, layers=(1.5, 2))


def test_the_old_spellings_are_the_one_policy():
    sites = [Site.of(m, LAYERS) for m in PATHS]
    compile_style = CollectivePolicy(FP4, min_bytes=0, skip_first=1, skip_last=1, modules=("*.down_proj",))
    eval_style = HfPolicy(FP4, skip_first=1, skip_last=1, sites="mlp")
    for p in (compile_style, eval_style):
        assert isinstance(p, CommPolicy)
        assert _decisions(p, sites) == [None, None, None, FP4, None, FP4, None, None]
    assert eval_style.min_bytes == 0 and compile_style.algorithm == "gather"
    assert CollectivePolicy("int4_b32") == CommPolicy(INT4) and hash(CollectivePolicy("int4_b32")) == hash(CommPolicy(INT4))
    assert compile_style.decide(sites[2]) == (None, "module not selected")
    assert compile_style.decide(sites[1]) == (None, "first/last skipped")


def test_one_policy_decides_alike_in_the_tp_layers_the_hf_emulation_and_the_compile_pass():
    from tests.tp.study.test_eval import tiny_llama
    from tp.comm.passes import CallSite

    policy = CommPolicy(FP4, rules=(Rule(FP8, layers=(-1, None)), Rule(INT4, kind="mlp")), min_bytes=0)
    cfg = tp.LlamaConfig.preset("tiny")
    model = tp.TPLlama(cfg, tp.TPContext.emulated(2), policy)
    layers = [m.call_site for m in model.row_parallel_layers()]
    hf = [s for s in find_sites(tiny_llama(layers=cfg.num_hidden_layers))]
    graph = [CallSite(module=s.module, layer=s.layer, num_layers=cfg.num_hidden_layers, kind=Site.of(s.module).kind,
                      index=i, count=len(hf), shape=(8, 64), dtype=torch.float32, group_name="tp") for i, s in enumerate(hf)]
    assert [s.module for s in layers] == [s.module for s in hf]
    want = _decisions(policy, layers)
    assert want[-2:] == [FP8, FP8] and want[:2] == [FP4, INT4]
    assert _decisions(policy, hf) == want == _decisions(policy, graph)


def test_json_round_trip_and_strict_reading(tmp_path):
    p = CommPolicy(FP4, "two_shot", 4096, (Rule(None, modules=("*.o_proj",), label="keep"), Rule(INT4, layers=(-2, None),
                                                                                                   kind="mlp")))
    path = tmp_path / "policy.json"
    p.to_file(path)
    back = CommPolicy.from_file(path)
    assert back == p and back.rules[1].layers == (-2, None) and back.rules[1].fmt == INT4
    assert CommPolicy.from_string(p.to_string()) == p
    d = p.to_dict()
    with pytest.raises(ValueError, match="unknown policy fields"):
        CommPolicy.from_dict({**d, "threshold_bytes": 0})
    with pytest.raises(ValueError, match="not a qformats-tp-policy"):
        CommPolicy.from_dict({**d, "version": 2})
    with pytest.raises(ValueError, match="rule 0: unknown fields"):
        CommPolicy.from_dict({**d, "rules": [{"fmt": None, "sites": "attn"}]})
    with pytest.raises(ValueError, match="JSON"):
        CommPolicy.from_string("mxfp4")
    with pytest.raises(ValueError, match="no JSON form"):
        CommPolicy(choose=lambda s: None).to_dict()
    # CommPolicy.load: what tp.compile (and the eval) take: a policy or its file
    assert CommPolicy.load(p) is p and CommPolicy.load(path) == p and CommPolicy.load(str(path)) == p
    from tp.comm.compile import compile_pass

    assert compile_pass(path).policy == p
    with pytest.raises(ValueError, match="policy file .*missing.json"):
        CommPolicy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json.*not a qformats-tp-policy"):
        tp.compile(torch.nn.Linear(2, 2), str(tmp_path / "bad.json"))
    with pytest.raises(TypeError, match="policy file's path"):
        CommPolicy.load(3)


def test_arguments_are_checked_with_one_vocabulary():
    with pytest.raises(ValueError, match="unknown algorithm"):
        CommPolicy(FP4, "ring")
    with pytest.raises(ValueError, match="unsupported communication format"):
        Rule("int99")
    with pytest.raises(ValueError, match="min_bytes"):
        CommPolicy(FP4, min_bytes=-1)
    with pytest.raises(TypeError, match="tp.Rule"):
        CommPolicy(FP4, rules=({"fmt": "mxfp4"},))
    with pytest.raises(ValueError, match="no second hop"):
        CommPolicy(FP4, "gather", second_fmt="mxfp8_e4m3")
    # fused is two_shot from 4 ranks: the policy keeps the second hop (a call at W <= 3 refuses it)
    assert CommPolicy(FP4, "fused", second_fmt="mxfp8_e4m3").second_fmt == qformats.as_format("mxfp8_e4m3")
    with pytest.raises(ValueError, match="unsupported communication format"):
        CommPolicy(FP4, "two_shot", second_fmt="int99")
    assert CommPolicy(FP4, second_fmt=None).second_fmt is None


def test_second_hop_format_round_trips_and_applies_to_every_compressed_site():
    p = CommPolicy(FP4, "two_shot", rules=(Rule(None, layers=(0, 1)), Rule(FP8, kind="mlp")), second_fmt="int8/b32/bf16")
    q = CommPolicy.from_string(p.to_string())
    assert q == p and q.second_fmt == qformats.as_format("int8/b32/bf16")
    assert "second_fmt=int8/b32/bf16" in str(p)
    assert p.second_for(FP4) == p.second_for(FP8) == p.second_fmt and p.second_for(None) is None
    assert CommPolicy(FP4, "two_shot").second_for(FP4) == FP4  # default: the first hop's format
    with pytest.raises(ValueError, match="no second hop"):
        p.second_for(FP4, "gather")  # an algorithm override (the eval's) that has no second hop
    assert p.formats() == (FP4, FP8, p.second_fmt)


def test_calibration_replaces_the_default_format_below_the_other_rules():
    class Cal:  # the two members with_calibration reads (tp.model.calibrate.Calibration has them)
        sites = {m: None for m in PATHS}

        def format(self, site):
            return FP8

    p = HfPolicy(FP4, skip_first=1).with_calibration(Cal())
    assert _decisions(p, [Site.of(m, LAYERS) for m in PATHS]) == [None, None] + [FP8] * 6
    assert p.formats() == (FP4, FP8)
