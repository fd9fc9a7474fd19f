"""What the GPU benchmark scripts share (codec_gpu.py, rmsnorm_gpu.py): the run's environment
record, the JSONL sink every record goes to as soon as it exists, CUDA-graph timing, the HBM
copy rate measured in the same run, and the kernel tests' input generators.

Import it from a script run as ``python benchmarks/<script>.py`` (its folder is on sys.path),
after the script's own check for a GPU. Cost: a timing is ``QF_BENCH_REP_MS`` (default 100) ms
of CUDA-graph replays.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

WIDTH = 8192  # the hidden size every kernel table is measured at (tp.comm.cost prices others by bytes)
RECORDS: list = []
_SINK: list = []  # the open output file


def env() -> dict:
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), command=" ".join(sys.argv))


def open_sink(path: str) -> None:
    """Write every later :func:`record` to ``path`` (one JSON object per line) as it is made."""
    _SINK.append(open(path, "w"))


def record(**kw):
    RECORDS.append(kw)
    if _SINK:
        _SINK[0].write(json.dumps(kw) + "\n")
        _SINK[0].flush()
    return kw


def bench(fn, reps=int(os.environ.get("QF_BENCH_REP_MS", "100"))) -> float:
    """Median kernel time in microseconds, CUDA-graph replays."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=reps, return_mode="median") * 1e3


def rows_for(mib: float) -> int:
    """Rows of WIDTH bf16 values in ``mib`` MiB."""
    return max(1, int(mib * (1 << 20)) // 2 // WIDTH)


def copy_rate(mib: float) -> float:
    """The device-to-device copy rate (GB/s, bytes read + written) of ``mib`` MiB of bf16."""
    x = torch.randn(rows_for(mib), WIDTH, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    gbs = 2 * x.numel() * 2 / us / 1e3
    record(case="copy", mib=mib, us=us, gbs=gbs)
    return gbs


def tests_kernels():
    """The kernel tests' module: its input generator (``adversarial``) and bit comparison
    (``same_bits``), one definition of each."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lowering"))
    import test_kernels

    return test_kernels
