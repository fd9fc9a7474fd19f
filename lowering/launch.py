"""Launchers of the codec kernel (:func:`lowering.kernels._codec_kernel`) and its tile table.

Use the ``torch.ops.qformats`` ops of :mod:`lowering.ops` (they validate inputs and fall back
to the reference for unsupported formats); these launchers check buffer sizes and devices but
not values. Each takes a :class:`lowering.constants.KernelConstants` and passes its ``F`` (the
format, read by name in the kernel) plus the step's constexprs. Cost: one kernel launch per
call (two for per-tensor-scale formats' quantize), host work cached per launch shape.

Tile table: blocks per program and warps. The kernel is memory-bound once its per-element work
is small; what matters then is enough bytes in flight per SM (a few thousand elements per
program) without spilling registers. ``GPU_TILES`` maps the kind of step to (elements per
program, warps); it was chosen by a sweep of ``benchmarks/codec_gpu.py --tile elements,warps``
(one run per tile, the command is in each result file's first line) on the device named in
``MEASURED_ON`` (the runs are in benchmarks/results/kernels/). ``QFORMATS_TILE="elements,warps"``
overrides it (for sweeps: call ``_plan.cache_clear()`` after changing it). In Triton's CPU
interpreter the cost is per program instance, so there the tile is as large as memory
comfortably allows (one program per 64k elements).
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from .constants import KernelConstants, value_table
from .kernel_math import IO_BF16, IO_FP16, IO_FP32
from .kernels import _codec_kernel

_IO = {torch.float32: IO_FP32, torch.bfloat16: IO_BF16, torch.float16: IO_FP16}

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


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not hasattr(_codec_kernel, "run") or type(_codec_kernel).__name__ == "InterpretedFunction"


def _io_view(t: torch.Tensor) -> torch.Tensor:
    # the interpreter reads/writes bf16 as int16 bits (see _load_f32 / _store_f32)
    return t.view(torch.int16) if t.dtype == torch.bfloat16 and is_interpreted() else t


@functools.lru_cache(maxsize=1024)
def _plan(kc: KernelConstants, rows: int, width: int, nbytes_extra: int, device_type: str, step: str):
    """(layout, section offsets (scale, zero point, tensor scale, second and third code
    planes), blocks per program, launch options) of one launch shape
    (cached: call ``_plan.cache_clear()`` after changing ``QFORMATS_TILE``)."""
    lay = kc.layout(rows)
    n_elems = rows * lay.padded
    bpp, warps = config(kc, n_elems, device_type, step)
    opts = {} if is_interpreted() else dict(num_warps=warps, enable_fp_fusion=False, enable_reflect_ftz=False)
    opts["I64"] = max(n_elems, lay.total + nbytes_extra) >= (1 << 31) - (1 << 24)
    offs = (lay.offsets["scale"][0], lay.offsets["zp"][0], lay.offsets["ts"][0], *kc.plane_offsets(rows))
    return lay, offs, bpp, opts


def _out_buffer(out: torch.Tensor | None, nbytes: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != nbytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-D uint8 tensor of {nbytes} bytes, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def _out_values(out, rows: int, width: int, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty((rows, width), dtype=dtype, device=device)
    if out.dtype != dtype or out.numel() != rows * width or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {rows}x{width} values, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def _walign(kc: KernelConstants, *addresses: int) -> bool:
    """Whether every scale / zero-point word is SB-aligned: the section offsets, buffer
    strides and base addresses given are multiples of SB (then one integer load per word)."""
    return kc.SB == 1 or all(int(a) % kc.SB == 0 for a in addresses)


def _same_device(what: str, t: torch.Tensor, device) -> None:
    if t.device != torch.device(device):
        raise ValueError(f"{what} is on {t.device}, the launch on {device}")


def quantize(x2: torch.Tensor | None, kc: KernelConstants, *, shape: tuple | None = None,
             bufs: torch.Tensor | None = None, deq_dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None):
    """Wire buffer (uint8) of ``x2`` [rows, width] (contiguous fp32/bf16/fp16), or, with
    ``bufs`` [N, nbytes] uint8 (rows of any byte stride), of the fp32 rank-order sum of their
    decodes (then ``x2`` may be None and ``shape`` = (rows, width) gives the shape).

    ``out``: where to write the buffer (a contiguous uint8 tensor of exactly the wire size,
    e.g. a slot of a peer's symmetric buffer); default a new tensor. One kernel launch (two
    for per-tensor-scale formats). Returns (buffer, decode of the buffer as ``deq_dtype`` or
    None)."""
    if x2 is None and (bufs is None or shape is None):
        raise ValueError("quantize needs x2, or bufs together with shape=(rows, width)")
    rows, width = shape if x2 is None else x2.shape
    if width != kc.width:
        raise ValueError(f"constants lowered for width {kc.width}, got rows of {width}")
    dev = bufs.device if x2 is None else x2.device
    extra = 0 if bufs is None else bufs.stride(0) * bufs.shape[0]
    lay, offs, bpp, opts = _plan(kc, rows, width, extra, dev.type, "quantize")
    total = rows * lay.nblocks
    out = _out_buffer(out, lay.total, dev)
    _same_device("out", out, dev)
    deq = torch.empty((rows, width), dtype=deq_dtype, device=dev) if deq_dtype is not None else None
    amax = torch.zeros(1, dtype=torch.int32, device=dev) if kc.TS else out  # TS: absmax workspace
    grid = (triton.cdiv(total, bpp),)
    if bufs is None:
        xin, src, stride, n = _io_view(x2), out, 0, 1
    else:
        xin, src, stride, n = out, bufs, bufs.stride(0), bufs.shape[0]
    lut = value_table(kc, dev)
    dq = _io_view(deq) if deq is not None else out
    args = (xin, src, stride, src, 0, out, out, 0, dq, amax, lut, total, lay.nblocks, width, *offs)
    walign = _walign(kc, *offs[:2], out.data_ptr(), *(() if bufs is None else (bufs.data_ptr(), bufs.stride(0))))
    common = dict(SRC_BUFS=bufs is not None, TABLE=False, N_SRC=n, QUANT=True, SUM=True, WALIGN=walign,
                  IN_KIND=_IO.get(x2.dtype, 0) if x2 is not None else 0, OUT_KIND=0, HAS_RES=False, RES_KIND=0,
                  WRITE_DEQ=deq is not None, DEQ_KIND=_IO[deq_dtype] if deq is not None else 0, BPP=bpp,
                  F=kc.F, **opts)
    if kc.TS:  # pass 1: the tensor's finite absmax, for the per-tensor scale
        _codec_kernel[grid](*args, PHASE=0, **common)
    _codec_kernel[grid](*args, PHASE=1, **common)
    return out, deq


def dequantize(bufs: torch.Tensor, kc: KernelConstants, rows: int, width: int, dtype: torch.dtype,
               residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 rank-order sum of the decodes of ``bufs`` [N, nbytes] (rows of any byte stride)
    (+ ``residual``), as ``dtype`` [rows, width], written into ``out`` if given (contiguous).
    N = 1 is a plain decode. One kernel launch."""
    if width != kc.width:
        raise ValueError(f"constants lowered for width {kc.width}, got rows of {width}")
    lay, offs, bpp, opts = _plan(kc, rows, width, bufs.stride(0) * bufs.shape[0], bufs.device.type, "dequantize")
    out = _out_values(out, rows, width, dtype, bufs.device)
    _same_device("out", out, bufs.device)
    total = rows * lay.nblocks
    res = _io_view(residual) if residual is not None else out
    o = _io_view(out)
    _codec_kernel[(triton.cdiv(total, bpp),)](
        o, bufs, bufs.stride(0), bufs, 0, res, o, 0, o, o, value_table(kc, bufs.device),
        total, lay.nblocks, width, *offs,
        SRC_BUFS=True, TABLE=False, N_SRC=bufs.shape[0], QUANT=False, SUM=True, PHASE=1, IN_KIND=0,
        WALIGN=_walign(kc, *offs[:2], bufs.data_ptr(), bufs.stride(0)),
        OUT_KIND=_IO[dtype], HAS_RES=residual is not None, RES_KIND=_IO[residual.dtype] if residual is not None else 0,
        WRITE_DEQ=False, DEQ_KIND=0, BPP=bpp, F=kc.F, **opts)
    return out


def dequantize_peers(ptrs: torch.Tensor, src_off: int, kc: KernelConstants, rows: int, width: int,
                     out: torch.Tensor, *, summed: bool) -> torch.Tensor:
    """Decode the wire buffers at addresses ``ptrs[i] + src_off`` (int64 tensor of N base
    addresses on the launch device, e.g. symmetric-memory peer buffers; host addresses in the
    interpreter; bases and ``src_off`` 16-byte aligned). ``summed``: their fp32 rank-order sum into ``out`` [rows, width]; else buffer j
    decoded into rows ``[j*rows, (j+1)*rows)`` of ``out`` [N*rows, width]. One kernel launch."""
    if src_off % 16:
        raise ValueError(f"src_off {src_off} must be a multiple of 16 bytes")
    if width != kc.width:
        raise ValueError(f"constants lowered for width {kc.width}, got rows of {width}")
    n = ptrs.numel()
    lay, offs, bpp, opts = _plan(kc, rows, width, src_off, out.device.type, "dequantize")
    _out_values(out, rows if summed else n * rows, width, out.dtype, out.device)
    total = rows * lay.nblocks
    opts = dict(opts, I64=opts["I64"] or (not summed and n * rows * width >= (1 << 31)))
    grid = (triton.cdiv(total, bpp),) if summed else (triton.cdiv(total, bpp), n)
    o = _io_view(out)
    _codec_kernel[grid](
        o, o, 0, ptrs, src_off, o, o, rows * width, o, o, value_table(kc, out.device),
        total, lay.nblocks, width, *offs,
        SRC_BUFS=True, TABLE=True, N_SRC=n, QUANT=False, SUM=summed, PHASE=1, IN_KIND=0,
        WALIGN=_walign(kc, *offs[:2], src_off),  # peer bases are 16-byte aligned
        OUT_KIND=_IO[out.dtype], HAS_RES=False, RES_KIND=0, WRITE_DEQ=False, DEQ_KIND=0, BPP=bpp,
        F=kc.F, **opts)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dequantize_rmsnorm(bufs: torch.Tensor, kc: KernelConstants, rows: int, width: int, dtype: torch.dtype,
                       residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                       out: torch.Tensor | None = None, res_out: torch.Tensor | None = None, each: bool = False):
    """(RMSNorm of h, h) for h = the fp32 rank-order sum of the decodes of ``bufs`` [N, nbytes]
    (+ ``residual``) as ``dtype`` [rows, width] (saturating), ``weight`` [width] (any float
    dtype), ``eps`` (rounded to fp32): ``lowering.ops.reference_dequant_sum_rmsnorm``. One
    kernel launch, one program per row (the row's sum of squares is one fixed tree).

    ``each``: buffer j alone (N = 1 each) gives rows ``[j*rows, (j+1)*rows)`` of the residual
    and of both outputs, [N*rows, width] (two_shot's decode of the all-gathered chunks)."""
    return _rmsnorm_launch(bufs, None, 0, kc, rows, width, dtype, residual, weight, eps, out, res_out, each)


def dequantize_peers_rmsnorm(ptrs: torch.Tensor, src_off: int, kc: KernelConstants, rows: int, width: int,
                             dtype: torch.dtype, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                             out: torch.Tensor | None = None, res_out: torch.Tensor | None = None,
                             summed: bool = True):
    """:func:`dequantize_rmsnorm` over the wire buffers at addresses ``ptrs[i] + src_off`` (as
    :func:`dequantize_peers`; ``summed=False`` is ``each``)."""
    if src_off % 16:
        raise ValueError(f"src_off {src_off} must be a multiple of 16 bytes")
    return _rmsnorm_launch(None, ptrs, src_off, kc, rows, width, dtype, residual, weight, eps, out, res_out,
                           not summed)


def _rmsnorm_launch(bufs, ptrs, src_off, kc, rows, width, dtype, residual, weight, eps, out, res_out, each):
    if width != kc.width:
        raise ValueError(f"constants lowered for width {kc.width}, got rows of {width}")
    table = ptrs is not None
    n = ptrs.numel() if table else bufs.shape[0]
    dev = ptrs.device if table else bufs.device
    lay = kc.layout(rows)
    nblk = lay.nblocks
    bpp = _next_pow2(nblk)
    n_elems = rows * lay.padded
    if is_interpreted():
        opts = {}
    else:  # (a first choice, not tuned: about 32 fp32 values a thread)
        warps = min(16, max(4, bpp * kc.BP2 // 1024))
        opts = dict(num_warps=warps, enable_fp_fusion=False, enable_reflect_ftz=False)
    extent = src_off if table else bufs.stride(0) * n
    orows = n * rows if each else rows
    opts["I64"] = max(n_elems, lay.total + extent, orows * width if each else 0) >= (1 << 31) - (1 << 24)
    offs = (lay.offsets["scale"][0], lay.offsets["zp"][0], lay.offsets["ts"][0], *kc.plane_offsets(rows))
    out = _out_values(out, orows, width, dtype, dev)
    res_out = _out_values(res_out, orows, width, dtype, dev)
    if residual is not None:
        _out_values(residual, orows, width, residual.dtype, dev)  # (shape and contiguity)
    for what, t in (("out", out), ("res_out", res_out), ("weight", weight)):
        _same_device(what, t, dev)
    eps32 = float(torch.tensor(float(eps), dtype=torch.float32))
    res = _io_view(residual) if residual is not None else out
    o, ro, w = _io_view(out), _io_view(res_out), _io_view(weight)
    if table:
        src, stride, tab, walign = o, 0, ptrs, _walign(kc, *offs[:2], src_off)
    else:
        src, stride, tab, walign = bufs, bufs.stride(0), bufs, _walign(kc, *offs[:2], bufs.data_ptr(), bufs.stride(0))
    _codec_kernel[(rows, n) if each else (rows,)](
        w, src, stride, tab, src_off, res, o, rows * width, ro, o, value_table(kc, dev),
        rows * nblk, nblk, width, *offs,
        SRC_BUFS=True, TABLE=table, N_SRC=n, QUANT=False, SUM=not each, PHASE=1, IN_KIND=_IO[weight.dtype],
        WALIGN=walign,
        OUT_KIND=_IO[dtype], HAS_RES=residual is not None, RES_KIND=_IO[residual.dtype] if residual is not None else 0,
        WRITE_DEQ=False, DEQ_KIND=0, BPP=bpp, F=kc.F, NORM=True, EPS=eps32, **opts)
    return out, res_out
