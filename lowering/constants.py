"""The one place a :class:`qformats.Format` becomes kernel constants.

:func:`lower` turns (format, row width, device) into a frozen :class:`KernelConstants`
whose :attr:`~KernelConstants.F` (a :class:`KernelFormat`) is the one format argument of the
generic kernel in :mod:`lowering.kernels`, read there by name; the other fields serve the host
side (layouts, plane offsets, TorchCodec). Nothing else in ``lowering`` looks at a Format's element type,
scale type or packing: a new preset needs no kernel change, only (at most) a new value here.

Formats the kernels do not implement raise :class:`Unsupported` with the reason; the ops
(:mod:`lowering.ops`) catch it and run the reference codec instead (an explicit, documented
fallback, never a silently different result). Today that is: outlier channels (``+o[...]``)
and static per-feature scales (``static``).

Cost: a few microseconds per call (cached per format string, width and device kind).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qformats import Format, as_format
from qformats.numeric import FP32_EMIN, FP32_MBITS
from qformats.packing import planes
from qformats.spec import SCALES, scale_element, scale_type

# Element kinds, float policies and scale kinds as kernel integers.
KIND_FLOAT, KIND_INT, KIND_UINT = 0, 1, 2
POLICY_FIN, POLICY_IEEE, POLICY_FN = 0, 1, 2
SCALE_E8M0, SCALE_FP32, SCALE_BF16, SCALE_FP16, SCALE_E4M3 = 0, 1, 2, 3, 4
# How element codes decode: a table load (float codes of at most TABLE_MAX_BITS bits: one or two
# L1 lines, so a warp's lookups cost one or two wavefronts), the GPU's exact fp8 widening, or
# integer arithmetic (int and uint elements of any width: a sign extension and a multiply, no
# load per element).
DECODE_TABLE, DECODE_FP8, DECODE_INT = 0, 1, 2
TABLE_MAX_BITS = 6
# The hardware fp8 types (elements the GPU converts to and from exactly as the spec rounds).
FP8_E4M3, FP8_E5M2 = 0, 1
_FP8 = {(4, 3, "fn"): FP8_E4M3, (5, 2, "ieee"): FP8_E5M2}

_KINDS = {"float": KIND_FLOAT, "int": KIND_INT, "uint": KIND_UINT}
_POLICIES = {"fin": POLICY_FIN, "ieee": POLICY_IEEE, "fn": POLICY_FN}
_SCALES = {"e8m0": SCALE_E8M0, "fp32": SCALE_FP32, "bf16": SCALE_BF16, "fp16": SCALE_FP16, "e4m3": SCALE_E4M3}


# NaN code of each stored scale type for a NaN/Inf block: the reference's canonical patterns.
_SCALE_NAN = {_SCALES[k]: st.nan_bits for k, st in SCALES.items() if k in _SCALES}


def _scale_nan(kind: int) -> int:
    return _SCALE_NAN[kind]


class Unsupported(ValueError):
    """The kernels do not implement this format (the ops fall back to the reference codec)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class KernelFormat(NamedTuple):
    """The format's constants as the kernel reads them: one ``tl.constexpr`` argument ``F`` of
    :func:`lowering.kernels._codec_kernel`, read by name (``F.BITS``) there and in every helper
    it passes ``F`` to; the host reads the same fields through :class:`KernelConstants`
    (``kc.BITS``). Built only by :func:`lower`: a new constant is one field here and one value
    there.

    Element: ``KIND`` (float/int/uint), ``BITS``, ``MBITS``, ``EMIN`` (smallest normal
    exponent), ``EMAX``, ``GSCALE`` = 2^-GE (GE: the grid exponent of int/uint elements),
    ``MAXMAG`` (largest finite magnitude code, or max integer code), ``SAT`` (a power of two
    above max normal: inputs are clamped to it before rounding), ``MAXN`` (max normal, an exact
    fp32), ``MAXV`` = 2 * ``MAXN`` (a bound on |element value| over every code, foreign bytes
    too: an MX int's -2^(N-1)). Scale: ``SCALE`` kind, ``SB`` bytes per scale, ``ZP``, ``TS``
    (per-tensor fp32 scale), ``MAXN_TS`` (fp32(max_normal * e4m3's max normal)), the scale
    type's own grid ``S_*`` (absmax scales are rounded onto it), ``SNAN`` (its NaN code),
    ``S_INV_STEP_HI * S_INV_STEP_LO`` = 1 / the grid's smallest step (fp32: 2^149), as two exact
    fp32 powers of two (block maxima whose quotient is below 2^-126 are scaled by both).
    Block and packing: ``BS`` (block size for this row width), ``BP2`` (BS rounded up to a
    power of two: kernel tiles), ``P0``, ``P1``, ``P2``: the widths of the code's bit planes
    (``qformats.packing.planes``, low bits first; 0 for none), each packed densely, planes
    one after the other (their byte offsets: :meth:`KernelConstants.plane_offsets`).
    ``EVEN``: the blocks tile the rows exactly and ``BS`` is a power of two (contiguous tiles).
    ``ROT``: k = log2 N of the ``+h{N}`` rotation (0: none; N >= 2): the kernel applies
    ``qformats.codec.rotate``'s k butterfly stages to each run of N features of a block (the
    wire layout is the unrotated format's).
    ``GPU``: compiled for the GPU (exact division by ``div_rn`` / Markstein steps, hardware
    casts), else the CPU interpreter (numpy's IEEE division; its narrow float casts are not
    trusted). ``DECODE``: how codes decode (``DECODE_*``); ``FP8_HW`` / ``FP8``: the element is
    a hardware fp8 type (GPU only) and which.
    """

    KIND: int
    BITS: int
    MBITS: int
    EMIN: int
    EMAX: int
    GSCALE: float
    MAXMAG: int
    SAT: float
    MAXN: float
    MAXV: float
    SCALE: int
    SB: int
    ZP: bool
    TS: bool
    MAXN_TS: float
    S_EBITS: int
    S_MBITS: int
    S_BIAS: int
    S_EMIN: int
    S_POLICY: int
    S_MAXMAG: int
    SNAN: int
    S_INV_STEP_HI: float
    S_INV_STEP_LO: float
    BS: int
    BP2: int
    P0: int
    P1: int
    P2: int
    EVEN: bool
    ROT: int
    GPU: bool
    DECODE: int
    FP8_HW: bool
    FP8: int
    CODE_ROWS: bool


@dataclass(frozen=True)
class KernelConstants:
    """A format lowered for rows of one width on one device kind: the kernel's format argument
    :attr:`F` (whose fields read through: ``kc.BITS`` is ``kc.F.BITS``) and the host-side facts
    (``fmt``, ``width``, ``GE``: the grid exponent TorchCodec scales integers by), all derived
    from one Format by :func:`lower`."""

    fmt: str
    width: int
    GE: int
    F: KernelFormat

    def __getattr__(self, name: str):
        # only for names that are not attributes: the format's constants, read through F
        if name in KernelFormat._fields:
            return getattr(self.F, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def code_bytes_per_block(self) -> int:
        return self.BS * self.BITS // 8

    @property
    def format(self) -> Format:
        return _parsed(self.fmt)

    def plane_offsets(self, rows: int) -> tuple[int, int]:
        """Byte offsets of the second and third bit planes in the code section of ``rows`` rows
        (0 where there is none)."""
        n = self.layout(rows).rows * self.layout(rows).padded
        return (n * self.P0 // 8 if self.P1 else 0), (n * (self.P0 + self.P1) // 8 if self.P2 else 0)

    def layout(self, rows: int):
        """The wire layout of ``rows`` rows of this width (cached)."""
        return _layout(self.fmt, int(rows), self.width)


@functools.lru_cache(maxsize=256)
def _parsed(fmt_str: str) -> Format:
    return Format.parse(fmt_str)


@functools.lru_cache(maxsize=4096)
def _layout(fmt_str: str, rows: int, width: int):
    return _parsed(fmt_str).layout((rows, width))


def unsupported_reason(fmt) -> str | None:
    """Why the kernels cannot run ``fmt`` (None if they can). Cheap; no width needed."""
    f = as_format(fmt)
    if f is None:
        return "no format (None / bf16)"
    if f.outliers:
        return "outlier channels (+o[...]) are not lowered yet"
    if f.scale == "static":
        return "static per-feature scales are not lowered yet"
    if f.elem.kind == "float" and (f.elem.ebits > 5 or f.elem.mbits > 5):
        return "float elements wider than e5m5 are not lowered"
    return None


@functools.lru_cache(maxsize=4096)
def _lower(fmt_str: str, width: int, cuda: bool) -> KernelConstants:
    f = _parsed(fmt_str)
    why = unsupported_reason(f)
    if why:
        raise Unsupported(f"{f}: {why}")
    e = f.elem
    bs = f.block_for(width)
    if e.kind == "float":
        maxmag = e.max_mag_code
        sat = math.ldexp(1.0, e.emax + 2)
    else:
        maxmag = e.max_code
        sat = 0.0
    s_el = scale_element(f.scale)
    if s_el is not None:
        s = dict(S_EBITS=s_el.ebits, S_MBITS=s_el.mbits, S_BIAS=s_el.bias, S_EMIN=s_el.emin,
                 S_POLICY=_POLICIES[s_el.policy], S_MAXMAG=s_el.max_mag_code)
    else:
        s = dict(S_EBITS=0, S_MBITS=0, S_BIAS=0, S_EMIN=0, S_POLICY=0, S_MAXMAG=0)
    if f.scale in ("e8m0", "static"):
        inv_step = 0
    else:  # -log2 of the scale grid's smallest step (fp32: its smallest subnormal, 2^-149)
        inv_step = FP32_MBITS - FP32_EMIN if s_el is None else s_el.mbits - s_el.emin
    s["S_INV_STEP_HI"] = math.ldexp(1.0, inv_step - inv_step // 2)
    s["S_INV_STEP_LO"] = math.ldexp(1.0, inv_step // 2)
    maxn32 = np.float32(e.max_normal)
    if float(maxn32) != e.max_normal:
        raise Unsupported(f"{f}: max normal {e.max_normal} is not an fp32 value")
    # The reference computes max_normal * e4m3's max normal as an fp32 product of fp32 values.
    maxn_ts = float(maxn32 * np.float32(scale_element("e4m3").max_normal)) if f.tensor_scale else 0.0
    pw = [p for _, p in planes(e.bits)] + [0, 0]
    fp8 = _FP8.get((e.ebits, e.mbits, e.policy)) if e.kind == "float" else None
    if cuda and fp8 is not None:
        decode = DECODE_FP8
    elif e.kind in ("int", "uint"):
        decode = DECODE_INT
    else:
        decode = DECODE_TABLE
    F = KernelFormat(
        KIND=_KINDS[e.kind], BITS=e.bits, MBITS=e.mbits, EMIN=e.emin, EMAX=e.emax,
        GSCALE=math.ldexp(1.0, -e.grid_exponent), MAXMAG=maxmag, SAT=sat, MAXN=float(maxn32),
        MAXV=float(maxn32) * 2.0, SCALE=_SCALES[f.scale], SB=scale_type(f.scale).nbytes, ZP=f.zero_point,
        TS=f.tensor_scale, MAXN_TS=maxn_ts, SNAN=_scale_nan(_SCALES[f.scale]), **s,
        BS=bs, BP2=_next_pow2(bs), P0=pw[0], P1=pw[1], P2=pw[2],
        EVEN=(width % bs == 0 and bs == _next_pow2(bs)), ROT=f.rotation.bit_length() - 1 if f.rotation else 0,
        GPU=bool(cuda), DECODE=decode, FP8_HW=bool(cuda) and fp8 is not None,
        FP8=fp8 if fp8 is not None else FP8_E4M3, CODE_ROWS=decode != DECODE_FP8,
    )
    return KernelConstants(fmt=str(f), width=int(width), GE=e.grid_exponent, F=F)


@functools.lru_cache(maxsize=256)
def _value_table(fmt_str: str, device: str):
    import torch

    from qformats.grid import code_table

    t = code_table(Format.parse(fmt_str).elem, marker_nan=False)  # (static formats are not lowered)
    t32 = t.to(torch.float32)
    same = (t32.to(torch.float64) == t) | (torch.isnan(t) & torch.isnan(t32))
    if not bool(same.all()):  # pragma: no cover - every lowered element is an fp32 value
        raise Unsupported(f"{fmt_str}: element values are not all fp32 values")
    return t32.to(device)


def value_table(kc: KernelConstants, device):
    """The decode table: fp32 value of every element code (2^BITS entries, sign, Inf and NaN
    codes included), indexed by code; the kernels decode ``table[code] * scale``.

    Built from the reference's ``qformats.grid.code_table`` (so decode cannot drift from the
    spec), cached per format and device: 4 bytes x 2^BITS, L1-resident in the kernels. On CUDA
    call it (or any op) once before CUDA-graph capture: the first call copies it to the GPU.
    """
    import torch

    return _value_table(kc.fmt, str(torch.device(device)))


def lower(fmt, width: int, device) -> KernelConstants:
    """Kernel constants of ``fmt`` for rows of ``width`` features on ``device``.

    Raises :class:`Unsupported` for formats the kernels do not implement (see module doc),
    ValueError for a width the format cannot take (e.g. a static format's feature count).
    """
    f = as_format(fmt)
    if f is None:
        raise Unsupported("no format (None / bf16): nothing to lower")
    cuda = getattr(device, "type", str(device)) == "cuda"
    return _lower(str(f), int(width), cuda)
