"""tp.CommPolicy: one policy, one vocabulary, the same decision in every consumer, and JSON."""
import json

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
    assert tuple(p.decide(sites[0])) == (None, "rule")
    assert tuple(p.decide(sites[4], nbytes=10)) == (None, f"< {tp.DEFAULT_MIN_BYTES} B")
    assert tuple(CommPolicy().decide(sites[0])) == (None, "no format")


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
    assert tuple(compile_style.decide(sites[2])) == (None, "module not selected")
    assert tuple(compile_style.decide(sites[1])) == (None, "first/last skipped")


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


# ---- one strict schema: tp.Rule, CommPolicy, from_dict and every loader refuse the same things ----
def _doc(**over):
    d = CommPolicy(FP4, "two_shot", 4096, (Rule(INT4, modules=("*.o_proj",), layers=(0, 2), kind="attn"),)).to_dict()
    rule = {**d["rules"][0], **over.pop("rule", {})}
    return {**d, "rules": [rule], **over}


BAD_DOCS = {
    # a string where a list of globs belongs: it used to become one glob per character, "*" among them
    "modules a string": (dict(rule={"modules": "*.o_proj"}),
                         r"rule 0: modules must be a list of glob patterns, got the string"),
    "modules of numbers": (dict(rule={"modules": [3]}), r"rule 0: modules\[0\] must be a glob pattern string"),
    "modules an object": (dict(rule={"modules": {"a": 1}}), r"rule 0: modules must be a list"),
    "all_gather a string": (dict(all_gather="false"), r"all_gather must be true or false, got 'false'"),
    "all_gather a number": (dict(all_gather=1), r"all_gather must be true or false, got 1"),
    "min_bytes a bool": (dict(min_bytes=True), r"min_bytes must be an integer, got True"),
    "min_bytes a float": (dict(min_bytes=4096.0), r"min_bytes must be an integer, got 4096.0"),
    "min_bytes a string": (dict(min_bytes="4096"), r"min_bytes must be an integer"),
    "layers of bools": (dict(rule={"layers": [True, False]}), r"rule 0: layers \(start, stop\) must be integers"),
    "layers a string": (dict(rule={"layers": "0:2"}), r"rule 0: layers must be \(start, stop\)"),
    "layers of three": (dict(rule={"layers": [0, 1, 2]}), r"rule 0: layers must be \(start, stop\)"),
    "layers an object": (dict(rule={"layers": {"a": 1, "b": 2}}), r"rule 0: layers must be \(start, stop\)"),
    "kind a list": (dict(rule={"kind": ["attn"]}), r"rule 0: unknown site kind \['attn'\]"),
    "label a number": (dict(rule={"label": 5}), r"rule 0: label must be a string"),
    "fmt a number": (dict(fmt=4), r"fmt must be a format string or null, got 4"),
    "rule fmt an object": (dict(rule={"fmt": {"e": 2}}), r"rule 0: fmt must be a format string or null"),
    "second_fmt a list": (dict(second_fmt=["mxfp4"]), r"second_fmt must be a format string or null"),
    "algorithm a list": (dict(algorithm=["gather"]), r"algorithm must be a string"),
    "rules an object": (dict(rules={"fmt": None}), r"rules must be a list of rule objects, got dict"),
    "rules a string": (dict(rules="*"), r"rules must be a list of rule objects, got str"),
    "rule a string": (dict(rules=["*"]), r"rule 0: must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_policy_documents_are_checked_field_by_field(case, tmp_path):
    from tp.comm.policy import PolicyError

    over, pattern = BAD_DOCS[case]
    d = _doc(**over)
    with pytest.raises(PolicyError, match=pattern):
        CommPolicy.from_dict(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"p\.json.*" + pattern.replace("rule 0: ", "")):
        CommPolicy.load(tmp_path / "p.json")  # every loader goes through from_dict
    with pytest.raises(PolicyError):
        CommPolicy.from_string(json.dumps(d))


def test_rule_and_policy_refuse_what_files_refuse():
    """tp.Rule / CommPolicy built in Python: the same checks (PolicyError is a ValueError and a TypeError)."""
    from tp.comm.policy import PolicyError

    for kw, pattern in ((dict(modules="*.o_proj"), "got the string"), (dict(modules=[1]), r"modules\[0\]"),
                        (dict(layers=(True, 2)), "must be integers"), (dict(layers=(0, False)), "must be integers"),
                        (dict(label=None), "label must be a string"), (dict(kind="ffn"), "unknown site kind")):
        with pytest.raises(PolicyError, match=pattern):
            Rule(FP4, **kw)
    for kw, pattern in ((dict(all_gather="false"), "all_gather"), (dict(min_bytes=True), "min_bytes"),
                        (dict(rules=Rule(FP4)), "rules must be a list")):
        with pytest.raises(PolicyError, match=pattern):
            CommPolicy(FP4, **kw)
    with pytest.raises(TypeError, match="got the string"):
        tp.CollectivePolicy(FP4, modules="*.o_proj")
    with pytest.raises(ValueError, match="skip_first must be an integer"):
        tp.CollectivePolicy(FP4, skip_first=True)
    # the well-formed document still loads, lists or tuples alike
    assert CommPolicy.from_dict(_doc()).rules[0].modules == ("*.o_proj",)
    assert Rule(FP4, modules=["a.*"]).modules == ("a.*",)


def test_malformed_policy_json_gives_a_clear_error():
    from tp.comm.policy import PolicyError

    with pytest.raises(PolicyError, match="nested too deeply"):
        CommPolicy.from_string("[" * 100000 + "]" * 100000)
    with pytest.raises(PolicyError, match="not a qformats-tp-policy"):
        CommPolicy.from_string("[1, 2]")
    with pytest.raises(PolicyError, match="a JSON document"):
        CommPolicy.from_string("{'kind': 1}")


def test_a_rule_that_matches_no_site_warns():
    """A typo in a module glob used to leave its sites silently on the default format."""
    import warnings

    typo = CommPolicy(FP4, min_bytes=0, rules=(Rule(FP8, modules=("*.down_prj",), label="typo"),
                                               Rule(INT4, kind="mlp")))
    assert [i for i, _ in typo.unmatched_rules(PATHS)] == [0]
    with pytest.warns(UserWarning, match=r"policy rule 0 \(modules=\['\*.down_prj'\], label='typo'; .*matches none "
                                         r"of the 8 collective sites of here"):
        typo.warn_unmatched(PATHS, "here")
    cfg = tp.LlamaConfig.preset("tiny")
    with pytest.warns(UserWarning, match="matches none of the .* sites of this TPLlama"):
        tp.TPLlama(cfg, tp.TPContext(), typo)
    from tests.tp.study.test_eval import tiny_llama
    from tp.study.hf import emulate_tp

    emu = emulate_tp(tiny_llama(layers=2))
    try:
        with pytest.warns(UserWarning, match="matches none of the 4 collective sites of this LlamaForCausalLM"):
            emu.configure(2, typo)
    finally:
        emu.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a policy whose rules all match something: silent
        tp.TPLlama(cfg, tp.TPContext(), CommPolicy(FP4, rules=(Rule(FP8, modules=("*.down_proj",)),)))
        CommPolicy(FP4, rules=(Rule(None),)).warn_unmatched(PATHS, "here")  # a catch-all is no typo


def test_decide_answers_format_second_hop_algorithm_and_path():
    """CommPolicy.decide is the one decision: compress or not (size floor included), format,
    second hop, algorithm and path (the fused window is applied there too)."""
    from tp.comm.policy import DEFAULT_FUSED_MIN_BYTES, EAGER_FUSED_MIN_BYTES, Decision, fused_window

    p = CommPolicy("mxfp4", "two_shot", second_fmt="mxfp8_e4m3")
    d = p.decide("model.layers.0.mlp.down_proj", 1 << 20)
    assert isinstance(d, Decision) and d.path == "nccl" and d.algorithm == "two_shot" and d.why == ""
    assert d.fmt == tp.comm.call.resolve_format("mxfp4")
    assert d.second_fmt == tp.comm.call.resolve_format("mxfp8_e4m3")
    fmt, why = p.decide("x", 10)  # unpacks as the pair (format, why)
    assert fmt is None and why == f"< {tp.DEFAULT_MIN_BYTES} B"
    assert p.decide("x", 10).path == "plain" and p.decide("x", 10).second_fmt is None
    f = CommPolicy("mxfp4", "fused")
    assert f.decide("x", EAGER_FUSED_MIN_BYTES, "cuda").path == "fused"
    assert f.decide("x", EAGER_FUSED_MIN_BYTES, "cpu").path == "nccl"
    low = f.decide("x", DEFAULT_FUSED_MIN_BYTES, "cuda")  # eager: under the window, the plain all-reduce
    assert low.path == "plain" and low.fmt is None and "fused window" in low.why
    assert fused_window("mxfp4", True) == (DEFAULT_FUSED_MIN_BYTES, None)
    with pytest.raises(ValueError, match="one-shot gather"):  # fused at W <= 3 has no second hop, even under the floor
        CommPolicy("mxfp4", "fused", second_fmt="mxfp8_e4m3").decide("x", 10, world=2)
