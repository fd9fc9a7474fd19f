"""Run one vLLM engine on a checkpoint at TP=N on CPU and save what tests/tp/test_vllm.py checks.

``python tests/tp/vllm_engine.py MODEL OUT --tp 2 --mode eager|compiled [--config JSON] [--no-plugin]``
writes OUT (torch.save): for one short prompt generated alone (``short``: its token ids, prompt
and sample logprobs, and with the plugin the counters after it) and then for PROMPTS together,
the same plus, with the plugin, the per-worker counters and captured (site, partial, result)
calls of that second run. A script, not a test: vLLM starts its
workers by spawn, and one engine per process shuts down cleanly.
"""
import argparse
import json
import os
import sys
import time

PROMPTS = [[1, 17, 300, 45, 999, 3, 512, 77, 8, 201, 66, 5], [1, 4, 4, 90, 610, 22, 13, 700, 31, 2]]
SHORT = [1, 17, 300]  # generated alone first: every message of it is <= 3 tokens wide


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--config", default=None, help="additional_config['qformats'] as JSON")
    ap.add_argument("--no-plugin", action="store_true", help="VLLM_PLUGINS: load no qformats plugin")
    ap.add_argument("--max-tokens", type=int, default=6)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % max(os.cpu_count() or 1, 1))
                                                                   for i in range(a.tp)))
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")  # a cache hit fails to load in vLLM 0.32
    if a.no_plugin:
        os.environ["VLLM_PLUGINS"] = "none"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    kw = {}
    if a.config is not None:
        kw["additional_config"] = {"qformats": json.loads(a.config)}
    if not a.no_plugin:
        kw["worker_extension_cls"] = "tp.vllm_plugin.WorkerExtension"
    llm = LLM(a.model, tensor_parallel_size=a.tp, distributed_executor_backend="mp", dtype="float32",
              enforce_eager=a.mode == "eager", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=128, seed=0, max_logprobs=20, **kw)
    t_start = time.time() - t0
    plugin = not a.no_plugin
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, prompt_logprobs=20, logprobs=5, detokenize=False,
                        ignore_eos=True)

    def run(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                "prompt_logprobs": [[None if d is None else {k: v.logprob for k, v in d.items()}
                                     for d in o.prompt_logprobs] for o in outs],
                "logprobs": [[{k: v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs] for o in outs]}

    if plugin:
        llm.collective_rpc("qformats_reset")
    t1 = time.time()
    short = run([SHORT])
    if plugin:
        short["counters"] = llm.collective_rpc("qformats_counters")
        llm.collective_rpc("qformats_reset")
        llm.collective_rpc("qformats_capture", args=(True,))
    res = {**run(PROMPTS), "short": short, "prompts": PROMPTS, "start_s": t_start}
    res["generate_s"] = time.time() - t1
    if plugin:
        res["counters"] = llm.collective_rpc("qformats_counters")
        res["captured"] = llm.collective_rpc("qformats_captured")
    torch.save(res, a.out)
    print(f"engine start {t_start:.1f} s, generate {res['generate_s']:.1f} s", flush=True)
    llm.llm_engine.engine_core.shutdown()  # the engine core and its workers (os._exit alone orphans them)
    sys.stdout.flush()
    os._exit(0)  # everything is written; the rest of vLLM's teardown can linger


if __name__ == "__main__":
    main()
