"""Static profile of the codec kernel without a GPU: every launch the launchers make, compiled
for a CUDA target on this (CPU) machine, with its SASS instruction count, registers, barriers,
shared-memory accesses and warp shuffles.

    python benchmarks/sass_report.py [--formats mxfp4,int5/b32/bf16+h32] [--steps q_bf16,ds2_res] \
        [--arch 90] [--out report.md] [--hashes hashes.txt]

Use it to find a kernel's limiter before spending device time (instructions per element: SASS
divided by the elements each thread of the launch handles, e.g. 32 for the tile table's 4096
elements on 128 threads; a static count per element; the quantizers are straight-line code, the decoders carry a rarely taken
saturating path, so theirs overstates), and to prove a refactor changed no instruction:
``--hashes`` writes one hash of each launch's instruction text (addresses stripped), and two
builds with equal files compile to identical code. Cost: about a second per launch (Triton and
ptxas on the CPU); nothing runs.

How: a stand-in Triton driver reports a CUDA target, every launch is compiled through the real
launchers (``lowering.launch``, the GPU tile table, the launch options) with Triton's warm-up
path instead of running, and ``cuobjdump`` (shipped with Triton) reads the cubin. Relies on
Triton's driver and JIT internals (checked with Triton 3.6).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, never interpret
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia as _nv  # noqa: E402
import triton.runtime.jit as _jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

FORMATS = ["mxfp4", "mxfp8_e4m3", "mxfp6_e3m2", "nvfp4", "int8/b32/bf16", "int6/b32/bf16", "int5/b32/bf16+h32",
           "int8/b32/bf16+h32", "int5/b64/e4m3+h64", "uint4/b128/fp16+zp", "int4/b32/fp32", "fp3_e1m1/b32/e8m0"]
STEPS = ["q_bf16", "q_f32_deq", "rq2", "dq1", "ds2_res", "ds8", "peers_sum", "peers_each", "norm2", "norm_each"]
ROWS, WIDTH = 64, 8192
_CUOBJDUMP = os.path.join(os.path.dirname(_nv.__file__), "bin", "cuobjdump")


class _StandInDriver:
    """What Triton's JIT asks the active driver before it compiles (no device behind it)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


def _capture():
    """Make every JIT launch compile without running; returns the list the kernels land in."""
    compiled = []
    run = _jit.JITFunction.run

    def warm(self, *args, grid, warmup, **kw):
        k = run(self, *args, grid=grid, warmup=True, **kw)
        compiled.append(k)
        return k

    _jit.JITFunction.run = warm
    return compiled


def _sass(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ins = [re.sub(r"/\*[0-9a-f]{4}\*/", "", line).split(";")[0].strip() for line in text.splitlines()
           if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    ops = [re.sub(r"^@!?U?P[0-9T] ", "", i).split()[0] if i else "" for i in ins]
    regs = re.search(r"REG:(\d+)", res)
    return dict(sass=len(ins), regs=int(regs.group(1)) if regs else None,
                bar=sum(o.startswith("BAR") for o in ops), smem=sum(o.startswith(("STS", "LDS")) for o in ops),
                shfl=sum(o.startswith("SHFL") for o in ops),
                hash=hashlib.sha1("\n".join(ins).encode()).hexdigest()[:12])


def _elements_per_thread(kernel) -> float:
    """Elements a thread of this compiled launch handles: BPP blocks of BP2 lanes per program
    over its num_warps * 32 threads (read from the launch, so QFORMATS_TILE overrides count)."""
    names = kernel.src.fn.arg_names
    const = {names[k[0]]: v for k, v in kernel.src.constants.items()}
    return const["BPP"] * const["F"].BP2 / (32 * kernel.metadata.num_warps)


def _launches(kc, width: int):
    """(step name, call) of every launch shape the collectives use, on CPU stand-in tensors."""
    from lowering import launch as L

    x = torch.randn(ROWS, width).to(torch.bfloat16)
    nb = kc.layout(ROWS).total
    bufs = torch.zeros(8, nb, dtype=torch.uint8)
    ptrs = torch.zeros(2, dtype=torch.int64)
    w = torch.ones(width, dtype=torch.bfloat16)
    bf = torch.bfloat16
    return [
        ("q_bf16", lambda: L.quantize(x, kc)),
        ("q_f32_deq", lambda: L.quantize(x.float(), kc, deq_dtype=bf)),
        ("rq2", lambda: L.quantize(None, kc, shape=(ROWS, width), bufs=bufs[:2])),
        ("dq1", lambda: L.dequantize(bufs[:1], kc, ROWS, width, bf)),
        ("ds2_res", lambda: L.dequantize(bufs[:2], kc, ROWS, width, bf, residual=x)),
        ("ds8", lambda: L.dequantize(bufs, kc, ROWS, width, torch.float16)),
        ("peers_sum", lambda: L.dequantize_peers(ptrs, 0, kc, ROWS, width, torch.empty(ROWS, width, dtype=bf),
                                                 summed=True)),
        ("peers_each", lambda: L.dequantize_peers(ptrs, 0, kc, ROWS, width, torch.empty(2 * ROWS, width, dtype=bf),
                                                  summed=False)),
        ("norm2", lambda: L.dequantize_rmsnorm(bufs[:2], kc, ROWS, width, bf, x, w, 1e-6)),
        ("norm_each", lambda: L.dequantize_rmsnorm(bufs[:2], kc, ROWS, width, bf, torch.cat([x, x]), w, 1e-6,
                                                   each=True)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--steps", default=",".join(STEPS), help=f"a subset of {','.join(STEPS)}")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90: H100/H200)")
    ap.add_argument("--out", help="also write the table (Markdown) here")
    ap.add_argument("--hashes", help="write 'format step#launch sass hash' lines here (compare two builds)")
    a = ap.parse_args(argv)
    steps = a.steps.split(",")
    bad = sorted(set(steps) - set(STEPS))
    if bad:
        ap.error(f"unknown steps {bad}: valid are {STEPS}")
    driver.set_active(_StandInDriver(a.arch))
    compiled = _capture()
    from lowering import launch
    from lowering.constants import lower

    config = launch.config
    launch.config = lambda kc, n, device_type, step="quantize": config(kc, n, "cuda", step)  # the GPU tiles
    launch._plan.cache_clear()
    rows, hashes = [], []
    for fmt in a.formats.split(","):
        kc = lower(fmt, WIDTH, "cuda")
        for step, call in _launches(kc, WIDTH):
            if step not in steps:
                continue
            compiled.clear()
            call()
            for i, k in enumerate(compiled):
                r = _sass(k)
                per_thread = _elements_per_thread(k)
                rows.append(f"| {fmt} | {step}#{i} | {r['sass']} | {r['sass'] / per_thread:.1f} | {r['regs']} | "
                            f"{r['bar']} | {r['smem']} | {r['shfl']} |")
                hashes.append(f"{fmt} {step}#{i} {r['sass']} {r['hash']}")
                print(rows[-1], flush=True)
    head = [f"SASS of the codec kernel's launches for sm_{a.arch} (triton {triton.__version__}, torch "
            f"{torch.__version__}; `{' '.join(['python', 'benchmarks/sass_report.py'] + (argv or sys.argv[1:]))}`)", "",
            "| format | step#launch | SASS | per element | registers | barriers | smem ld/st | shuffles |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(head + rows) + "\n")
    if a.hashes:
        with open(a.hashes, "w") as f:
            f.write("\n".join(hashes) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
