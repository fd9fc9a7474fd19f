"""Issue 8 benchmark: time-to-first-token of the TP Llama model with compressed all-reduce, TP=2.

Run (2 GPUs; NVLink as is, then the host-memory path):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=. \
      timeout 300 torchrun --nproc-per-node 2 benchmarks/ttft_gpu.py --regime nvlink --out T.jsonl
    NCCL_P2P_DISABLE=1 ... --regime p2p_off --out T2.jsonl

Random bf16 weights in Llama-3-8B shape (32 layers) and a Llama-3-70B-shaped slice (hidden 8192,
FFN 28672, 64/8 heads, --layers-70b layers, reported per layer). Prefill of 1k/4k/8k/16k tokens
(batch 1) and a batched case (4 x 2k), the logits of the last token only (what TTFT needs);
decode: per-token latency at batch 1 and 32 after a 256-token prompt. Variants, all in one
process: plain NCCL bf16; no communication at all (the all-reduce replaced by identity: its
difference to NCCL is the communication share); ``fused`` (tp.comm.fused, auto policy: fused above
64 MiB eager) in formats mxfp8_e4m3 / mxfp4 / int4/b32/bf16 (NVLink regime only); the NCCL-path
``gather`` and ``two_shot`` with the lowering kernels (tp.comm.collectives, CommPolicy threshold).
Eager mode (no torch.compile, no CUDA graphs). Median of --runs runs after 2 warm-ups, CUDA
events, max over ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


@torch.no_grad()
def prefill(model, ids):
    """TPLlama.forward, but the LM head on the last position only (the first token's logits)."""
    from tp.model.llama import rope_inv_freq

    x = model.model.embed_tokens(ids)
    pos = torch.arange(0, ids.shape[1], device=ids.device, dtype=torch.float32)
    freqs = pos[:, None] * rope_inv_freq(model.cfg).to(pos.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, None)
    return model.lm_head(model.model.norm(x[:, -1:]))


def timed(fn, runs, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    ts = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    t = torch.tensor([statistics.median(ts)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def report(paths, out_md):
    """Markdown tables from result JSONL files (no GPU): TTFT speedups, communication share, decode."""
    lines = ["# TTFT, TP=2, random bf16 weights (eager, last-token logits)", ""]
    for p in paths:
        recs = [json.loads(line) for line in open(p)]
        h, rows = recs[0], recs[1:]
        lines += [f"## {os.path.basename(p)}: {h['device']} x{h['world']}, regime {h['regime']}, torch {h['torch']}, "
                  f"triton {h['triton']}, {h['time']}", "", f"`{h['command']}`, env {h['env']}", "",
                  "| model | batch x tokens | variant | format | TTFT ms | speedup vs NCCL | comm share of NCCL run |",
                  "|---|---|---|---|---|---|---|"]
        key = lambda r: (r["model"], r["batch"], r["tokens"])
        base = {key(r): r["ms"] for r in rows if r["kind"] == "prefill" and r["variant"] == "nccl_bf16"}
        noc = {key(r): r["ms"] for r in rows if r["kind"] == "prefill" and r["variant"] == "no_comm"}
        for r in sorted((r for r in rows if r["kind"] == "prefill"), key=lambda r: (r["model"], r["batch"] * r["tokens"], r["batch"])):
            k = key(r)
            per = f" ({r['ms_per_layer']:.2f}/layer)" if r["model"] != "llama3-8b" else ""
            lines.append(f"| {r['model']} | {r['batch']}x{r['tokens']} | {r['variant']} | {r['fmt'] or 'bf16'} | "
                         f"{r['ms']:.2f}{per} | {base[k] / r['ms']:.3f} | {1 - noc[k] / base[k]:.1%} |")
        dbase = {r["batch"]: r["ms"] for r in rows if r["kind"] == "decode" and r["variant"] == "nccl_bf16"}
        lines += ["", "| decode batch | variant | format | ms/token | vs NCCL |", "|---|---|---|---|---|"]
        for r in rows:
            if r["kind"] == "decode":
                lines.append(f"| {r['batch']} | {r['variant']} | {r['fmt'] or 'bf16'} | {r['ms']:.3f} | "
                             f"{r['ms'] / dbase[r['batch']]:.3f} |")
        lines.append("")
    open(out_md, "w").write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--report":  # offline: python benchmarks/ttft_gpu.py --report OUT.md F.jsonl...
        report(sys.argv[3:], sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--regime", choices=("nvlink", "p2p_off"), default="nvlink")
    ap.add_argument("--prompts", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--fmts", nargs="*", default=["mxfp8_e4m3", "mxfp4", "int4/b32/bf16"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--layers-70b", type=int, default=4)
    ap.add_argument("--out", default="ttft.jsonl")
    args = ap.parse_args()

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    dev = torch.device("cuda", local)

    import triton

    import tp
    import tp.model.layers as L
    from lowering import LoweredCodec
    from tp.comm import fused as F

    tp.comm.collectives.set_codec(LoweredCodec())
    orig_all_reduce = L.all_reduce
    header = dict(kind="header", device=torch.cuda.get_device_name(dev), world=world, regime=args.regime,
                  torch=torch.__version__, triton=triton.__version__,
                  command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                  env={k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM"))},
                  time=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(json.dumps(header))
    fout = open(args.out, "w") if dist.get_rank() == 0 else None

    def emit(rec):
        if fout:
            fout.write(json.dumps(rec) + "\n")
            fout.flush()

    emit(header)
    ar = None
    if args.regime == "nvlink":
        ar = F.FusedAllReduce(max_tokens=max(max(args.prompts), 8192), hidden=8192, fmts=args.fmts,
                              min_bytes=None)

    def variants():
        yield "nccl_bf16", None, tp.CommPolicy(None), orig_all_reduce
        yield "no_comm", None, tp.CommPolicy(None), (lambda x, fmt=None, group=None, *a, **k: x)
        if ar is not None:
            for f in args.fmts:
                yield "fused", f, tp.CommPolicy(f, min_bytes=0), (
                    lambda x, fmt=None, group=None, *a, **k: ar(x, fmt, inplace=True))
        for f in args.fmts:
            for alg in ("gather", "two_shot"):
                if alg == "two_shot" and f != "mxfp4":
                    continue
                yield f"nccl_{alg}", f, tp.CommPolicy(f, algorithm=alg), orig_all_reduce

    rows = []
    for shape_name, cfg in (("llama3-8b", tp.LlamaConfig.preset("llama3-8b")),
                            ("llama3-70b-slice", tp.LlamaConfig.preset("llama3-70b").replace(
                                num_hidden_layers=args.layers_70b))):
        cfg = cfg.replace(max_position_embeddings=max(32768, max(args.prompts)))
        t0 = time.time()
        model = tp.TPLlama(cfg, tp.TPContext.from_group(), dtype=torch.bfloat16, device=dev)
        tp.init_random_(model, seed=0)
        model.eval()
        log(f"{shape_name}: built in {time.time() - t0:.1f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        prompts = [(1, n) for n in args.prompts] + [(4, 2048)]
        if shape_name != "llama3-8b":
            prompts = [(1, 4096), (1, 8192)]
        g = torch.Generator(device=dev).manual_seed(1)
        for name, fmt, pol, fn in variants():
            if shape_name != "llama3-8b" and fmt not in (None, "mxfp4"):
                continue
            L.all_reduce = fn
            model.set_policy(pol)
            try:
                for b, n in prompts:
                    ids = torch.randint(0, cfg.vocab_size, (b, n), generator=g, device=dev)
                    t = timed(lambda: prefill(model, ids), args.runs)
                    rec = dict(kind="prefill", regime=args.regime, model=shape_name, layers=cfg.num_hidden_layers,
                               variant=name, fmt=fmt, batch=b, tokens=n, ms=t, ms_per_layer=t / cfg.num_hidden_layers,
                               msg_mib=b * n * cfg.hidden_size * 2 / 2**20)
                    rows.append(rec)
                    emit(rec)
                if shape_name == "llama3-8b":
                    for b in (1, 32):
                        ids = torch.randint(0, cfg.vocab_size, (b, 256), generator=g, device=dev)
                        step = torch.randint(0, cfg.vocab_size, (b, 1), generator=g, device=dev)

                        def decode():
                            cache = tp.KVCache(cfg.num_hidden_layers)
                            with torch.no_grad():
                                model(ids, cache)
                            return cache

                        base_cache = decode()
                        k0 = [k.clone() for k in base_cache.k]
                        v0 = [v.clone() for v in base_cache.v]

                        def one_step():
                            base_cache.k = list(k0)
                            base_cache.v = list(v0)
                            with torch.no_grad():
                                model(step, base_cache)

                        t = timed(one_step, 3 * args.runs)
                        rec = dict(kind="decode", regime=args.regime, model=shape_name, variant=name, fmt=fmt,
                                   batch=b, ms=t, msg_kib=b * cfg.hidden_size * 2 / 1024)
                        rows.append(rec)
                        emit(rec)
            finally:
                L.all_reduce = orig_all_reduce
            log(f"{shape_name} {name} {fmt or ''} done")
        del model
        torch.cuda.empty_cache()

    if dist.get_rank() == 0:
        print(f"\n## TTFT {header['device']} x{world}, regime {args.regime}, torch {torch.__version__}")
        base = {(r["model"], r["batch"], r["tokens"]): r["ms"] for r in rows
                if r["kind"] == "prefill" and r["variant"] == "nccl_bf16"}
        print("| model | batch x tokens | variant | format | TTFT ms | speedup vs NCCL | comm share (NCCL) |")
        print("|---|---|---|---|---|---|---|")
        nocomm = {(r["model"], r["batch"], r["tokens"]): r["ms"] for r in rows
                  if r["kind"] == "prefill" and r["variant"] == "no_comm"}
        for r in rows:
            if r["kind"] != "prefill":
                continue
            k = (r["model"], r["batch"], r["tokens"])
            share = 1 - nocomm[k] / base[k] if k in nocomm else float("nan")
            print(f"| {r['model']} | {r['batch']}x{r['tokens']} | {r['variant']} | {r['fmt'] or 'bf16'} | "
                  f"{r['ms']:.2f} | {base[k] / r['ms']:.3f} | {share:.1%} |")
        dbase = {r["batch"]: r["ms"] for r in rows if r["kind"] == "decode" and r["variant"] == "nccl_bf16"}
        print("\n| decode batch | variant | format | ms/token | vs NCCL |")
        print("|---|---|---|---|---|")
        for r in rows:
            if r["kind"] == "decode":
                print(f"| {r['batch']} | {r['variant']} | {r['fmt'] or 'bf16'} | {r['ms']:.3f} | "
                      f"{r['ms'] / dbase[r['batch']]:.3f} |")
    if fout:
        fout.close()
    F.shutdown(ar)


if __name__ == "__main__":
    main()
