"""The generic Triton codec kernel, bit-exact with ``qformats.encode/decode``.

One kernel, :func:`_codec_kernel`, serves every lowered format and every codec step; the
format enters only through the constexprs of :class:`lowering.constants.KernelConstants`,
the step through four launch constexprs:

* source: the input tensor, or the fp32 rank-order sum of ``N_SRC`` wire buffers (``SRC_BUFS``;
  with ``TABLE`` their addresses come from a pointer table: symmetric-memory peers);
* ``QUANT``: quantise the source into a wire buffer (optionally also writing the decode of
  what it wrote), else write the source (plus an optional residual) as floats.

So ``quantize`` is (input, QUANT), ``dequantize`` / ``dequant_sum`` are (buffers, not QUANT) and
``dequant_sum_requant`` is (buffers, QUANT). A fifth constexpr, ``NORM`` (off by default; off, the
kernel compiles to exactly the code it compiled to before NORM existed), ends a decode in the
next layer's residual add and RMSNorm: ``dequant_sum_rmsnorm`` is (buffers, not QUANT, NORM), one
program per row, the norm defined bit for bit by ``lowering.ops.reference_rms_norm``. Use the launchers here, or better the
``torch.ops.qformats`` ops of :mod:`lowering.ops`, which validate inputs and fall back to the
reference for unsupported formats. Cost on a GPU: one pass over inputs and outputs
(per-tensor-scale formats such as nvfp4 read their input twice: a first pass finds the
tensor's absmax).

Why it is fast (the kernel is memory-bound only if it spends few instructions per element):
when the blocks tile the rows exactly (``width % BS == 0``, power-of-two ``BS``: the common
case) a program owns ``BPP`` consecutive blocks, i.e. one contiguous span of the tensor and of
the code section, so loads and stores are 16-byte vectors with no per-element index or mask
arithmetic. Per block: one integer max gives the absmax and flags NaN/Inf. Per element the
work is a multiply by the scale, the rounding onto the element grid and a shift into the
packed word; 8-bit floats use the GPU's round-to-nearest-even, saturating fp8 conversions
(proved equal to the generic path on the GPU by the tests), decode is a table load (codes of
at most 6 bits: one or two L1 lines) or the hardware fp8 conversion, and bf16/fp16 outputs
are hardware casts (round half to even, like the reference).

How exactness is kept (the reference computes in float64 where it matters; here fp32/int32):

* Block scale exponents (E8M0) come from the exponent bits of the block absmax, never from a
  float log2. Scaling by 2^-s is one fp32 multiply that is exact unless the product is an fp32
  subnormal, which is < 2^-126, far below half the smallest element step (>= 2^-19), so it
  rounds to the same signed zero either way.
* Rounding onto a float element grid: the grid step is read off the value's exponent bits and
  the significand is rounded half to even in integers (the subnormal binade by adding a magic
  power of two); saturation is a ``min`` on the code. Integer elements: ``v * 2^-GE`` rounded
  with the ``1.5 * 2^23`` magic number.
* Absmax scales: ``x / scale`` must be the IEEE fp32 quotient. The interpreter divides with
  numpy; the GPU uses the block's correctly rounded reciprocal and two Markstein corrections
  with fused multiply-adds (correctly rounded for every fp32 pair without over/underflow; the
  block's operands are pre-scaled by a power of two to stay in range), which the GPU tests check
  against ``div_rn`` on every bf16 pair and on random fp32 pairs.
* GPU launches pass ``enable_fp_fusion=False`` (so ``acc + a*b`` is not contracted into an
  FMA that rounds once instead of twice) and ``enable_reflect_ftz=False``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import constants as C
from . import tuning
from .constants import KernelConstants, value_table

# in/out element kinds of the float side (bf16 travels as int16 bits in the interpreter, whose
# bf16 casts do not round half to even)
IO_FP32, IO_BF16, IO_FP16 = 0, 1, 2
_IO = {torch.float32: IO_FP32, torch.bfloat16: IO_BF16, torch.float16: IO_FP16}

# the kernel-side names of the constants' integers (Triton reads module globals only as constexprs)
_E8M0 = tl.constexpr(C.SCALE_E8M0)
_FP32S = tl.constexpr(C.SCALE_FP32)
_BF16S = tl.constexpr(C.SCALE_BF16)
_FP16S = tl.constexpr(C.SCALE_FP16)
_FLOAT = tl.constexpr(C.KIND_FLOAT)
_INT = tl.constexpr(C.KIND_INT)
_IEEE = tl.constexpr(C.POLICY_IEEE)
_FN = tl.constexpr(C.POLICY_FN)
_DEC_TABLE = tl.constexpr(C.DECODE_TABLE)
_DEC_FP8 = tl.constexpr(C.DECODE_FP8)
_DEC_INT = tl.constexpr(C.DECODE_INT)
_FP8_E5M2 = tl.constexpr(C.FP8_E5M2)
_F32IO = tl.constexpr(IO_FP32)
_BF16IO = tl.constexpr(IO_BF16)


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not hasattr(_codec_kernel, "run") or type(_codec_kernel).__name__ == "InterpretedFunction"


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
def _scale_value(code, SCALE: tl.constexpr, S_EBITS: tl.constexpr, S_MBITS: tl.constexpr,
                 S_BIAS: tl.constexpr, S_POLICY: tl.constexpr):
    """fp32 value of a stored scale / zero-point code (fp32 bits, bf16, fp16 or e4m3 code)."""
    if SCALE == _FP32S:
        return code.to(tl.float32, bitcast=True)
    elif SCALE == _BF16S:
        return (code << 16).to(tl.float32, bitcast=True)
    elif SCALE == _FP16S:
        return _float_code_value(code, S_EBITS, S_MBITS, S_BIAS, S_POLICY, 15)
    else:
        return _float_code_value(code, S_EBITS, S_MBITS, S_BIAS, S_POLICY, -1)


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


_FP32_MAX = tl.constexpr(3.4028234663852886e38)
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

    Written as two integer reductions over the pair axis (picking each member's bits: the other
    one is 0), so the tile keeps its register layout whatever it is: where a pair
    lives in one thread this folds to plain adds, where it spans two lanes it becomes warp
    shuffles; no shared-memory round trip (a permute/join of the pair axis would force one)."""
    v = tl.reshape(x.to(tl.int32, bitcast=True), (BPP * BP2 // (2 * H), 2, H))
    hi = (tl.arange(0, 2) == 1)[None, :, None]
    a = tl.sum(tl.where(hi, 0, v), axis=1).to(tl.float32, bitcast=True)
    b = tl.sum(tl.where(hi, v, 0), axis=1).to(tl.float32, bitcast=True)
    return tl.reshape(tl.where(hi, (a - b)[:, None, :], (a + b)[:, None, :]), (BPP, BP2))


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


# ------------------------------------------------------------------------------------------
# the tile a program owns
# ------------------------------------------------------------------------------------------
@triton.jit
def _tile(pid, total_blocks, nblk, width, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
          EVEN: tl.constexpr, I64: tl.constexpr):
    """The [BPP, BP2] tile of blocks program ``pid`` owns: block ids [BPP], their mask, the
    lanes holding a block's elements, the lanes holding real features, element offsets.

    EVEN (blocks tile the rows exactly, BS a power of two): the tile is one contiguous span,
    so offsets are affine and masks constant along a block (16-byte vector accesses)."""
    if I64:  # int32 offsets unless the tensor or buffer needs more (cheaper index math)
        blk = pid.to(tl.int64) * BPP + tl.arange(0, BPP)
    else:
        blk = pid * BPP + tl.arange(0, BPP)
    bmask = blk < total_blocks
    lane = tl.arange(0, BP2)
    if EVEN:
        offs = blk[:, None] * BS + lane[None, :]
        inb = bmask[:, None] & (lane < BP2)[None, :]
        valid = inb
    else:
        row = blk // nblk
        col = (blk - row * nblk) * BS
        inb = bmask[:, None] & (lane < BS)[None, :]
        valid = inb & ((col[:, None] + lane[None, :]) < width)
        offs = (row * width + col)[:, None] + lane[None, :]
    return blk, bmask, inb, valid, offs


# ------------------------------------------------------------------------------------------
# wire-buffer sections: packed codes and per-block words
# ------------------------------------------------------------------------------------------
@triton.jit
def _code_mask(bmask, grp, G: tl.constexpr, BS: tl.constexpr, EVEN: tl.constexpr):
    """Mask of the [BPP, NG] code bytes/groups of a tile: constant along a block when EVEN
    (so the accesses vectorise)."""
    if EVEN:
        return bmask[:, None] & (grp >= 0)[None, :]
    else:
        return bmask[:, None] & (grp * G < BS)[None, :]


@triton.jit
def _plane_bytes(blk, bmask, BPP: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr):
    """Byte offsets [BPP * NB / CB, CB] (and their mask) of the NB plane bytes of each block of
    ``blk``, as runs of CB contiguous bytes: one run per thread-sized chunk of the float tile
    (see :func:`_store_plane`)."""
    NCB: tl.constexpr = NB // CB
    R: tl.constexpr = BPP * NCB
    start = tl.reshape(blk[:, None] * NB + (tl.arange(0, NCB) * CB)[None, :], (R,))
    m = tl.reshape(bmask[:, None] & (tl.arange(0, NCB) >= 0)[None, :], (R,))
    return tl.multiple_of(start, CB)[:, None] + tl.arange(0, CB)[None, :], m[:, None] & (tl.arange(0, CB) >= 0)[None, :]


@triton.jit
def _load_plane(ptr, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr, P: tl.constexpr,
                EVEN: tl.constexpr):
    """The P-bit slices [BPP, BP2] (int32) of blocks ``blk`` from a plane of P-bit codes packed
    8 / P to a byte (P a power of two): one contiguous byte row per block (a decode keeps the
    layout these whole-row loads give: few threads per block, so the rotation's stages and
    the per-block work stay inside a thread)."""
    G: tl.constexpr = 8 // P
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    raw = tl.load(ptr + (blk * (BS // G))[:, None] + grp[None, :], mask=_code_mask(bmask, grp, G, BS, EVEN),
                  other=0).to(tl.int32)
    if G == 1:
        return raw
    elif G == 2:
        return tl.reshape(tl.join(raw & 15, raw >> 4), (BPP, BP2))
    else:
        k = tl.arange(0, G) * P
        return tl.reshape((raw[:, :, None] >> k[None, None, :]) & ((1 << P) - 1), (BPP, BP2))


@triton.jit
def _load_codes(buf_ptr, pl1_off, pl2_off, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, EVEN: tl.constexpr):
    """Element codes [BPP, BP2] (int32) of blocks ``blk``: their bit planes (widths P0, P1, P2,
    low bits first; ``qformats.packing``) at byte offsets 0, ``pl1_off``, ``pl2_off``."""
    c = _load_plane(buf_ptr, blk, bmask, BPP, BS, BP2, P0, EVEN)
    if P1 > 0:
        c = c | (_load_plane(buf_ptr + pl1_off, blk, bmask, BPP, BS, BP2, P1, EVEN) << P0)
    if P2 > 0:
        c = c | (_load_plane(buf_ptr + pl2_off, blk, bmask, BPP, BS, BP2, P2, EVEN) << (P0 + P1))
    return c


@triton.jit
def _store_plane(ptr, code, keep, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                 P: tl.constexpr, OFF: tl.constexpr, MASK: tl.constexpr, EVEN: tl.constexpr, CW: tl.constexpr):
    """Pack bits [OFF, OFF + P) of codes [BPP, BP2] 8 / P to a byte into one plane (MASK: other
    bits are set above them); ``keep`` [BPP] -1, or 0 to write a block's bytes as zeros.

    EVEN and P < 8: written in runs of CW * P / 8 bytes (the bytes of the CW codes a thread holds
    in the float tile it quantised), so each thread stores its own bytes; a whole-row store
    would first move them between threads through shared memory (a barrier per plane)."""
    G: tl.constexpr = 8 // P
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    c = code >> OFF
    if MASK:
        c = c & ((1 << P) - 1)
    if G == 1:
        b = c
    elif G == 2:
        lo, hi = tl.split(tl.reshape(c, (BPP, NG, 2)))
        b = lo | (hi << P)
    else:
        k = tl.arange(0, G) * P
        b = tl.sum(tl.reshape(c, (BPP, NG, G)) << k[None, None, :], axis=2)
    b = (b & keep[:, None]).to(tl.uint8)
    CB: tl.constexpr = CW * P // 8
    if EVEN and P < 8 and CB >= 1 and CB < NG:
        offs, m = _plane_bytes(blk, bmask, BPP, NG, CB)
        tl.store(ptr + offs, tl.reshape(b, (BPP * NG // CB, CB)), mask=m)
    else:
        tl.store(ptr + (blk * (BS // G))[:, None] + grp[None, :], b, mask=_code_mask(bmask, grp, G, BS, EVEN))


@triton.jit
def _store_codes(buf_ptr, pl1_off, pl2_off, code, keep, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr,
                 BP2: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, EVEN: tl.constexpr,
                 CW: tl.constexpr):
    """Write codes [BPP, BP2] (int32, in [0, 2^BITS)) as their bit planes (see
    :func:`_load_codes`); ``keep`` [BPP] is -1, or 0 to write a block's codes as zeros (NaN/Inf
    blocks: masked after packing, one logic op per byte)."""
    _store_plane(buf_ptr, code, keep, blk, bmask, BPP, BS, BP2, P0, 0, P1 > 0, EVEN, CW)
    if P1 > 0:
        _store_plane(buf_ptr + pl1_off, code, keep, blk, bmask, BPP, BS, BP2, P1, P0, P2 > 0, EVEN, CW)
    if P2 > 0:
        _store_plane(buf_ptr + pl2_off, code, keep, blk, bmask, BPP, BS, BP2, P2, P0 + P1, False, EVEN, CW)


@triton.jit
def _load_word(buf_ptr, off, blk, bmask, SB: tl.constexpr, WALIGN: tl.constexpr):
    """Little-endian SB-byte words (int32) at ``off + blk * SB``; WALIGN: the address is a
    multiple of SB, so one load of a 2- or 4-byte integer does."""
    if SB == 1:
        return tl.load(buf_ptr + off + blk, mask=bmask, other=0).to(tl.int32)
    elif WALIGN and SB == 2:
        return tl.load((buf_ptr + off).to(tl.pointer_type(tl.int16)) + blk, mask=bmask, other=0).to(tl.int32) & 0xFFFF
    elif WALIGN and SB == 4:
        return tl.load((buf_ptr + off).to(tl.pointer_type(tl.int32)) + blk, mask=bmask, other=0)
    else:
        i = tl.arange(0, SB)
        raw = tl.load(buf_ptr + off + blk[:, None] * SB + i[None, :], mask=bmask[:, None], other=0)
        return tl.sum(raw.to(tl.int32) << (i * 8)[None, :], axis=1)


@triton.jit
def _store_word(buf_ptr, off, blk, bmask, w, SB: tl.constexpr, WALIGN: tl.constexpr):
    if SB == 1:
        tl.store(buf_ptr + off + blk, w.to(tl.uint8), mask=bmask)
    elif WALIGN and SB == 2:
        tl.store((buf_ptr + off).to(tl.pointer_type(tl.int16)) + blk, w.to(tl.int16), mask=bmask)
    elif WALIGN and SB == 4:
        tl.store((buf_ptr + off).to(tl.pointer_type(tl.int32)) + blk, w, mask=bmask)
    else:
        i = tl.arange(0, SB)
        b = (w[:, None] >> (i * 8)[None, :]) & 0xFF
        tl.store(buf_ptr + off + blk[:, None] * SB + i[None, :], b.to(tl.uint8), mask=bmask[:, None])


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------
@triton.jit
def _element_values(code, lut_ptr, KIND: tl.constexpr, BITS: tl.constexpr, GSCALE: tl.constexpr,
                    DECODE: tl.constexpr, FP8: tl.constexpr):
    """Exact fp32 values of element codes (NaN/Inf codes included)."""
    if DECODE == _DEC_FP8:  # exact widening through the hardware fp8 conversion
        if FP8 == _FP8_E5M2:
            return code.to(tl.uint8).to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif DECODE == _DEC_INT:
        if KIND == _INT:  # MX integer: sign-extended code times 2^GE (-2^(N-1), which no encoder
            STEP: tl.constexpr = 1.0 / GSCALE  # writes, decodes to its value as in the reference)
            return ((code << (32 - BITS)) >> (32 - BITS)).to(tl.float32) * STEP
        else:
            return code.to(tl.float32)
    else:
        return tl.load(lut_ptr + code)


@triton.jit
def _scaled(val, scale, zero, ZP: tl.constexpr, WIDE: tl.constexpr, HALVE: tl.constexpr, MAXV: tl.constexpr,
            SAT: tl.constexpr):
    """(fp32(val * scale (+ zero)), a per-block bound on its magnitude) for element values
    [BPP, BP2] and per-block parameters, with the reference's rounding: val * scale is exact
    for codes times scales of at most 16 significant bits, so fp32 arithmetic rounds once; WIDE
    (zero point and fp32 scales) adds in float64 as the reference does.

    SAT: also what the reference does past fp32's range (products of finite factors saturate,
    :func:`_saturate`; HALVE, bf16 zero points, redoes a sum whose product overflowed on halved
    terms, exactly). Without SAT the result is exact wherever the bound (MAXV = the largest
    finite element value) is below fp32's max: callers check the bound once per tile."""
    if ZP:
        bound = MAXV * tl.abs(scale) + tl.abs(zero)
        if WIDE:
            y = (val.to(tl.float64) * scale.to(tl.float64)[:, None] + zero.to(tl.float64)[:, None]).to(tl.float32)
        else:
            y = val * scale[:, None] + zero[:, None]
        if SAT:
            if HALVE:
                yh = (val * (scale * 0.5)[:, None] + (zero * 0.5)[:, None]) * 2.0
                y = tl.where(tl.abs(y) == float("inf"), yh, y)
            ok = ((tl.abs(scale) < float("inf")) & (tl.abs(zero) < float("inf")))[:, None]  # (uint values are finite)
            y = _saturate(y, ok)
    else:
        bound = MAXV * tl.abs(scale)
        y = val * scale[:, None]
        if SAT:
            y = _saturate(y, (tl.abs(val) < float("inf")) & (tl.abs(scale) < float("inf"))[:, None])
    return y, bound


@triton.jit
def _decode_tile(buf_ptr, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K: tl.constexpr, SAT: tl.constexpr):
    """(fp32 values [BPP, BP2], per-block bound on their magnitudes) of blocks ``blk`` of one
    wire buffer (SAT: see :func:`_scaled`). ``K`` bundles the format's constexprs (see
    :func:`_codec_kernel`)."""
    BPP: tl.constexpr = K[0]
    BITS: tl.constexpr = K[1]
    SCALE: tl.constexpr = K[2]
    SB: tl.constexpr = K[3]
    ZP: tl.constexpr = K[4]
    TS: tl.constexpr = K[5]
    S_EBITS: tl.constexpr = K[6]
    S_MBITS: tl.constexpr = K[7]
    S_BIAS: tl.constexpr = K[8]
    S_POLICY: tl.constexpr = K[9]
    BS: tl.constexpr = K[10]
    BP2: tl.constexpr = K[11]
    P0: tl.constexpr = K[12]
    P1: tl.constexpr = K[13]
    P2: tl.constexpr = K[14]
    GSCALE: tl.constexpr = K[15]
    DECODE: tl.constexpr = K[16]
    FP8: tl.constexpr = K[17]
    KIND: tl.constexpr = K[18]
    EVEN: tl.constexpr = K[19]
    WALIGN: tl.constexpr = K[20]
    MAXV: tl.constexpr = K[21]
    ROT: tl.constexpr = K[22]
    code = _load_codes(buf_ptr, pl1_off, pl2_off, blk, bmask, BPP, BS, BP2, P0, P1, P2, EVEN)
    val = _element_values(code, lut_ptr, KIND, BITS, GSCALE, DECODE, FP8)
    w = _load_word(buf_ptr, scale_off, blk, bmask, SB, WALIGN)
    if SCALE == _E8M0:
        sc = tl.where(w == 255, float("nan"), _pow2(w - 127))  # 2^-127 is a subnormal: exact
        y, bound = _scaled(val, sc, sc, False, False, False, MAXV, SAT)  # (a NaN scale gives NaN, never Inf)
    else:
        scale = _scale_value(w, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
        if TS:
            ts = tl.load(buf_ptr + ts_off + tl.arange(0, 4)).to(tl.int32)
            ts = tl.sum(ts << (tl.arange(0, 4) * 8), axis=0).to(tl.float32, bitcast=True)
            scale = scale * ts
        zero = scale
        if ZP:
            zero = _scale_value(_load_word(buf_ptr, zp_off, blk, bmask, SB, WALIGN), SCALE, S_EBITS, S_MBITS, S_BIAS,
                                S_POLICY)
        y, bound = _scaled(val, scale, zero, ZP, SCALE == _FP32S, SCALE == _BF16S, MAXV, SAT)
    if ROT > 0:  # back from the rotated coordinates; partial sums grow by at most 2^ROT
        y = _rotate(y, ROT, True, BPP, BP2)
        bound = bound * (2.0 ** ROT)
    return y, bound


@triton.jit
def _saturating(y, KIND: tl.constexpr):
    """fp32 ``y`` saturated for a cast to KIND (the reference's ``saturating_cast``)."""
    if KIND == _BF16IO:
        return _clamp_finite(y, _BF16_MAX)
    elif KIND == _F32IO:
        return y
    else:
        return _clamp_finite(y, _FP16_MAX)


@triton.jit
def _src(src_ptr, src_stride, ptr_table, src_off, i, TABLE: tl.constexpr):
    """Base of source buffer ``i``: ``src_ptr + i * src_stride``, or with TABLE the address
    ``ptr_table[i] + src_off`` (peer buffers of symmetric memory, 16-byte aligned)."""
    if TABLE:
        return tl.multiple_of(tl.load(ptr_table + i).to(tl.pointer_type(tl.uint8)) + src_off, 16)
    else:
        return src_ptr + i * src_stride


@triton.jit
def _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K: tl.constexpr,
             TABLE: tl.constexpr, SUM: tl.constexpr, N_SRC: tl.constexpr, SAT: tl.constexpr):
    """(fp32 rank-order sum of the decodes of the N_SRC source buffers, or with SUM False the
    decode of buffer ``program_id(1)``; per-block bound on its magnitude). SAT: see :func:`_scaled`."""
    if SUM:
        x, bound = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, 0, TABLE), blk, bmask, scale_off,
                                zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K, SAT)
        if SAT:  # the rare exact path: a loop, not unrolled (code size and registers stay small)
            for i in range(1, N_SRC):
                y, b = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, i, TABLE), blk, bmask, scale_off,
                                    zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K, SAT)
                x = x + y
                bound = bound + b
        else:
            for i in tl.static_range(1, N_SRC):
                y, b = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, i, TABLE), blk, bmask, scale_off,
                                    zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K, SAT)
                x = x + y
                bound = bound + b
    else:
        x, bound = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, tl.program_id(1), TABLE), blk, bmask,
                                scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr, K, SAT)
    return x, bound


# ------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------
@triton.jit
def _signed_like(q, x):
    """|q| with the sign of x (one logic op)."""
    return ((q.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (x.to(tl.int32, bitcast=True) & -2147483648)).to(
        tl.float32, bitcast=True)


@triton.jit
def _exact_quotient(x, s, GPU: tl.constexpr):
    """fp32(x / s) for a tile x [BPP, BP2] and per-block s > 0 [BPP] (IEEE round to nearest),
    up to the sign of a zero quotient.

    GPU: reciprocal per block, then q0 = x r and two Markstein steps q += (x - s q) r, each a
    fused multiply-add: correctly rounded when nothing over/underflows. The block's operands
    are scaled by the same power of two so that r is a normal fp32; the scaling is exact (or,
    for values that would underflow, moves a quotient far below every element grid's half
    step, which rounds to the same signed zero)."""
    if GPU:
        f = tl.where(s < 1.0e-20, 1.8446744073709552e19, tl.where(s > 1.0e20, 5.421010862427522e-20, 1.0))
        s2 = s * f
        r = tl.math.div_rn(tl.full(s2.shape, 1.0, tl.float32), s2)
        xs = x * f[:, None]
        s2b = s2[:, None]
        rb = r[:, None]
        q = xs * rb
        q = tl.fma(tl.fma(-s2b, q, xs), rb, q)
        q = tl.fma(tl.fma(-s2b, q, xs), rb, q)
        return q  # its magnitude: the corrections can turn -0 into +0 (callers take x's sign)
    else:
        return x / s[:, None]


@triton.jit
def _element_codes(v, BITS: tl.constexpr, KIND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                   MAXMAG: tl.constexpr, MAXN: tl.constexpr, SAT: tl.constexpr, GSCALE: tl.constexpr,
                   FP8_HW: tl.constexpr, FP8: tl.constexpr):
    """Element codes (int32, low BITS bits) of finite fp32 values already divided by their
    block's scale: round half to even onto the grid, saturate at max normal."""
    if FP8_HW:  # cvt.rn.satfinite: RNE, saturating at max normal; signed zeros kept
        if FP8 == _FP8_E5M2:
            c = v.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        else:
            c = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        return c
    elif KIND == _FLOAT:
        # round |v| half to even onto the grid in fp32: adding c = 2^(e + 23 - MBITS), e the
        # binade of |v| (at least EMIN: the subnormal step below it), leaves the grid step as
        # the ulp, so (a + c) - c is the rounded value; then saturate at max normal
        a = tl.minimum(tl.abs(v), SAT)
        CST: tl.constexpr = (23 - MBITS) << 23
        EMIN_BITS: tl.constexpr = (EMIN + 127) << 23
        c = (tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, EMIN_BITS) + CST).to(tl.float32, bitcast=True)
        r = tl.minimum((a + c) - c, MAXN)
        # r * 2^(-126-EMIN) is exact, and its fp32 bits are the element's bits shifted by
        # 23 - MBITS: element subnormals land on fp32 subnormals, normals keep their exponent
        # relative to EMIN, so one shift gives every magnitude code
        SCALE_DOWN: tl.constexpr = 2.0 ** (-126 - EMIN)
        code = (r * SCALE_DOWN).to(tl.int32, bitcast=True) >> (23 - MBITS)
        vb = v.to(tl.int32, bitcast=True)
        return code | ((vb >> (32 - BITS)) & (1 << (BITS - 1)))
    else:  # integer grids (MX int, uint with a zero point): code * 2^GE, two's complement
        # clamp, then round half to even with the 1.5 * 2^23 magic number: the low bits of the
        # sum are the code (the magic's low 23 bits are 0x400000, whose low BITS bits are 0)
        y = tl.minimum(tl.maximum(v * GSCALE, -MAXMAG * 1.0), MAXMAG * 1.0)
        return (y + 12582912.0).to(tl.int32, bitcast=True) & ((1 << BITS) - 1)


# ------------------------------------------------------------------------------------------
# the RMSNorm epilogue (NORM): one program per row, a fixed pairwise tree for the sum of squares
# ------------------------------------------------------------------------------------------
@triton.jit
def _row_tile(pid, nblk, width, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr, EVEN: tl.constexpr,
              I64: tl.constexpr):
    """NORM: the [BPP, BP2] tile of row ``pid``: its ``nblk`` blocks in the first BPP >= nblk
    block slots (the rest masked), as :func:`_tile` returns them, plus each lane's column."""
    if I64:
        row = pid.to(tl.int64)
    else:
        row = pid
    j = tl.arange(0, BPP)
    blk = row * nblk + j
    bmask = j < nblk
    lane = tl.arange(0, BP2)
    cols = (j * BS)[:, None] + lane[None, :]
    if EVEN:
        offs = blk[:, None] * BS + lane[None, :]
        inb = bmask[:, None] & (lane < BP2)[None, :]
        valid = inb
    else:
        inb = bmask[:, None] & (lane < BS)[None, :]
        valid = inb & (cols < width)
        offs = row * width + cols
    return blk, bmask, inb, valid, offs, cols


@triton.jit
def _as_stored(y, KIND: tl.constexpr, GPU: tl.constexpr):
    """fp32 ``y`` rounded to KIND (half to even) and widened back: the value :func:`_store_f32`
    stores (callers saturate first). NaN stays NaN (its payload is not part of the contract)."""
    if KIND == _F32IO:
        return y
    elif KIND == _BF16IO:
        if GPU:
            return y.to(tl.bfloat16).to(tl.float32)
        else:
            b = y.to(tl.int32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
            r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
            return (r << 16).to(tl.float32, bitcast=True)
    else:
        return y.to(tl.float16).to(tl.float32)


@triton.jit
def _tree_sum(v, N: tl.constexpr):
    """Sum of the N (a power of two) fp32 values of ``v`` [N] as a [1] tensor, by the fixed
    pairwise tree of ``lowering.ops.tree_sum``: each stage adds adjacent pairs (v[2i] + v[2i+1],
    one fp32 addition each, so the result does not depend on how Triton reduces a pair)."""
    for s in tl.static_range(31):
        if (N >> s) > 1:
            v = tl.sum(tl.reshape(v, (N >> (s + 1), 2)), axis=1)
    return v


@triton.jit
def _rms_epilogue(x, valid, offs, cols, width, w_ptr, out_ptr, res_out_ptr, W_KIND: tl.constexpr,
                  OUT_KIND: tl.constexpr, EPS: tl.constexpr, BPP: tl.constexpr, BP2: tl.constexpr,
                  GPU: tl.constexpr):
    """Store the new residual ``x`` (fp32 [BPP, BP2], one whole row, already saturated for
    OUT_KIND) and its RMSNorm ``(h * (1 / sqrt(ss / width + EPS))) * w`` (h: x as stored; ss:
    :func:`_tree_sum` of h * h over the tile, zeros in masked lanes; IEEE sqrt and divisions),
    saturated and rounded to OUT_KIND (``lowering.ops.reference_rms_norm``)."""
    _store_f32(res_out_ptr, offs, x, valid, OUT_KIND, GPU)
    h = tl.where(valid, _as_stored(x, OUT_KIND, GPU), 0.0)
    ss = _tree_sum(tl.reshape(h * h, (BPP * BP2,)), BPP * BP2)
    var = _div(ss, tl.full((1,), 1.0, tl.float32) * width.to(tl.float32), GPU)
    r = _div(tl.full((1,), 1.0, tl.float32), tl.sqrt_rn(var + EPS), GPU)
    w = _load_f32(w_ptr, cols, valid, W_KIND, GPU)
    y = (h * r[:, None]) * w
    _store_f32(out_ptr, offs, _saturating(y, OUT_KIND), valid, OUT_KIND, GPU)


# ------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------
@triton.jit
def _codec_kernel(
    x_ptr, src_ptr, src_stride, ptr_table, src_off, res_ptr, out_ptr, out_chunk, deq_ptr, amax_ptr, lut_ptr,
    total_blocks, nblk, width, scale_off, zp_off, ts_off, pl1_off, pl2_off,
    SRC_BUFS: tl.constexpr, TABLE: tl.constexpr, N_SRC: tl.constexpr, QUANT: tl.constexpr, SUM: tl.constexpr,
    PHASE: tl.constexpr, IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr,
    RES_KIND: tl.constexpr, WRITE_DEQ: tl.constexpr, DEQ_KIND: tl.constexpr, BPP: tl.constexpr,
    EVEN: tl.constexpr, I64: tl.constexpr, WALIGN: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
    BIAS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, POLICY: tl.constexpr,
    GE: tl.constexpr, GSCALE: tl.constexpr, MAXMAG: tl.constexpr, SAT: tl.constexpr, MAXN: tl.constexpr,
    SCALE: tl.constexpr, SB: tl.constexpr, ZP: tl.constexpr, TS: tl.constexpr, MAXN_TS: tl.constexpr,
    S_EBITS: tl.constexpr, S_MBITS: tl.constexpr, S_BIAS: tl.constexpr, S_EMIN: tl.constexpr,
    S_POLICY: tl.constexpr, S_MAXMAG: tl.constexpr, SNAN: tl.constexpr,
    S_INV_STEP_HI: tl.constexpr, S_INV_STEP_LO: tl.constexpr,
    BS: tl.constexpr, BP2: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    ROT: tl.constexpr, GPU: tl.constexpr, DECODE: tl.constexpr, FP8_HW: tl.constexpr,
    FP8: tl.constexpr, NORM: tl.constexpr = False, EPS: tl.constexpr = 0.0,
):
    """One codec step over BPP blocks per program (see the module docstring).

    Source: ``x`` [rows, width] (IN_KIND), or with SRC_BUFS the fp32 rank-order sum of
    ``N_SRC`` wire buffers (:func:`_src`), plus the residual (HAS_RES, not with QUANT).
    QUANT: quantise it into ``out`` (PHASE 0 only folds the finite absmax into ``amax_ptr``:
    pass 1 of a per-tensor scale), writing its decode to ``deq`` with WRITE_DEQ. Else store it
    as OUT_KIND floats; with SRC_BUFS and not SUM, program axis 1 picks buffer j, decoded into
    ``out + j * out_chunk`` (an all-gather's decode: two_shot's last step).

    NORM (off by default; with SRC_BUFS, not QUANT): one program per row (``BPP`` >= the
    row's block count, a power of two); the summed (+ residual) row goes to ``deq`` as OUT_KIND
    (the new residual) and its RMSNorm with weight ``x`` (IN_KIND) and ``EPS`` to ``out``
    (:func:`_rms_epilogue`). Without SUM, buffer j = ``program_id(1)`` is decoded alone and its
    residual, output and new residual are rows ``j * out_chunk`` on (two_shot's last decode)."""
    # MAXV: a bound on |element value| over every code (foreign bytes too: MX ints' -2^(N-1))
    MAXV: tl.constexpr = MAXN * 2.0
    # codes a thread holds in the float tile it quantises (16 bytes of the input): plane bytes
    # are stored in runs of that many codes (see _store_plane)
    if QUANT and not SRC_BUFS:
        CW: tl.constexpr = 4 if IN_KIND == _F32IO else 8
    else:
        CW: tl.constexpr = 8
    K: tl.constexpr = (BPP, BITS, SCALE, SB, ZP, TS, S_EBITS, S_MBITS, S_BIAS, S_POLICY, BS, BP2, P0, P1, P2,
                       GSCALE, DECODE, FP8, KIND, EVEN, WALIGN, MAXV, ROT)
    if NORM:
        blk, bmask, inb, valid, offs, cols = _row_tile(tl.program_id(0), nblk, width, BPP, BS, BP2, EVEN, I64)
    else:
        blk, bmask, inb, valid, offs = _tile(tl.program_id(0), total_blocks, nblk, width, BPP, BS, BP2, EVEN, I64)
    if SRC_BUFS:
        x, bound = _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr,
                            K, TABLE, SUM, N_SRC, False)
        # that fast decode is exact unless a block's bound reaches where the reference saturates
        # (fp32's max for the products and their sum, the output dtype's max for the cast): then
        # the tile is decoded again with saturation (one check per tile, no per-element cost)
        if QUANT or HAS_RES:
            lim = _FP32_MAX
        else:
            lim = _out_max(OUT_KIND)
        if _any(~(bound < _RISK * lim)):
            x, bound = _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off,
                                lut_ptr, K, TABLE, SUM, N_SRC, True)
            if not QUANT and not HAS_RES:
                x = _saturating(x, OUT_KIND)
        if HAS_RES:  # (the residual's magnitude is not known per block: saturate per element)
            if NORM and not SUM:  # buffer j's rows of the residual
                x = x + _load_f32(res_ptr + tl.program_id(1).to(tl.int64) * out_chunk, offs, valid, RES_KIND, GPU)
            else:
                x = x + _load_f32(res_ptr, offs, valid, RES_KIND, GPU)
            if not QUANT:
                x = _saturating(x, OUT_KIND)
    else:
        x = _load_f32(x_ptr, offs, valid, IN_KIND, GPU)
    if not QUANT:
        if NORM and SUM:
            _rms_epilogue(x, valid, offs, cols, width, x_ptr, out_ptr, deq_ptr, IN_KIND, OUT_KIND, EPS, BPP, BP2, GPU)
        elif NORM:
            jo = tl.program_id(1).to(tl.int64) * out_chunk
            _rms_epilogue(x, valid, offs, cols, width, x_ptr, out_ptr + jo, deq_ptr + jo, IN_KIND, OUT_KIND, EPS, BPP,
                          BP2, GPU)
        elif SUM:
            _store_f32(out_ptr, offs, x, valid, OUT_KIND, GPU)
        else:
            _store_f32(out_ptr + tl.program_id(1).to(tl.int64) * out_chunk, offs, x, valid, OUT_KIND, GPU)
    else:  # (constexpr branches, not early returns: Triton compiles the code after a return too)
        if not EVEN:
            x = tl.where(valid, x, 0.0)  # padded lanes of a summed source decode to 0 (or NaN)
        if ROT > 0:  # into the rotated coordinates (padding lanes are zeros, as the reference pads)
            x = _rotate(x, ROT, False, BPP, BP2)
        xb = x.to(tl.int32, bitcast=True)
        ab = xb & 0x7FFFFFFF
        # one integer max per block: its absmax, and >= 0x7F800000 iff it holds NaN/Inf
        top = tl.max(ab, axis=1)
        bad = top >= 0x7F800000
        if PHASE == 0:
            amax_fin = tl.max(tl.where(ab < 0x7F800000, ab, 0), axis=1)
            tl.atomic_max(amax_ptr, tl.max(tl.where(bmask, amax_fin, 0), axis=0))
        else:
            amax_b = tl.where(bad, 0, top)
            s_e8m0 = amax_b
            scale = amax_b.to(tl.float32, bitcast=True)
            zero = scale
            if SCALE == _E8M0:
                s = tl.where(amax_b > 0, _flog2(amax_b) - EMAX, -127)
                s = tl.minimum(tl.maximum(s, -127), 127)
                # one multiply by 2^-s (2^-127 is an exact subnormal): exact unless the product is an
                # fp32 subnormal, which rounds to the same signed zero on any element grid
                v = x * _pow2(-s)[:, None]
                s_e8m0 = tl.where(bad, 255, s + 127)
                scode = s_e8m0
            elif ZP:
                # (a NaN/Inf block's min/max are replaced below: no per-element finiteness masks)
                if EVEN:
                    mn = tl.min(x, axis=1)
                    mx = tl.max(x, axis=1)
                else:  # lanes past a block's end (non-power-of-two blocks) do not count
                    mn = tl.min(tl.where(inb, x, float("inf")), axis=1)
                    mx = tl.max(tl.where(inb, x, -float("inf")), axis=1)
                # +0 for a zero min/max, whatever signed zeros the block holds (see ops docs)
                mn = tl.where(bad | (mn == 0.0), 0.0, mn)
                mx = tl.where(bad | (mx == 0.0), 0.0, mx)
                mnb = mn.to(tl.int32, bitcast=True)
                zneg = mnb < 0
                zcode = _round_mag_int(mnb & 0x7FFFFFFF, zneg, S_EMIN, S_MBITS, S_MAXMAG)  # round down
                zero = _neg_if(_scale_value(zcode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY), zneg)
                zcode = tl.where(zneg, zcode | 0x8000, zcode)
                # where mx - zero overflows fp32 (bf16 terms near fp32's max) both terms are halved,
                # exactly (they are >= 2^103 there); h = 1 in every other block changes no bit
                d = mx - zero
                big = d == float("inf")
                h = tl.where(big, 0.5, 1.0)
                raw = _div(mx * h - zero * h, MAXMAG * 1.0, GPU) * tl.where(big, 2.0, 1.0)
                # an underflowed quotient of a non-constant block: fp32's smallest (rounds up to one step)
                raw = tl.where((raw == 0.0) & (d > 0.0), (tl.zeros_like(amax_b) + 1).to(tl.float32, bitcast=True), raw)
                rb = raw.to(tl.int32, bitcast=True)
                rneg = rb < 0
                scode = _round_mag_int(rb & 0x7FFFFFFF, ~rneg, S_EMIN, S_MBITS, S_MAXMAG)  # round up
                scale = _neg_if(_scale_value(scode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY), rneg)
                scode = tl.where(rneg, scode | 0x8000, scode)
                # scale > 0 unless the block is constant (then x - zero == 0 and any scale will do)
                # (a scale <= 0: a constant block, or one below -max whose zero point saturated
                # above it: the reference's codes are 0)
                # (their codes are zeroed at the store, like a NaN/Inf block's)
                if _any(big):
                    xz = x * h[:, None] - (zero * h)[:, None]
                else:
                    xz = x - zero[:, None]
                v = _signed_like(_exact_quotient(xz, tl.where(scale > 0, scale * h, 1.0), GPU), xz)
                zcode = tl.where(bad, SNAN, zcode)
                scode = tl.where(bad, SNAN, scode)
            else:
                amax_f = amax_b.to(tl.float32, bitcast=True)
                if TS:
                    tam = tl.load(amax_ptr).to(tl.float32, bitcast=True)
                    ts = tl.maximum(_div(tam, MAXN_TS, GPU), 1.1754943508222875e-38)
                    den = MAXN * ts
                else:
                    den = MAXN + tl.zeros_like(amax_f)
                raw = _div(amax_f, den, GPU)
                if SCALE == _FP32S:
                    scode = raw.to(tl.int32, bitcast=True)
                else:
                    scode = _round_mag_int(raw.to(tl.int32, bitcast=True), raw >= 0.0, S_EMIN, S_MBITS, S_MAXMAG)
                # a quotient below fp32's normal range (rounded to fp32's subnormal grid, or to 0):
                # the exact ceiling in scale steps 2^-P instead, at least one:
                # ceil(fp32(amax * 2^P / den)), 2^P = S_INV_STEP_HI * S_INV_STEP_LO (both exact)
                tiny = (raw < 1.1754943508222875e-38) & (amax_b > 0)
                w = _div(tl.where(tiny, amax_f, 0.0) * S_INV_STEP_HI * S_INV_STEP_LO, den, GPU)
                nt = w.to(tl.int32)  # truncation: 0 <= w < 2^23 + 1
                nt = tl.maximum(nt + tl.where(nt.to(tl.float32) < w, 1, 0), 1)
                scode = tl.where(tiny, nt, scode)
                stored = _scale_value(scode, SCALE, S_EBITS, S_MBITS, S_BIAS, S_POLICY)
                if TS:
                    scale = stored * ts
                    tsw = ts.to(tl.int32, bitcast=True) + tl.zeros_like(amax_b)
                    _store_word(out_ptr, ts_off, tl.zeros_like(blk), bmask & (blk == 0), tsw, 4, False)
                else:
                    scale = stored
                # a zero scale means an all-zero block: x / 1 keeps each zero's sign
                v = _signed_like(_exact_quotient(x, tl.where(scale > 0, scale, 1.0), GPU), x)
                scode = tl.where(bad, SNAN, scode)
            code = _element_codes(v, BITS, KIND, MBITS, EMIN, MAXMAG, MAXN, SAT, GSCALE, FP8_HW, FP8)
            if ZP:
                keep = tl.where(bad | ~(scale > 0), 0, -1)
            else:
                keep = tl.where(bad, 0, -1)
            _store_codes(out_ptr, pl1_off, pl2_off, code, keep, blk, bmask, BPP, BS, BP2, P0, P1, P2, EVEN, CW)
            _store_word(out_ptr, scale_off, blk, bmask, scode, SB, WALIGN)
            if ZP:
                _store_word(out_ptr, zp_off, blk, bmask, zcode, SB, WALIGN)
            if WRITE_DEQ:
                code = code & (keep[:, None] & ((1 << BITS) - 1))  # as stored
                val = _element_values(code, lut_ptr, KIND, BITS, GSCALE, DECODE, FP8)
                if SCALE == _E8M0:
                    sc = tl.where(bad, float("nan"), _pow2(s))
                    zero = sc
                else:
                    sc = tl.where(bad, float("nan"), scale)
                y, dbound = _scaled(val, sc, zero, ZP, SCALE == _FP32S, SCALE == _BF16S, MAXV, False)
                if ROT > 0:
                    y = _rotate(y, ROT, True, BPP, BP2)
                    dbound = dbound * (2.0 ** ROT)
                if _any(~(dbound < _RISK * _out_max(DEQ_KIND))):  # (as for a decode above)
                    y, dbound = _scaled(val, sc, zero, ZP, SCALE == _FP32S, SCALE == _BF16S, MAXV, True)
                    if ROT > 0:
                        y = _rotate(y, ROT, True, BPP, BP2)
                    y = _saturating(y, DEQ_KIND)
                _store_f32(deq_ptr, offs, y, valid, DEQ_KIND, GPU)


# ------------------------------------------------------------------------------------------
# launchers (no validation of values: lowering.ops validates)
# ------------------------------------------------------------------------------------------
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
    bpp, warps = tuning.config(kc, n_elems, device_type, step)
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
                  **kc.constexprs(), **opts)
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
        WRITE_DEQ=False, DEQ_KIND=0, BPP=bpp, **kc.constexprs(), **opts)
    return out


def dequantize_peers(ptrs: torch.Tensor, src_off: int, kc: KernelConstants, rows: int, width: int,
                     out: torch.Tensor, *, summed: bool) -> torch.Tensor:
    """Decode the wire buffers at addresses ``ptrs[i] + src_off`` (int64 tensor of N base
    addresses on the GPU, e.g. symmetric-memory peer buffers; bases and ``src_off`` 16-byte
    aligned). ``summed``: their fp32 rank-order sum into ``out`` [rows, width]; else buffer j
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
        **kc.constexprs(), **opts)
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
    :func:`dequantize_peers`; ``summed=False`` is ``each``). GPU only (device addresses)."""
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
        WRITE_DEQ=False, DEQ_KIND=0, BPP=bpp, **kc.constexprs(), NORM=True, EPS=eps32, **opts)
    return out, res_out
