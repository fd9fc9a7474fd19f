"""Run a prompt through the TP model with a chosen communication format; print TTFT and the output.

Single node, N ranks (GPUs with NCCL, else CPU processes with gloo)::

    torchrun --nproc-per-node 2 -m tp --model llama3-8b --fmt mxfp4 --prompt "The capital of France is"
    torchrun --nproc-per-node 2 -m tp --model ./smollm2-dir --fmt fp4_b64 --algorithm two_shot
    torchrun --nproc-per-node 3 -m tp --model path/to/model.gguf --calibration cal.json

``--model`` is a checkpoint (a ``save_pretrained`` directory with safetensors, or a .gguf
file) or a shape preset (``tiny``, ``smollm2-135m``, ``llama3-8b``, ``llama3-70b``) with random
weights, for timing. Without torchrun, ``python -m tp ...`` runs one process (world size 1),
or ``--emulate N`` runs N ranks' arithmetic in one process through the exact emulator.

Multi-node: torchrun's own rendezvous, nothing home-made. Run the same command on every
node, e.g. TP=16 over two 8-GPU nodes::

    torchrun --nnodes 2 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint NODE0_HOST:29500 --rdzv-id tp-demo \\
        -m tp --model /shared/ckpt --fmt mxfp4 --algorithm two_shot

(or the static form ``--nnodes 2 --node-rank R --master-addr NODE0_HOST --master-port 29500``).
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; this module calls
``init_process_group`` with them (``env://``), binds each rank to GPU ``LOCAL_RANK``, and
tears the group down at the end. The whole world is one TP group: the compressed all-reduce
is meant for the slow inter-node (or PCIe) links, where it pays most.

Time to first token is the prefill plus the first argmax, measured after ``--warmup`` untimed
runs, with a device sync before each clock read; it is the max over ranks.

It also prints how many row-parallel all-reduces of the timed run were compressed: messages
under ``--min-bytes`` (default 64 KiB) stay plain bf16, which on a small model or a
short prompt is all of them (one decode step of ``tiny`` moves 64 values); pass
``--min-bytes 0`` to compress every one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qformats.numeric import DTYPE_BY_NAME

from ..comm.call import ALGORITHMS
from ..comm.collectives import DEFAULT_MIN_BYTES, compresses
from ..comm.policy import CommPolicy
from .layers import RowParallelLinear, TPContext
from .llama import PRESET_CONFIGS, LlamaConfig, TPLlama, generate, init_random_


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tp", description="Tensor-parallel generation with compressed all-reduce.",
                                epilog="Run under torchrun for N ranks; see `python -c 'import tp.model.launch; help(tp.model.launch)'`.")
    p.add_argument("--model", required=True,
                   help=f"checkpoint directory or .gguf file, or a random-weight preset: {', '.join(PRESET_CONFIGS)}")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--fmt", default=None, help="communication format: preset or spec string (default: none)")
    p.add_argument("--algorithm", default="gather", choices=ALGORITHMS)
    p.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES,
                   help="all-reduces smaller than this stay uncompressed")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="a CommPolicy JSON file (tp.CommPolicy.to_file); replaces --fmt/--algorithm/--min-bytes")
    p.add_argument("--calibration", default=None, help="JSON from tp.model.calibrate: outlier formats per layer (static or dynamic scales for the rest)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPE_BY_NAME), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--emulate", type=int, default=0, metavar="N", help="one process emulating N ranks")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed one")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (presets)")
    return p


def _tokenizer(args, model_path: Path | None):
    src = args.tokenizer or (str(model_path) if model_path is not None else None)
    if src is None:
        return None
    try:
        from transformers import AutoTokenizer

        p = Path(src)
        if p.is_file() and p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer degrades to token ids, loudly
        print(f"[tp] no tokenizer from {src} ({type(e).__name__}: {e}); using byte ids", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt is empty: give the text the model should continue")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    own_group = False
    if args.emulate and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise SystemExit("--emulate runs all ranks in one process; do not combine it with torchrun")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        own_group = True
    try:
        return _run(args, use_cuda)
    except ValueError as e:  # a bad argument for this model (TP size, format, ...): no traceback
        print(f"python -m tp: {e}", file=sys.stderr)
        return 2
    finally:
        if own_group:
            # every rank's last collective done before any rank tears its transport down: without
            # the barrier a gloo rank could exit while its peer's pair thread still ran (SIGABRT)
            dist.barrier()
            dist.destroy_process_group()


def _run(args, use_cuda: bool) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = DTYPE_BY_NAME[args.dtype] if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    ctx = TPContext.emulated(args.emulate) if args.emulate else TPContext.from_group()
    # CommPolicy.load: a missing or malformed file is a ValueError naming the file (no traceback)
    policy = CommPolicy.load(args.policy) if args.policy else CommPolicy(args.fmt, args.algorithm, args.min_bytes)
    if args.calibration:
        from .calibrate import Calibration

        policy = policy.with_calibration(Calibration.load(args.calibration))
    model_path = None
    if args.model in PRESET_CONFIGS:
        cfg = LlamaConfig.preset(args.model)
        model = init_random_(TPLlama(cfg, ctx, policy, dtype=dtype, device=device), seed=args.seed).eval()
        source = "random weights"
    else:
        from .checkpoint import load_model

        model_path = Path(args.model)
        model = load_model(model_path, ctx, policy, dtype=dtype, device=device)
        cfg, source = model.cfg, str(model_path)
    tok = _tokenizer(args, model_path)
    if tok is not None:
        ids = torch.tensor([tok.encode(args.prompt)], device=device)
        eos = tok.eos_token_id
    else:
        ids = torch.tensor([[b % cfg.vocab_size for b in args.prompt.encode()]], device=device)
        eos = None
    if ids.numel() == 0:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens: give the text the model should continue")
    fused = None
    if policy.algorithm == "fused" and use_cuda and ctx.sharded and policy.formats():
        from ..comm.fused import FusedAllReduce  # collective allocation: every rank, before the first forward

        fused = FusedAllReduce(ctx.group, max_tokens=ids.numel(), hidden=cfg.hidden_size, fmts=policy.formats())
    try:
        return _generate(args, ctx, policy, model, cfg, source, tok, ids, eos, device, dtype, use_cuda)
    finally:
        if fused is not None:
            fused.close()


class CollectiveCount:
    """Counts the row-parallel all-reduces of ``model`` while enabled, compressed or plain, by
    the same rule the collectives apply (:func:`tp.comm.collectives.compresses`); a forward hook per
    row-parallel layer, so it costs a dict update per layer call."""

    def __init__(self, model: torch.nn.Module):
        self.compressed = self.plain = 0
        self.formats: set[str] = set()
        self.enabled = False
        self._hooks = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, RowParallelLinear)]

    def _hook(self, mod: RowParallelLinear, _inp, out: torch.Tensor) -> None:
        if not self.enabled or mod.ctx.world_size == 1:  # world 1: nothing is communicated
            return
        fmt = mod.decision(out.numel() * out.element_size()).fmt  # out has the partial's shape and dtype
        if compresses(out, fmt):
            self.compressed += 1
            self.formats.add(str(fmt))
        else:
            self.plain += 1

    def describe(self, min_bytes: int) -> str:
        total = self.compressed + self.plain
        if total == 0:
            return "row-parallel all-reduces: none (one rank: nothing is communicated)"
        line = f"row-parallel all-reduces compressed: {self.compressed} of {total}"
        if self.formats:
            line += f" ({', '.join(sorted(self.formats))})"
        if self.plain and min_bytes:
            line += (f"; {self.plain} stayed plain: under --min-bytes {min_bytes} "
                     "(pass --min-bytes 0 to compress every one)")
        return line


def _generate(args, ctx, policy, model, cfg, source, tok, ids, eos, device, dtype, use_cuda) -> int:
    sync = torch.cuda.synchronize if use_cuda else None
    for _ in range(args.warmup):
        generate(model, ids, 1, sync=sync)
    count = CollectiveCount(model)
    count.enabled = True
    out, ttft, total = generate(model, ids, args.max_new_tokens, eos_token_id=eos, sync=sync)
    count.enabled = False
    if ctx.sharded:  # report the slowest rank
        t = torch.tensor([ttft, total], dtype=torch.float64, device=device if use_cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
        ttft, total = t.tolist()
    if ctx.rank == 0:
        new = out[0, ids.shape[1]:].tolist()
        backend = dist.get_backend(ctx.group) if ctx.sharded else ("emulated" if ctx.emulate else "single process")
        print(f"model: {args.model} ({source}), {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
        print(f"tensor parallel: TP={ctx.world_size} ({backend}), dtype {str(dtype).replace('torch.', '')}, "
              f"device {device.type}")
        print(f"communication: {policy}")
        print(count.describe(policy.min_bytes))
        print(f"prompt tokens: {ids.shape[1]}")
        print(f"time to first token: {ttft * 1e3:.2f} ms")
        if len(new) > 1:
            print(f"generated {len(new)} tokens in {total * 1e3:.2f} ms "
                  f"({(total - ttft) / (len(new) - 1) * 1e3:.2f} ms/token after the first)")
        text = tok.decode(new) if tok is not None else " ".join(map(str, new))
        print(f"output: {text}")
    return 0
