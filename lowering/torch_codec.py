"""A fast CPU codec, bitwise equal to the reference codec (``qformats.encode`` / ``decode``).

Use it where the reference codec's cost dominates on a CPU: the emulator of compressed
collectives (:mod:`tp.comm.emulate`; ``qformats eval`` installs it), or any loop of
``qformats.encode/decode`` on CPU tensors. Install it with
``tp.set_codec(TorchCodec())``; :func:`quantize` / :func:`dequantize` are the same
operations as plain functions (named, and with the dtype argument, as the ops of
:mod:`lowering.ops`). On a GPU use the Triton ops of :mod:`lowering.ops`.

Cost: whole-tensor torch ops on fp32/int32, no Python loop over blocks or elements. An encode
is ~10-15 elementwise passes over the tensor plus ~50-100 small per-block ops, a decode 3-5
passes (a table look-up per code byte, one multiply per value, an add for zero points).
Measured on one thread, encode + decode of [2048, 576] fp32: 15-27x faster than the
reference (mxfp4 11 ms vs 300 ms); at [256, 576] 6-20x; below ~100 rows the per-block ops'
fixed cost (~0.2-0.8 ms an encode) dominates. With 2 threads on busy shared cores every
whole-tensor op pays an OpenMP fork/join that can cost more than its arithmetic (the
eval's ``--threads 1`` avoids it).

Exactness: the arithmetic is that of the Triton kernels (:mod:`lowering.kernels`, whose
docstring gives the reasoning), with the constants of :func:`lowering.constants.lower`:

* E8M0 scale exponents come from the exponent bits of the block absmax (an integer max over
  ``|x|``'s bits, which orders like the floats); scaling by ``2^-s`` is an fp32 multiply,
  exact unless the product is an fp32 subnormal, which is far below half of any element step.
* Rounding onto a float element's grid: the grid step ``2^g`` is read off the exponent bits
  and the add-subtract of ``1.5 * 2^(g + 23)`` rounds half to even at exactly that step. The
  code of the (exact) rounded value is a table look-up on its sign, exponent and top
  mantissa bits; the table is the reference's own ``grid.to_codes`` of every such value, so
  saturation and the NaN/Inf policies come out as the reference's. Integer elements round
  with the ``1.5 * 2^23`` add, whose low bits are the two's complement code.
* Absmax scales: ``amax / max_normal`` is an IEEE fp32 division, ``x / scale`` the reference's
  own :func:`qformats.codec.times_reciprocal` (one rounded reciprocal per block); the scale
  is rounded onto its type's grid in integers from the bits (the kernels' ``_round_mag_int``);
  quotients below 2^-126 take the reference's exact ceiling instead (:func:`_tiny_scale_codes`).
  Zero points whose ``max - zero`` overflows fp32 halve both terms, as the reference does.
* Saturation (finite inputs decode finite): products that overflow fp32 from finite factors
  become +-fp32 max, casts to bf16/fp16 saturate finite values (the reference's
  ``saturate_fp32`` / ``saturating_cast``); a bound on the decoded magnitudes from the
  per-block scales skips both passes when nothing can overflow, which is almost always.
* Decoding multiplies the exact element value (the reference's code table) by the fp32
  scale: one rounding, as the reference's float64 product cast to fp32. Zero points: fp16
  ones are added in fp32 (the reference's float64 sum is exact there, see
  :func:`_decode_rows`), bf16 ones in float64 as the reference does.
* NaN/Inf blocks store the canonical NaN scale bytes (``qformats.spec.ScaleType.nan_bits``);
  a zero point of zero is +0; outliers use the reference's own bf16 cast. Decoded NaNs carry
  the reference's payloads too, for any wire bytes: scale words go through the reference's
  casts, one buffer at a time (:func:`_load_scales` says why).

Every format the reference supports is exact here, including outlier channels (``+o[...]``),
static per-feature scales (``static``) of ``tp.model.calibrate`` and rotation (``+h{N}``: the
reference's own fp32 butterfly :func:`qformats.codec.rotate` around the unrotated format's
arithmetic, so the order of its additions is the definition's). The one fallback: formats
that :func:`lowering.constants.lower` refuses for their element (float elements wider than
e5m5, which only an ``Element`` built by hand has) run the reference codec, same bytes at
reference speed; :func:`fallback_reason` says which. CUDA inputs are computed on the CPU
and moved back, as the reference does.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from qformats import Format, grid, need_format, packing
from qformats.codec import check_input, rotate, saturate_fp32, saturating_cast, times_reciprocal
from qformats.numeric import (FP32_ABS_MASK, FP32_BIAS, FP32_EMAX, FP32_EMIN, FP32_EXP_MASK, FP32_MAX, FP32_MBITS,
                              FP32_MIN_SUBNORMAL, FP32_RNE_MAGIC, FP32_TINY, SUPPORTED_DTYPES)
from qformats.spec import dims, replace, scale_element

from .codec import reference_dequantize, reference_quantize
from .constants import (KIND_FLOAT, SCALE_BF16, SCALE_E4M3, SCALE_E8M0, SCALE_FP16, SCALE_FP32,
                        KernelConstants, Unsupported, lower)

__all__ = ["TorchCodec", "dequantize", "fallback_reason", "quantize"]

# Multi-byte words (scales, packed code groups) are read and written through native views.
assert sys.byteorder == "little", "lowering.torch_codec assumes a little-endian host"

_F32, _F64, _I32 = torch.float32, torch.float64, torch.int32


# ------------------------------------------------------------------------------------------
# per-format tables and constants (built once, cached)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What encode/decode of one format at one row width need, derived once."""

    kc: KernelConstants  # element, scale and packing constants of the quantised features
    static: bool
    rotation: int  # N of +h{N} (0: none), applied here around the unrotated format's plan
    keep: Optional[torch.Tensor]  # int64 indices of the quantised features (outlier formats)
    outliers: Optional[torch.Tensor]  # int64 indices of the outlier features
    static_scales: Optional[torch.Tensor]  # fp32 [padded], 1 on the padding
    values: torch.Tensor  # fp32 value of every element code (the reference's code table)
    values64: torch.Tensor  # the same in float64 (zero-point decode adds in float64)
    inf_codes: bool  # some element code decodes to +-Inf (ieee elements)
    maxval: float  # the largest finite element value (max normal; uint: the largest code)
    byte_values: Optional[torch.Tensor]  # [256, codes per byte] values, for 1/2/4/8-bit codes
    rounded_codes: Optional[torch.Tensor]  # float elements: code of a grid value, by its top bits
    scale_values: Optional[torch.Tensor]  # e4m3 scales: fp32 value by code
    e8m0_values: torch.Tensor  # fp32 2^(byte - 127) (NaN for 255)
    maxn: torch.Tensor  # 0-dim fp32 constants, as the reference's tensor arithmetic uses them
    maxn_ts: torch.Tensor
    maxmag: torch.Tensor


def _quantised_format(f: Format) -> Format:
    """The format the quantised features go through, as :func:`lower` sees it: outliers are
    split off here; for static formats only the element and packing constants are used (the
    per-feature scales are applied here), so any scale type stands in."""
    if f.scale == "static":
        return Format(f.elem, 0, "fp32")
    return replace(f, outliers=(), rotation=0) if (f.outliers or f.rotation) else f


def fallback_reason(fmt) -> Optional[str]:
    """Why ``fmt`` runs the reference codec here (None: it runs the fast path)."""
    f = need_format(fmt)
    try:
        lower(_quantised_format(f), 8, "cpu")
    except (Unsupported, ValueError) as e:  # ValueError: an Element built outside the grammar
        return str(e)
    return None


@functools.lru_cache(maxsize=256)
def _element_tables(elem, marker_nan: bool = True) -> tuple:
    """(values fp32, values float64, byte_values, rounded_codes) of an element type
    (``marker_nan``: as ``qformats.grid.from_codes``: True for static formats only)."""
    v64 = grid.code_table(elem, marker_nan)
    v32 = v64.to(_F32)  # element values are exact in fp32 (NaN signs kept)
    byte_values = None
    if 8 % elem.bits == 0:  # every byte holds whole codes: decode by one look-up per byte
        g = 8 // elem.bits
        b = torch.arange(256)
        lanes = (b[:, None] >> (torch.arange(g) * elem.bits)) & ((1 << elem.bits) - 1)
        byte_values = (v32[lanes], v64[lanes])
    rounded = None
    if elem.kind == "float":
        # key = sign, exponent and top M mantissa bits of an fp32 value on the element's grid;
        # the table holds the reference's code of that value (saturated where it is past max).
        m = elem.mbits
        keys = torch.arange(1 << (9 + m), dtype=torch.int64)
        vals = (keys << (FP32_MBITS - m)).to(_I32).view(_F32).to(_F64)  # to(int32) wraps: sign bit
        ok = torch.isfinite(vals)
        codes = grid.to_codes(grid.round_to_grid(torch.where(ok, vals, 0.0), elem), elem)
        rounded = torch.where(ok, codes, 0).to(torch.uint8)
    return v32, v64, byte_values, rounded


@functools.lru_cache(maxsize=1)
def _e8m0_values() -> torch.Tensor:
    e = torch.arange(256, dtype=_F64) - 127
    return torch.where(e == 128, torch.nan, torch.exp2(e)).to(_F32)  # 2^-127 is an exact fp32


@functools.lru_cache(maxsize=1)
def _e4m3_values() -> torch.Tensor:
    # as the reference loads them: block scales are unsigned, the sign bit is ignored
    return grid.from_codes(torch.arange(256) & 0x7F, scale_element("e4m3")).to(_F32)


@functools.lru_cache(maxsize=512)
def _plan(f: Format, width: int) -> Optional[_Plan]:
    """The plan of ``f`` for rows of ``width`` features, None when the format falls back."""
    q = f.quantized_width(width)
    try:
        kc = lower(_quantised_format(f), q, "cpu")
    except (Unsupported, ValueError):  # see fallback_reason; width errors were raised above
        return None
    assert kc.S_EMIN >= FP32_EMIN and kc.S_EMIN - kc.S_MBITS >= FP32_EMIN - FP32_MBITS, "scale grids finer than fp32's are not handled"
    keep = outl = st = None
    if f.outliers:
        mask = torch.ones(width, dtype=torch.bool)
        outl = torch.tensor(f.outliers, dtype=torch.int64)
        mask[outl] = False
        keep = mask.nonzero().reshape(-1)
    if f.scale == "static":
        padded = f.layout((1, width)).padded
        st = torch.ones(padded, dtype=_F32)
        st[:q] = torch.tensor(f.static_scales, dtype=_F32)
    v32, v64, byte_values, rounded = _element_tables(f.elem, f.scale == "static")
    return _Plan(
        kc=kc, static=f.scale == "static", rotation=f.rotation, keep=keep, outliers=outl, static_scales=st,
        values=v32, values64=v64, inf_codes=bool(torch.isinf(v32).any()), maxval=_finite_absmax(v32), byte_values=byte_values, rounded_codes=rounded,
        scale_values=_e4m3_values() if kc.SCALE == SCALE_E4M3 else None, e8m0_values=_e8m0_values(),
        maxn=torch.tensor(kc.MAXN, dtype=_F32), maxn_ts=torch.tensor(kc.MAXN_TS, dtype=_F32),
        maxmag=torch.tensor(float(kc.MAXMAG), dtype=_F32),
    )


# ------------------------------------------------------------------------------------------
# small exact helpers (per-block tensors unless said otherwise)
# ------------------------------------------------------------------------------------------
def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in the normal range [-126, 127], built from the bits."""
    return ((e.to(_I32) + FP32_BIAS) << FP32_MBITS).view(_F32)


def _times_pow2(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t * 2^k`` (a new tensor) for per-block integer exponents ``k`` broadcast over the last
    axis. Exact unless the product is an fp32 subnormal (then below 2^-126, far under half of
    any element step: it rounds to the same signed zero). Exponents past the normal range
    (only at the ends of the E8M0 range) are applied as a second exact factor."""
    k1 = k.clamp(FP32_EMIN, FP32_EMAX)
    y = t * _pow2(k1).unsqueeze(-1)
    if not torch.equal(k1, k):
        y.mul_(_pow2(k - k1).unsqueeze(-1))
    return y


def _round_onto_scale_grid(val: torch.Tensor, larger: torch.Tensor, kc: KernelConstants) -> torch.Tensor:
    """Magnitude code (int32) of fp32 ``val`` rounded onto the scale type's float grid, toward
    the larger magnitude where ``larger`` else toward zero, saturating at its max finite code.
    Integer arithmetic on the bits (the kernels' ``_round_mag_int``): exact for every fp32.
    The grid step is never finer than the value's fp32 ulp (S_EMIN - S_MBITS >= -149 for every
    scale type, checked in :func:`_plan`), so rounding only ever drops low bits. Per-block
    tensors only: ~20 small ops."""
    bits = val.view(_I32) & FP32_ABS_MASK
    field = bits >> FP32_MBITS
    mant = bits & 0x7FFFFF
    sig = torch.where(field > 0, mant | 0x800000, mant)  # value = sig * 2^(max(field, 1) - 150)
    # exponent of the grid binade: fp32 subnormals (field 0) lie below every scale type's
    # smallest normal binade (S_EMIN >= -126), so the exponent field suffices
    top = (field - FP32_BIAS).clamp_(min=kc.S_EMIN)
    drop = (top - kc.S_MBITS - field.clamp(min=1) + 150).clamp_(0, 31)  # low bits below the grid step
    n = sig >> drop
    n += (larger & ((sig - (n << drop)) > 0)).to(_I32)
    code = ((top - kc.S_EMIN) << kc.S_MBITS) + n  # a carry out of n moves to the next binade by itself
    return code.clamp_(max=kc.S_MAXMAG)


def _tiny_scale_codes(amax: torch.Tensor, den: torch.Tensor, tiny: torch.Tensor, kc: KernelConstants) -> torch.Tensor:
    """Magnitude codes (int32) of the scales of blocks whose quotient amax / den is below
    fp32's normal range (``tiny``): the quotient rounded up onto the scale's grid exactly, at
    least one step (``qformats.codec._absmax_scale``). The grid's step is 2^-P; amax * 2^P is
    exact, one fp32 division and a ceiling give the steps (< 2^23 + 1). Per-block tensors."""
    w = (torch.where(tiny, amax, 0.0) * kc.S_INV_STEP_HI * kc.S_INV_STEP_LO) / den
    return torch.ceil(w).clamp_(min=1).to(_I32)


def _saturate_overflow(y: torch.Tensor, scale: Optional[torch.Tensor], elem_inf) -> torch.Tensor:
    """``y`` (fp32 products of element values and scales) with +-Inf that came from finite
    factors replaced by +-fp32 max (the reference's ``saturate_fp32``). ``scale`` broadcasts
    over ``y`` (None: always finite); ``elem_inf()`` gives where the element value was Inf (None:
    the element has no Inf codes). Four passes: for the rare buffers whose scales allow it."""
    ovf = torch.isinf(y)
    if scale is not None:
        ovf &= torch.isfinite(scale)
    if elem_inf is not None:
        ovf &= ~elem_inf()
    return torch.where(ovf, torch.copysign(torch.tensor(FP32_MAX, dtype=_F32), y), y)


def _scale_values(words: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """fp32 values of stored scale / zero-point words (int32, the wire's SB bytes), with the
    reference's own casts and tables (so NaN payloads come out as the reference's)."""
    kind = plan.kc.SCALE
    if kind == SCALE_FP32:
        return words.view(_F32)
    if kind in (SCALE_BF16, SCALE_FP16):
        dt = torch.bfloat16 if kind == SCALE_BF16 else torch.float16
        return words.to(torch.int16).view(dt).to(_F32)  # to(int16) wraps: the sign bit
    return plan.scale_values.index_select(0, words.reshape(-1)).view(words.shape)  # e4m3


def _signed_code(val: torch.Tensor, larger: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored word, fp32 value) of ``val`` rounded onto the scale type's grid (sign kept)."""
    kc = plan.kc
    code = _round_onto_scale_grid(val, larger, kc)
    neg = val.view(_I32) < 0
    code = code | (neg.to(_I32) << (8 * kc.SB - 1))
    return code, _scale_values(code, plan)


def _load_scales(raw: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """fp32 scale / zero-point values [N, n] of the scale sections [N, n * SB] of N buffers.

    fp16 goes through torch's fp16 -> fp32 cast, as in the reference, and that cast gives a NaN
    a payload that depends on where it falls in the cast's loop (vectorised: 0x7FC00000; the
    scalar tail: 0x7FFFFFFF). So each buffer's section is cast on its own, as one 1-D tensor of
    the reference's length: same loop, same payloads."""
    words = _words(raw, plan.kc.SB)
    if plan.kc.SCALE == SCALE_FP16 and words.shape[0] > 1:
        return torch.stack([_scale_values(w, plan) for w in words])  # one per buffer (rank)
    return _scale_values(words, plan)


def _word_bytes(words: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian ``nbytes``-byte wire form of int32 words, flat uint8."""
    w = words.to(_I32).reshape(-1, 1)
    return w.view(torch.uint8)[:, :nbytes].reshape(-1)


def _words(raw: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Inverse of :func:`_word_bytes` for a [..., n * nbytes] uint8 section: int32 [..., n]."""
    r = raw.reshape(*raw.shape[:-1], -1, nbytes)
    r = torch.nn.functional.pad(r, (0, 4 - nbytes))  # a copy: sections need not be aligned
    return r.view(_I32).squeeze(-1)


# ------------------------------------------------------------------------------------------
# element rounding and packing (whole-tensor passes)
# ------------------------------------------------------------------------------------------
def _float_codes(a: torch.Tensor, sign_of: torch.Tensor, plan: _Plan, saturate: bool) -> torch.Tensor:
    """uint8 codes of float elements from signed values ``a`` (fp32 in element units; used up),
    zeros taking the sign of ``sign_of``. ``saturate``: clamp ``a`` to a power of two above max
    normal first (needed unless the scale already bounds it, as E8M0's does)."""
    kc = plan.kc
    if saturate:
        a.clamp_(-kc.SAT, kc.SAT)
    # m = 1.5 * 2^(g + 23), 2^g the grid step of |a|'s binade (the first normal binade's below
    # it): |a| < 2^(g + 22), so a + m lies in m's binade, whose ulp is 2^g: the add rounds a half
    # to even onto the grid (m / 2^g is even), and subtracting m again is exact.
    magic = (a.view(_I32) & FP32_EXP_MASK).clamp_(min=(kc.EMIN + FP32_BIAS) << FP32_MBITS)
    magic += ((FP32_MBITS - kc.MBITS) << FP32_MBITS) | 0x400000
    a += magic.view(_F32)
    a -= magic.view(_F32)
    a.copysign_(sign_of)  # a rounded to zero is +0 after the add: give it back its sign
    # the code of a grid value is a look-up on its sign, exponent and top M mantissa bits
    key = a.view(_I32).bitwise_right_shift_(FP32_MBITS - kc.MBITS).bitwise_and_((1 << (9 + kc.MBITS)) - 1)
    return plan.rounded_codes.index_select(0, key.reshape(-1)).view(key.shape)


def _int_codes(v: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """uint8 codes (two's complement in the low BITS bits) of int/uint elements from signed
    values ``v`` (fp32 in units of the grid step; used up). NaN-free input."""
    kc = plan.kc
    v.clamp_(-float(kc.MAXMAG), float(kc.MAXMAG))  # saturate first: rounding keeps integers
    v += FP32_RNE_MAGIC  # round half to even; the low bits of the sum are the integer's
    return v.view(_I32).to(torch.uint8).bitwise_and_((1 << kc.BITS) - 1)  # to(uint8) keeps the low byte


def _pack(codes: torch.Tensor, kc: KernelConstants) -> torch.Tensor:
    """Codes (uint8/int32 in [0, 2^BITS)) -> packed bytes (``qformats.packing``'s layout):
    each power-of-two bit plane in turn, the 8/p p-bit slices of a byte OR-ed together."""
    flat = codes.reshape(-1)
    if kc.BITS == 8:
        return flat.to(torch.uint8)
    parts = []
    for off, p in packing.planes(kc.BITS):
        c = ((flat >> off) & ((1 << p) - 1)).to(torch.uint8).view(-1, 8 // p)
        b = c[:, 0].clone()
        for i in range(1, 8 // p):  # the lanes of a byte (at most 8), each over all bytes at once
            b |= c[:, i] << (i * p)
        parts.append(b)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _code_values(raw: torch.Tensor, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """Element values (``dtype``: fp32 or float64) of a packed code section [N, nbytes],
    flat per row of ``raw``: one table look-up per byte for 1/2/4/8-bit codes, else the codes
    assembled from their bit planes, then one look-up per code."""
    kc = plan.kc
    n = raw.shape[0]
    if plan.byte_values is not None:
        table = plan.byte_values[0 if dtype == _F32 else 1]  # [256, codes per byte]
        idx = raw.reshape(-1).to(_I32)
        if table.shape[1] > 1 and table[0].nbytes == 8:  # gathering 8-byte words is much faster than rows
            return table.view(torch.int64).reshape(-1).index_select(0, idx).view(dtype).view(n, -1)
        return table.index_select(0, idx).view(n, -1)
    ncodes = raw.shape[1] * 8 // kc.BITS
    codes = torch.zeros((n, ncodes), dtype=torch.int64)
    start = 0
    for off, p in packing.planes(kc.BITS):
        nb = ncodes * p // 8
        shifts = torch.arange(8 // p, dtype=torch.int64) * p
        plane = (raw[:, start:start + nb].to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << p) - 1)
        codes |= plane.reshape(n, ncodes) << off
        start += nb
    table = plan.values if dtype == _F32 else plan.values64
    return table.index_select(0, codes.reshape(-1)).view(n, -1)


# ------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------
def _block_sections(blocks: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """Wire sections (codes, scales, zero points, tensor scale) of fp32 blocks [R, NB, BS]."""
    kc = plan.kc
    bits = blocks.view(_I32)
    if kc.ZP:
        # block min and max: NaN propagates and Inf is the min or max, so they also find the
        # blocks holding NaN/Inf (amin + amax: 4x faster than aminmax over short rows)
        mn, mx = blocks.amin(-1), blocks.amax(-1)
        bad = ~(torch.isfinite(mn) & torch.isfinite(mx))
        anybad = bool(bad.any())
        if anybad:  # the reference's min and max are over the finite values
            blocks = blocks.masked_fill((bits & FP32_ABS_MASK) >= FP32_EXP_MASK, 0.0)
            mn, mx = blocks.amin(-1).masked_fill_(bad, 0.0), blocks.amax(-1).masked_fill_(bad, 0.0)
        mn, mx = mn + 0.0, mx + 0.0  # a zero min/max is +0 (the reference's rule)
        zcode, zero = _signed_code(mn, mn < 0, plan)  # rounded down
        d = mx - zero
        big = torch.isinf(d)  # max - zero past fp32's range: both terms halved, exactly (the reference's h)
        h = torch.where(big, 0.5, 1.0) if bool(big.any()) else None
        raw = d / plan.maxmag if h is None else (mx * h - zero * h) / plan.maxmag / h
        raw = torch.where((raw == 0) & (d > 0), FP32_MIN_SUBNORMAL, raw)  # underflow: never a zero scale
        scode, scale = _signed_code(raw, raw >= 0, plan)  # rounded up
        pos = scale > 0
        if h is None:
            v = (blocks - zero.unsqueeze(-1)).div_(torch.where(pos, scale, 1.0).unsqueeze(-1))
        else:
            hb = h.unsqueeze(-1)
            v = (blocks * hb - (zero * h).unsqueeze(-1)).div_(torch.where(pos, scale * h, 1.0).unsqueeze(-1))
        if not bool(pos.all()):
            v.masked_fill_(~pos.unsqueeze(-1), 0.0)
        codes = _int_codes(v, plan)
        if anybad:
            codes.masked_fill_(bad.unsqueeze(-1), 0)
        return [_pack(codes, kc), _word_bytes(torch.where(bad, kc.SNAN, scode), kc.SB),
                _word_bytes(torch.where(bad, kc.SNAN, zcode), kc.SB)]

    # block absmax as an integer max over |x|'s bits (the same order as the floats, and faster
    # than a float max over short rows); NaN/Inf bits lie above every finite value's
    mag = bits & FP32_ABS_MASK
    amax = mag.amax(-1)
    bad = amax >= FP32_EXP_MASK  # blocks holding NaN/Inf
    anybad = bool(bad.any())
    if anybad:  # the reference's absmax is over the finite values
        nonfinite = mag >= FP32_EXP_MASK
        blocks = blocks.masked_fill(nonfinite, 0.0)
        amax = mag.masked_fill_(nonfinite, 0).amax(-1)
    amax = amax.view(_F32)
    float_elem = kc.KIND == KIND_FLOAT
    sections = []
    if kc.SCALE == SCALE_E8M0:
        # s = floor(log2 amax) - emax, clamped to [-127, 127] (-127 for an all-zero block): the
        # exponent field gives floor(log2 amax) for normal amax; a zero or fp32-subnormal amax
        # (field 0) is below 2^-126, where s clamps to -127 whatever its log2 (emax >= 0)
        s = ((amax.view(_I32) >> FP32_MBITS) - (FP32_BIAS + kc.EMAX)).clamp_(-127, 127)
        if float_elem:
            codes = _float_codes(_times_pow2(blocks, -s), blocks, plan, saturate=False)
        else:
            codes = _int_codes(_times_pow2(blocks, -s - kc.GE), plan)
        scale_bytes = torch.where(bad, 255, s + 127).to(torch.uint8).reshape(-1)
    else:
        ts = None
        if kc.TS:
            tamax = amax.max() if amax.numel() else amax.new_zeros(())  # (every feature an outlier)
            ts = torch.clamp(tamax / plan.maxn_ts, min=FP32_TINY)
            den = plan.maxn * ts
        else:
            den = plan.maxn
        raw = amax / den
        if kc.SCALE == SCALE_FP32:
            scode, stored = raw.view(_I32), raw
        else:
            scode, stored = _signed_code(raw, raw >= 0, plan)  # rounded up
        tiny = (raw < FP32_TINY) & (amax > 0)
        if bool(tiny.any()):  # quotients below fp32's normal range: rounded up exactly instead
            scode = torch.where(tiny, _tiny_scale_codes(amax, den, tiny, kc), scode)
            stored = scode.view(_F32) if kc.SCALE == SCALE_FP32 else _scale_values(scode, plan)
        scale = stored * ts if kc.TS else stored
        # scale 0 (an all-zero block): a reciprocal of 1 / inf = 0 gives x's signed zero
        v = times_reciprocal(blocks, torch.where(scale > 0, scale, torch.inf).unsqueeze(-1))
        if float_elem:
            codes = _float_codes(v, blocks, plan, saturate=True)
        else:
            if kc.GSCALE != 1.0:
                v *= kc.GSCALE
            codes = _int_codes(v, plan)
        scale_bytes = _word_bytes(torch.where(bad, kc.SNAN, scode), kc.SB)
        if ts is not None:
            sections.append(ts.reshape(1).view(torch.uint8))
    if anybad:
        codes.masked_fill_(bad.unsqueeze(-1), 0)
    return [_pack(codes, kc), scale_bytes] + sections


def _static_codes(xq: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Codes of [R, padded] fp32 features with fixed per-feature scales; NaN/Inf take the
    otherwise unused code -2^(N-1) (the reference's NaN marker)."""
    kc = plan.kc
    # a finite sum proves every value finite (isfinite over the tensor costs ~25 sums)
    nonfinite = None if bool(torch.isfinite(xq.sum())) else ~torch.isfinite(xq)
    v = (xq if nonfinite is None else xq.masked_fill(nonfinite, 0.0)) / plan.static_scales
    if kc.GSCALE != 1.0:
        v *= kc.GSCALE
    codes = _int_codes(v, plan)
    if nonfinite is not None:
        codes.masked_fill_(nonfinite, 1 << (kc.BITS - 1))
    return codes


def quantize(x: torch.Tensor, fmt) -> torch.Tensor:
    """Wire buffer (uint8, 1-D) of ``x`` (fp32/bf16/fp16, any leading shape), byte for byte
    ``qformats.encode(x, fmt).data``."""
    f = need_format(fmt)
    check_input(x)
    if x.device.type != "cpu":  # the reference computes on the CPU too
        return quantize(x.detach().cpu(), f).to(x.device)
    lay = f.layout(x.shape)
    plan = _plan(f, lay.width)
    if plan is None:
        return reference_quantize(x, f)
    x2 = x.detach().reshape(lay.rows, lay.width).to(_F32)
    xq = x2.index_select(1, plan.keep) if plan.keep is not None else x2
    if lay.padded > lay.qwidth:  # zero-pad the last block (one copy)
        xq = torch.cat([xq, xq.new_zeros(lay.rows, lay.padded - lay.qwidth)], 1)
    xq = xq.contiguous()
    if plan.rotation:  # the reference's own fp32 butterfly (its definition), over the padded features
        xq = rotate(xq, plan.rotation)
    if plan.static:
        parts = [_pack(_static_codes(xq, plan), plan.kc)]
    else:
        parts = _block_sections(xq.view(lay.rows, lay.nblocks, lay.block), plan)
    if plan.outliers is not None:
        parts.append(saturating_cast(x2.index_select(1, plan.outliers), torch.bfloat16).view(torch.uint8).reshape(-1))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------
def _finite_absmax(t: torch.Tensor) -> float:
    """Largest |t| over its finite values (0 if none), as a float. For per-block tensors."""
    if t.numel() == 0:
        return 0.0
    a = t.abs()
    return float(torch.where(torch.isfinite(a), a, 0.0).amax())


def _decode_rows(bufs: torch.Tensor, f: Format, shape: tuple, plan: _Plan) -> tuple[torch.Tensor, float]:
    """fp32 decodes [N, rows, width] of N wire buffers [N, nbytes] (one pass for all of them),
    and a bound on their finite magnitudes (from the per-block scales: it lets the callers skip
    the saturation passes, which change nothing below fp32's or the output dtype's max)."""
    kc = plan.kc
    lay = f.layout(shape)
    n = bufs.shape[0]
    sec = {k: bufs[:, a:b] for k, (a, b) in lay.offsets.items()}

    def saturate(y, scale, bound):  # the reference's saturate_fp32, only where a product can overflow
        if bound < FP32_MAX:
            return y
        elem_inf = (lambda: torch.isinf(_code_values(sec["code"], plan, _F32)).view(y.shape)) if plan.inf_codes else None
        return _saturate_overflow(y, scale, elem_inf)

    if plan.static:
        y = _code_values(sec["code"], plan, _F32).view(n, lay.rows, lay.padded).mul_(plan.static_scales)
        bound = plan.maxval * float(plan.static_scales.max())
        y = saturate(y, None, bound)
    else:
        bshape = (n, lay.rows, lay.nblocks, 1)
        if kc.SCALE == SCALE_E8M0:
            vals = _code_values(sec["code"], plan, _F32).view(n, lay.rows, lay.nblocks, lay.block)
            sb = sec["scale"].reshape(-1).to(_I32)
            sv = plan.e8m0_values.index_select(0, sb)
            y = vals.mul_(sv.view(bshape))
            nan_blocks = sb == 255
            if bool(nan_blocks.any()):
                y.masked_fill_(nan_blocks.view(bshape), torch.nan)
            bound = plan.maxval * _finite_absmax(sv)
            y = saturate(y, None, bound)  # (NaN blocks hold no Inf)
        else:
            scale = _load_scales(sec["scale"], plan).view(bshape)
            if kc.TS:
                scale = scale * _words(sec["ts"], 4).view(_F32).view(n, 1, 1, 1)
            bound = plan.maxval * _finite_absmax(scale)
            if kc.ZP and kc.SCALE == SCALE_FP16:
                # code * scale (<= 8 + 11 bits, exact in fp32) and the zero point both have all
                # their bits within 2^-24 .. 2^25, so the reference's float64 sum is exact and its
                # cast to fp32 the one rounding: which is what an fp32 add of the two terms does.
                vals = _code_values(sec["code"], plan, _F32).view(n, lay.rows, lay.nblocks, lay.block)
                zero = _load_scales(sec["zp"], plan).view(bshape)
                y = vals.mul_(scale).add_(zero)  # |y| < 2^25: never overflows (Inf only from Inf words)
                bound += _finite_absmax(zero)
            elif kc.ZP:  # bf16 terms can span more bits than float64 holds: add exactly as the reference
                vals = _code_values(sec["code"], plan, _F64).view(n, lay.rows, lay.nblocks, lay.block)
                zero = _load_scales(sec["zp"], plan).view(bshape)
                y = (vals * scale.to(_F64)).add_(zero.to(_F64))
                bound += _finite_absmax(zero)
                y = saturate_fp32(y) if bound >= FP32_MAX else y.to(_F32)
            else:
                vals = _code_values(sec["code"], plan, _F32).view(n, lay.rows, lay.nblocks, lay.block)
                y = saturate(vals.mul_(scale), scale, bound)
                nan_scale = torch.isnan(scale)
                if bool(nan_scale.any()):  # the reference's float64 product keeps a NaN scale's bits,
                    y = torch.where(nan_scale, scale * 1.0, y)  # quieted, also over a NaN element (fp32 mul_ keeps the element's)
        y = y.view(n, lay.rows, lay.padded)
        if plan.rotation:
            y = rotate(y, plan.rotation, inverse=True)
            # a decoded value is 2^-floor(k/2) times a sum of N = 2^k values: at most 2^ceil(k/2) x bound
            k = plan.rotation.bit_length() - 1
            bound = bound * 2.0 ** (k - k // 2)
    y = y[:, :, : lay.qwidth]
    if plan.outliers is not None:
        ob = sec["out"].clone(memory_format=torch.contiguous_format)  # a copy: bf16-aligned
        ob = ob.view(torch.bfloat16).view(n, lay.rows, -1).to(_F32)
        bound = max(bound, _finite_absmax(ob))
        out = torch.empty(n, lay.rows, lay.width, dtype=_F32)
        out.index_copy_(2, plan.keep, y)
        out.index_copy_(2, plan.outliers, ob)
        y = out
    return y.reshape(n, *shape), bound


def _check_buffer(buf: torch.Tensor, f: Format, shape: tuple) -> None:
    if buf.dtype != torch.uint8:
        raise ValueError(f"wire buffers are uint8, got {buf.dtype}")
    need = f.nbytes(shape)
    if buf.numel() != need:
        raise ValueError(f"{f} needs {need} bytes for shape {shape}, got {buf.numel()}")


def _decode_many(bufs: torch.Tensor, f: Format, shape: tuple) -> torch.Tensor:
    """fp32 [N, *shape] decodes of N equal-format buffers [N, nbytes] (CPU)."""
    return _decode_many_bounded(bufs, f, shape)[0]


def _decode_many_bounded(bufs: torch.Tensor, f: Format, shape: tuple) -> tuple[torch.Tensor, float]:
    """:func:`_decode_many` and a bound on the finite magnitudes (inf: not known)."""
    plan = _plan(f, shape[-1])
    if plan is None:
        return torch.stack([reference_dequantize(b, f, shape, _F32) for b in bufs]), math.inf
    return _decode_rows(bufs, f, shape, plan)


def dequantize(buf: torch.Tensor, fmt, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of one wire buffer as ``dtype``, bitwise ``qformats.decode`` of it (NaN payloads and
    signed zeros included)."""
    f = need_format(fmt)
    shape = dims(shape)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cannot decode to {dtype}: use one of float32, bfloat16, float16")
    _check_buffer(buf, f, shape)
    if buf.device.type != "cpu":
        return dequantize(buf.cpu(), f, shape, dtype).to(buf.device)
    y, bound = _decode_many_bounded(buf.reshape(1, -1), f, shape)
    if dtype != _F32 and bound <= torch.finfo(dtype).max:
        return y[0].to(dtype)  # nothing overflows: the reference's saturating cast is this plain cast
    return saturating_cast(y[0], dtype)


class TorchCodec:
    """:class:`lowering.codec.Codec` on whole-tensor CPU torch ops,
    bitwise equal to the reference (module docstring). Install it with
    ``tp.set_codec(TorchCodec())``. ``dequant_sum`` decodes all buffers in one pass,
    then adds them in list (= rank) order, one fp32 addition at a time."""

    name = "torch"

    def quantize(self, x: torch.Tensor, fmt) -> torch.Tensor:
        return quantize(x, fmt)

    def dequantize(self, buf: torch.Tensor, fmt, shape) -> torch.Tensor:
        return dequantize(buf, fmt, shape)

    def dequant_sum(self, bufs: Sequence[torch.Tensor], fmt, shape) -> torch.Tensor:
        f = need_format(fmt)
        shape = dims(shape)
        stacked = bufs if isinstance(bufs, torch.Tensor) else torch.stack([b.reshape(-1) for b in bufs])
        for b in stacked:
            _check_buffer(b, f, shape)
        dev = stacked.device
        ys = _decode_many(stacked.cpu(), f, shape)
        acc = ys[0]
        for y in ys[1:]:  # rank order: the sum every rank computes
            acc.add_(y)
        return acc.to(dev)

    def dequant_sum_requant(self, bufs: Sequence[torch.Tensor], fmt, shape) -> torch.Tensor:
        return self.quantize(self.dequant_sum(bufs, fmt, shape), fmt)
