"""The Llama-style TP model: world sizes agree, compression stays within the emulator, HF checkpoints load."""
import contextlib
import io

import pytest
import torch

import tp
from tests.tp.multirank import run_ranks
from tp.model.checkpoint import load_model, model_from_state_dict, shard_state_dict

# GQA (8 heads, 4 KV heads), vocabulary 250 (padded at TP=4), runs at TP 1, 2, 4
CFG = tp.LlamaConfig(250, 64, 128, 2, 8, 4, head_dim=8, rms_norm_eps=1e-6)
IDS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(ctx, fmt=None, algorithm="gather"):
    return tp.init_random_(tp.TPLlama(CFG, ctx, tp.CommPolicy(fmt, algorithm, 0)), seed=3).eval()


@torch.no_grad()
def _logits(rank, world, fmt, algorithm):
    return _model(tp.TPContext.from_group(), fmt, algorithm)(IDS)


@pytest.fixture(scope="module")
def reference():
    with torch.no_grad():
        return _model(tp.TPContext())(IDS)


@pytest.mark.parametrize("world", [2, 4])
def test_uncompressed_matches_world_one(world, reference):
    res = run_ranks(_logits, world, None, "gather")
    for r in range(world):
        assert torch.equal(res[r], res[0])
    assert torch.allclose(res[0], reference, rtol=0, atol=2e-6), (res[0] - reference).abs().max()


@pytest.mark.parametrize("world,algorithm,fmt", [(2, "gather", "mxfp4"), (4, "two_shot", "flash_int4")])
@torch.no_grad()
def test_compressed_logits_match_the_emulated_model(world, algorithm, fmt, reference):
    res = run_ranks(_logits, world, fmt, algorithm)
    emulated = _model(tp.TPContext.emulated(world), fmt, algorithm)(IDS)
    compression_error = (emulated - reference).abs().max()
    assert 0 < compression_error < 0.25 * reference.abs().max()  # the format does something, not everything
    for r in range(world):
        assert torch.equal(res[r], res[0])
        # the only freedom left is matmul rounding in the partial sums (1e-7), far below the format's error
        assert (res[r] - emulated).abs().max() <= 1e-3 * compression_error


def test_tp_size_must_divide_heads():
    with pytest.raises(ValueError, match=r"tensor-parallel size 3 does not divide num_attention_heads=8.*valid sizes for this model: 1, 2, 4"):
        tp.TPLlama(CFG, tp.TPContext(world_size=3, rank=0))
    smol = tp.LlamaConfig.preset("smollm2-135m")
    assert tp.valid_tp_sizes(smol) == [1, 3]
    with pytest.raises(ValueError, match="num_attention_heads=9, num_key_value_heads=3"):
        tp.TPLlama(smol, tp.TPContext.emulated(2), device="meta")


def test_presets_have_the_real_shapes():
    assert abs(tp.LlamaConfig.preset("llama3-8b").num_parameters() / 8.03e9 - 1) < 0.01
    assert abs(tp.LlamaConfig.preset("llama3-70b").num_parameters() / 70.6e9 - 1) < 0.01
    m = tp.TPLlama(tp.LlamaConfig.preset("llama3-70b"), tp.TPContext(world_size=8, rank=7), device="meta")
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (8192 // 8, 8192)
    assert m.model.layers[0].mlp.down_proj.weight.shape == (8192, 28672 // 8)
    assert len(m.sites) == 160
    with pytest.raises(ValueError, match="unknown model preset"):
        tp.LlamaConfig.preset("gpt2")


def test_random_init_is_independent_of_world_size():
    full = _model(tp.TPContext()).state_dict()
    for r in range(4):
        shard = _model(tp.TPContext(world_size=4, rank=r)).state_dict()
        assert torch.equal(shard["model.layers.1.self_attn.k_proj.weight"],
                           full["model.layers.1.self_attn.k_proj.weight"][8 * r : 8 * r + 8])
        assert torch.equal(shard["model.layers.0.mlp.down_proj.weight"],
                           full["model.layers.0.mlp.down_proj.weight"][:, 32 * r : 32 * r + 32])
        emb = shard["model.embed_tokens.weight"]  # 250 rows padded to 252: 63 per rank
        assert emb.shape == (63, 64) and torch.equal(emb[: 250 - 63 * r], full["model.embed_tokens.weight"][63 * r : 63 * r + 63])
    assert torch.equal(shard["model.embed_tokens.weight"][61:], torch.zeros(2, 64))


# ---- Hugging Face checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=4, rope_theta=5e5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hc).eval()
    d = tmp_path_factory.mktemp("hf")
    with contextlib.redirect_stderr(io.StringIO()):
        hf.save_pretrained(d)
    with torch.no_grad():
        return hf, d, hf(IDS).logits


def test_world_one_equals_transformers(hf_model):
    hf, d, ref = hf_model
    m = load_model(d, tp.TPContext())
    with torch.no_grad():
        assert torch.allclose(m(IDS), ref, rtol=0, atol=1e-6)
    ids, _, _ = tp.generate(m, IDS[:1], 6)  # greedy with the KV cache == transformers' greedy
    assert torch.equal(ids, hf.generate(IDS[:1], max_new_tokens=6, do_sample=False))


@torch.no_grad()
def _load_sharded(rank, world, path):
    m = load_model(path, tp.TPContext.from_group())
    return m(IDS), m.model.layers[0].self_attn.o_proj.weight.shape


def test_safetensors_load_sharded_per_rank(hf_model):
    hf, d, ref = hf_model
    res = run_ranks(_load_sharded, 2, str(d), timeout=90)
    for logits, oshape in res:
        assert oshape == (64, 32)
        assert torch.allclose(logits, ref, rtol=0, atol=2e-6)


def test_state_dict_sharding_and_tied_embeddings(hf_model):
    hf, _, ref = hf_model
    sd = hf.state_dict()
    parts = [shard_state_dict(sd, hf.config, tp.TPContext(world_size=2, rank=r)) for r in range(2)]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(torch.cat([p[name] for p in parts]), sd[name])
    assert torch.equal(torch.cat([p["model.layers.0.mlp.down_proj.weight"] for p in parts], 1),
                       sd["model.layers.0.mlp.down_proj.weight"])
    # tied embeddings: no lm_head.weight needed, the head reuses the embedding
    cfg = tp.LlamaConfig.from_hf(hf.config).replace(tie_word_embeddings=True)
    tied = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    m = model_from_state_dict(tied, cfg, tp.TPContext())
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with pytest.raises(KeyError, match="lm_head.weight"):
        model_from_state_dict(tied, tp.LlamaConfig.from_hf(hf.config), tp.TPContext())


def test_launcher_prints_ttft_and_output(capsys):
    from tp.model.launch import main

    assert main(["--model", "tiny", "--fmt", "mxfp4", "--min-bytes", "0", "--emulate", "2",
                 "--max-new-tokens", "3", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert "time to first token:" in out and "TP=2 (emulated)" in out and "fp4_e2m1/b32/e8m0" in out
    assert len(out.split("output:")[1].split()) == 3


def test_launcher_reads_a_policy_file(capsys, tmp_path):
    from tp.model.launch import main

    path = tmp_path / "policy.json"
    tp.CommPolicy("int4_b32", min_bytes=0, rules=(tp.Rule("mxfp8_e4m3", kind="mlp"),)).to_file(path)
    assert main(["--model", "tiny", "--policy", str(path), "--emulate", "2", "--max-new-tokens", "1", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert "communication: fmt=int4/b32/e8m0, algorithm=gather, min_bytes=0, 1 rules" in out


def test_launcher_bad_policy_file_and_empty_prompt_are_clear_errors(capsys, tmp_path):
    """A missing or malformed --policy file and an empty --prompt: a message and exit code 2, no traceback."""
    from tp.model.launch import main

    assert main(["--model", "tiny", "--policy", str(tmp_path / "missing.json"), "--emulate", "2"]) == 2
    err = capsys.readouterr().err
    assert "python -m tp: policy file" in err and "missing.json" in err and "Traceback" not in err
    (tmp_path / "bad.json").write_text('{"kind": "qformats-tp-policy", "version": 1, "all_gather": "false"}')
    assert main(["--model", "tiny", "--policy", str(tmp_path / "bad.json"), "--emulate", "2"]) == 2
    assert "all_gather must be true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "", "--emulate", "2"])
    assert e.value.code == 2 and "--prompt is empty" in capsys.readouterr().err


def test_checkpoint_index_naming_files_outside_its_folder_is_refused(tmp_path):
    import json

    from tp.model.checkpoint import SafetensorsSource

    d = tmp_path / "ckpt"
    d.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    for bad in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors"), "sub/model.safetensors",
                "..", "model.bin", 3):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(ValueError, match="a shard must be a \\*.safetensors file inside"):
            SafetensorsSource(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a safetensors index with a weight_map"):
        SafetensorsSource(d)
