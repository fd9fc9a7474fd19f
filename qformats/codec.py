"""The reference codec: exact, pure torch, the oracle for every kernel and collective.

``encode`` quantises along the last axis into one contiguous uint8 wire buffer
(codes | scales | zero points | tensor scale | outliers, see ``Format.layout``);
``decode`` inverts it. It is written for clarity and exactness (float64 inside), not
speed: use ``lowering`` ops for speed.

What each scale type computes, per block of the quantised features (outliers removed,
the last block zero-padded):

* ``e8m0`` (OCP MX v1.0): s = floor(log2 amax) - emax_elem from the exponent bits, clamped to
  [-127, 127]; an all-zero block gets s = -127. Elements are x * 2^-s rounded half to even
  and saturated at max normal. A block with NaN or Inf gets the NaN scale 0xFF and decodes
  to all NaN.
* ``fp32``/``bf16``/``fp16``/``e4m3`` (absmax): scale = fp32(amax / max_normal) rounded *up*
  onto the scale type (fp32: kept), so no element saturates by more than that division's
  rounding (2^-24). Where the fp32 quotient is below 2^-126 (fp32 would round it to its
  subnormal grid, or to 0) the scale is the quotient rounded up onto the type's grid exactly,
  at least the type's smallest step: a non-zero block never gets a zero scale (see
  ``_absmax_scale``). fp16/e4m3 scales saturate at their max, past which elements saturate.
  Elements are x times the block's rounded reciprocal, fp32((x * f) * fp32(1 / (scale * f)))
  with f a power of two (:func:`times_reciprocal`; wire version 3: version 2 divided, x /
  scale correctly rounded, which a GPU pays about six more instructions per element for),
  rounded half to even; decode is fp32(code_value * scale). A
  block with NaN/Inf stores a NaN scale and decodes to all NaN. ``+ts`` (e4m3 only) first
  divides by an fp32 per-tensor scale tamax / (max_normal * 448), at least 2^-126.
* ``+zp`` (uint elements): zero = block min rounded down to the scale type, scale = (max - zero)
  / max_code rounded up (at least the type's smallest step when max > zero); codes are
  round(fp32(fp32(x - zero) / scale)) in [0, max_code]; decode is fp32(code * scale + zero)
  (code * scale is exact, so fused or not it is one rounding). Where max - zero overflows
  fp32 (bf16 scales near fp32's max) both terms are halved first, which is exact there.
* ``static``: fixed per-feature scales (a calibration's); NaN/Inf elements take the otherwise
  unused code -2^(N-1) and decode to NaN; other values saturate.

``+h{N}`` (rotation): after the outliers are split off and the last block is zero-padded, each
run of N consecutive quantised features is replaced by its Walsh-Hadamard transform
(:func:`rotate`, fp32, defined exactly there) and the result is encoded as above; decode undoes
it on the decoded fp32 values (the inverse transform), then cuts the padding off. So the error
bound, signed zeros and finite-in-finite-out hold for the rotated coordinates, not for the
decoded values: the inverse spreads each element's error over its run, zeros lose their sign,
and a run whose butterfly sums pass fp32's range (magnitudes near 2^128 / N) becomes Inf/NaN.
A NaN/Inf input makes its whole run non-finite, and so its block decodes to all NaN.

Outlier features travel as bf16 (round to nearest even). Signed zeros keep their sign with
float elements; integer elements have one zero, and zero points are never -0. NaN scales are
stored as canonical quiet NaNs (``ScaleType.nan_bits``). Decode computes fp32, then casts.

Decoding a finite input gives finite values: a finite product past fp32's range saturates at
fp32's max (:func:`saturate_fp32`), and the cast to bf16/fp16 saturates finite values at that
dtype's max (:func:`saturating_cast`); outliers saturate at bf16's max on encode. Inf stays Inf
and NaN stays NaN (an Inf element code, only in foreign bytes, decodes to Inf).
Foreign bytes decode exactly as the kernels decode them: an MX int code -2^(N-1), which no
encoder writes, is its two's-complement value (OCP MX: MXINT8 code -128 is -2.0), except in
static formats, whose NaN marker it is; an e4m3 block scale's sign bit is ignored (block
scales are unsigned: 0x80 | b decodes as b).

The reference always computes on the CPU (CUDA inputs are copied there and back): torch's
CUDA ops differ from IEEE in corners (fast math in some kernels), and there must be one oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import grid, packing
from .numeric import FP32_MAX, FP32_MIN_SUBNORMAL, FP32_TINY, INT_VIEW, RECIPROCAL_SHIFT, SUPPORTED_DTYPES
from .spec import Format, dims, need_format, scale_element, scale_type

_F32 = torch.float32
_F64 = torch.float64


@dataclass(frozen=True)
class QTensor:
    """A quantised tensor: the wire buffer ``data`` (uint8, 1-D, contiguous) plus what decodes it."""

    data: torch.Tensor
    fmt: Format
    shape: tuple
    dtype: torch.dtype

    @staticmethod
    def from_buffer(data: torch.Tensor, fmt, shape, dtype=torch.float32) -> "QTensor":
        """Wrap a received wire buffer; checks its size against the format's layout."""
        fmt = need_format(fmt)
        shape = dims(shape)
        if data.dtype != torch.uint8:
            raise ValueError(f"wire buffers are uint8, got {data.dtype}")
        n = fmt.nbytes(shape)
        if data.numel() != n:
            raise ValueError(f"{fmt} needs {n} bytes for shape {shape}, got {data.numel()}")
        return QTensor(data.reshape(-1), fmt, shape, dtype)


def check_input(x: torch.Tensor) -> None:
    """Raise a clear error for anything the codec (and every lowering of it) cannot quantise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a torch.Tensor is expected, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {x.dtype} is not supported: use one of float32, bfloat16, float16")
    if x.dim() == 0:
        raise ValueError("a tensor with at least one dimension is expected (blocks run along the last)")
    if x.numel() == 0:
        raise ValueError(f"cannot quantise an empty tensor of shape {tuple(x.shape)}")


def saturate_fp32(y64: torch.Tensor) -> torch.Tensor:
    """fp32 of exact (float64) decoded values, one rounding; a finite value past fp32's range
    saturates at +-fp32 max instead of overflowing. Inf and NaN stay as they are: only an Inf
    element code or scale word (foreign bytes: the encoder writes neither) gives an Inf."""
    y = y64.to(_F32)
    return torch.where(torch.isfinite(y64), y.clamp(-FP32_MAX, FP32_MAX), y)


def saturating_cast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` (fp32) as ``dtype``: round half to even, finite values past ``dtype``'s max
    saturating at it (so a finite value never becomes Inf); Inf and NaN stay (NaNs exactly as
    the plain cast gives them: only overflowed entries are touched). Use it for every cast of
    decoded values to a narrower dtype. Cost: the cast and one pass over its output (three more
    for tensors that overflowed)."""
    out = y.to(dtype)
    if dtype == _F32:
        return out
    inf = torch.isinf(out)
    if y.device.type != "cpu" or bool(inf.any()):  # (no data-dependent branch, so no sync, off the CPU)
        # (a fill, not a tensor copied from the host: capturable in a CUDA graph)
        m = torch.full_like(out, torch.finfo(dtype).max)
        out = torch.where(inf & torch.isfinite(y), torch.copysign(m, out), out)
    return out


def times_reciprocal(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What absmax-scaled codecs quantise in place of x / scale: fp32((x * f) * fp32(1 / (scale
    * f))), f = 2^64 for scales below 2^-64, 2^-64 for scales from 2^64 up, else 1 (so the
    scaled scale and its reciprocal are normal fp32; both scalings are exact but for values
    that underflow, whose quotients lie far below every element grid's half step).

    Use it wherever an absmax block scale divides: the reference, TorchCodec and the kernels
    all compute exactly this. It costs one rounded reciprocal per block and one multiply per
    element (two where f != 1), where the correctly rounded quotient costs a GPU a reciprocal
    and two fused multiply-add corrections per element. It can differ from x / scale in the
    last bit, which moves a code only where the quotient lies within an ulp of a rounding
    boundary. ``x``, ``scale`` fp32 (broadcastable), scale > 0 (inf: every quotient a signed
    zero); signed zeros keep their sign."""
    big = 2.0**RECIPROCAL_SHIFT
    f = torch.where(scale < 1.0 / big, big, torch.where(scale >= big, 1.0 / big, 1.0)).to(_F32)
    return (x * f) * (1.0 / (scale * f))


def rotate(x: torch.Tensor, n: int, inverse: bool = False) -> torch.Tensor:
    """The ``+h{n}`` transform of fp32 ``x`` over each run of ``n`` consecutive values along the
    last axis (its length a multiple of ``n``), as a new fp32 tensor. The definition every
    lowering must match bit for bit:

    * k = log2(n) butterfly stages, s = 0, 1, ..., k-1 in that order. Stage s pairs the
      positions i and i + 2^s of a run for every i whose bit s is 0 and writes
      (v[i] + v[i + 2^s], v[i] - v[i + 2^s]) there: one fp32 addition each, rounded to
      nearest even (so the result is the Sylvester-ordered Hadamard matrix H_n times v).
    * Then ONE fp32 multiply by a power of two: 2^-ceil(k/2) forward, 2^-floor(k/2) for the
      inverse. H_n H_n = n I, so inverse(forward(v)) = v in exact arithmetic; forward is the
      orthonormal H_n / sqrt(n) times 2^-1/2 when k is odd (a power-of-two factor that block
      scales absorb, so the quantisation error is that of the orthonormal transform) and
      exactly orthonormal when k is even.

    Cost: k whole-tensor add/sub passes plus one multiply. Use it through the format
    (``+h{n}``); it is public so that lowerings and tests can apply the same transform."""
    k = n.bit_length() - 1
    if n < 2 or n != 1 << k or x.shape[-1] % n:
        raise ValueError(f"rotate: n={n} must be a power of two >= 2 dividing the last dimension {x.shape[-1]}")
    if x.dtype != _F32:
        raise TypeError(f"rotate works on fp32 (its definition), got {x.dtype}")
    shape = x.shape
    v = x.reshape(-1, n)
    for s in range(k):
        h = 1 << s
        p = v.view(-1, n // (2 * h), 2, h)  # [runs, pair groups, (low half i, high half i + h), h]
        a, b = p[:, :, 0, :], p[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
    c = k // 2 if inverse else k - k // 2
    return (v * math.ldexp(1.0, -c)).reshape(shape)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _split_features(x2: torch.Tensor, fmt: Format):
    """(quantised features, outlier features) of an [R, H] fp32 view."""
    if not fmt.outliers:
        return x2, None
    keep = torch.ones(x2.shape[1], dtype=torch.bool, device=x2.device)
    idx = torch.tensor(fmt.outliers, device=x2.device)
    keep[idx] = False
    return x2[:, keep], x2[:, idx]


def encode(x: torch.Tensor, fmt) -> QTensor:
    """Quantise ``x`` (fp32/bf16/fp16, any leading shape) along its last axis."""
    fmt = need_format(fmt)
    check_input(x)
    if x.device.type != "cpu":  # one oracle: the CPU's IEEE arithmetic, whatever the input's device
        q = encode(x.detach().cpu(), fmt)
        return QTensor(q.data.to(x.device), fmt, q.shape, q.dtype)
    lay = fmt.layout(x.shape)
    x2 = x.detach().reshape(lay.rows, lay.width).to(_F32)
    xq, xo = _split_features(x2, fmt)
    xq = torch.nn.functional.pad(xq, (0, lay.padded - lay.qwidth))
    if fmt.rotation:
        xq = rotate(xq.contiguous(), fmt.rotation)
    elem = fmt.elem
    parts = []
    if fmt.scale == "static":
        codes = _encode_static(xq, fmt, lay)
        parts.append(packing.pack(codes, elem.bits))
    else:
        blocks = xq.reshape(lay.rows, lay.nblocks, lay.block)
        codes, scale_bytes, zp_bytes, ts = _encode_blocks(blocks, fmt)
        parts.append(packing.pack(codes, elem.bits))
        parts.append(scale_bytes)
        if zp_bytes is not None:
            parts.append(zp_bytes)
        if ts is not None:
            parts.append(_bytes_of(ts.reshape(1)))
    if xo is not None:  # a finite outlier past bf16's max saturates (it does not become Inf)
        parts.append(_bytes_of(saturating_cast(xo, torch.bfloat16)))
    data = torch.cat([p.reshape(-1) for p in parts])
    assert data.numel() == lay.total, (data.numel(), lay)
    return QTensor(data, fmt, tuple(x.shape), x.dtype)


def _with_canonical_nan(t: torch.Tensor, bits: int) -> torch.Tensor:
    iv = INT_VIEW[t.dtype]
    nan = torch.tensor(bits, dtype=torch.int64).to(iv)  # wraps to the signed pattern
    return torch.where(torch.isnan(t), nan, t.view(iv)).view(t.dtype)


def _store_scale(s32: torch.Tensor, scale: str) -> torch.Tensor:
    """fp32 scale values (already on the scale type's grid) -> their wire bytes."""
    st = scale_type(scale)
    if st.dtype is not None:  # fp32 / bf16 / fp16: native floats
        return _bytes_of(_with_canonical_nan(s32.to(getattr(torch, st.dtype)).contiguous(), st.nan_bits))
    if scale == "e4m3":
        codes = grid.to_codes(s32.to(_F64).nan_to_num(0.0), st.element)
        return torch.where(torch.isnan(s32), st.nan_bits, codes).to(torch.uint8).reshape(-1)
    raise AssertionError(scale)


def _round_scale(raw32: torch.Tensor, scale: str, mode=grid.UP) -> torch.Tensor:
    """Round fp32 scale values onto the scale type's grid (fp32 stays as is)."""
    el = scale_element(scale)
    if el is None:
        return raw32
    return grid.round_to_grid(raw32.to(_F64), el, mode).to(_F32)


def _scale_step(scale: str) -> float:
    """The smallest step of a scale type's grid (its smallest subnormal)."""
    el = scale_element(scale)
    return el.min_subnormal if el is not None else FP32_MIN_SUBNORMAL


def _absmax_scale(amax: torch.Tensor, den: torch.Tensor, scale: str) -> torch.Tensor:
    """Stored absmax scales (fp32 values on the scale type's grid) of block maxima ``amax``:
    fp32(amax / den) rounded up onto the type (fp32: kept). Where that quotient is below fp32's
    normal range (so fp32 rounded it to its coarse subnormal grid, or to 0), the scale is
    instead amax / den rounded up onto the type's grid exactly, at least its smallest step: a
    non-zero block never gets a zero scale, nor one far below amax / den. Computed as
    ceil(fp32(fp32(amax * 2^P) / den)) steps of 2^-P, P = -log2(step) (2^P as two exact factors)."""
    raw = amax / den
    stored = _round_scale(raw, scale)
    tiny = (raw < FP32_TINY) & (amax > 0)
    if bool(tiny.any()):
        step = _scale_step(scale)
        p = -math.frexp(step)[1] + 1  # step = 2^-p
        hi, lo = 2.0 ** (p - p // 2), 2.0 ** (p // 2)
        w = (torch.where(tiny, amax, 0.0) * hi * lo) / den  # the quotient in steps (< 2^23 + 1)
        n = torch.ceil(w).clamp(min=1)
        stored = torch.where(tiny, (n.to(_F64) * step).to(_F32), stored)
    return stored


def _encode_blocks(blocks: torch.Tensor, fmt: Format):
    """Per-block scales and element codes; blocks is [R, NB, BS] fp32."""
    elem = fmt.elem
    finite = torch.isfinite(blocks)
    bad = ~finite.all(-1, keepdim=True)  # blocks holding NaN/Inf
    clean = torch.where(finite, blocks, 0.0)
    amax = clean.abs().amax(-1, keepdim=True)
    zp_bytes = ts = None
    if fmt.scale == "e8m0":
        e = grid._floor_log2(amax.to(_F64).clamp(min=torch.finfo(_F64).tiny))
        s = torch.where(amax > 0, e - elem.emax, -127).clamp(-127, 127)
        v = torch.ldexp(clean.to(_F64), (-s).to(_F64))  # exact
        scale_bytes = torch.where(bad, scale_type("e8m0").nan_bits, s + 127).to(torch.uint8).reshape(-1)
    elif fmt.zero_point:
        mn = torch.where(finite, blocks, torch.inf).amin(-1, keepdim=True)
        mx = torch.where(finite, blocks, -torch.inf).amax(-1, keepdim=True)
        # + 0.0 turns -0 into +0: which signed zero amin/amax return depends on position
        mn, mx = torch.where(bad, 0.0, mn) + 0.0, torch.where(bad, 0.0, mx) + 0.0
        zero = _round_scale(mn, fmt.scale, grid.DOWN)
        # h: where mx - zero overflows fp32 (bf16 terms near fp32's max), both terms are halved,
        # exactly (they are >= 2^103 there); h = 1 elsewhere changes no bit
        d = mx - zero
        h = torch.where(torch.isinf(d), 0.5, 1.0)
        raw = (mx * h - zero * h) / float(elem.max_code) / h
        raw = torch.where((raw == 0) & (d > 0), FP32_MIN_SUBNORMAL, raw)  # underflow: never a zero scale
        scale = _round_scale(raw, fmt.scale, grid.UP)
        v = torch.where(scale > 0, (clean * h - zero * h) / (scale * h), 0.0).to(_F64)
        nan = torch.full_like(scale, torch.nan)
        scale_bytes = _store_scale(torch.where(bad, nan, scale), fmt.scale)
        zp_bytes = _store_scale(torch.where(bad, nan, zero), fmt.scale)
    else:
        maxn = torch.tensor(elem.max_normal, dtype=_F32)
        if fmt.tensor_scale:
            tamax = amax.amax() if amax.numel() else torch.zeros((), dtype=_F32)  # every feature an outlier
            ts = torch.clamp(tamax / (maxn * scale_element("e4m3").max_normal), min=FP32_TINY).to(_F32)
            den = maxn * ts
        else:
            den = maxn
        stored = _absmax_scale(amax, den, fmt.scale)
        scale = stored * ts if fmt.tensor_scale else stored
        # scale 0 (an all-zero block): a reciprocal of 1 / inf = 0 gives each x's signed zero
        v = times_reciprocal(clean, torch.where(scale > 0, scale, torch.inf)).to(_F64)
        scale_bytes = _store_scale(torch.where(bad, torch.nan, stored), fmt.scale)
    q = grid.round_to_grid(v, elem)
    codes = torch.where(bad, 0, grid.to_codes(q, elem))
    return codes, scale_bytes, zp_bytes, ts


def _encode_static(xq: torch.Tensor, fmt: Format, lay) -> torch.Tensor:
    elem = fmt.elem
    s = torch.ones(lay.padded, dtype=_F32, device=xq.device)
    s[: lay.qwidth] = torch.tensor(fmt.static_scales, dtype=_F32, device=xq.device)
    finite = torch.isfinite(xq)
    q = grid.round_to_grid((torch.where(finite, xq, 0.0) / s).to(_F64), elem)
    codes = grid.to_codes(q, elem)
    return torch.where(finite, codes, 1 << (elem.bits - 1))  # the NaN marker


def _view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret wire bytes; sections need not be aligned to ``dtype`` inside the buffer."""
    return raw.clone().view(dtype)


def _load_scale(raw: torch.Tensor, scale: str) -> torch.Tensor:
    """Wire bytes -> fp32 scale values (NaN where the block was NaN)."""
    st = scale_type(scale)
    if st.dtype is not None:  # fp32 / bf16 / fp16: native floats
        return _view(raw, getattr(torch, st.dtype)).to(_F32)
    if scale == "e4m3":
        # block scales are unsigned: the sign bit (never written) is ignored, as the kernels do
        return grid.from_codes(raw.to(torch.int64) & 0x7F, st.element).to(_F32)
    raise AssertionError(scale)


def decode(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantise a :class:`QTensor` to ``dtype`` (default: the dtype it was encoded from)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"decode expects a QTensor, got {type(q).__name__} (wrap bytes with QTensor.from_buffer)")
    fmt, dtype = q.fmt, dtype or q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cannot decode to {dtype}: use one of float32, bfloat16, float16")
    lay = fmt.layout(q.shape)
    if q.data.numel() != lay.total:
        raise ValueError(f"{fmt} needs {lay.total} bytes for shape {q.shape}, got {q.data.numel()}")
    if q.data.device.type != "cpu":  # see encode: the reference computes on the CPU
        return decode(QTensor(q.data.cpu(), fmt, q.shape, q.dtype), dtype).to(q.data.device)
    off = lay.offsets
    sec = {k: q.data[a:b] for k, (a, b) in off.items()}
    elem = fmt.elem
    codes = packing.unpack(sec["code"], elem.bits, lay.rows * lay.padded)
    # float64, element units; an int code -2^(N-1) is NaN only as a static format's marker
    vals = grid.from_codes(codes, elem, marker_nan=fmt.scale == "static")
    if fmt.scale == "static":
        s = torch.ones(lay.padded, dtype=_F64, device=vals.device)
        s[: lay.qwidth] = torch.tensor(fmt.static_scales, dtype=_F32, device=vals.device).to(_F64)
        xq = saturate_fp32(vals.reshape(lay.rows, lay.padded) * s)
    else:
        vals = vals.reshape(lay.rows, lay.nblocks, lay.block)
        if fmt.scale == "e8m0":
            sb = sec["scale"].to(torch.int64).reshape(lay.rows, lay.nblocks, 1)
            y = torch.ldexp(vals, (sb - 127).to(_F64))
            y = torch.where(sb == 255, torch.nan, y)
        else:
            scale = _load_scale(sec["scale"], fmt.scale).reshape(lay.rows, lay.nblocks, 1)
            if fmt.tensor_scale:
                scale = scale * _view(sec["ts"], torch.float32)
            y = vals * scale.to(_F64)  # exact: <= 8-bit significand times an fp32
            if fmt.zero_point:
                y = y + _load_scale(sec["zp"], fmt.scale).reshape(lay.rows, lay.nblocks, 1).to(_F64)
        xq = saturate_fp32(y).reshape(lay.rows, lay.padded)
        if fmt.rotation:
            xq = rotate(xq, fmt.rotation, inverse=True)
    xq = xq[:, : lay.qwidth]
    if fmt.outliers:
        out = torch.empty(lay.rows, lay.width, dtype=_F32, device=xq.device)
        keep = torch.ones(lay.width, dtype=torch.bool, device=xq.device)
        idx = torch.tensor(fmt.outliers, device=xq.device)
        keep[idx] = False
        out[:, keep] = xq
        out[:, idx] = _view(sec["out"], torch.bfloat16).reshape(lay.rows, -1).to(_F32)
        xq = out
    return saturating_cast(xq.reshape(q.shape), dtype)


class _StraightThrough(torch.autograd.Function):
    """``decode(encode(x))`` forward, the identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt):
        return decode(encode(x, fmt))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize_dequantize(x: torch.Tensor, fmt) -> torch.Tensor:
    """``decode(encode(x, fmt))``: the value a receiver sees, same shape and dtype as ``x``.

    Differentiable straight through: the gradient is passed unchanged (rounding is taken as the
    identity), the usual rule for training through a quantiser. ``encode``/``decode`` themselves
    carry no gradient (their wire buffer is integer bytes)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, fmt)
    return decode(encode(x, fmt))
