"""Generic Triton quantize / dequantize kernels, bit-exact with ``qformats.encode/decode``.

One quantize kernel and one dequantize kernel serve every lowered format; the format enters
only through the constexprs of :class:`lowering.constants.KernelConstants`. The fused
collective steps are modes of the same two kernels:

* ``dequant_sum_requant``: the quantize kernel reading its input as the fp32 rank-order sum
  of N wire buffers (``SRC_BUFS``), optionally writing the decode of what it re-quantised;
* ``dequant_sum``: the dequantize kernel summing N wire buffers, plus an optional residual.

Use the launchers here (or, better, the ``torch.ops.qformats`` ops of :mod:`lowering.ops`,
which validate inputs and fall back to the reference for unsupported formats). Cost on a
GPU: one pass over the input and the output (per-tensor-scale formats such as nvfp4 read
their input twice: a first pass finds the tensor's absmax).

How exactness is kept (the reference computes in float64; these kernels in fp32/int32):

* Block scale exponents (E8M0) come from the exponent bits of the block absmax, with an exact
  int->float trick for fp32 subnormals; never from a float log2.
* Scaling by 2^-s is one fp32 multiply that is exact unless the product is an fp32 subnormal;
  such a value is < 2^-126, far below half the smallest element step (>= 2^-19), so it rounds
  to the same (signed) zero either way.
* Rounding onto an element grid: the grid step 2^g is read off the value's exponent bits,
  ``|v| * 2^-g`` is exact, and round-half-even is ``(y + 1.5*2^23) - 1.5*2^23`` (y < 2^22),
  which works in the interpreter (no libdevice) and on the GPU. Codes are then integer
  arithmetic: ``((g - emin + M) << M) + n`` is the magnitude code for every binade at once
  (a rounding carry lands in the next binade by itself), and saturation is a ``min``.
* Absmax scales: ``amax / max_normal`` and ``x / scale`` are IEEE divisions (``div_rn`` on the
  GPU, numpy's ``/`` in the interpreter); rounding the scale up onto its type's grid is done
  in integers from the bits (exact also for fp32 subnormals).
* Decoding looks the exact fp32 element value up in a 2^BITS-entry table built from the
  reference's code table (:func:`lowering.constants.value_table`) and multiplies it by the
  fp32 scale (one rounding, as the reference's float64 product cast to fp32); zero points use
  float64 exactly as the reference.
* No interpreter float casts are trusted for narrow types: bf16 in/out is done on the bits
  (round half to even by hand); fp8 casts are never used.
* GPU launches pass ``enable_fp_fusion=False`` (so ``acc + a*b`` is not contracted into an
  FMA that rounds once instead of twice) and ``enable_reflect_ftz=False``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning
from .constants import KernelConstants, value_table

# in/out element kinds (bf16 travels as int16 bits: the interpreter's bf16 casts do not round
# half to even, and doing it by hand costs nothing on the GPU either)
IO_FP32, IO_BF16, IO_FP16 = 0, 1, 2
_IO = {torch.float32: IO_FP32, torch.bfloat16: IO_BF16, torch.float16: IO_FP16}

_RNE_MAGIC = 12582912.0  # 1.5 * 2^23
_FP32_TINY = 1.1754943508222875e-38  # 2^-126


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not hasattr(_quantize_kernel, "run") or type(_quantize_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------------
# small exact helpers
# ------------------------------------------------------------------------------------------
@triton.jit
def _pow2(e):
    """2^e as fp32 for integer e in [-149, 127], built from bits (exact, subnormals included)."""
    normal = ((tl.maximum(e, -126) + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _pow2n(e):
    """2^e as fp32 for integer e in the normal range [-126, 127] (cheaper than _pow2)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _neg_if(y, neg):
    """-y where ``neg``, by flipping the sign bit (Triton's unary minus is 0 - y: no -0)."""
    return (y.to(tl.int32, bitcast=True) ^ tl.where(neg, -2147483648, 0)).to(tl.float32, bitcast=True)


@triton.jit
def _flog2(bits):
    """floor(log2(a)) of a non-negative finite fp32 given by its int32 bits; -1000 for 0."""
    field = bits >> 23
    mant = bits & 0x7FFFFF
    # subnormal: mant is an exact fp32 integer; its exponent field gives floor(log2(mant))
    sub = ((mant.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127) - 149
    return tl.where(field > 0, field - 127, tl.where(mant > 0, sub, -1000))


@triton.jit
def _div(a, b, DIV_RN: tl.constexpr):
    if DIV_RN:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _rne_int(y):
    """Round y (fp32, 0 <= y < 2^22) half to even, as int32."""
    return ((y + 12582912.0) - 12582912.0).to(tl.int32)


@triton.jit
def _round_mag_int(bits, larger, S_EMIN: tl.constexpr, S_MBITS: tl.constexpr, S_MAXMAG: tl.constexpr):
    """Directed rounding of a finite non-negative fp32 (int32 ``bits``) onto a float grid.

    Rounds toward the larger magnitude where ``larger`` else toward zero, saturating at the
    grid's max finite code; returns the magnitude code. Pure integer arithmetic: exact for
    every fp32 input, subnormals included (used once per block, for scales and zero points).
    """
    field = bits >> 23
    sig = tl.where(field > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    ex = tl.maximum(field, 1) - 150  # value = sig * 2^ex
    g = tl.maximum(_flog2(bits), S_EMIN) - S_MBITS  # grid step exponent
    sh = g - ex
    shr = tl.minimum(tl.maximum(sh, 0), 31)
    q = sig >> shr
    rem = sig - (q << shr)
    n_right = q + tl.where(larger & (rem > 0), 1, 0)
    n_left = sig << tl.minimum(tl.maximum(-sh, 0), 24)
    n = tl.where(sh >= 0, n_right, n_left)
    code = ((g - S_EMIN + S_MBITS) << S_MBITS) + n
    return tl.minimum(code, S_MAXMAG)


@triton.jit
def _float_code_value(code, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                      POLICY: tl.constexpr, SIGNBIT: tl.constexpr):
    """fp32 value of a float code (sign at bit SIGNBIT, -1 for none); NaN/Inf per policy."""
    field = (code >> MBITS) & ((1 << EBITS) - 1)
    mant = code & ((1 << MBITS) - 1)
    sig = tl.where(field > 0, mant | (1 << MBITS), mant)
    e = tl.maximum(field, 1) - BIAS - MBITS
    t1 = tl.maximum(e, -126)
    v = (sig.to(tl.float32) * _pow2(t1)) * _pow2(e - t1)  # exact: second factor only for e < -126
    if POLICY == 1:  # ieee
        top = (1 << EBITS) - 1
        v = tl.where(field == top, tl.where(mant == 0, float("inf"), float("nan")), v)
    if POLICY == 2:  # fn
        top = (1 << EBITS) - 1
        v = tl.where((field == top) & (mant == (1 << MBITS) - 1), float("nan"), v)
    if SIGNBIT >= 0:
        v = _neg_if(v, ((code >> SIGNBIT) & 1) != 0)
    return v


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    if KIND == 1:  # bf16 as int16 bits
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return (b << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f32(ptr, offs, y, mask, KIND: tl.constexpr):
    if KIND == 0:
        tl.store(ptr + offs, y, mask=mask)
    elif KIND == 1:  # fp32 -> bf16, round half to even on the bits; NaN -> 0x7FC0
        b = y.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
        r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, y.to(tl.float16), mask=mask)


# ------------------------------------------------------------------------------------------
# wire-buffer tiles: codes and per-block scale parameters
# ------------------------------------------------------------------------------------------
@triton.jit
def _load_codes(buf_ptr, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                BITS: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, GBP2: tl.constexpr,
                WORD64: tl.constexpr):
    """Element codes [BPP, BP2] (int32) of blocks ``blk`` from the packed code section."""
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    byt = tl.arange(0, GBP2)
    base = blk * (BS * BITS // 8)
    offs = base[:, None, None] + (grp * GB)[None, :, None] + byt[None, None, :]
    m = bmask[:, None, None] & ((grp * G) < BS)[None, :, None] & (byt < GB)[None, None, :]
    raw = tl.load(buf_ptr + offs, mask=m, other=0)
    if WORD64:
        w = tl.sum(raw.to(tl.int64) << (byt * 8).to(tl.int64)[None, None, :], axis=2)
        k = tl.arange(0, G).to(tl.int64) * BITS
        c = ((w[:, :, None] >> k[None, None, :]) & ((1 << BITS) - 1)).to(tl.int32)
    else:
        w = tl.sum(raw.to(tl.int32) << (byt * 8)[None, None, :], axis=2)
        k = tl.arange(0, G) * BITS
        c = (w[:, :, None] >> k[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(c, (BPP, BP2))


@triton.jit
def _store_codes(buf_ptr, code, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                 BITS: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, GBP2: tl.constexpr,
                 WORD64: tl.constexpr):
    """Pack codes [BPP, BP2] (int32, in [0, 2^BITS)) into the code section (LSB first)."""
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    byt = tl.arange(0, GBP2)
    c3 = tl.reshape(code, (BPP, NG, G))
    if WORD64:
        k = tl.arange(0, G).to(tl.int64) * BITS
        w = tl.sum(c3.to(tl.int64) << k[None, None, :], axis=2)
        b = (w[:, :, None] >> (byt * 8).to(tl.int64)[None, None, :]) & 0xFF
    else:
        k = tl.arange(0, G) * BITS
        w = tl.sum(c3 << k[None, None, :], axis=2)
        b = (w[:, :, None] >> (byt * 8)[None, None, :]) & 0xFF
    base = blk * (BS * BITS // 8)
    offs = base[:, None, None] + (grp * GB)[None, :, None] + byt[None, None, :]
    m = bmask[:, None, None] & ((grp * G) < BS)[None, :, None] & (byt < GB)[None, None, :]
    tl.store(buf_ptr + offs, b.to(tl.uint8), mask=m)


@triton.jit
def _load_word(buf_ptr, off, blk, bmask, SB: tl.constexpr):
    """Little-endian SB-byte words (int32) at ``off + blk * SB``."""
    i = tl.arange(0, SB)
    raw = tl.load(buf_ptr + off + blk[:, None] * SB + i[None, :], mask=bmask[:, None], other=0)
    return tl.sum(raw.to(tl.int32) << (i * 8)[None, :], axis=1)


@triton.jit
def _store_word(buf_ptr, off, blk, bmask, w, SB: tl.constexpr):
    i = tl.arange(0, SB)
    b = (w[:, None] >> (i * 8)[None, :]) & 0xFF
    tl.store(buf_ptr + off + blk[:, None] * SB + i[None, :], b.to(tl.uint8), mask=bmask[:, None])


@triton.jit
def _scale_value(code, SCALE: tl.constexpr, S_EBITS: tl.constexpr, S_MBITS: tl.constexpr,
                 S_BIAS: tl.constexpr, S_POLICY: tl.constexpr):
    """fp32 value of a stored scale / zero-point code (fp32 bits, bf16, fp16 or e4m3 code)."""
    if SCALE == 1:
        return code.to(tl.float32, bitcast=True)
    elif SCALE == 2:
        return (code << 16).to(tl.float32, bitcast=True)
    elif SCALE == 3:
        return _float_code_value(code, S_EBITS, S_MBITS, S_BIAS, S_POLICY, 15)
    else:
        return _float_code_value(code, S_EBITS, S_MBITS, S_BIAS, S_POLICY, -1)


@triton.jit
def _decode_values(code, s_e8m0, scale, zero, lut_ptr, SCALE: tl.constexpr, ZP: tl.constexpr):
    """fp32 values of codes [BPP, BP2] with per-block parameters ([BPP]):
    ``s_e8m0`` the E8M0 byte (255 = NaN block), else ``scale`` (and ``zero``) as fp32.

    The element value is one load from the decode table (sign, Inf and NaN codes included:
    :func:`lowering.constants.value_table`), an exact fp32; times an exact fp32 scale that is
    one rounding, as the reference's float64 product cast to fp32 (subnormal products too:
    no flush to zero), and Inf/NaN elements stay Inf/NaN under any finite scale.
    """
    val = tl.load(lut_ptr + code)
    if SCALE == 0:
        sc = tl.where(s_e8m0 == 255, float("nan"), _pow2(s_e8m0 - 127))  # 2^-127 is a subnormal: exact
        y = val * sc[:, None]
    elif ZP:
        # the reference adds in float64 then casts: do exactly that
        y = (val.to(tl.float64) * scale.to(tl.float64)[:, None] + zero.to(tl.float64)[:, None]).to(tl.float32)
    else:
        y = val * scale[:, None]
    return y


@triton.jit
def _dequant_tile(buf_ptr, blk, bmask, scale_off, zp_off, ts_off, lut_ptr,
                  BPP: tl.constexpr, BITS: tl.constexpr, SCALE: tl.constexpr, SB: tl.constexpr,
                  ZP: tl.constexpr, TS: tl.constexpr, S_EBITS: tl.constexpr, S_MBITS: tl.constexpr,
                  S_BIAS: tl.constexpr, S_POLICY: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                  G: tl.constexpr, GB: tl.constexpr, GBP2: tl.constexpr, WORD64: tl.constexpr):
    """fp32 values [BPP, BP2] of blocks ``blk`` of one wire buffer."""
    code = _load_codes(buf_ptr, blk, bmask, BPP, BS, BP2, BITS, G, GB, GBP2, WORD64)
    w = _load_word(buf_ptr, scale_off, blk, bmask, SB)
    if SCALE == 0:
        return _decode_values(code, w, 0.0, 0.0, lut_ptr, SCALE, ZP)
    else:
        scale = _scale_value(w, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
        if TS:
            ts = _load_word(buf_ptr, ts_off, tl.zeros_like(blk), bmask, 4).to(tl.float32, bitcast=True)
            scale = scale * ts
        zero = scale
        if ZP:
            zero = _scale_value(_load_word(buf_ptr, zp_off, blk, bmask, SB), SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
        return _decode_values(code, w, scale, zero, lut_ptr, SCALE, ZP)


@triton.jit
def _src(src_ptr, src_stride, ptr_table, src_off, i, TABLE: tl.constexpr):
    """Base of source buffer ``i``: ``src_ptr + i * src_stride``, or with TABLE the address
    ``ptr_table[i] + src_off`` (peer buffers of symmetric memory, 16-byte aligned)."""
    if TABLE:
        return tl.multiple_of(tl.load(ptr_table + i).to(tl.pointer_type(tl.uint8)) + src_off, 16)
    else:
        return src_ptr + i * src_stride


# ------------------------------------------------------------------------------------------
# the generic quantize kernel
# ------------------------------------------------------------------------------------------
@triton.jit
def block_tile(pid, total_blocks, nblk, width, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
               I64: tl.constexpr):
    """The [BPP, BP2] tile of blocks program ``pid`` owns: block ids, their mask, the lanes of
    the (zero-padded) block, the lanes holding real features, and element offsets."""
    if I64:  # int32 offsets unless the tensor or buffer needs more (cheaper index math)
        blk = pid.to(tl.int64) * BPP + tl.arange(0, BPP)
    else:
        blk = pid * BPP + tl.arange(0, BPP)
    bmask = blk < total_blocks
    lane = tl.arange(0, BP2)
    row = blk // nblk
    col = (blk - row * nblk) * BS
    inb = bmask[:, None] & (lane < BS)[None, :]
    valid = inb & ((col[:, None] + lane[None, :]) < width)
    offs = (row * width + col)[:, None] + lane[None, :]
    return blk, bmask, inb, valid, offs


@triton.jit
def _quantize_kernel(
    x_ptr, src_ptr, src_stride, out_ptr, deq_ptr, amax_ptr, lut_ptr,
    total_blocks, nblk, width, scale_off, zp_off, ts_off,
    IN_KIND: tl.constexpr, SRC_BUFS: tl.constexpr, N_SRC: tl.constexpr, PHASE: tl.constexpr,
    WRITE_DEQ: tl.constexpr, DEQ_KIND: tl.constexpr, BPP: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    BIAS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, POLICY: tl.constexpr,
    GE: tl.constexpr, GSCALE: tl.constexpr, MAXMAG: tl.constexpr, SAT: tl.constexpr, MAXN: tl.constexpr,
    SCALE: tl.constexpr, SB: tl.constexpr, ZP: tl.constexpr, TS: tl.constexpr, MAXN_TS: tl.constexpr,
    S_EBITS: tl.constexpr, S_MBITS: tl.constexpr, S_BIAS: tl.constexpr, S_EMIN: tl.constexpr,
    S_POLICY: tl.constexpr, S_MAXMAG: tl.constexpr, SNAN: tl.constexpr,
    BS: tl.constexpr, BP2: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, GBP2: tl.constexpr,
    WORD64: tl.constexpr, DIV_RN: tl.constexpr, I64: tl.constexpr,
):
    """Quantise BPP blocks per program. Input: ``x`` [rows, width] (IN_KIND), or with
    SRC_BUFS the fp32 rank-order sum of ``N_SRC`` wire buffers at ``src_ptr + i*src_stride``.
    PHASE 0 only folds the finite absmax into ``amax_ptr`` (per-tensor scale, pass 1)."""
    blk, bmask, inb, valid, offs = block_tile(tl.program_id(0), total_blocks, nblk, width, BPP, BS, BP2, I64)
    if SRC_BUFS:
        x = _dequant_tile(src_ptr, blk, bmask, scale_off, zp_off, ts_off, lut_ptr, BPP, BITS, SCALE, SB, ZP,
                          TS, S_EBITS, S_MBITS, S_BIAS, S_POLICY, BS, BP2, G, GB, GBP2, WORD64)
        for i in tl.static_range(1, N_SRC):
            x = x + _dequant_tile(src_ptr + i * src_stride, blk, bmask, scale_off, zp_off, ts_off, lut_ptr,
                                  BPP, BITS, SCALE, SB, ZP, TS, S_EBITS, S_MBITS, S_BIAS, S_POLICY,
                                  BS, BP2, G, GB, GBP2, WORD64)
        x = tl.where(valid, x, 0.0)
    else:
        x = _load_f32(x_ptr, offs, valid, IN_KIND)
    xb = x.to(tl.int32, bitcast=True)
    ab = xb & 0x7FFFFFFF
    finite = ab < 0x7F800000
    bad = tl.max(tl.where(inb & (~finite), 1, 0), axis=1) > 0  # NaN/Inf blocks
    ab = tl.where(finite, ab, 0)
    xc = tl.where(finite, x, 0.0)  # finite values, signs kept
    amax_b = tl.max(ab, axis=1)  # int order == float order for non-negative floats
    if PHASE == 0:
        tl.atomic_max(amax_ptr, tl.max(tl.where(bmask, amax_b, 0), axis=0))
    else:
        s_e8m0 = amax_b
        scale = amax_b.to(tl.float32, bitcast=True)
        zero = scale
        if SCALE == 0:
            s = tl.where(amax_b > 0, _flog2(amax_b) - EMAX, -127)
            s = tl.minimum(tl.maximum(s, -127), 127)
            # one multiply by 2^-s (2^-127 is an exact subnormal): exact unless the product is
            # an fp32 subnormal, which rounds to the same signed zero on any element grid
            v = xc * _pow2(-s)[:, None]
            s_e8m0 = tl.where(bad, 255, s + 127)
            scode = s_e8m0
        elif ZP:
            mn = tl.min(tl.where(inb & finite, x, float("inf")), axis=1)
            mx = tl.max(tl.where(inb & finite, x, -float("inf")), axis=1)
            # +0 for a zero min/max, whatever signed zeros the block holds (see ops docs)
            mn = tl.where(bad | (mn == 0.0), 0.0, mn)
            mx = tl.where(bad | (mx == 0.0), 0.0, mx)
            mnb = mn.to(tl.int32, bitcast=True)
            zneg = mnb < 0
            zcode = _round_mag_int(mnb & 0x7FFFFFFF, zneg, S_EMIN, S_MBITS, S_MAXMAG)  # round down
            zero = _scale_value(zcode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
            zero = _neg_if(zero, zneg)
            zcode = tl.where(zneg, zcode | 0x8000, zcode)
            raw = _div(mx - zero, MAXMAG * 1.0, DIV_RN)
            rb = raw.to(tl.int32, bitcast=True)
            rneg = rb < 0
            scode = _round_mag_int(rb & 0x7FFFFFFF, ~rneg, S_EMIN, S_MBITS, S_MAXMAG)  # round up
            scale = _scale_value(scode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
            scale = _neg_if(scale, rneg)
            scode = tl.where(rneg, scode | 0x8000, scode)
            safe = tl.where(scale > 0, scale, 1.0)
            v = tl.where((scale > 0)[:, None], _div(xc - zero[:, None], safe[:, None], DIV_RN), 0.0)
            zcode = tl.where(bad, SNAN, zcode)
            scode = tl.where(bad, SNAN, scode)
        else:
            amax_f = amax_b.to(tl.float32, bitcast=True)
            if TS:
                tam = tl.load(amax_ptr).to(tl.float32, bitcast=True)
                ts = tl.maximum(_div(tam, MAXN_TS, DIV_RN), 1.1754943508222875e-38)
                raw = _div(amax_f, MAXN * ts, DIV_RN)
            else:
                raw = _div(amax_f, MAXN, DIV_RN)
            if SCALE == 1:
                scode = raw.to(tl.int32, bitcast=True)
                stored = raw
            else:
                scode = _round_mag_int(raw.to(tl.int32, bitcast=True), raw >= 0.0, S_EMIN, S_MBITS, S_MAXMAG)
                stored = _scale_value(scode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
            if TS:
                scale = stored * ts
                tsw = ts.to(tl.int32, bitcast=True) + tl.zeros_like(amax_b)
                _store_word(out_ptr, ts_off, tl.zeros_like(blk), bmask & (blk == 0), tsw, 4)
            else:
                scale = stored
            safe = tl.where(scale > 0, scale, 1.0)
            v = tl.where((scale > 0)[:, None], _div(xc, safe[:, None], DIV_RN), xc * 0.0)
            scode = tl.where(bad, SNAN, scode)
        # ---- round v onto the element grid (half to even, saturating) ----
        vb = v.to(tl.int32, bitcast=True)
        neg = vb < 0
        a = (vb & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        if KIND == 0:
            a = tl.minimum(a, SAT)
            g = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, EMIN) - MBITS
            n = _rne_int(a * _pow2n(-g))  # -g in [-(EMAX+2-M), 19]
            code = tl.minimum(((g - EMIN + MBITS) << MBITS) + n, MAXMAG)
            code = tl.where(neg, code | (1 << (BITS - 1)), code)
        else:
            n = tl.minimum(_rne_int(tl.minimum(a * GSCALE, 4194304.0)), MAXMAG)
            code = tl.where(neg, -n, n) & ((1 << BITS) - 1)
        code = tl.where(bad[:, None], 0, code)
        _store_codes(out_ptr, code, blk, bmask, BPP, BS, BP2, BITS, G, GB, GBP2, WORD64)
        _store_word(out_ptr, scale_off, blk, bmask, scode, SB)
        if ZP:
            _store_word(out_ptr, zp_off, blk, bmask, zcode, SB)
        if WRITE_DEQ:
            if SCALE != 0:
                scale = tl.where(bad, float("nan"), scale)
            y = _decode_values(code, s_e8m0, scale, zero, lut_ptr, SCALE, ZP)
            _store_f32(deq_ptr, offs, y, valid, DEQ_KIND)


# ------------------------------------------------------------------------------------------
# the generic dequantize kernel
# ------------------------------------------------------------------------------------------
@triton.jit
def _dequantize_kernel(
    src_ptr, src_stride, ptr_table, src_off, res_ptr, out_ptr, out_chunk, lut_ptr,
    total_blocks, nblk, width, scale_off, zp_off, ts_off,
    N_SRC: tl.constexpr, TABLE: tl.constexpr, SUM: tl.constexpr, OUT_KIND: tl.constexpr,
    HAS_RES: tl.constexpr, RES_KIND: tl.constexpr, BPP: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    BIAS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, POLICY: tl.constexpr,
    GE: tl.constexpr, GSCALE: tl.constexpr, MAXMAG: tl.constexpr, SAT: tl.constexpr, MAXN: tl.constexpr,
    SCALE: tl.constexpr, SB: tl.constexpr, ZP: tl.constexpr, TS: tl.constexpr, MAXN_TS: tl.constexpr,
    S_EBITS: tl.constexpr, S_MBITS: tl.constexpr, S_BIAS: tl.constexpr, S_EMIN: tl.constexpr,
    S_POLICY: tl.constexpr, S_MAXMAG: tl.constexpr, SNAN: tl.constexpr,
    BS: tl.constexpr, BP2: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, GBP2: tl.constexpr,
    WORD64: tl.constexpr, DIV_RN: tl.constexpr, I64: tl.constexpr,
):
    """Decode BPP blocks per program of ``N_SRC`` wire buffers (see :func:`_src`).

    SUM: their fp32 sum in buffer order, plus the residual (optional), cast to OUT_KIND.
    Else program axis 1 picks buffer j, decoded into ``out + j * out_chunk`` (an all-gather's
    decode: two_shot's last step)."""
    blk, bmask, inb, valid, offs = block_tile(tl.program_id(0), total_blocks, nblk, width, BPP, BS, BP2, I64)
    if SUM:
        acc = _dequant_tile(_src(src_ptr, src_stride, ptr_table, src_off, 0, TABLE), blk, bmask, scale_off,
                            zp_off, ts_off, lut_ptr, BPP, BITS, SCALE, SB, ZP, TS, S_EBITS, S_MBITS, S_BIAS,
                            S_POLICY, BS, BP2, G, GB, GBP2, WORD64)
        for i in tl.static_range(1, N_SRC):
            acc = acc + _dequant_tile(_src(src_ptr, src_stride, ptr_table, src_off, i, TABLE), blk, bmask,
                                      scale_off, zp_off, ts_off, lut_ptr, BPP, BITS, SCALE, SB, ZP, TS,
                                      S_EBITS, S_MBITS, S_BIAS, S_POLICY, BS, BP2, G, GB, GBP2, WORD64)
        if HAS_RES:
            acc = acc + _load_f32(res_ptr, offs, valid, RES_KIND)
        _store_f32(out_ptr, offs, acc, valid, OUT_KIND)
    else:
        j = tl.program_id(1)
        y = _dequant_tile(_src(src_ptr, src_stride, ptr_table, src_off, j, TABLE), blk, bmask, scale_off,
                          zp_off, ts_off, lut_ptr, BPP, BITS, SCALE, SB, ZP, TS, S_EBITS, S_MBITS, S_BIAS,
                          S_POLICY, BS, BP2, G, GB, GBP2, WORD64)
        _store_f32(out_ptr + j.to(tl.int64) * out_chunk, offs, y, valid, OUT_KIND)


# ------------------------------------------------------------------------------------------
# launchers (no validation: lowering.ops validates)
# ------------------------------------------------------------------------------------------
def _io_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch_opts(kc: KernelConstants, n_elems: int, nbytes: int, device) -> tuple[int, dict]:
    bpp, warps = tuning.config(kc.BP2, n_elems, device)
    opts = {} if is_interpreted() else dict(num_warps=warps, enable_fp_fusion=False, enable_reflect_ftz=False)
    opts["I64"] = max(n_elems, nbytes) >= (1 << 31) - (1 << 24)
    return bpp, opts


@functools.lru_cache(maxsize=1024)
def _sections(kc: KernelConstants, rows: int, width: int):
    from qformats import Format

    lay = Format.parse(kc.fmt).layout((rows, width))
    off = lay.offsets
    return lay, off["scale"][0], off["zp"][0], off["ts"][0]


def _out_buffer(out: torch.Tensor | None, nbytes: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != nbytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 1-D uint8 tensor of {nbytes} bytes, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


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
    dev = bufs.device if x2 is None else x2.device
    lay, so, zo, to = _sections(kc, rows, width)
    total = rows * lay.nblocks
    out = _out_buffer(out, lay.total, dev)
    deq = torch.empty((rows, width), dtype=deq_dtype, device=dev) if deq_dtype is not None else None
    amax = torch.zeros(1, dtype=torch.int32, device=dev) if kc.TS else out  # TS: absmax workspace
    nbytes = lay.total if bufs is None else bufs.stride(0) * bufs.shape[0]
    bpp, opts = _launch_opts(kc, rows * lay.padded, nbytes, dev)
    grid = (triton.cdiv(total, bpp),)
    if bufs is None:
        xin, src, stride, n = _io_view(x2), out, 0, 1
    else:
        xin, src, stride, n = out, bufs, bufs.stride(0), bufs.shape[0]
    lut = value_table(kc, dev)
    args = (xin, src, stride, out, _io_view(deq) if deq is not None else out, amax, lut,
            total, lay.nblocks, width, so, zo, to)
    common = dict(IN_KIND=_IO.get(x2.dtype, 0) if x2 is not None else 0, SRC_BUFS=bufs is not None, N_SRC=n,
                  WRITE_DEQ=deq is not None, DEQ_KIND=_IO[deq_dtype] if deq is not None else 0, BPP=bpp,
                  **kc.constexprs(), **opts)
    if kc.TS:  # pass 1: the tensor's finite absmax, for the per-tensor scale
        _quantize_kernel[grid](*args, PHASE=0, **common)
    _quantize_kernel[grid](*args, PHASE=1, **common)
    return out, deq


def dequantize(bufs: torch.Tensor, kc: KernelConstants, rows: int, width: int, dtype: torch.dtype,
               residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 rank-order sum of the decodes of ``bufs`` [N, nbytes] (rows of any byte stride)
    (+ ``residual``), as ``dtype`` [rows, width], written into ``out`` if given (contiguous).
    N = 1 is a plain decode. One kernel launch."""
    lay, so, zo, to = _sections(kc, rows, width)
    out = _out_values(out, rows, width, dtype, bufs.device)
    bpp, opts = _launch_opts(kc, rows * lay.padded, bufs.stride(0) * bufs.shape[0], bufs.device)
    total = rows * lay.nblocks
    res = _io_view(residual) if residual is not None else out
    _dequantize_kernel[(triton.cdiv(total, bpp),)](
        bufs, bufs.stride(0), bufs, 0, res, _io_view(out), 0, value_table(kc, bufs.device),
        total, lay.nblocks, width, so, zo, to,
        N_SRC=bufs.shape[0], TABLE=False, SUM=True, OUT_KIND=_IO[dtype], HAS_RES=residual is not None,
        RES_KIND=_IO[residual.dtype] if residual is not None else 0, BPP=bpp, **kc.constexprs(), **opts)
    return out


def dequantize_peers(ptrs: torch.Tensor, src_off: int, kc: KernelConstants, rows: int, width: int,
                     out: torch.Tensor, *, summed: bool) -> torch.Tensor:
    """Decode the wire buffers at addresses ``ptrs[i] + src_off`` (int64 tensor of N base
    addresses on the GPU, e.g. symmetric-memory peer buffers; bases and ``src_off`` 16-byte
    aligned). ``summed``: their fp32 rank-order sum into ``out`` [rows, width]; else buffer j
    decoded into rows ``[j*rows, (j+1)*rows)`` of ``out`` [N*rows, width]. One kernel launch."""
    if src_off % 16:
        raise ValueError(f"src_off {src_off} must be a multiple of 16 bytes")
    n = ptrs.numel()
    lay, so, zo, to = _sections(kc, rows, width)
    _out_values(out, rows if summed else n * rows, width, out.dtype, out.device)
    total = rows * lay.nblocks
    bpp, opts = _launch_opts(kc, rows * lay.padded, lay.total + src_off, out.device)
    opts["I64"] = opts["I64"] or (not summed and n * rows * width >= (1 << 31))
    grid = (triton.cdiv(total, bpp),) if summed else (triton.cdiv(total, bpp), n)
    o = _io_view(out)
    _dequantize_kernel[grid](
        o, 0, ptrs, src_off, o, o, rows * width, value_table(kc, out.device),
        total, lay.nblocks, width, so, zo, to,
        N_SRC=n, TABLE=True, SUM=summed, OUT_KIND=_IO[out.dtype], HAS_RES=False, RES_KIND=0, BPP=bpp,
        **kc.constexprs(), **opts)
    return out


def _out_values(out, rows: int, width: int, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty((rows, width), dtype=dtype, device=device)
    if out.dtype != dtype or out.numel() != rows * width or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {rows}x{width} values, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out
