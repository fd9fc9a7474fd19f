"""Launch configurations of the codec kernels: elements per program and warps, keyed by size.

The kernels are memory-bound; what matters is enough bytes in flight per SM (large tiles)
without spilling registers (the per-element integer work lives in registers). The GPU table
below was chosen by :func:`sweep` on the device named in ``MEASURED_ON`` (run
``python -m lowering.tuning`` on a GPU to redo it; the output is the table to paste).

In Triton's CPU interpreter the cost is per program instance, so there the tile is as large
as memory comfortably allows (one program per 64k elements).

Cost of a lookup: a dict scan, nanoseconds.
"""
from __future__ import annotations

import os

# Measured by `python -m lowering.tuning` (see benchmarks/results/ for the run that chose it).
MEASURED_ON = "NVIDIA H100 80GB HBM3 (benchmarks/results/sweep_h100.log)"
# (max elements, (elements per program, num_warps)), first row whose bound >= n wins.
# The sweep (4 and 256 MiB bf16, mxfp4 / mxfp8_e4m3 / mxfp6_e3m2 / flash_int4): 2048 elements
# with 4 warps was within ~5% of the best for every format and op at both sizes; 8192-element
# tiles lost 20-100% (register pressure), 8 warps helped only the zero-point quantiser.
GPU_TABLE: tuple = (
    (1 << 62, (2048, 4)),
)
INTERPRETER_TILE = 1 << 16


def config(bp2: int, n_elems: int, device) -> tuple[int, int]:
    """(blocks per program, num_warps) for a launch over ``n_elems`` padded elements with
    blocks of ``bp2`` lanes (a power of two) on ``device``."""
    if getattr(device, "type", str(device)) != "cuda":
        tile, warps = INTERPRETER_TILE, 4
    else:
        override = os.environ.get("QFORMATS_TILE")  # for sweeps: "elements,warps"
        if override:
            t, w = override.split(",")
            tile, warps = int(t), int(w)
        else:
            tile, warps = next(cfg for bound, cfg in GPU_TABLE if n_elems <= bound)
    return max(1, tile // bp2), warps


def sweep(sizes_mib=(4, 256), tiles=(1024, 2048, 4096, 8192), warps=(4, 8),
          fmts=("mxfp4", "mxfp8_e4m3", "flash_int4", "mxfp6_e3m2")):
    """Time quantize + dequantize for each (tile, warps) on bf16 inputs; print the table.

    Needs a CUDA GPU. Returns the rows [(size_mib, tile, warps, fmt, quant_ms, dequant_ms)].
    """
    import torch
    import triton.testing

    from . import kernels
    from .constants import lower

    rows = []
    for mib in sizes_mib:
        n = mib * (1 << 20) // 2
        x = torch.randn(n // 4096, 4096, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        cms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
        print(f"{mib:5d} MiB copy: {cms*1e3:8.1f} us = {2 * x.numel() * 2 / cms / 1e6:.0f} GB/s (read + write)", flush=True)
        for fmt in fmts:
            kc = lower(fmt, 4096, x.device)
            for t in tiles:
                for w in warps:
                    os.environ["QFORMATS_TILE"] = f"{t},{w}"
                    try:
                        buf, _ = kernels.quantize(x, kc)
                        qms = triton.testing.do_bench(lambda: kernels.quantize(x, kc), return_mode="median")
                        b2 = buf.view(1, -1)
                        dms = triton.testing.do_bench(
                            lambda: kernels.dequantize(b2, kc, x.shape[0], 4096, torch.bfloat16), return_mode="median")
                    finally:
                        os.environ.pop("QFORMATS_TILE", None)
                    rows.append((mib, t, w, fmt, qms, dms))
                    moved = x.numel() * 2 + buf.numel()
                    print(f"{mib:5d} MiB {fmt:14s} tile {t:5d} warps {w}: quant {qms*1e3:8.1f} us "
                          f"({moved / qms / 1e6:.0f} GB/s)  dequant {dms*1e3:8.1f} us ({moved / dms / 1e6:.0f} GB/s)",
                          flush=True)
    return rows


if __name__ == "__main__":
    sweep()
