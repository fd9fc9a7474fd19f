"""Launch configurations of the codec kernel: blocks per program and warps.

The kernel is memory-bound once its per-element work is small; what matters then is enough
bytes in flight per SM (a few thousand elements per program) without spilling registers.
``GPU_TILES`` maps the kind of step to (elements per program, warps); it was chosen by a
sweep of ``benchmarks/codec_gpu.py --tile elements,warps`` (one run per tile, the command is
in each result file's first line) on the device named in ``MEASURED_ON`` (the runs are in
benchmarks/results/kernels/). ``QFORMATS_TILE="elements,warps"`` overrides it (for sweeps).

In Triton's CPU interpreter the cost is per program instance, so there the tile is as large
as memory comfortably allows (one program per 64k elements).

Cost of a lookup: nanoseconds.
"""
from __future__ import annotations

import os

MEASURED_ON = "NVIDIA H200 (benchmarks/results/kernels/codec_h200_sweep_tile_*.jsonl)"
# (elements per program, num_warps) per step
GPU_TILES = {
    "quantize": (4096, 4),
    "dequantize": (4096, 4),
}
INTERPRETER_TILE = 1 << 16


def config(kc, n_elems: int, device_type: str, step: str = "quantize") -> tuple[int, int]:
    """(blocks per program, num_warps) for a launch over ``n_elems`` padded elements of the
    lowered format ``kc`` on a device of type ``device_type``."""
    if device_type != "cuda":
        tile, warps = INTERPRETER_TILE, 4
    else:
        override = os.environ.get("QFORMATS_TILE")
        if override:
            t, w = override.split(",")
            tile, warps = int(t), int(w)
        else:
            tile, warps = GPU_TILES[step]
    return max(1, tile // kc.BP2), warps
