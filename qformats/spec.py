"""Format specifications: one frozen value per format, everything else derived.

A :class:`Format` is (element type, block size, scale type, options). Its canonical
string form, e.g. ``fp4_e2m1/b32/e8m0``, parses back to an equal value. Exponent
bias, emax, max normal, bits per value, wire size and error bound are derived
properties, never stored.

Grammar (``/``-separated, then ``+``-options)::

    ELEMENT / BLOCK / SCALE [+zp] [+ts] [+h{N}] [+o[i,j,...]] [+s[hex...]]

    ELEMENT  fp{N}_e{E}m{M}[fn|ieee|fin]   float, N = 1 + E + M <= 8 (1 <= E <= 5, M <= 5)
             int{N}                        MX signed integer (2 <= N <= 8)
             uint{N}                       unsigned integer with a zero point (needs +zp)
    BLOCK    b{K} (K a multiple of 8, 8..4096) | row (the whole last dimension)
    SCALE    e8m0 | fp32 | bf16 | fp16 | e4m3 | static
    +zp      asymmetric: a per-block zero point (the block minimum) beside the scale
    +ts      e4m3 scales only: an fp32 per-tensor scale in front of the block scales (NVFP4)
    +h{N}    a block-local Walsh-Hadamard rotation over each run of N quantised features before
             encoding, undone after decoding (N a power of two, 2..BLOCK, dividing BLOCK; fixed
             blocks only, not static scales); defined exactly in :func:`qformats.codec.rotate`
    +o[...]  outlier features carried in bf16 (Dong et al.); the others are quantised
    +s[...]  static per-feature fp32 scales (scale ``static``), 8 hex digits each
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import re
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from .presets import PRESET_SPECS

# Float element special-value policies.
#   "ieee": top exponent field reserved for Inf/NaN (e5m2).
#   "fn":   no Inf; only the all-ones code is NaN (OCP e4m3 "fn").
#   "fin":  every code is a finite number (OCP fp6/fp4 and the small papers' formats).
FLOAT_POLICIES = ("ieee", "fn", "fin")
MIN_BLOCK, MAX_BLOCK = 8, 4096
MAX_ELEMENT_BITS = 8  # codes pack into bytes (qformats.packing)


def _default_policy(ebits: int, mbits: int) -> str:
    if (ebits, mbits) == (4, 3):
        return "fn"
    if (ebits, mbits) == (5, 2):
        return "ieee"
    return "fin"


_MAX_SHOWN = 60  # characters of a bad spec quoted in an error message


def _show(s: str) -> str:
    """``repr`` of a (possibly huge) piece of a spec, cut short for an error message."""
    return repr(s) if len(s) <= _MAX_SHOWN else repr(s[:_MAX_SHOWN]) + f"... ({len(s)} characters)"


def _integer(v, what: str) -> int:
    """``v`` as an int; ValueError for anything that is not an integer (floats, bools, strings)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {type(v).__name__} {v!r}")
    return int(v)


def _fp32(v) -> float:
    """A static scale as the fp32 value the codec uses (so ``str`` round-trips exactly)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"a static scale must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    try:
        return struct.unpack(">f", struct.pack(">f", v))[0]
    except OverflowError:  # beyond fp32's range: Inf, which the validation below rejects
        return math.copysign(math.inf, v)


def dims(shape: Sequence[int]) -> tuple:
    """A tensor shape as a tuple of non-negative ints; ValueError naming the shape otherwise."""
    try:
        out = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape {tuple(shape)!r}: dimensions must be integers") from None
    if any(d < 0 for d in out):
        raise ValueError(f"shape {out}: dimensions must be non-negative")
    return out


@dataclass(frozen=True)
class Element:
    """One element type: ``kind`` is "float", "int" (MX signed integer) or "uint".

    Float elements are sign + ``ebits`` exponent + ``mbits`` mantissa bits with IEEE-style
    bias and subnormals. MX integers are two's complement codes in
    [-(2^(N-1)-1), 2^(N-1)-1] times 2^-(N-2) (so emax = 0, as in the OCP MX spec and
    microxcaling). Unsigned integers are codes 0..2^N-1, used with a zero point.
    """

    kind: str
    bits: int
    ebits: int = 0
    mbits: int = 0
    policy: str = "fin"

    def __post_init__(self):
        for name in ("bits", "ebits", "mbits"):
            object.__setattr__(self, name, _integer(getattr(self, name), f"element {name}"))
        if self.kind == "float":
            if not (1 <= self.ebits <= 8 and 0 <= self.mbits <= 23):
                raise ValueError(f"float element e{self.ebits}m{self.mbits}: need 1<=E<=8, 0<=M<=23")
            if self.bits != 1 + self.ebits + self.mbits:
                raise ValueError(f"float element: bits {self.bits} != 1 + E + M = {1 + self.ebits + self.mbits}")
            if self.policy not in FLOAT_POLICIES:
                raise ValueError(f"float policy {self.policy!r}: valid are {', '.join(FLOAT_POLICIES)}")
            if self.policy == "ieee" and self.ebits < 2:
                raise ValueError("an 'ieee' element needs at least 2 exponent bits")
            if self.policy == "fn" and self.mbits < 1:
                raise ValueError("an 'fn' element needs at least 1 mantissa bit")
        elif self.kind in ("int", "uint"):
            lo = 2 if self.kind == "int" else 1
            if not lo <= self.bits <= 8:
                raise ValueError(f"{self.kind}{self.bits}: valid widths are {lo}..8")
        else:
            raise ValueError(f"element kind {self.kind!r}: valid are float, int, uint")

    # ---- derived -------------------------------------------------------------------
    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1 if self.kind == "float" else 0

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (the OCP ``emax_elem``)."""
        if self.kind == "float":
            top = (1 << self.ebits) - 1 - self.bias
            return top - 1 if self.policy == "ieee" else top
        if self.kind == "int":
            return 0
        return self.bits - 1  # uint: codes up to 2^N - 1 < 2^N

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (floats); the grid exponent of ints."""
        if self.kind == "float":
            return 1 - self.bias
        return self.grid_exponent

    @property
    def grid_exponent(self) -> int:
        """Ints: every value is code * 2^grid_exponent."""
        return -(self.bits - 2) if self.kind == "int" else 0

    @property
    def max_code(self) -> int:
        """Largest integer magnitude code (ints) or largest significand (floats, in units of 2^(emax-M))."""
        if self.kind == "int":
            return (1 << (self.bits - 1)) - 1
        if self.kind == "uint":
            return (1 << self.bits) - 1
        top = (1 << (self.mbits + 1)) - 1
        return top - 1 if self.policy == "fn" else top

    @property
    def max_mag_code(self) -> int:
        """Largest finite magnitude code (codes grow with magnitude): ints their max code, floats
        the code below the Inf/NaN codes their policy reserves."""
        if self.kind != "float":
            return self.max_code
        if self.policy == "fin":
            return (1 << (self.bits - 1)) - 1
        if self.policy == "fn":
            return (1 << (self.bits - 1)) - 2
        return (((1 << self.ebits) - 1) << self.mbits) - 1  # ieee: the top exponent field is Inf/NaN

    @property
    def max_normal(self) -> float:
        if self.kind == "float":
            return math.ldexp(self.max_code, self.emax - self.mbits)
        return math.ldexp(self.max_code, self.grid_exponent)

    @property
    def min_subnormal(self) -> float:
        if self.kind == "float":
            return math.ldexp(1.0, self.emin - self.mbits)
        return math.ldexp(1.0, self.grid_exponent)

    def __str__(self) -> str:
        if self.kind == "float":
            name = f"fp{self.bits}_e{self.ebits}m{self.mbits}"
            return name if self.policy == _default_policy(self.ebits, self.mbits) else name + self.policy
        return f"{self.kind}{self.bits}"

    @staticmethod
    def parse(s: str) -> "Element":
        m = re.fullmatch(r"fp([0-9]{1,2})_e([0-9]{1,2})m([0-9]{1,2})(fn|ieee|fin)?", s)
        if m:
            bits, e, mm = int(m[1]), int(m[2]), int(m[3])
            if not (1 <= e <= 5 and 0 <= mm <= 5):
                raise ValueError(f"element {s!r}: float elements need 1<=E<=5 and 0<=M<=5")
            return Element("float", bits, e, mm, m[4] or _default_policy(e, mm))
        m = re.fullmatch(r"(u?int)([0-9]{1,2})", s)
        if m:
            return Element(m[1], int(m[2]))
        raise ValueError(
            f"element {_show(s)} not understood: valid are fp<N>_e<E>m<M>[fn|ieee|fin] (1<=E<=5, 0<=M<=5, "
            f"N=1+E+M), int<N> (2..8), uint<N> (1..8)"
        )


@dataclass(frozen=True)
class ScaleType:
    """One block-scale storage type, every fact about it in one place.

    ``nbytes``: bytes per block scale on the wire. ``element``: the float grid an absmax scale
    is rounded (up) onto, None for ``e8m0`` (a power of two), ``fp32`` (stored as computed) and
    ``static`` (per-feature fp32 scales in the format itself). ``nan_bits``: the canonical
    quiet-NaN pattern written for a NaN/Inf block (explicit, because what a cast of NaN gives
    depends on the torch build). ``dtype``: the torch dtype name it is stored as, for the
    types that are native floats.
    """

    name: str
    nbytes: int
    element: Optional[Element] = None
    nan_bits: Optional[int] = None
    dtype: Optional[str] = None


SCALES = {
    "e8m0": ScaleType("e8m0", 1, nan_bits=0xFF),
    "fp32": ScaleType("fp32", 4, nan_bits=0x7FC00000, dtype="float32"),
    "bf16": ScaleType("bf16", 2, Element("float", 16, 8, 7, "ieee"), 0x7FC0, "bfloat16"),
    "fp16": ScaleType("fp16", 2, Element("float", 16, 5, 10, "ieee"), 0x7E00, "float16"),
    "e4m3": ScaleType("e4m3", 1, Element("float", 8, 4, 3, "fn"), 0x7F),
    "static": ScaleType("static", 0),
}
SCALE_TYPES = tuple(SCALES)


def scale_type(scale: str) -> ScaleType:
    """The :class:`ScaleType` record of a scale name."""
    try:
        return SCALES[scale]
    except KeyError:
        raise ValueError(f"scale {scale!r} not understood: valid are {', '.join(SCALE_TYPES)}") from None


def scale_element(scale: str) -> Optional[Element]:
    """The float grid a non-fp32 absmax scale is rounded (up) to; None for e8m0/fp32/static."""
    return scale_type(scale).element


_LAYOUT_CACHE = 1024  # layouts kept per Format value (Format.layout)


@dataclass(frozen=True)
class Format:
    """A block format. Build it with :meth:`parse` or from :data:`qformats.PRESETS`.

    ``block`` is the block size along the last axis, or 0 for ``row`` (one block per row).
    Use a Format wherever a format is expected; pass ``str(fmt)`` across process or
    compile boundaries.
    """

    elem: Element
    block: int
    scale: str
    zero_point: bool = False
    tensor_scale: bool = False
    outliers: tuple = ()
    static_scales: tuple = ()
    rotation: int = 0  # N of +h{N} (0: none); see qformats.codec.rotate

    def __post_init__(self):
        if not isinstance(self.elem, Element):
            raise ValueError(f"elem must be an Element, got {type(self.elem).__name__}")
        object.__setattr__(self, "block", _integer(self.block, "block size"))
        object.__setattr__(self, "rotation", _integer(self.rotation, "rotation size"))
        for name in ("zero_point", "tensor_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "outliers", tuple(_integer(i, "an outlier index") for i in self.outliers))
        object.__setattr__(self, "static_scales", tuple(_fp32(v) for v in self.static_scales))
        e, s = self.elem, self.scale
        if e.bits > MAX_ELEMENT_BITS:  # (an Element may be wider: the 16-bit scale grids are Elements)
            raise ValueError(f"element {e}: {e.bits} bits, but element codes are at most {MAX_ELEMENT_BITS} bits wide")
        if not isinstance(s, str) or s not in SCALES:
            raise ValueError(f"scale {s!r} not understood: valid are {', '.join(SCALE_TYPES)}")
        if self.block != 0 and not (MIN_BLOCK <= self.block <= MAX_BLOCK and self.block % 8 == 0):
            raise ValueError(f"block size {self.block}: valid are multiples of 8 from {MIN_BLOCK} to {MAX_BLOCK}, or row")
        if e.kind == "uint" and not self.zero_point:
            raise ValueError(f"{e} needs a zero point: write {e}/<block>/fp16+zp")
        if self.zero_point:
            if e.kind != "uint":
                raise ValueError(f"+zp is for uint elements, not {e} (signed elements are symmetric)")
            if s not in ("bf16", "fp16"):
                raise ValueError(f"+zp needs a 16-bit scale (bf16 or fp16), not {s}: the decode "
                                 "code*scale+zero must be exact before its one rounding")
        if s == "e8m0" and e.kind == "uint":
            raise ValueError("e8m0 scales are for symmetric elements (float or int)")
        if self.tensor_scale and s != "e4m3":
            raise ValueError(f"+ts (fp32 per-tensor scale) goes with e4m3 block scales, not {s}")
        if s == "static":
            if e.kind != "int":
                raise ValueError(f"static per-feature scales are for int elements, not {e}")
            if self.block != 0:
                raise ValueError("static scales are per feature: the block must be 'row'")
            if not self.static_scales:
                raise ValueError("scale 'static' needs its per-feature scales (+s[...]); "
                                 "build one with qformats.static_outlier_format or tp.model.calibrate")
            if not all(math.isfinite(v) and v > 0 for v in self.static_scales):
                raise ValueError("static scales must be finite and positive")
        elif self.static_scales:
            raise ValueError("+s[...] (static scales) needs scale 'static'")
        if self.rotation:
            n = self.rotation
            if s == "static":
                raise ValueError("+h (rotation) does not go with static per-feature scales: a feature's "
                                 "calibrated scale means nothing once the run of features is rotated")
            if self.block == 0:
                raise ValueError(f"+h{n} needs a fixed block size (b<K>), not row: the rotated runs must tile the blocks")
            if n < 2 or n & (n - 1) or n > self.block or self.block % n:
                raise ValueError(f"+h{n}: the rotation size must be a power of two from 2 to the block size "
                                 f"{self.block} that divides it")
        if list(self.outliers) != sorted(set(self.outliers)) or any(i < 0 for i in self.outliers):
            raise ValueError("outlier indices must be distinct, non-negative and increasing")

    # ---- grammar ---------------------------------------------------------------------
    @staticmethod
    def parse(s: str) -> "Format":
        """Parse a canonical string or a preset name (surrounding whitespace ignored in both).
        Raises ValueError naming the bad part. Cached: a repeated string costs a dict look-up."""
        if not isinstance(s, str):  # before the cache: an unhashable argument must not reach it
            raise ValueError(f"a format string is expected, got {type(s).__name__}")
        return _parse_cached(s.strip())


    def __str__(self) -> str:
        return self._canonical

    @functools.cached_property
    def _canonical(self) -> str:
        s = f"{self.elem}/{'row' if self.block == 0 else f'b{self.block}'}/{self.scale}"
        if self.zero_point:
            s += "+zp"
        if self.tensor_scale:
            s += "+ts"
        if self.rotation:
            s += f"+h{self.rotation}"
        if self.outliers:
            s += "+o[" + ",".join(map(str, self.outliers)) + "]"
        if self.static_scales:
            s += "+s[" + "".join(struct.pack(">f", v).hex() for v in self.static_scales) + "]"
        return s

    def __repr__(self) -> str:
        text = str(self)
        return f"Format({text if len(text) < 120 else text[:100] + '...'!r})"

    # ---- derived sizes ---------------------------------------------------------------
    @property
    def features(self) -> Optional[int]:
        """Row length the format is tied to (static formats), else None."""
        return len(self.outliers) + len(self.static_scales) if self.scale == "static" else None

    def quantized_width(self, width: int) -> int:
        """How many features of a row go through the element quantiser (outliers removed)."""
        if self.outliers and self.outliers[-1] >= width:
            raise ValueError(f"outlier index {self.outliers[-1]} out of range for rows of {width} features")
        if self.features is not None and width != self.features:
            raise ValueError(f"format is calibrated for rows of {self.features} features, got {width}")
        return width - len(self.outliers)

    def block_for(self, width: int) -> int:
        """The block size used for rows of ``width`` features (``row`` -> the padded row)."""
        q = self.quantized_width(width)
        return self.block if self.block else max(8, -(-q // 8) * 8)

    def layout(self, shape: Sequence[int]) -> "Layout":
        """Byte layout of the wire buffer for a tensor of ``shape`` (quantised along the last dim).

        Cached on the format (it is frozen): each shape is computed once per Format value, so the
        layers below an entry point may ask again at the cost of a dict look-up."""
        shape = dims(shape)
        cache = self._layouts
        lay = cache.get(shape)
        if lay is None:
            if len(cache) >= _LAYOUT_CACHE:  # bounded: eval sees a new row count per batch
                cache.clear()
            lay = cache[shape] = self._compute_layout(shape)
        return lay

    @functools.cached_property
    def _layouts(self) -> dict:
        return {}

    def _compute_layout(self, shape: tuple) -> "Layout":
        if len(shape) == 0:
            raise ValueError("a tensor with at least one dimension is expected")
        width = shape[-1]
        rows = math.prod(shape[:-1])
        bs = self.block_for(width)
        q = self.quantized_width(width)
        nblocks = 0 if self.scale == "static" else -(-q // bs)
        padded = max(nblocks * bs, -(-q // 8) * 8) if self.scale != "static" else -(-q // 8) * 8
        code_bytes = rows * padded * self.elem.bits // 8
        sb = scale_type(self.scale).nbytes
        scale_bytes = rows * nblocks * sb
        zp_bytes = scale_bytes if self.zero_point else 0
        ts_bytes = 4 if self.tensor_scale else 0
        out_bytes = rows * len(self.outliers) * 2
        return Layout(rows, width, q, padded, bs, nblocks, code_bytes, scale_bytes, zp_bytes, ts_bytes, out_bytes)

    def nbytes(self, shape: Sequence[int]) -> int:
        """Wire bytes of a tensor of ``shape``."""
        return self.layout(shape).total

    def bits_per_value_at(self, width: int) -> float:
        """Bits on the wire per value for rows of ``width`` features (per-tensor scale amortised away)."""
        lay = self.layout((1, width))
        return 8.0 * (lay.total - lay.ts_bytes) / width

    @property
    def bits_per_value(self) -> float:
        """Bits per value including scale, zero-point and outlier overhead.

        For ``row`` blocks and outlier formats the overhead depends on the row length:
        static formats use their own feature count, others assume rows of 4096.
        """
        width = self.features or (4096 if (self.block == 0 or self.outliers) else self.block)
        return self.bits_per_value_at(width)

    @property
    def compression_ratio(self) -> float:
        """Size of bf16 over the size of this format."""
        return 16.0 / self.bits_per_value

    # ---- derived accuracy --------------------------------------------------------------
    @property
    def relative_error_bound(self) -> float:
        """Largest |x - q(x)| over the block's absolute maximum, for finite blocks whose scale is in range.

        e8m0: the block amax lies in [2^emax, 2^(emax+1)) element units; the error is the larger of
        half the top binade's step (relative to 2^emax) and the saturation gap (relative to
        2^(emax+1)). absmax scales: the amax maps to max_normal / (1 + 2^-Ms) or more (the scale
        rounds up to Ms mantissa bits); the error is half the top step. Zero points: half a
        step of (max - min) / max_code, and max - min <= 2 amax. ``qformats.bounds`` adds the
        absolute floor that the smallest scale sets. Rotated formats (``+h``): the same figure
        holds in the rotated coordinates (for the rotated block's amax), not for the decoded
        values (``qformats.bounds.error_bound`` refuses them and says why).
        """
        e = self.elem
        top_step = math.ldexp(1.0, (e.emax - e.mbits) if e.kind == "float" else e.grid_exponent)
        if self.scale == "e8m0":
            return max(top_step / 2 / math.ldexp(1.0, e.emax), 1 - e.max_normal / math.ldexp(1.0, e.emax + 1))
        if self.scale == "static":
            return top_step / 2 / e.max_normal  # relative to the calibrated range, not the block amax
        sel = scale_element(self.scale)
        slack = 1 + (math.ldexp(1.0, -sel.mbits) if sel else 2.0**-22)
        if self.zero_point:
            return slack * slack / e.max_code
        return slack * top_step / 2 / e.max_normal


@dataclass(frozen=True)
class Layout:
    """Sections of a wire buffer, in order: codes | scales | zero points | tensor scale | outliers."""

    rows: int
    width: int
    qwidth: int  # features quantised per row (outliers removed)
    padded: int  # codes per row on the wire (qwidth padded to whole blocks / bytes)
    block: int
    nblocks: int  # blocks per row
    code_bytes: int
    scale_bytes: int
    zp_bytes: int
    ts_bytes: int
    out_bytes: int

    @property
    def total(self) -> int:
        return self.code_bytes + self.scale_bytes + self.zp_bytes + self.ts_bytes + self.out_bytes

    @property
    def offsets(self) -> dict:
        o, out = 0, {}
        for name in ("code", "scale", "zp", "ts", "out"):
            n = getattr(self, f"{name}_bytes")
            out[name] = (o, o + n)
            o += n
        return out


def static_outlier_format(elem: str = "int4", outliers: Sequence[int] = (), scales: Sequence[float] = ()) -> Format:
    """The outlier-aware static format of Dong et al.: ``outliers`` travel in bf16, every other
    feature as ``elem`` with its own fixed fp32 scale (``scales[j]`` for the j-th non-outlier feature).

    Use it after a calibration (``tp.model.calibrate``) has fixed the outliers and scales; it costs
    ``elem.bits`` per quantised feature plus 16 per outlier, no per-block scales at all.
    """
    scales = tuple(float(struct.unpack(">f", struct.pack(">f", float(v)))[0]) for v in scales)
    return Format(Element.parse(elem), 0, "static", outliers=tuple(int(i) for i in outliers), static_scales=scales)


def as_format(f) -> Optional[Format]:
    """Accept a Format, a canonical string, a preset name, or None (no compression)."""
    if f is None or isinstance(f, Format):
        return f
    if isinstance(f, str):
        if f.strip().lower() in ("none", "bf16", ""):
            return None
        return Format.parse(f)
    raise ValueError(f"a Format, a format string or None is expected, got {type(f).__name__}")


def need_format(f) -> Format:
    """:func:`as_format` where a format is required (None, "none" and "bf16" mean no compression)."""
    fmt = as_format(f)
    if fmt is None:
        raise ValueError(f"a quantisation format is required here, got {f!r} (no compression)")
    return fmt


def replace(fmt: Format, **kw) -> Format:
    return dataclasses.replace(fmt, **kw)


@functools.lru_cache(maxsize=1024)
def _parse_cached(s: str) -> "Format":
    if s in PRESETS:
        return PRESETS[s]
    if s.lower() in PRESETS:  # preset names are case-insensitive: MXFP4 = mxfp4
        return PRESETS[s.lower()]
    return _parse_grammar(s, PRESETS)


# Digits are ASCII only (``\d`` would take any Unicode digit) and bounded, so a huge number is a
# clear error naming its part, not Python's integer-length limit.
_BLOCK_RE = re.compile(r"b([1-9][0-9]{0,5})")
_OUTLIERS_RE = re.compile(r"o\[([0-9]{1,9}(?:,[0-9]{1,9})*)\]")
_ROTATION_RE = re.compile(r"h([0-9]{1,5})")
_STATIC_RE = re.compile(r"s\[((?:[0-9a-f]{8})+)\]")


def _parse_grammar(s: str, presets=()) -> "Format":
    head, *opts = s.strip().split("+")
    parts = head.split("/")
    if len(parts) != 3:
        import difflib

        close = difflib.get_close_matches(s.strip().lower(), list(presets), n=3, cutoff=0.6)
        raise ValueError(
            f"format {_show(s)}: " + (f"did you mean {' or '.join(close)}? " if close else "")
            + "expected ELEMENT/BLOCK/SCALE[+options] (e.g. fp4_e2m1/b32/e8m0) "
            f"or a preset name ({', '.join(presets)})"
        )
    elem = Element.parse(parts[0])
    m = _BLOCK_RE.fullmatch(parts[1])
    if parts[1] == "row":
        block = 0
    elif m:
        block = int(m[1])
    elif re.fullmatch(r"b0+", parts[1]):
        raise ValueError(f"block {parts[1]!r}: a block holds {MIN_BLOCK} to {MAX_BLOCK} features; "
                         "write row for one block per row")
    else:
        raise ValueError(f"block {_show(parts[1])}: valid are b<K> (K a multiple of 8, {MIN_BLOCK}..{MAX_BLOCK}) or row")
    kw = {}
    for o in opts:
        if o == "zp":
            key, val = "zero_point", True
        elif o == "ts":
            key, val = "tensor_scale", True
        elif m := _ROTATION_RE.fullmatch(o):
            key, val = "rotation", int(m[1])
            if val == 0:
                raise ValueError(f"option +{o}: a rotation size is a power of two >= 2 (leave +h out for none)")
        elif m := _OUTLIERS_RE.fullmatch(o):
            key, val = "outliers", tuple(int(i) for i in m[1].split(","))
        elif m := _STATIC_RE.fullmatch(o):
            h = m[1]
            key, val = "static_scales", tuple(
                struct.unpack(">f", bytes.fromhex(h[i : i + 8]))[0] for i in range(0, len(h), 8))
        else:
            raise ValueError(f"option +{o if len(o) <= _MAX_SHOWN else _show(o)}: valid are +zp, +ts, +h<N>, +o[i,j,...], +s[<8 hex digits per scale>]")
        if key in kw:
            label = {"rotation": "h", "outliers": "o", "static_scales": "s"}.get(key, o)
            raise ValueError(f"format {_show(s)}: option +{label} is given twice")
        kw[key] = val
    return Format(elem, block, parts[2], **kw)


PRESETS = {name: _parse_grammar(spec, PRESET_SPECS) for name, spec in PRESET_SPECS.items()}
"""Preset name -> Format."""
