"""tp.study.tune (``qformats tune``) on tiny searches: the additive front is the exact Pareto
front, the measured fronts are non-dominated, the chosen policies round-trip through files and
``qformats eval --policy`` reproduces the tuner's figures bit for bit; argument errors."""
import itertools
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

import qformats  # noqa: E402
import tp  # noqa: E402
from tests.tp.study.test_eval import WordTokenizer, synthetic_text, tiny_llama  # noqa: E402
from tp.study import assets  # noqa: E402
from tp.study.eval import add_eval_arguments, run_eval  # noqa: E402
from tp.study.tune import SiteGroup, additive_front, default_layer_bounds, main_tune, run_tune  # noqa: E402

CANDIDATES = ["mxfp4", "int8/b32/bf16"]
SEARCH = dict(tokens=96, window=48)  # 2 windows
CONFIRM_TOKENS = 192  # 4 windows


def _inputs(layers=4):
    text = assets.TextData(synthetic_text(seed=1), synthetic_text(seed=2), "synthetic")
    return dict(model=tiny_llama(layers=layers), text=text, tokenizer=WordTokenizer(), progress=False)


def _dominated(p, others) -> bool:
    return any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in others)


def test_additive_front_is_the_exact_pareto_front_of_every_assignment():
    rng = random.Random(0)
    for _ in range(20):
        options = [[(rng.choice([1.0, 2.0, 4.25, 8.5]) * rng.random(), rng.random(), (g, k)) for k in range(3)]
                   for g in range(4)]
        front = additive_front(options)
        every = [(sum(o[0] for o in pick), sum(o[1] for o in pick), tuple(o[2] for o in pick))
                 for pick in itertools.product(*options)]
        brute = sorted(p for p in every if not _dominated(p[:2], [q[:2] for q in every]))
        assert [(round(b, 12), round(k, 12)) for b, k, _ in front] == \
            [(round(b, 12), round(k, 12)) for b, k, _ in brute]
        for b, k, choice in front:  # each point is the assignment it claims
            assert sum(options[g][c[1]][0] for g, c in enumerate(choice)) == pytest.approx(b)
    assert default_layer_bounds(30) == (1, 3, 27) and default_layer_bounds(2) == (1,)
    assert SiteGroup("attn", 3, 27).rule("mxfp4").matches(tp.Site.of("model.layers.5.self_attn.o_proj", 30))


def test_tiny_search_front_policies_and_eval_reproduction(tmp_path):
    kw = _inputs()
    doc = run_tune(kw["model"], kw["text"], tokenizer=kw["tokenizer"], progress=False, tp=2, candidates=CANDIDATES,
                   budgets=[5, 6, 7, 9], confirm_tokens=CONFIRM_TOKENS, confirm_budgets=[6, 9], confirm_tp=[2, 4],
                   out=tmp_path, command="qformats tune --test", **SEARCH)
    out = tmp_path
    assert {p.name for p in out.iterdir()} >= {"front.json", "front.md", "front.png", "policies", "sensitivity",
                                               "joint", "confirm"}
    assert json.loads((out / "front.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["groups"] == ["attn L0", "mlp L0", "attn L1-2", "mlp L1-2", "attn L3", "mlp L3"]
    assert len(doc["sensitivity"]) == 6 * len(CANDIDATES)
    assert doc["run"]["command"] == "qformats tune --test" and doc["run"]["torch"] == torch.__version__

    # the joint stage: bits as the emulator counts them; the front flags are the non-dominated points
    joint = doc["joint"]
    pts = [(j["bits"], j["kl"]) for j in joint]
    for j, p in zip(joint, pts):
        assert j["on_front"] == (not _dominated(p, pts)), j["name"]
    fp4, i8 = (qformats.as_format(f).bits_per_value_at(64) for f in CANDIDATES)
    for j in joint:  # 8 equal-width sites: the mean of the groups' formats (layers 1-2: 2 sites each)
        share = {"attn L0": 1, "mlp L0": 1, "attn L1-2": 2, "mlp L1-2": 2, "attn L3": 1, "mlp L3": 1}
        want = sum(share[g] * (fp4 if f == "mxfp4" else i8) for g, f in j["assignment"].items()) / 8
        assert j["bits"] == pytest.approx(want)
    assert 0 < doc["additivity"]["min"] <= doc["additivity"]["max"]

    # the confirmed points: one per budget's best, at both TP degrees, with intervals, sorted by KL
    conf = doc["confirmed"]
    names = {c["name"] for c in conf}
    assert len(conf) == 2 * len(names) and {c["tp"] for c in conf} == {2, 4}
    assert [c["kl"] for c in conf] == sorted(c["kl"] for c in conf)
    at2 = [c for c in conf if c["tp"] == 2]
    for c in at2:
        assert c["on_front"] == (not _dominated((c["bits_per_value"], c["kl"]),
                                                [(d["bits_per_value"], d["kl"]) for d in at2]))
        assert c["kl_ci"][0] <= c["kl"] <= c["kl_ci"][1] and c["tokens"] == CONFIRM_TOKENS
    md = (out / "front.md").read_text()
    assert sum(ln.startswith("| gather_tp2_") for ln in md.splitlines()) == len(conf) + len(joint)
    assert "Additivity" in md and "[" in md  # intervals printed

    # each chosen policy's file: the same policy; qformats eval --policy gives the same figures
    files = sorted((out / "policies").glob("*.json"))
    assert {f.stem for f in files} == names
    for f in files:
        j = next(j for j in joint if j["name"] == f.stem)
        assert tp.CommPolicy.from_file(f) == tp.CommPolicy.from_dict(j["policy"])
    fresh = _inputs()
    recs = run_eval(formats=None, policies=[str(f) for f in files], tp=[2, 4], tokens=CONFIRM_TOKENS,
                    window=SEARCH["window"], **fresh)
    assert recs[0]["baseline"] and len(recs) == 1 + len(conf)
    for r in recs[1:]:
        c = next(c for c in conf if (c["name"], c["tp"]) == (r["name"], r["tp"]))
        assert (r["kl"], r["ppl_change_pct"], r["bits_per_value"]) == (c["kl"], c["ppl_change_pct"], c["bits_per_value"])
        assert r["kl_ci"] == c["kl_ci"] and r["format"] == "policy"
    search = run_eval(policies=[str(files[0])], tp=[2], **SEARCH, **_inputs())
    assert search[1]["kl"] == next(j["kl"] for j in joint if j["name"] == files[0].stem)


def test_two_shot_searches_the_second_hop(tmp_path):
    kw = _inputs(layers=2)
    doc = run_tune(kw["model"], kw["text"], tokenizer=kw["tokenizer"], progress=False, tp=4, algorithm="two_shot",
                   candidates=["mxfp4"], second_formats=["same", "int8/b32/bf16"], budgets=[4.5, 7],
                   confirm_tokens=0, out=tmp_path, **SEARCH)
    assert {d["second"] for d in doc["sensitivity"]} == {"same", "int8/b32/bf16"} and not doc["confirmed"]
    fp4, i8 = (qformats.as_format(f).bits_per_value_at(64) for f in ("mxfp4", "int8/b32/bf16"))
    by_second = {j["second"]: j for j in doc["joint"]}
    assert by_second["same"]["bits"] == pytest.approx(fp4)
    assert by_second["int8/b32/bf16"]["bits"] == pytest.approx((fp4 + i8) / 2)  # both hops, as many values each
    pol = tp.CommPolicy.from_dict(by_second["int8/b32/bf16"]["policy"])
    assert pol.algorithm == "two_shot" and pol.second_fmt == qformats.as_format("int8/b32/bf16")
    written = {f.stem for f in (tmp_path / "policies").glob("*.json")}  # no confirmation: the joint front
    assert written == {j["name"] for j in doc["joint"] if j["on_front"]}


def test_argument_errors(tmp_path, capsys):
    kw = _inputs(layers=2)
    bad = [
        (dict(algorithm="fused"), "gather or two_shot"),
        (dict(candidates=["mxfp9"]), "unknown format"),
        (dict(candidates=["outlier_int4"]), "calibrated"),
        (dict(candidates=[]), "names no format"),
        (dict(second_formats=["int8/b32/bf16"]), "two_shot only"),
        (dict(algorithm="two_shot", second_formats=["bf16"]), "reduced sum travels compressed"),
        (dict(budgets=[-1]), "positive"),
        (dict(budgets="4.5,x"), "not a number"),
        (dict(confirm_tokens=-5), "confirm-tokens"),
        (dict(tokens=0), "--tokens"),
        (dict(layer_bounds=[2]), "strictly between 0 and 2"),
        (dict(layer_bounds="1,x"), "layer indices"),
        (dict(budgets=[1.0]), "no assignment fits"),
        (dict(candidates=["fp4_e2m1/b32/e8m0+o[100]"]), "out of range"),
    ]
    for extra, match in bad:
        with pytest.raises(ValueError, match=match):
            run_tune(kw["model"], kw["text"], tokenizer=kw["tokenizer"], progress=False, tp=2, out=tmp_path / "x",
                     **{**SEARCH, "candidates": CANDIDATES, "confirm_tokens": 0, **extra})
    with pytest.raises(ValueError, match="tokenizer"):
        run_tune(kw["model"], kw["text"], out=tmp_path / "y")
    # the CLI: errors exit 2 with the message
    from tp.cli import main

    assert main(["tune", "--algorithm", "ring", "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "z")]) == 2
    assert "qformats tune: --algorithm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["tune", "--help"])
    assert e.value.code == 0 and "--confirm-tokens" in capsys.readouterr().out


def test_eval_policy_arguments(tmp_path):
    import argparse

    a = add_eval_arguments(argparse.ArgumentParser()).parse_args(["--policy", "a.json", "--policy", "b.json"])
    assert a.policy == ["a.json", "b.json"] and a.formats is None
    pol = tp.CommPolicy("mxfp4", "two_shot", 0, second_fmt="int8/b32/bf16")
    pol.to_file(tmp_path / "p.json")
    kw = _inputs(layers=2)
    recs = run_eval(policies=[tmp_path / "p.json"], tp=[2], **SEARCH, **kw)
    assert [r["name"] for r in recs] == ["bf16", "p"]
    r = recs[1]
    assert r["format"] == "policy" and r["algorithm"] == "two_shot" and tp.CommPolicy.from_dict(r["policy"]) == pol
    fp4, i8 = (qformats.as_format(f).bits_per_value_at(64) for f in ("mxfp4", "int8/b32/bf16"))
    assert r["bits_per_value"] == pytest.approx((fp4 + i8) / 2) and r["top1_ci"][0] <= r["top1_agreement"]
    errors = [
        (dict(policies=[tmp_path / "missing.json"]), "missing.json"),
        (dict(policies=[("a", pol), ("a", tmp_path / "p.json")]), "two policies are named"),
        (dict(policies=[("mxfp4", pol)], formats=["mxfp4"]), "also a --formats name"),
        (dict(policies=[pol], skip_first=1), "a --policy file says its own rules"),
        (dict(policies=[tp.CommPolicy("mxfp4", choose=lambda s: None)]), "choose"),
        (dict(policies=[tp.CommPolicy("mxfp4", rules=(tp.Rule(None, layers=(5, 6)),))]), "out of range"),
        (dict(policies=[3]), "policy file's path"),
    ]
    for extra, match in errors:
        with pytest.raises(ValueError, match=match):
            run_eval(tp=[2], **SEARCH, **{**kw, **extra})


def test_paired_kl_ratio_reads_eval_folders(tmp_path):
    from tp.study.stats import WindowScore
    from tp.study.tune import kl_ratio_ci, window_scores

    kw = _inputs(layers=2)
    run_eval(formats=["mxfp4", "int8/b32/bf16"], tp=[2], out=tmp_path, **SEARCH, **kw)
    fp4, i8 = (window_scores(tmp_path, n, 2) for n in ("mxfp4", "int8/b32/bf16"))
    assert len(fp4) == 2 and all(s.tokens == 48 for s in fp4)
    r = kl_ratio_ci(fp4, i8)
    assert r["ratio"] == pytest.approx(sum(s.kl for s in fp4) / sum(s.kl for s in i8)) and r["ratio"] > 1
    assert r["ci"][0] <= r["ratio"] <= r["ci"][1]
    same = [WindowScore(0, 2 * s.kl, 0, s.tokens) for s in i8]  # every window twice the KL: the interval is 2
    assert kl_ratio_ci(same, i8)["ci"] == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="no configuration"):
        window_scores(tmp_path, "nvfp4", 2)
    with pytest.raises(ValueError, match="same >= 2 windows"):
        kl_ratio_ci(fp4, i8[:1])
