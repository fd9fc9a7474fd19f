"""Exact fp32 arithmetic for the codec kernel (:mod:`lowering.kernels`): powers of two and
floor(log2) from bits, IEEE division, directed rounding onto a scale grid, scale and float
code values, float tiles in and out (bf16/fp16/fp32 with the reference's rounding and
saturation) and the ``+h{N}`` rotation's butterfly.

Use these only inside ``@triton.jit`` code. Each is exact for every fp32 input it documents
(the reference codec computes in float64 where it matters); the kernels' bit-exactness rests on
them. Cost: a few integer or fp32 operations per call, per element or per block as noted.
"""
from __future__ import annotations

import triton
import triton.language as tl

from qformats import numeric

from . import constants as C

# in/out element kinds of the float side (bf16 travels as int16 bits in the interpreter, whose
# bf16 casts do not round half to even)
IO_FP32, IO_BF16, IO_FP16 = 0, 1, 2

# the kernel-side names of the constants' integers (Triton reads module globals only as constexprs)
_E8M0 = tl.constexpr(C.SCALE_E8M0)
_FP32S = tl.constexpr(C.SCALE_FP32)
_BF16S = tl.constexpr(C.SCALE_BF16)
_FP16S = tl.constexpr(C.SCALE_FP16)
_FLOAT = tl.constexpr(C.KIND_FLOAT)
_INT = tl.constexpr(C.KIND_INT)
_IEEE = tl.constexpr(C.POLICY_IEEE)
_FN = tl.constexpr(C.POLICY_FN)
_DEC_FP8 = tl.constexpr(C.DECODE_FP8)
_DEC_INT = tl.constexpr(C.DECODE_INT)
_FP8_E5M2 = tl.constexpr(C.FP8_E5M2)
_F32IO = tl.constexpr(IO_FP32)
_BF16IO = tl.constexpr(IO_BF16)


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
def _div(a, b, GPU: tl.constexpr):
    """IEEE fp32 a / b (per block: cheap enough to use the slow exact path)."""
    if GPU:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _round_mag_int(bits, larger, F: tl.constexpr):
    """Directed rounding of a finite non-negative fp32 (int32 ``bits``) onto the scale type's
    float grid (``F.S_*``).

    Rounds toward the larger magnitude where ``larger`` else toward zero, saturating at the
    grid's max finite code; returns the magnitude code. Pure integer arithmetic: exact for
    every fp32 input, subnormals included (used once per block, for scales and zero points).
    """
    field = bits >> 23
    sig = tl.where(field > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    ex = tl.maximum(field, 1) - 150  # value = sig * 2^ex
    g = tl.maximum(_flog2(bits), F.S_EMIN) - F.S_MBITS  # grid step exponent
    sh = g - ex
    shr = tl.minimum(tl.maximum(sh, 0), 31)
    q = sig >> shr
    rem = sig - (q << shr)
    n_right = q + tl.where(larger & (rem > 0), 1, 0)
    n_left = sig << tl.minimum(tl.maximum(-sh, 0), 24)
    n = tl.where(sh >= 0, n_right, n_left)
    code = ((g - F.S_EMIN + F.S_MBITS) << F.S_MBITS) + n
    return tl.minimum(code, F.S_MAXMAG)


@triton.jit
def _float_code_value(code, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                      POLICY: tl.constexpr, SIGNBIT: tl.constexpr):
    """fp32 value of a float code (sign at bit SIGNBIT, -1 for none); NaN/Inf per policy.
    Used per block (scales, zero points); elements decode through the table."""
    field = (code >> MBITS) & ((1 << EBITS) - 1)
    mant = code & ((1 << MBITS) - 1)
    sig = tl.where(field > 0, mant | (1 << MBITS), mant)
    e = tl.maximum(field, 1) - BIAS - MBITS
    t1 = tl.maximum(e, -126)
    v = (sig.to(tl.float32) * _pow2(t1)) * _pow2(e - t1)  # exact: second factor only for e < -126
    if POLICY == _IEEE:
        top = (1 << EBITS) - 1
        v = tl.where(field == top, tl.where(mant == 0, float("inf"), float("nan")), v)
    if POLICY == _FN:
        top = (1 << EBITS) - 1
        v = tl.where((field == top) & (mant == (1 << MBITS) - 1), float("nan"), v)
    if SIGNBIT >= 0:
        v = _neg_if(v, ((code >> SIGNBIT) & 1) != 0)
    return v


@triton.jit
def _scale_value(code, F: tl.constexpr):
    """fp32 value of a stored scale / zero-point code (fp32 bits, bf16, fp16 or e4m3 code)."""
    if F.SCALE == _FP32S:
        return code.to(tl.float32, bitcast=True)
    elif F.SCALE == _BF16S:
        return (code << 16).to(tl.float32, bitcast=True)
    elif F.SCALE == _FP16S:
        return _float_code_value(code, F.S_EBITS, F.S_MBITS, F.S_BIAS, F.S_POLICY, 15)
    else:
        return _float_code_value(code, F.S_EBITS, F.S_MBITS, F.S_BIAS, F.S_POLICY, -1)


# ------------------------------------------------------------------------------------------
# float tiles in and out
# ------------------------------------------------------------------------------------------
@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr, GPU: tl.constexpr):
    if KIND == _BF16IO and not GPU:  # bf16 as int16 bits (exact widening)
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return (b << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


_FP32_MAX = tl.constexpr(numeric.FP32_MAX)
_FP32_TINY = tl.constexpr(numeric.FP32_TINY)  # fp32's smallest normal
_RNE_MAGIC = tl.constexpr(numeric.FP32_RNE_MAGIC)  # 1.5 * 2^23 (qformats.numeric)
# qformats.codec.times_reciprocal's range for scales, [2^-S, 2^S) (S = numeric.RECIPROCAL_SHIFT),
# and the absmax quantizer's tile flag (kernels._encode_absmax): quotients amax / den outside
# [2^-(S-4), 2^(S-4)) (their scales, at most 2^(S-3), may leave the range) or, with +ts, tensor
# scales outside [2^-(S-9), 2^(S-9)) (times an e4m3 value in [2^-9, 448])
_RECIP_LO = tl.constexpr(2.0**-numeric.RECIPROCAL_SHIFT)
_RECIP_HI = tl.constexpr(2.0**numeric.RECIPROCAL_SHIFT)
_RARE_QUOTIENT_LO = tl.constexpr(2.0 ** -(numeric.RECIPROCAL_SHIFT - 4))
_RARE_QUOTIENT_HI = tl.constexpr(2.0 ** (numeric.RECIPROCAL_SHIFT - 4))
_RARE_TS_LO = tl.constexpr(2.0 ** -(numeric.RECIPROCAL_SHIFT - 9))
_RARE_TS_HI = tl.constexpr(2.0 ** (numeric.RECIPROCAL_SHIFT - 9))
_BF16_MAX = tl.constexpr(3.3895313892515355e38)
_FP16_MAX = tl.constexpr(65504.0)
# a block whose bound on |decoded value| reaches this fraction of a dtype's max may overflow it
# (the bound is computed in fp32: a margin far above its rounding error)
_RISK = tl.constexpr(0.999)


@triton.jit
def _any(flags):
    """Whether any of the per-block ``flags`` [BPP] is set: one scalar for the whole tile (a
    cross-warp reduction: use it once per tile), so rare work runs only in tiles that need it."""
    return tl.max(flags.to(tl.int32), axis=0) > 0


@triton.jit
def _clamp_finite(y, M: tl.constexpr):
    """Finite values past +-M become +-M (M representable in the output dtype, so clamping then
    rounding is rounding with saturation); +-Inf and NaN pass unchanged."""
    a = tl.abs(y)
    return tl.where((a > M) & (a < float("inf")), tl.where(y > 0, M, -M), y)


@triton.jit
def _saturate(y, ok):
    """fp32 products of finite factors (``ok``) that overflowed to +-Inf become +-fp32 max (the
    reference's ``saturate_fp32``); Inf codes/scales (foreign bytes) and NaN stay."""
    return tl.where(ok & (tl.abs(y) == float("inf")), tl.where(y > 0, _FP32_MAX, -_FP32_MAX), y)


@triton.jit
def _out_max(KIND: tl.constexpr):
    """The largest finite value of an output kind (a decode saturates there)."""
    if KIND == _BF16IO:
        return _BF16_MAX
    elif KIND == _F32IO:
        return _FP32_MAX
    else:
        return _FP16_MAX


@triton.jit
def _store_f32(ptr, offs, y, mask, KIND: tl.constexpr, GPU: tl.constexpr):
    """Store fp32 values as KIND, rounding half to even (callers saturate first: the hardware
    casts turn values past the dtype's max into Inf)."""
    if KIND == _F32IO:
        tl.store(ptr + offs, y, mask=mask)
    elif KIND == _BF16IO:
        if GPU:  # hardware cvt.rn.bf16.f32: round half to even
            tl.store(ptr + offs, y.to(tl.bfloat16), mask=mask)
        else:  # fp32 -> bf16 on the bits, round half to even; NaN -> 0x7FC0
            b = y.to(tl.int32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
            r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
            tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, y.to(tl.float16), mask=mask)


# ------------------------------------------------------------------------------------------
# rotation (+h{N}): qformats.codec.rotate's butterfly on each run of N lanes of a tile
# ------------------------------------------------------------------------------------------
@triton.jit
def _butterfly(x, BPP: tl.constexpr, BP2: tl.constexpr, H: tl.constexpr):
    """One stage: lanes i and i + H of every run of 2H (bit log2(H) of i clear) become
    (v[i] + v[i + H], v[i] - v[i + H]), one fp32 addition each (as the reference's stage).

    Each member needs its partner's value: one integer reduction over the pair axis gives the
    sum of both bit patterns (int32, wrapping), and that sum minus a member's own bits is its
    partner's, exactly. Then lane i adds its partner, lane i + H adds its partner to its own
    negation (x - y is x + (-y) in IEEE arithmetic, signed zeros included). Where a pair lives
    in one thread the compiler folds this to one add or subtract per element; where it spans
    two lanes it is one warp shuffle per element; the tile keeps its register layout (no
    shared-memory round trip, which a permute/join of the pair axis would force)."""
    v = tl.reshape(x.to(tl.int32, bitcast=True), (BPP * BP2 // (2 * H), 2, H))
    hi = (tl.arange(0, 2) == 1)[None, :, None]
    partner = (tl.sum(v, axis=1)[:, None, :] - v).to(tl.float32, bitcast=True)
    own = (v ^ tl.where(hi, -2147483648, 0)).to(tl.float32, bitcast=True)  # -v[i + H] by its sign bit
    return tl.reshape(partner + own, (BPP, BP2))


@triton.jit
def _rotate(x, K: tl.constexpr, INVERSE: tl.constexpr, BPP: tl.constexpr, BP2: tl.constexpr):
    """``qformats.codec.rotate(x, 2^K, INVERSE)`` on each run of 2^K lanes of the [BPP, BP2]
    fp32 tile (2^K divides the block size, so runs never straddle blocks or the padding lanes
    of a block): K stages in the reference's order, then one multiply by a power of two
    (2^-ceil(K/2) forward, 2^-floor(K/2) inverse). Cost: K additions per element, plus the
    lane exchanges of the stages whose partners live in other threads."""
    for s in tl.static_range(K):
        x = _butterfly(x, BPP, BP2, 1 << s)
    if INVERSE:
        return x * (2.0 ** (-(K // 2)))
    else:
        return x * (2.0 ** (-(K - K // 2)))
