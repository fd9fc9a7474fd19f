"""``torch.ops.qformats.*``: the codec as torch.library custom ops (torch.compile-safe).

Ops (the format is always its canonical string or a preset name; shapes are the logical
tensor shapes, quantised along the last axis):

``quantize(x, fmt) -> Tensor``
    uint8 wire buffer, byte for byte ``qformats.encode(x, fmt).data``.
``dequantize(buf, fmt, shape, dtype) -> Tensor``
    ``qformats.decode`` of the buffer, as ``dtype``.
``dequant_sum(bufs, fmt, shape, dtype, residual=None) -> Tensor``
    ``bufs`` is [N, nbytes] uint8 (e.g. an all-gather's output): decode each to fp32, add them
    in row (= rank) order one fp32 addition at a time, add ``residual`` (cast to fp32) last,
    cast to ``dtype`` (finite values saturate at its max, as every decode's cast does:
    ``qformats.codec.saturating_cast``). One kernel; the gather step of a compressed all-reduce.
``dequant_sum_rmsnorm(bufs, fmt, shape, dtype, residual, weight, eps) -> (Tensor, Tensor)``
    ``h = dequant_sum(bufs, fmt, shape, dtype, residual)`` (the new residual) and the RMSNorm
    of h with ``weight`` [width] and ``eps``, both as ``dtype``: the all-reduce's decode ending in
    the next layer's residual add and norm, one kernel (one program per row). The norm is
    defined bit for bit by :func:`reference_rms_norm` (a fixed pairwise tree for the row's sum
    of squares, laid out as the kernel's tile; ``1 / sqrt`` with IEEE fp32 sqrt and division).
``dequant_sum_requant(bufs, fmt, shape, dtype=None) -> (Tensor, Tensor)``
    the fp32 rank-order sum of the decodes, re-quantised: ``quantize(sum, fmt)`` (the sum is
    fp32). With ``dtype``, the second output is ``dequantize`` of that new buffer (the value
    every rank will decode for this chunk, so the owner can skip decoding its own chunk);
    without, it is an empty tensor. One kernel (two for per-tensor-scale formats); the middle
    step of the two-shot all-reduce.

Paths: CUDA tensors run the Triton kernels of :mod:`lowering.kernels`. CPU tensors run the
same kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import (tests
do), else the reference codec. Formats the kernels do not implement (outlier channels,
static per-feature scales; :func:`lowering.constants.unsupported_reason` says why) run the
reference codec on any device: an explicit fallback, same bytes, reference speed.
:func:`path` says which path a call takes.

Signed zeros and zero points: for ``+zp`` formats a block's min/max that is a zero is taken
as +0 (the kernels' rule, and the reference codec's: its ``amin``/``amax`` would pick a signed
zero by position, so it adds +0 to both).

Every op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces it
as one node. ``reference_*`` functions are the pure-torch compositions of qformats calls
with the same signatures: the oracle in tests and the fallback here. The four of the codec
(``reference_quantize``, ``reference_dequantize``, ``reference_dequant_sum``,
``reference_dequant_sum_requant``) live in :mod:`lowering.codec`, the one adapter of the
reference codec, and are re-exported here; the RMSNorm ones are this module's.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from qformats import Format, need_format
from qformats.codec import check_input, saturating_cast
from qformats.numeric import SUPPORTED_DTYPES

from . import launch
from .codec import reference_dequant_sum, reference_dequant_sum_requant, reference_dequantize, reference_quantize
from .constants import _lower, unsupported_reason

__all__ = [
    "quantize", "dequantize", "dequant_sum", "dequant_sum_requant", "path",
    "reference_quantize", "reference_dequantize", "reference_dequant_sum", "reference_dequant_sum_requant",
    "dequant_sum_rmsnorm", "reference_dequant_sum_rmsnorm", "reference_rms_norm", "tree_sum",
]


# ------------------------------------------------------------------------------------------
# validation (same messages on every path)
# ------------------------------------------------------------------------------------------
def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cannot decode to {dtype}: use one of float32, bfloat16, float16")


def _check_bufs(bufs: torch.Tensor, f: Format, shape: Sequence[int], two_d: bool) -> int:
    if bufs.dtype != torch.uint8:
        raise TypeError(f"wire buffers are uint8, got {bufs.dtype}")
    shape = [int(d) for d in shape]
    if not shape or math.prod(shape) == 0:
        raise ValueError(f"shape {shape}: a non-empty shape with at least one dimension is expected")
    n = f.nbytes(shape)
    if two_d:
        if bufs.dim() != 2 or bufs.shape[0] < 1:
            raise ValueError(f"buffers are expected as [N >= 1, nbytes], got shape {tuple(bufs.shape)}")
        if bufs.shape[1] != n:
            raise ValueError(f"{f} needs {n} bytes per buffer for shape {tuple(shape)}, got {bufs.shape[1]}")
    elif bufs.dim() != 1 or bufs.numel() != n:
        raise ValueError(f"{f} needs a 1-D buffer of {n} bytes for shape {tuple(shape)}, got {tuple(bufs.shape)}")
    return n


def path(fmt, device) -> str:
    """'kernel', 'interpreter' or 'reference: <why>' for ``fmt`` on ``device``."""
    why = unsupported_reason(fmt)
    if why:
        return f"reference: {why}"
    if torch.device(device).type == "cuda":
        return "kernel"
    return "interpreter" if launch.is_interpreted() else "reference: no GPU and TRITON_INTERPRET unset"


def _kernel_ok(f: Format, device: torch.device) -> bool:
    return path(f, device) in ("kernel", "interpreter")


def _lowered(fmt: str, width: int, device: torch.device):
    """The kernel constants of the op's format string ``fmt`` (already parsed and checked by the
    op): keyed on that string, so the op boundary is the format's only string round trip (the
    public :func:`lowering.constants.lower` takes a Format and would print it again)."""
    return _lower(fmt.strip(), int(width), device.type == "cuda")


def _rows_width(shape: Sequence[int]) -> Tuple[int, int]:
    return math.prod(shape[:-1]), int(shape[-1])


# ------------------------------------------------------------------------------------------
# the RMSNorm epilogue's reference (the codec's own references: lowering.codec)
# ------------------------------------------------------------------------------------------
def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis (a power of two long) by the fixed pairwise tree: each stage
    adds adjacent pairs, ``v[..., 2i] + v[..., 2i+1]`` (one addition each, in v's dtype)."""
    n = v.shape[-1]
    if n & (n - 1):
        raise ValueError(f"tree_sum needs a power-of-two length, got {n}")
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def reference_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, block: int) -> torch.Tensor:
    """RMSNorm of ``h`` (fp32/bf16/fp16, normalised over the last axis) as ``h.dtype``, the
    definition the fused kernel is held to bit for bit. In fp32, x = h widened:

    * ss: the row's x * x laid out as the kernel's tile of ``block``-sized blocks (the format's
      ``block_for(width)``): block j of the row in slot j, each block padded with zeros to the
      next power of two ``BP2``, the row padded with zero blocks to a power-of-two count of
      slots; then :func:`tree_sum` over that [slots * BP2] vector. (When ``block`` is a power
      of two dividing the width, the common case, that is the row itself, zero-padded to the
      next power of two: the same order for every such format.)
    * r = 1 / sqrt(ss / width + eps): eps rounded to fp32; IEEE fp32 division, sqrt, division
      (each correctly rounded: numpy in the interpreter, div_rn / sqrt_rn on the GPU).
    * y = (x * r) * fp32(weight), saturated to h's dtype (``saturating_cast``).
    """
    width = h.shape[-1]
    x = h.reshape(-1, width).to(torch.float32)
    rows = x.shape[0]
    nblk = -(-width // block)
    bp2, slots = _next_pow2(block), _next_pow2(nblk)
    xp = torch.nn.functional.pad(x, (0, nblk * block - width)).view(rows, nblk, block)
    tile = x.new_zeros((rows, slots, bp2))
    tile[:, :nblk, :block] = xp
    sq = tile * tile
    ss = tree_sum(sq.reshape(rows, slots * bp2))
    # Python scalars, not new device tensors (no host-to-device copy: CUDA-graph capturable);
    # each is an exact fp32 value, so the fp32 ops see exactly it
    eps32 = float(np.float32(eps))
    var = ss / float(width)
    one = torch.ones_like(var)
    # sqrt through fp64: torch's vectorised fp32 sqrt on CPU (AVX-512, torch 2.13) is not always
    # correctly rounded (1 ulp off for ~0.6% of inputs); fp64 sqrt rounded to fp32 is (double
    # rounding is innocuous for sqrt), the kernel's sqrt_rn / numpy's fp32 sqrt
    r = one / torch.sqrt((var + eps32).double()).float()
    y = (x * r[:, None]) * weight.to(torch.float32).reshape(1, width)
    return saturating_cast(y, h.dtype).reshape(h.shape)


def reference_dequant_sum_rmsnorm(bufs: torch.Tensor, fmt, shape: List[int], dtype: torch.dtype,
                                  residual: Optional[torch.Tensor], weight: torch.Tensor,
                                  eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(reference_rms_norm(h), h) for h = reference_dequant_sum(bufs, fmt, shape, dtype, residual)."""
    f = need_format(fmt)
    h = reference_dequant_sum(bufs, f, shape, dtype, residual)
    width = int(shape[-1])
    return reference_rms_norm(h, weight, eps, f.block_for(width)), h


# ------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("qformats::quantize", mutates_args=())
def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Wire buffer of ``x`` (fp32/bf16/fp16, any shape, blocks along the last axis).
    Cost on GPU: one read of x, one write of the buffer (two reads for +ts formats)."""
    f = need_format(fmt)
    check_input(x)
    if not _kernel_ok(f, x.device):
        return reference_quantize(x, f)
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    buf, _ = launch.quantize(x2, _lowered(fmt, x.shape[-1], x.device))
    return buf


@quantize.register_fake
def _(x, fmt):
    f = need_format(fmt)
    check_input(x)
    return x.new_empty((f.nbytes(x.shape),), dtype=torch.uint8)


@torch.library.custom_op("qformats::dequantize", mutates_args=())
def dequantize(buf: torch.Tensor, fmt: str, shape: List[int], dtype: torch.dtype) -> torch.Tensor:
    """``qformats.decode`` of a wire buffer, as ``dtype``. Cost on GPU: one read, one write."""
    f = need_format(fmt)
    _check_dtype(dtype)
    _check_bufs(buf, f, shape, two_d=False)
    if not _kernel_ok(f, buf.device):
        return reference_dequantize(buf, f, shape, dtype)
    rows, width = _rows_width(shape)
    out = launch.dequantize(buf.reshape(1, -1).contiguous(), _lowered(fmt, width, buf.device), rows, width, dtype)
    return out.reshape(shape)


@dequantize.register_fake
def _(buf, fmt, shape, dtype):
    f = need_format(fmt)
    _check_dtype(dtype)
    _check_bufs(buf, f, shape, two_d=False)
    return buf.new_empty(list(shape), dtype=dtype)


def _check_residual(residual: Optional[torch.Tensor], shape, bufs: torch.Tensor) -> None:
    """A residual added to a decode: ``shape``, a float dtype, on the buffers' device (or None)."""
    if residual is None:
        return
    if list(residual.shape) != [int(d) for d in shape] or residual.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"residual must have shape {list(shape)} and a float dtype, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if residual.device != bufs.device:
        raise ValueError(f"residual is on {residual.device}, buffers on {bufs.device}")


@torch.library.custom_op("qformats::dequant_sum", mutates_args=())
def dequant_sum(bufs: torch.Tensor, fmt: str, shape: List[int], dtype: torch.dtype,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 rank-order sum of the decodes of ``bufs`` [N, nbytes] (+ residual), as ``dtype``.
    Cost on GPU: one read of every buffer (and the residual), one write."""
    f = need_format(fmt)
    _check_dtype(dtype)
    _check_bufs(bufs, f, shape, two_d=True)
    _check_residual(residual, shape, bufs)
    if not _kernel_ok(f, bufs.device):
        return reference_dequant_sum(bufs, f, shape, dtype, residual)
    rows, width = _rows_width(shape)
    res = residual.reshape(rows, width).contiguous() if residual is not None else None
    out = launch.dequantize(bufs.contiguous(), _lowered(fmt, width, bufs.device), rows, width, dtype, res)
    return out.reshape(shape)


@dequant_sum.register_fake
def _(bufs, fmt, shape, dtype, residual=None):
    f = need_format(fmt)
    _check_dtype(dtype)
    _check_bufs(bufs, f, shape, two_d=True)
    return bufs.new_empty(list(shape), dtype=dtype)


@torch.library.custom_op("qformats::dequant_sum_requant", mutates_args=())
def dequant_sum_requant(bufs: torch.Tensor, fmt: str, shape: List[int],
                        dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(quantize(fp32 rank-order sum of the decodes of ``bufs``), its decode as ``dtype`` or
    an empty tensor). Cost on GPU: one read of every buffer, one write (plus the decode)."""
    f = need_format(fmt)
    if dtype is not None:
        _check_dtype(dtype)
    _check_bufs(bufs, f, shape, two_d=True)
    if not _kernel_ok(f, bufs.device):
        return reference_dequant_sum_requant(bufs, f, shape, dtype)
    rows, width = _rows_width(shape)
    buf, deq = launch.quantize(None, _lowered(fmt, width, bufs.device), shape=(rows, width), bufs=bufs.contiguous(),
                                deq_dtype=dtype)
    if deq is None:
        return buf, bufs.new_empty((0,), dtype=torch.float32)
    return buf, deq.reshape(shape)


@dequant_sum_requant.register_fake
def _(bufs, fmt, shape, dtype=None):
    f = need_format(fmt)
    _check_bufs(bufs, f, shape, two_d=True)
    buf = bufs.new_empty((f.nbytes(shape),), dtype=torch.uint8)
    if dtype is None:
        return buf, bufs.new_empty((0,), dtype=torch.float32)
    _check_dtype(dtype)
    return buf, bufs.new_empty(list(shape), dtype=dtype)


def _check_norm_args(bufs, f, shape, dtype, residual, weight):
    _check_dtype(dtype)
    _check_bufs(bufs, f, shape, two_d=True)
    _check_residual(residual, shape, bufs)
    if list(weight.shape) != [int(shape[-1])] or weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"weight must be a float tensor of shape [{int(shape[-1])}], got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if weight.device != bufs.device:
        raise ValueError(f"weight is on {weight.device}, buffers on {bufs.device}")


@torch.library.custom_op("qformats::dequant_sum_rmsnorm", mutates_args=())
def dequant_sum_rmsnorm(bufs: torch.Tensor, fmt: str, shape: List[int], dtype: torch.dtype,
                        residual: Optional[torch.Tensor], weight: torch.Tensor,
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) for h = ``dequant_sum(bufs, fmt, shape, dtype, residual)``, both
    ``dtype`` (:func:`reference_rms_norm` defines the norm bit for bit). Cost on GPU: one read
    of every buffer, the residual and the weight; two writes."""
    f = need_format(fmt)
    _check_norm_args(bufs, f, shape, dtype, residual, weight)
    if not _kernel_ok(f, bufs.device):
        return reference_dequant_sum_rmsnorm(bufs, f, shape, dtype, residual, weight, eps)
    rows, width = _rows_width(shape)
    res = residual.reshape(rows, width).contiguous() if residual is not None else None
    y, h = launch.dequantize_rmsnorm(bufs.contiguous(), _lowered(fmt, width, bufs.device), rows, width, dtype, res,
                                      weight.contiguous(), eps)
    return y.reshape(shape), h.reshape(shape)


@dequant_sum_rmsnorm.register_fake
def _(bufs, fmt, shape, dtype, residual, weight, eps):
    f = need_format(fmt)
    _check_norm_args(bufs, f, shape, dtype, residual, weight)
    return bufs.new_empty(list(shape), dtype=dtype), bufs.new_empty(list(shape), dtype=dtype)


class LoweredCodec:
    """:class:`lowering.codec.Codec` backed by these ops.

    Install it with ``tp.set_codec(LoweredCodec())``; it is bitwise equal to the
    reference codec (the tests check the ops; this class only adapts signatures). ``dequant_sum``
    and ``dequant_sum_requant`` take a list of buffers and stack them (one copy) unless they are
    already rows of one [N, nbytes] tensor.
    """

    name = "lowered"

    def __init__(self):
        self._names: dict = {}  # id(Format) -> (Format, its string): the op boundary's one conversion

    def _name(self, fmt) -> str:
        """``str(fmt)``, converted once per Format object this codec sees (the collectives resolve a
        format once and pass that object down, so a warm call converts nothing)."""
        if isinstance(fmt, str):
            return fmt
        hit = self._names.get(id(fmt))
        if hit is not None and hit[0] is fmt:
            return hit[1]
        if len(self._names) >= 256:
            self._names.clear()
        name = str(fmt)
        self._names[id(fmt)] = (fmt, name)  # holds fmt: its id cannot be reused while cached
        return name

    def quantize(self, x: torch.Tensor, fmt) -> torch.Tensor:
        return torch.ops.qformats.quantize(x, self._name(fmt))

    def dequantize(self, buf: torch.Tensor, fmt, shape) -> torch.Tensor:
        return torch.ops.qformats.dequantize(buf, self._name(fmt), list(shape), torch.float32)

    def dequant_sum(self, bufs, fmt, shape) -> torch.Tensor:
        stacked = bufs if isinstance(bufs, torch.Tensor) else torch.stack(list(bufs))
        return torch.ops.qformats.dequant_sum(stacked, self._name(fmt), list(shape), torch.float32, None)

    def dequant_sum_requant(self, bufs, fmt, shape) -> torch.Tensor:
        stacked = bufs if isinstance(bufs, torch.Tensor) else torch.stack(list(bufs))
        return torch.ops.qformats.dequant_sum_requant(stacked, self._name(fmt), list(shape), None)[0]
