"""Numeric facts named once: fp32's limits and bit fields, and the float dtypes the codecs take.

Import these instead of writing ``2.0**-126``, ``0x7F800000`` or a ``{torch.float32: ...}``
table again; each fact has one name here (the Triton kernels' own constexpr copies are the one
exception: a kernel needs literals). Pure constants: importing this costs nothing beyond torch.

fp32 (IEEE binary32): 1 sign, 8 exponent bits (bias 127), 23 mantissa bits.
"""
from __future__ import annotations

import torch

__all__ = [
    "DTYPE_BY_NAME", "DTYPE_CODES", "DTYPE_NAMES", "DTYPE_ROUNDING", "FP32_ABS_MASK", "FP32_BIAS",
    "FP32_EMAX", "FP32_EMIN", "FP32_EXP_MASK", "FP32_MAX", "FP32_MBITS", "FP32_MIN_SUBNORMAL",
    "FP32_RNE_MAGIC", "FP32_TINY", "INT_VIEW", "RECIPROCAL_SHIFT", "SUPPORTED_DTYPES",
]

# ---- fp32 -----------------------------------------------------------------------------------
FP32_BIAS = 127  # exponent bias: a normal value's field is its exponent + 127
FP32_MBITS = 23  # mantissa bits: the exponent field starts at bit 23
FP32_EMIN = -126  # exponent of the smallest normal binade
FP32_EMAX = 127  # exponent of the largest binade
FP32_MAX = torch.finfo(torch.float32).max  # 3.4028234663852886e38: finite decodes saturate here
FP32_TINY = 2.0**FP32_EMIN  # smallest normal, 2^-126: absmax quotients below it take the exact path
FP32_MIN_SUBNORMAL = 2.0 ** (FP32_EMIN - FP32_MBITS)  # 2^-149: fp32's smallest step
FP32_EXP_MASK = 0x7F800000  # the exponent field; |x| bits at or above it are Inf/NaN
FP32_ABS_MASK = 0x7FFFFFFF  # every bit but the sign: |x| as an integer (orders like the floats)
# 1.5 * 2^23: for |v| < 2^22, fp32(v + magic) rounds v half to even onto the integers, and the low
# bits of the sum's bit pattern are that integer in two's complement (the "magic add")
FP32_RNE_MAGIC = 1.5 * 2.0**FP32_MBITS
# absmax scales outside [2^-64, 2^64) are moved into it by 2^+-64 before their reciprocal is taken
# (qformats.codec.times_reciprocal): there the scale and its reciprocal are both normal fp32
RECIPROCAL_SHIFT = 64

# ---- the float dtypes ------------------------------------------------------------------------
# What every codec quantises from and decodes to (byte width: ``dtype.itemsize``).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # short names
DTYPE_BY_NAME = {name: dt for dt, name in DTYPE_NAMES.items()}
# one byte per dtype on the wire (the collectives' call signatures and wire headers)
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
# the integer dtype of the same width, to view a float tensor's bits
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# rounding of an fp32 value cast to the dtype: (relative: half an ulp, absolute: half the
# smallest subnormal); fp32's own is (0, 0), as nothing is cast
DTYPE_ROUNDING = {torch.float32: (0.0, 0.0), torch.bfloat16: (2.0**-8, 2.0**-134), torch.float16: (2.0**-11, 2.0**-25)}
