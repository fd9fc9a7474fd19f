"""tp.study.hf (TP emulation on Hugging Face models) and tp.study.eval (the ``qformats eval`` job).

Unit tests use tiny random models (2 layers, built from transformers configs, no download);
the smoke test of the real path (SmolLM2 + Brown Corpus from the registries) is marked slow.
"""
import json
import math
import re
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qformats  # noqa: E402
import tp  # noqa: E402
from tp.study import assets  # noqa: E402
from tp.study.eval import (  # noqa: E402
    WindowScore,
    add_eval_arguments,
    compare_logits,
    format_table,
    main_eval,
    make_windows,
    metrics,
    run_eval,
)
from tp.study.hf import Policy, emulate_tp, find_sites, shard_sizes  # noqa: E402

V = 128


def tiny_llama(heads=4, kv=2, hidden=64, inter=96, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_head=4, n_layer=2, n_positions=512,
                                  bos_token_id=1, eos_token_id=2)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises biases to zero: make them matter
        for name, p in m.named_parameters():
            if name.endswith("c_proj.bias"):
                p.normal_(0, 0.5)
    return m


def other_models():
    """(name, model) for the other layouts tp.study.hf knows, tiny and random."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    return [
        ("qwen2", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(intermediate_size=96, num_key_value_heads=2, **common))),
        ("gemma", transformers.GemmaForCausalLM(transformers.GemmaConfig(intermediate_size=96, num_key_value_heads=2, head_dim=32, **common))),
        ("gpt_neox", transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(intermediate_size=96, **common))),
        ("phi", transformers.PhiForCausalLM(transformers.PhiConfig(intermediate_size=96, **common))),
        ("falcon", transformers.FalconForCausalLM(transformers.FalconConfig(**common))),
        ("gptj", transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=V, n_layer=2, n_embd=64, n_head=4, rotary_dim=8))),
        ("opt", transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=V, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64))),
    ]


def ids(n=24, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, n), generator=g)


# ----------------------------------------------------------------------------- tp.study.hf


def test_find_sites_llama_and_gpt2():
    s = find_sites(tiny_llama())
    assert [x.module for x in s] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
    ]
    assert (s[0].kind, s[0].units, s[0].unit_size, s[1].units) == ("attn", 4, 16, 96)
    g = find_sites(tiny_gpt2())
    assert [x.module for x in g][:2] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    assert (g[0].in_features, g[0].out_features, g[1].in_features) == (64, 64, 256)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_inactive_and_removed_are_exactly_the_plain_model(make):
    m = make()
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        emu = emulate_tp(m)  # wrapped, not configured: calls the original modules
        assert torch.equal(m(x).logits, ref)
        emu.configure(2)
        emu.active = False
        assert torch.equal(m(x).logits, ref)
        emu.remove()
        assert torch.equal(m(x).logits, ref)
    assert not any(type(mod).__name__ == "RowParallelEmulated" for mod in m.modules())


def test_tp1_uncompressed_is_bitwise_the_plain_llama():
    # One shard is the whole weight, same kernel, no bias: nothing may change.
    m = tiny_llama()
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        with emulate_tp(m, 1):
            assert torch.equal(m(x).logits, ref)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("degree", [2, 4])
def test_uncompressed_tp_equals_plain_model(make, degree):
    # Splitting the contraction into T partial products and summing them in fp32 reassociates
    # the dot products (and, for GPT-2, adds the bias after the sum instead of inside addmm),
    # so the logits agree to fp32 rounding, not bitwise. A wrong shard or a twice-added bias
    # would be off by O(1).
    m = make()
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
        with emulate_tp(m, degree, Policy(None)):
            out = m(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name,model", other_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_other_architectures_uncompressed_equal_plain(name, model):
    x = ids()
    model.eval()
    with torch.no_grad():
        ref = model(x).logits
        emu = emulate_tp(model, 2)
        assert len(emu.sites) == 4 and {s.kind for s in emu.sites} == {"attn", "mlp"}
        out = model(x).logits
        emu.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def _capture(emu, site_name):
    """Record (input, output) of one wrapped site."""
    seen = {}
    w = emu.wrappers[site_name]
    h = w.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach(), y=out.detach()))
    return seen, h


@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
def test_compressed_site_is_emulator_of_head_aligned_partials(algorithm):
    # Independent recomputation of one attention site at TP=2 with mxfp4: rank r owns heads
    # [2r, 2r+1] = input features [32r, 32r+32) of o_proj. Quantization makes the result
    # depend on exactly where the split is, so a wrong boundary fails here.
    m = tiny_llama()
    fmt = qformats.as_format("mxfp4")
    site = "model.layers.1.self_attn.o_proj"
    with torch.no_grad():
        emu = emulate_tp(m, 2, Policy(fmt), algorithm)
        seen, h = _capture(emu, site)
        m(ids())
        h.remove()
        w = emu.wrappers[site].inner.weight
        parts = [seen["x"][..., 32 * r:32 * r + 32].float() @ w[:, 32 * r:32 * r + 32].T for r in range(2)]
        want = tp.emulate_all_reduce(parts, fmt, algorithm)
        torch.testing.assert_close(seen["y"], want, rtol=0, atol=0)
        # and an uncompressed sum would differ: the format really is applied
        assert not torch.equal(seen["y"], parts[0] + parts[1])
        emu.remove()


def test_gpt2_conv1d_transposed_weight_bias_added_once():
    m = tiny_gpt2()
    fmt = qformats.as_format("mxfp8_e4m3")
    site = "transformer.h.0.mlp.c_proj"
    got = []
    with torch.no_grad():
        emu = emulate_tp(m, 4, Policy(fmt))
        emu.observer = lambda s, r, p: got.append((s, r, p)) if s == site else None
        seen, h = _capture(emu, site)
        m(ids())
        h.remove()
        conv = emu.wrappers[site].inner  # Conv1D: weight [in=256, out=64]
        parts = [seen["x"][..., 64 * r:64 * r + 64] @ conv.weight[64 * r:64 * r + 64] for r in range(4)]
        torch.testing.assert_close(seen["y"], tp.emulate_all_reduce(parts, fmt) + conv.bias, rtol=0, atol=0)
        assert [r for _, r, _ in got] == [0, 1, 2, 3]
        for (_, r, p), q in zip(got, parts):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        emu.remove()


def test_heads_not_dividing_tp_raise_or_balance():
    m = tiny_llama(heads=6, kv=2, hidden=96, inter=128)
    with pytest.raises(ValueError, match=r"6 attention heads do not divide evenly into TP=4.*balanced"):
        emulate_tp(m, 4)
    assert not any(type(mod).__name__ == "RowParallelEmulated" for mod in m.modules())  # failed wrap undone
    with pytest.raises(ValueError, match=r"TP=8 exceeds the 6 attention heads"):
        emulate_tp(m, 8, uneven="balanced")
    emu = emulate_tp(m, 4, uneven="balanced")
    assert emu.shards()["model.layers.0.self_attn.o_proj"] == (2, 2, 1, 1)
    assert emu.shards()["model.layers.0.mlp.down_proj"] == (32, 32, 32, 32)
    x = ids()
    with torch.no_grad():
        out = m(x).logits
        emu.remove()
        torch.testing.assert_close(out, m(x).logits, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="positive integer"):
        emulate_tp(m, 0)


def test_shard_sizes():
    assert shard_sizes(9, 2, "balanced") == (5, 4)
    assert shard_sizes(9, 4, "balanced") == (3, 2, 2, 2)
    assert shard_sizes(9, 8, "balanced") == (2, 1, 1, 1, 1, 1, 1, 1)
    assert shard_sizes(1536, 8) == (192,) * 8
    with pytest.raises(ValueError, match="do not divide"):
        shard_sizes(9, 2)


def test_policy_site_formats_and_bits():
    m = tiny_llama(layers=4)
    emu = emulate_tp(m, 2)
    fp4, fp8 = qformats.as_format("mxfp4"), qformats.as_format("mxfp8_e4m3")
    names = [s.module for s in emu.sites]  # 4 layers x (attn, mlp)

    emu.configure(2, Policy("mxfp4", skip_first=1, skip_last=1))
    assert list(emu.site_formats().values()) == [None, None, fp4, fp4, fp4, fp4, None, None]
    # hand-computed: mxfp4 = 4-bit codes + one 8-bit scale per 32 = 4.25 bits; 4 of 8 sites, equal widths
    assert emu.bits_per_value() == pytest.approx((4 * 4.25 + 4 * 16) / 8)

    emu.configure(2, Policy(fp4, sites="attn"))
    assert [f for f in emu.site_formats().values()] == [fp4, None] * 4
    emu.configure(2, Policy(fp4, sites="mlp", layer_formats={0: "mxfp8_e4m3", -1: None}))
    assert list(emu.site_formats().values()) == [None, fp8, None, fp4, None, fp4, None, None]
    assert emu.bits_per_value() == pytest.approx((8.25 + 2 * 4.25 + 5 * 16) / 8)
    assert Policy(fp4, layer_formats={-1: None}).to_dict()["rules"] == [
        {"fmt": None, "modules": [], "layers": [-1, None], "kind": None, "label": "layer -1"}]
    assert names[0] == "model.layers.0.self_attn.o_proj"

    with pytest.raises(ValueError, match="sites"):
        Policy(fp4, sites="attention")
    with pytest.raises(ValueError, match="skip_first"):
        Policy(fp4, skip_first=-1)
    with pytest.raises(ValueError, match="out of range"):
        emu.configure(2, Policy(fp4, layer_formats={7: None}))
    with pytest.raises(ValueError):
        Policy("fp4_e9m9/b32/e8m0")
    with pytest.raises(RuntimeError, match="already wrapped"):
        emulate_tp(m)
    emu.remove()


# ----------------------------------------------------------------------------- bookkeeping


def test_compare_logits_hand_computed():
    # position 0: base logits (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4); test logits (0, 0, 0) -> q = 1/3
    # position 1: base (0, ln 3, 0) -> p = (1/5, 3/5, 1/5); test (0, 0, ln 4) -> q = (1/6, 1/6, 2/3)
    ln2, ln3, ln4 = math.log(2), math.log(3), math.log(4)
    base = torch.log_softmax(torch.tensor([[ln2, 0, 0], [0, ln3, 0]], dtype=torch.float64), -1)
    test = torch.tensor([[0, 0, 0], [0, 0, ln4]], dtype=torch.float32)
    targets = torch.tensor([0, 1])
    s = compare_logits(base, test, targets)
    kl0 = 0.5 * math.log(0.5 / (1 / 3)) + 2 * 0.25 * math.log(0.25 / (1 / 3))
    kl1 = 0.2 * math.log(0.2 / (1 / 6)) + 0.6 * math.log(0.6 / (1 / 6)) + 0.2 * math.log(0.2 / (2 / 3))
    assert s.tokens == 2
    assert s.kl == pytest.approx(kl0 + kl1, rel=1e-6)
    assert s.nll == pytest.approx(-math.log(1 / 3) - math.log(1 / 6), rel=1e-6)
    assert s.agree == 1  # argmax 0 == 0 (position 0), 1 != 2 (position 1)
    b = compare_logits(base, base.float(), targets)
    assert b.kl == pytest.approx(0, abs=1e-7) and b.agree == 2
    assert b.nll == pytest.approx(-math.log(0.5) - math.log(0.6), rel=1e-6)
    m = metrics(s, b)
    assert m["perplexity"] == pytest.approx(math.exp((math.log(3) + math.log(6)) / 2), rel=1e-6)
    assert m["baseline_perplexity"] == pytest.approx(math.exp((math.log(2) + math.log(1 / 0.6)) / 2), rel=1e-6)
    assert m["ppl_change_pct"] == pytest.approx(100 * (math.sqrt(18) / math.sqrt(2 / 0.6) - 1), rel=1e-6)
    assert m["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert m["top1_agreement"] == 0.5 and m["tokens"] == 2
    acc = WindowScore()
    acc += s
    acc += s
    assert (acc.tokens, acc.agree) == (4, 2) and acc.kl == pytest.approx(2 * s.kl)
    with pytest.raises(ValueError):
        compare_logits(base, test[:1], targets)
    with pytest.raises(ValueError):
        metrics(s, acc)


class WordTokenizer:
    """Whitespace words -> ids in [3, V); BOS = 1. Enough of the HF tokenizer API for make_windows."""

    def __init__(self, bos=1):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False, verbose=True):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        out = {"input_ids": [3 + zlib.crc32(text[a:b].encode()) % (V - 3) for a, b in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def synthetic_text(paragraphs=60, words=40, seed=0):
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    return "\n\n".join(f"P{p} " + " ".join(rng.choice(vocab) for _ in range(words)) for p in range(paragraphs))


def test_make_windows():
    text = synthetic_text()
    tok = WordTokenizer()
    wins, scored = make_windows(tok, text, 3, 50)
    assert scored == 50 and [w.shape for w in wins] == [(1, 51)] * 3
    assert all(int(w[0, 0]) == 1 for w in wins)
    all_ids = tok(text)["input_ids"]
    assert wins[0][0, 1:].tolist() == all_ids[:50]  # first window: start of the text
    # later windows start at a paragraph start ("P<n>" word) in the middle / last third
    firsts = [tok(f"P{p}")["input_ids"][0] for p in range(60)]
    assert int(wins[1][0, 1]) in firsts and int(wins[2][0, 1]) in firsts
    wins2, scored2 = make_windows(WordTokenizer(bos=None), text, 2, 50)
    assert scored2 == 49 and wins2[0].shape == (1, 50)
    with pytest.raises(ValueError, match="too short"):
        make_windows(tok, text, 40, 100)


def test_run_eval_bookkeeping_on_tiny_model(tmp_path):
    m = tiny_llama(layers=2)
    tok = WordTokenizer()
    text = assets.TextData(synthetic_text(seed=1), synthetic_text(seed=2), "synthetic")
    recs = run_eval(model=m, tokenizer=tok, text=text, formats=["bf16", "mxfp4", "outlier_int4"], tp=[2, 4],
                    algorithms=["gather", "two_shot"], tokens=96, window=48, calib_tokens=96, out=tmp_path,
                    skip_last=1, progress=False)
    assert len(recs) == 2 + 2 * 2 * 2
    base = [r for r in recs if r["baseline"]]
    assert [r["tp"] for r in base] == [2, 4] and all(r["format"] == "bf16" and r["kl"] == 0 for r in base)

    # baseline perplexity, recomputed independently on the same windows
    wins, scored = make_windows(tok, text.eval_text, 2, 48)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            lp = torch.log_softmax(m(w).logits[0, :-1].double(), -1)
            nll -= lp.gather(-1, w[0, 1:, None]).sum().item()
            n += w.shape[1] - 1
    assert n == 96 and all(r["tokens"] == 96 for r in recs)
    assert base[0]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)

    # one compressed configuration, recomputed independently
    r = next(r for r in recs if r["format"] == "fp4_e2m1/b32/e8m0" and r["tp"] == 4 and r["algorithm"] == "two_shot")
    assert r["name"] == "mxfp4" and r["policy"]["rules"] == [
        {"fmt": None, "modules": [], "layers": [-1, None], "kind": None, "label": "first/last skipped"}]
    assert r["bits_per_value"] == pytest.approx((2 * 4.25 + 2 * 16) / 4)  # layer 1 skipped
    assert r["compression_ratio"] == pytest.approx(16 / r["bits_per_value"])
    kl, agree, cnll = 0.0, 0, 0.0
    with torch.no_grad():
        emu = emulate_tp(m, 4, Policy("mxfp4", skip_last=1), "two_shot")
        for w in wins:
            lq = torch.log_softmax(m(w).logits[0, :-1].double(), -1)
            emu.active = False
            lp = torch.log_softmax(m(w).logits[0, :-1].double(), -1)
            emu.active = True
            kl += (lp.exp() * (lp - lq)).sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            cnll -= lq.gather(-1, w[0, 1:, None]).sum().item()
        emu.remove()
    assert r["kl"] == pytest.approx(kl / n, rel=1e-9) and r["kl"] > 0
    assert r["top1_agreement"] == pytest.approx(agree / n)
    assert r["perplexity"] == pytest.approx(math.exp(cnll / n), rel=1e-9)
    assert r["ppl_change_pct"] == pytest.approx(100 * (r["perplexity"] / base[0]["perplexity"] - 1), rel=1e-9)

    out = [r for r in recs if r["name"] == "outlier_int4"]
    # 2 of 4 sites compressed (layer 1 skipped): (2 * b + 2 * 16) / 4 with 4 < b < 5 (int4 + bf16 outliers)
    assert len(out) == 4 and all(10.0 < r["bits_per_value"] < 10.5 for r in out)
    assert {r["calibration"]["scale_from"] for r in out} == {"max", "sum"}

    data = json.loads((tmp_path / "results.json").read_text())
    need = {"format", "tp", "algorithm", "bits_per_value", "perplexity", "ppl_change_pct", "kl", "top1_agreement", "tokens", "policy"}
    assert len(data) == len(recs) and all(need <= set(d) for d in data)
    assert (tmp_path / "results.csv").read_text().count("\n") == len(recs) + 1
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    table = format_table(recs)
    assert "outlier_int4" in table and len(table.splitlines()) == len(recs) + 2


def test_run_eval_bad_inputs():
    m = tiny_llama()
    tok = WordTokenizer()
    text = assets.TextData(synthetic_text(), synthetic_text(seed=3), "synthetic")
    kw = dict(model=m, tokenizer=tok, text=text, tokens=48, window=48, progress=False)
    with pytest.raises(ValueError, match=r"(?s)unknown format.*fp9.*valid"):
        run_eval(formats=["bf16", "fp9"], **kw)
    with pytest.raises(ValueError, match="unknown algorithm"):
        run_eval(formats=["mxfp4"], algorithms=["ring"], **kw)
    with pytest.raises(ValueError, match="do not divide evenly"):
        run_eval(formats=["mxfp4"], tp=[3], uneven="error", **kw)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        run_eval(formats=["mxfp4"], **{**kw, "tokens": 600, "window": 600})
    with pytest.raises(ValueError, match="LAYER=FORMAT"):
        run_eval(formats=["mxfp4"], layer_formats=["0:mxfp8"], **kw)


def test_cli_arguments_and_errors(capsys, tmp_path):
    import argparse

    p = add_eval_arguments(argparse.ArgumentParser())
    a = p.parse_args([])
    assert a.tp == [2, 4, 8] and a.algorithms == ["gather", "two_shot"] and "mxfp4" in a.formats
    a = p.parse_args(["--formats", "bf16,mxfp4", "--tp", "2,8", "--layer-format", "0=bf16", "--sites", "mlp",
                      "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert a.formats == ["bf16", "mxfp4"] and a.tp == [2, 8] and a.layer_format == ["0=bf16"]
    assert main_eval(a) == 2  # the text is read before the model: a missing file fails first, exit 2
    err = capsys.readouterr().err
    assert err.startswith("qformats eval: --text ") and "no such file" in err


# ----------------------------------------------------------------------------- the real path


@pytest.mark.slow
def test_smoke_real_model_and_text(tmp_path):
    """Fetch (or reuse) SmolLM2-135M-Instruct and the Brown Corpus; baseline and mxfp4 at TP=2
    on 1024 tokens (~1 min on 2 CPU cores once cached; the first run downloads ~96 MB)."""
    recs = run_eval(formats=["bf16", "mxfp4"], tp=[2], algorithms=["gather"], tokens=1024, window=256,
                    out=tmp_path, progress=False)
    base, comp = recs
    assert base["tokens"] == comp["tokens"] == 1024
    assert 5 < base["perplexity"] < 500, base
    assert comp["perplexity"] != base["perplexity"] and comp["kl"] > 0
    assert abs(comp["ppl_change_pct"]) < 50  # mxfp4 degrades, it does not destroy
    assert comp["heads_per_rank"] == [5, 4]  # SmolLM2's 9 heads over 2 ranks
    assert (tmp_path / "results.json").exists()
