"""The generic Triton codec kernel, bit-exact with ``qformats.encode/decode``.

One kernel, :func:`_codec_kernel`, serves every lowered format and every codec step; the
format enters only through one constexpr argument ``F`` (:class:`lowering.constants.KernelFormat`,
read by name: ``F.BITS``), the step through four launch constexprs:

* source: the input tensor, or the fp32 rank-order sum of ``N_SRC`` wire buffers (``SRC_BUFS``;
  with ``TABLE`` their addresses come from a pointer table: symmetric-memory peers);
* ``QUANT``: quantise the source into a wire buffer (optionally also writing the decode of
  what it wrote), else write the source (plus an optional residual) as floats.

So ``quantize`` is (input, QUANT), ``dequantize`` / ``dequant_sum`` are (buffers, not QUANT) and
``dequant_sum_requant`` is (buffers, QUANT). A fifth constexpr, ``NORM`` (off by default; off, the
kernel compiles to exactly the code it compiled to before NORM existed), ends a decode in the
next layer's residual add and RMSNorm: ``dequant_sum_rmsnorm`` is (buffers, not QUANT, NORM), one
program per row, the norm defined bit for bit by ``lowering.ops.reference_rms_norm``. Use the
launchers of :mod:`lowering.launch`, or better the ``torch.ops.qformats`` ops of
:mod:`lowering.ops`, which validate inputs and fall back to the reference for unsupported
formats. Cost on a GPU: one pass over inputs and outputs
(per-tensor-scale formats such as nvfp4 read their input twice: a first pass finds the
tensor's absmax).

Why it is fast (the kernel is memory-bound only if it spends few instructions per element):
when the blocks tile the rows exactly (``width % BS == 0``, power-of-two ``BS``: the common
case) a program owns ``BPP`` consecutive blocks, i.e. one contiguous span of the tensor and of
the code section, so loads and stores are 16-byte vectors with no per-element index or mask
arithmetic. A quantiser of an input tile (blocks of at most 16 such vectors) holds each block
in one thread (:func:`lowering.kernel_wire._tile_rows`): the rotation's stages, the absmax and
the per-block scale arithmetic stay inside the thread (no shuffles, one thread per block
instead of four), and a block's code bytes leave in 16-byte stores. Per block: one integer
max gives the absmax and flags NaN/Inf. Per element the work is a multiply by the scale, the rounding onto the element grid and a shift into the
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
* Absmax scales: ``x / scale`` is defined as x times the block's correctly rounded reciprocal
  (``qformats.codec.times_reciprocal``, wire version 3): one IEEE division per block
  (``div_rn``; numpy's in the interpreter) and one multiply per element (a second, by a power
  of two, brings extreme scales into range). Zero-point scales still divide exactly: the GPU
  uses the block's reciprocal and two Markstein corrections with fused multiply-adds
  (correctly rounded for every fp32 pair without over/underflow), which the GPU benchmark
  checks against ``div_rn`` on every bf16 pair and on random fp32 pairs.
* GPU launches pass ``enable_fp_fusion=False`` (so ``acc + a*b`` is not contracted into an
  FMA that rounds once instead of twice) and ``enable_reflect_ftz=False``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernel_math import (_BF16_MAX, _BF16IO, _BF16S, _DEC_FP8, _DEC_INT, _E8M0, _F32IO, _FLOAT, _FP8_E5M2, _FP16_MAX,
                          _FP32_MAX, _FP32_TINY, _FP32S, _INT, _RARE_QUOTIENT_HI, _RARE_QUOTIENT_LO, _RARE_TS_HI,
                          _RARE_TS_LO, _RECIP_HI, _RECIP_LO, _RISK, _RNE_MAGIC, _any, _clamp_finite, _div, _flog2, _load_f32, _neg_if,
                          _out_max, _pow2, _rotate, _round_mag_int, _saturate, _scale_value, _store_f32)
from .kernel_wire import _load_codes, _load_word, _row_tile, _store_codes, _store_word, _tile, _tile_rows


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------
@triton.jit
def _element_values(code, lut_ptr, F: tl.constexpr):
    """Exact fp32 values of element codes (NaN/Inf codes included)."""
    if F.DECODE == _DEC_FP8:  # exact widening through the hardware fp8 conversion
        if F.FP8 == _FP8_E5M2:
            return code.to(tl.uint8).to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif F.DECODE == _DEC_INT:
        if F.KIND == _INT:  # MX integer: sign-extended code times 2^GE (-2^(N-1), which no encoder
            STEP: tl.constexpr = 1.0 / F.GSCALE  # writes, decodes to its value as in the reference)
            return ((code << (32 - F.BITS)) >> (32 - F.BITS)).to(tl.float32) * STEP
        else:
            return code.to(tl.float32)
    else:
        return tl.load(lut_ptr + code)


@triton.jit
def _scaled(val, scale, zero, F: tl.constexpr, SAT: tl.constexpr):
    """(fp32(val * scale (+ zero)), a per-block bound on its magnitude) for element values
    [BPP, BP2] and per-block parameters, with the reference's rounding: val * scale is exact
    for codes times scales of at most 16 significant bits, so fp32 arithmetic rounds once; WIDE
    (zero point and fp32 scales) adds in float64 as the reference does; ``zero`` is read only
    with a zero point (F.ZP).

    SAT: also what the reference does past fp32's range (products of finite factors saturate,
    :func:`_saturate`; HALVE, bf16 zero points, redoes a sum whose product overflowed on halved
    terms, exactly). Without SAT the result is exact wherever the bound (F.MAXV, a bound on
    |element value|, times the scale) is below fp32's max: callers check the bound once per tile."""
    WIDE: tl.constexpr = F.SCALE == _FP32S
    HALVE: tl.constexpr = F.SCALE == _BF16S
    MAXV: tl.constexpr = F.MAXV
    if F.ZP:
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
def _decode_tile(buf_ptr, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr, F: tl.constexpr,
                 BPP: tl.constexpr, WALIGN: tl.constexpr, SAT: tl.constexpr):
    """(fp32 values [BPP, BP2], per-block bound on their magnitudes) of blocks ``blk`` of one
    wire buffer of format ``F`` (SAT: see :func:`_scaled`)."""
    code = _load_codes(buf_ptr, pl1_off, pl2_off, blk, bmask, F, BPP)
    val = _element_values(code, lut_ptr, F)
    w = _load_word(buf_ptr, scale_off, blk, bmask, F.SB, WALIGN)
    if F.SCALE == _E8M0:
        sc = tl.where(w == 255, float("nan"), _pow2(w - 127))  # 2^-127 is a subnormal: exact
        y, bound = _scaled(val, sc, sc, F, SAT)  # (a NaN scale gives NaN, never Inf)
    else:
        scale = _scale_value(w, F)
        if F.TS:
            ts = tl.load(buf_ptr + ts_off + tl.arange(0, 4)).to(tl.int32)
            ts = tl.sum(ts << (tl.arange(0, 4) * 8), axis=0).to(tl.float32, bitcast=True)
            scale = scale * ts
        zero = scale
        if F.ZP:
            zero = _scale_value(_load_word(buf_ptr, zp_off, blk, bmask, F.SB, WALIGN), F)
        y, bound = _scaled(val, scale, zero, F, SAT)
    if F.ROT > 0:  # back from the rotated coordinates; partial sums grow by at most 2^ROT
        y = _rotate(y, F.ROT, True, BPP, F.BP2)
        bound = bound * (2.0 ** F.ROT)
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
def _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr,
             F: tl.constexpr, BPP: tl.constexpr, WALIGN: tl.constexpr, TABLE: tl.constexpr, SUM: tl.constexpr,
             N_SRC: tl.constexpr, SAT: tl.constexpr):
    """(fp32 rank-order sum of the decodes of the N_SRC source buffers, or with SUM False the
    decode of buffer ``program_id(1)``; per-block bound on its magnitude). SAT: see :func:`_scaled`."""
    if SUM:
        x, bound = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, 0, TABLE), blk, bmask, scale_off,
                                zp_off, ts_off, pl1_off, pl2_off, lut_ptr, F, BPP, WALIGN, SAT)
        if SAT:  # the rare exact path: a loop, not unrolled (code size and registers stay small)
            for i in range(1, N_SRC):
                y, b = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, i, TABLE), blk, bmask, scale_off,
                                    zp_off, ts_off, pl1_off, pl2_off, lut_ptr, F, BPP, WALIGN, SAT)
                x = x + y
                bound = bound + b
        else:
            for i in tl.static_range(1, N_SRC):
                y, b = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, i, TABLE), blk, bmask, scale_off,
                                    zp_off, ts_off, pl1_off, pl2_off, lut_ptr, F, BPP, WALIGN, SAT)
                x = x + y
                bound = bound + b
    else:
        x, bound = _decode_tile(_src(src_ptr, src_stride, ptr_table, src_off, tl.program_id(1), TABLE), blk, bmask,
                                scale_off, zp_off, ts_off, pl1_off, pl2_off, lut_ptr, F, BPP, WALIGN, SAT)
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
def _times_reciprocal(x, s, K: tl.constexpr, rare, GPU: tl.constexpr):
    """fp32((x f) * fp32(1 / (s f))) times K (a power of two) for a tile x [BPP, BP2] and per-block
    s > 0 [BPP] (``qformats.codec.times_reciprocal``, f = 2^64 below 2^-64, 2^-64 from 2^64 up,
    else 1): one IEEE division per block and one multiply per element, two where the tile flag
    ``rare`` is set (the caller's promise: where it is not, every f is 1, or the block is all
    zeros with an infinite s, whose x r is x's signed zero anyway). K goes into the reciprocal:
    x (r K) is (x r) K exactly unless x r is an fp32 subnormal, which every element grid rounds
    to a zero code either way."""
    f = tl.where(s < _RECIP_LO, _RECIP_HI, tl.where(s >= _RECIP_HI, _RECIP_LO, 1.0))
    r = _div(tl.full(s.shape, 1.0, tl.float32), s * f, GPU)
    if K != 1.0:
        r = r * K
    if rare:
        x = x * f[:, None]
    return x * r[:, None]


@triton.jit
def _element_codes(v, F: tl.constexpr):
    """Element codes (int32, low BITS bits) of finite fp32 values already divided by their
    block's scale (integer grids: in grid steps, i.e. also times 2^-GE, which each encoder
    applies): round half to even onto the grid, saturate at max normal."""
    if F.FP8_HW:  # cvt.rn.satfinite: RNE, saturating at max normal; signed zeros kept
        if F.FP8 == _FP8_E5M2:
            c = v.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        else:
            c = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        return c
    elif F.KIND == _FLOAT:
        # round |v| half to even onto the grid in fp32: adding c = 2^(e + 23 - MBITS), e the
        # binade of |v| (at least EMIN: the subnormal step below it), leaves the grid step as
        # the ulp, so (a + c) - c is the rounded value; then saturate at max normal
        a = tl.minimum(tl.abs(v), F.SAT)
        CST: tl.constexpr = (23 - F.MBITS) << 23
        EMIN_BITS: tl.constexpr = (F.EMIN + 127) << 23
        c = (tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, EMIN_BITS) + CST).to(tl.float32, bitcast=True)
        r = tl.minimum((a + c) - c, F.MAXN)
        # r * 2^(-126-EMIN) is exact, and its fp32 bits are the element's bits shifted by
        # 23 - MBITS: element subnormals land on fp32 subnormals, normals keep their exponent
        # relative to EMIN, so one shift gives every magnitude code
        SCALE_DOWN: tl.constexpr = 2.0 ** (-126 - F.EMIN)
        code = (r * SCALE_DOWN).to(tl.int32, bitcast=True) >> (23 - F.MBITS)
        vb = v.to(tl.int32, bitcast=True)
        return code | ((vb >> (32 - F.BITS)) & (1 << (F.BITS - 1)))
    else:  # integer grids (MX int, uint with a zero point): code * 2^GE, two's complement
        # clamp, then round half to even with the 1.5 * 2^23 magic number: the low bits of the
        # sum are the code (the magic's low 23 bits are 0x400000, whose low BITS bits are 0)
        y = tl.minimum(tl.maximum(v, -F.MAXMAG * 1.0), F.MAXMAG * 1.0)
        return (y + _RNE_MAGIC).to(tl.int32, bitcast=True) & ((1 << F.BITS) - 1)


# ------------------------------------------------------------------------------------------
# encode: one helper per scale kind, each returning (x divided by the block scale, scale code,
# zero-point code, scale value, zero value) for the blocks of a tile (bad: NaN/Inf blocks,
# amax_b: their absmax bits, 0 where bad)
# ------------------------------------------------------------------------------------------
@triton.jit
def _encode_e8m0(x, amax_b, bad, F: tl.constexpr):
    """E8M0 (MX) scales: 2^s from the exponent bits of the block absmax (OCP MX: floor(log2
    amax) - emax of the element), clamped to E8M0's range; NaN code 255 for a bad block. Its
    scale and zero slots hold the exponent s: 2^s is formed where a decode needs it (forming it
    here would change the compiled schedule of the quantize-with-decode step)."""
    # the biased exponent is clamped in int32 before it is truncated to its byte: with the bias
    # added after the clamp, LLVM narrowed the adds to 16-bit pairs, and on an H100 one scale
    # byte came out without its bias (most likely ptxas of CUDA 12.8; the int5/b64 3 x 2 case of
    # tests/lowering/test_kernels.py; benchmarks/results/reliability/README.md)
    e = tl.where(amax_b > 0, _flog2(amax_b) - F.EMAX + 127, 0)
    e = tl.minimum(tl.maximum(e, 0), 254)
    s = e - 127
    # one multiply by 2^-s (2^-127 is an exact subnormal): exact unless the product is an
    # fp32 subnormal, which rounds to the same signed zero on any element grid
    v = x * _pow2(-s)[:, None]
    if F.GSCALE != 1.0:  # integer grids: into grid steps (a second exact power-of-two product)
        v = v * F.GSCALE
    scode = tl.where(bad, 255, e)
    return v, scode, scode, s, s


@triton.jit
def _encode_zero_point(x, inb, amax_b, bad, F: tl.constexpr):
    """Asymmetric blocks (+zp): the zero point is the block minimum rounded down onto the scale
    type's grid, the scale (max - zero) / MAXMAG rounded up onto it; codes of (x - zero) / scale."""
    # (a NaN/Inf block's min/max are replaced below: no per-element finiteness masks)
    if F.EVEN:
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
    zcode = _round_mag_int(mnb & 0x7FFFFFFF, zneg, F)  # round down
    zero = _neg_if(_scale_value(zcode, F), zneg)
    zcode = tl.where(zneg, zcode | 0x8000, zcode)
    # where mx - zero overflows fp32 (bf16 terms near fp32's max) both terms are halved,
    # exactly (they are >= 2^103 there); h = 1 in every other block changes no bit
    d = mx - zero
    big = d == float("inf")
    h = tl.where(big, 0.5, 1.0)
    raw = _div(mx * h - zero * h, F.MAXMAG * 1.0, F.GPU) * tl.where(big, 2.0, 1.0)
    # an underflowed quotient of a non-constant block: fp32's smallest (rounds up to one step)
    raw = tl.where((raw == 0.0) & (d > 0.0), (tl.zeros_like(amax_b) + 1).to(tl.float32, bitcast=True), raw)
    rb = raw.to(tl.int32, bitcast=True)
    rneg = rb < 0
    scode = _round_mag_int(rb & 0x7FFFFFFF, ~rneg, F)  # round up
    scale = _neg_if(_scale_value(scode, F), rneg)
    scode = tl.where(rneg, scode | 0x8000, scode)
    # scale > 0 unless the block is constant (then x - zero == 0 and any scale will do)
    # (a scale <= 0: a constant block, or one below -max whose zero point saturated
    # above it: the reference's codes are 0)
    # (their codes are zeroed at the store, like a NaN/Inf block's)
    if _any(big):
        xz = x * h[:, None] - (zero * h)[:, None]
    else:
        xz = x - zero[:, None]
    # (v is in grid steps: zero-point elements are uint, whose grid exponent is 0)
    tl.static_assert(F.GSCALE == 1.0, "zero points take uint elements (grid step 1)")
    v = _signed_like(_exact_quotient(xz, tl.where(scale > 0, scale * h, 1.0), F.GPU), xz)
    zcode = tl.where(bad, F.SNAN, zcode)
    scode = tl.where(bad, F.SNAN, scode)
    return v, scode, zcode, scale, zero


@triton.jit
def _encode_absmax(x, amax_b, bad, blk, bmask, amax_ptr, out_ptr, ts_off, F: tl.constexpr):
    """Absmax scales (fp32, bf16, fp16, e4m3; +ts: times the per-tensor fp32 scale, which the
    first program stores): amax / max normal rounded up onto the scale type's grid, x times the
    block's rounded reciprocal (:func:`_times_reciprocal`)."""
    amax_f = amax_b.to(tl.float32, bitcast=True)
    if F.TS:
        tam = tl.load(amax_ptr).to(tl.float32, bitcast=True)
        ts = tl.maximum(_div(tam, F.MAXN_TS, F.GPU), _FP32_TINY)
        den = F.MAXN * ts
    else:
        den = F.MAXN + tl.zeros_like(amax_f)
    raw = _div(amax_f, den, F.GPU)
    if F.SCALE == _FP32S:
        scode = raw.to(tl.int32, bitcast=True)
    else:
        scode = _round_mag_int(raw.to(tl.int32, bitcast=True), raw >= 0.0, F)
    # one tile-wide flag (one cross-warp reduction) for both rare paths: a non-zero block whose
    # quotient lies outside [2^-60, 2^60), or a tensor scale outside [2^-55, 2^55) (kernel_math's
    # _RARE_*, from qformats.numeric.RECIPROCAL_SHIFT = 64). Where it is
    # clear, no quotient is below fp32's normal range and every scale (the quotient rounded up
    # onto its type, at most 2^61; with +ts an e4m3 value in [2^-9, 448] times ts) lies in
    # [2^-64, 2^64), so no block needs the pre-scaling of _times_reciprocal
    rare = _any((amax_b > 0) & ((raw < _RARE_QUOTIENT_LO) | (raw >= _RARE_QUOTIENT_HI)))
    if F.TS:
        rare = rare | (ts < _RARE_TS_LO) | (ts >= _RARE_TS_HI)
    if rare:
        # a quotient below fp32's normal range (rounded to fp32's subnormal grid, or to 0):
        # the exact ceiling in scale steps 2^-P instead, at least one:
        # ceil(fp32(amax * 2^P / den)), 2^P = S_INV_STEP_HI * S_INV_STEP_LO (both exact)
        tiny = (raw < _FP32_TINY) & (amax_b > 0)
        w = _div(tl.where(tiny, amax_f, 0.0) * F.S_INV_STEP_HI * F.S_INV_STEP_LO, den, F.GPU)
        nt = w.to(tl.int32)  # truncation: 0 <= w < 2^23 + 1
        nt = tl.maximum(nt + tl.where(nt.to(tl.float32) < w, 1, 0), 1)
        scode = tl.where(tiny, nt, scode)
    stored = _scale_value(scode, F)
    if F.TS:
        scale = stored * ts
        tsw = ts.to(tl.int32, bitcast=True) + tl.zeros_like(amax_b)
        _store_word(out_ptr, ts_off, tl.zeros_like(blk), bmask & (blk == 0), tsw, 4, False)
    else:
        scale = stored
    # a zero scale means an all-zero block: a reciprocal of 1 / inf = 0 keeps each zero's sign
    # integer grids: v in grid steps, 2^-GE folded into the reciprocal (GSCALE is 1 for floats)
    v = _times_reciprocal(x, tl.where(scale > 0, scale, float("inf")), F.GSCALE, rare, F.GPU)
    scode = tl.where(bad, F.SNAN, scode)
    return v, scode, scode, scale, scale


# ------------------------------------------------------------------------------------------
# the RMSNorm epilogue (NORM): one program per row, a fixed pairwise tree for the sum of squares
# ------------------------------------------------------------------------------------------
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
    F: tl.constexpr,
    SRC_BUFS: tl.constexpr, TABLE: tl.constexpr, N_SRC: tl.constexpr, QUANT: tl.constexpr, SUM: tl.constexpr,
    PHASE: tl.constexpr, IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_RES: tl.constexpr,
    RES_KIND: tl.constexpr, WRITE_DEQ: tl.constexpr, DEQ_KIND: tl.constexpr, BPP: tl.constexpr,
    I64: tl.constexpr, WALIGN: tl.constexpr, NORM: tl.constexpr = False, EPS: tl.constexpr = 0.0,
):
    """One codec step over BPP blocks per program (see the module docstring).

    ``F``: the format (:class:`lowering.constants.KernelFormat`, read by name); the other
    constexprs name the step. Source: ``x`` [rows, width] (IN_KIND), or with SRC_BUFS the fp32
    rank-order sum of ``N_SRC`` wire buffers (:func:`_src`), plus the residual (HAS_RES, not with
    QUANT). QUANT: quantise it into ``out`` (PHASE 0 only folds the finite absmax into
    ``amax_ptr``: pass 1 of a per-tensor scale), writing its decode to ``deq`` with WRITE_DEQ.
    Else store it as OUT_KIND floats; with SRC_BUFS and not SUM, program axis 1 picks buffer j,
    decoded into ``out + j * out_chunk`` (an all-gather's decode: two_shot's last step).

    NORM (off by default; with SRC_BUFS, not QUANT): one program per row (``BPP`` >= the
    row's block count, a power of two); the summed (+ residual) row goes to ``deq`` as OUT_KIND
    (the new residual) and its RMSNorm with weight ``x`` (IN_KIND) and ``EPS`` to ``out``
    (:func:`_rms_epilogue`). Without SUM, buffer j = ``program_id(1)`` is decoded alone and its
    residual, output and new residual are rows ``j * out_chunk`` on (two_shot's last decode)."""
    BS: tl.constexpr = F.BS
    BP2: tl.constexpr = F.BP2
    GPU: tl.constexpr = F.GPU
    # codes a thread holds in the float tile it quantises (16 bytes of the input): plane bytes
    # are stored in runs of that many codes (see _store_plane)
    if QUANT and not SRC_BUFS:
        CW: tl.constexpr = 4 if IN_KIND == _F32IO else 8
    else:
        CW: tl.constexpr = 8
    # a quantiser of an input tile holds whole blocks in a thread (see _tile_rows)
    OWN: tl.constexpr = QUANT and not SRC_BUFS and BP2 // CW <= 16
    # whole blocks in a thread also where a requant loaded its codes so (F.CODE_ROWS)
    ROW_CODES: tl.constexpr = OWN or (SRC_BUFS and F.CODE_ROWS)
    if OWN:
        blk, bmask, inb, valid, offs, x = _tile_rows(x_ptr, tl.program_id(0), total_blocks, nblk, width, IN_KIND, GPU,
                                                     BPP, BS, BP2, CW, F.EVEN, I64)
    elif NORM:
        blk, bmask, inb, valid, offs, cols = _row_tile(tl.program_id(0), nblk, width, BPP, BS, BP2, F.EVEN, I64)
    else:
        blk, bmask, inb, valid, offs = _tile(tl.program_id(0), total_blocks, nblk, width, BPP, BS, BP2, F.EVEN, I64)
    if SRC_BUFS:
        x, bound = _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off, pl1_off,
                            pl2_off, lut_ptr, F, BPP, WALIGN, TABLE, SUM, N_SRC, False)
        # that fast decode is exact unless a block's bound reaches where the reference saturates
        # (fp32's max for the products and their sum, the output dtype's max for the cast): then
        # the tile is decoded again with saturation (one check per tile, no per-element cost)
        if QUANT or HAS_RES:
            lim = _FP32_MAX
        else:
            lim = _out_max(OUT_KIND)
        if _any(~(bound < _RISK * lim)):
            x, bound = _sources(src_ptr, src_stride, ptr_table, src_off, blk, bmask, scale_off, zp_off, ts_off,
                                pl1_off, pl2_off, lut_ptr, F, BPP, WALIGN, TABLE, SUM, N_SRC, True)
            if not QUANT and not HAS_RES:
                x = _saturating(x, OUT_KIND)
        if HAS_RES:  # (the residual's magnitude is not known per block: saturate per element)
            if NORM and not SUM:  # buffer j's rows of the residual
                x = x + _load_f32(res_ptr + tl.program_id(1).to(tl.int64) * out_chunk, offs, valid, RES_KIND, GPU)
            else:
                x = x + _load_f32(res_ptr, offs, valid, RES_KIND, GPU)
            if not QUANT:
                x = _saturating(x, OUT_KIND)
    elif not OWN:
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
        if not F.EVEN:
            x = tl.where(valid, x, 0.0)  # padded lanes of a summed source decode to 0 (or NaN)
        if F.ROT > 0:  # into the rotated coordinates (padding lanes are zeros, as the reference pads)
            x = _rotate(x, F.ROT, False, BPP, BP2)
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
            if F.SCALE == _E8M0:
                v, scode, zcode, scale, zero = _encode_e8m0(x, amax_b, bad, F)
            elif F.ZP:
                v, scode, zcode, scale, zero = _encode_zero_point(x, inb, amax_b, bad, F)
            else:
                v, scode, zcode, scale, zero = _encode_absmax(x, amax_b, bad, blk, bmask, amax_ptr, out_ptr, ts_off, F)
            code = _element_codes(v, F)
            if F.ZP:  # a scale <= 0 (a constant block, or one below -max whose zero point
                # saturated above it) has the reference's codes 0, like a NaN/Inf block
                keep = tl.where(bad | ~(scale > 0), 0, -1)
            else:
                keep = tl.where(bad, 0, -1)
            _store_codes(out_ptr, pl1_off, pl2_off, code, keep, blk, bmask, F, BPP, BP2 if ROW_CODES else CW)
            _store_word(out_ptr, scale_off, blk, bmask, scode, F.SB, WALIGN)
            if F.ZP:
                _store_word(out_ptr, zp_off, blk, bmask, zcode, F.SB, WALIGN)
            if WRITE_DEQ:
                code = code & (keep[:, None] & ((1 << F.BITS) - 1))  # as stored
                val = _element_values(code, lut_ptr, F)
                if F.SCALE == _E8M0:  # (scale holds the exponent: see _encode_e8m0)
                    sc = tl.where(bad, float("nan"), _pow2(scale))
                    zero = sc
                else:
                    sc = tl.where(bad, float("nan"), scale)
                y, dbound = _scaled(val, sc, zero, F, False)
                if F.ROT > 0:
                    y = _rotate(y, F.ROT, True, BPP, BP2)
                    dbound = dbound * (2.0 ** F.ROT)
                if _any(~(dbound < _RISK * _out_max(DEQ_KIND))):  # (as for a decode above)
                    y, dbound = _scaled(val, sc, zero, F, True)
                    if F.ROT > 0:
                        y = _rotate(y, F.ROT, True, BPP, BP2)
                    y = _saturating(y, DEQ_KIND)
                _store_f32(deq_ptr, offs, y, valid, DEQ_KIND, GPU)
