"""One quantiser for every element type: exact rounding onto an element's grid, and codes.

All arithmetic here is float64, in which every float32 value, every element value and
every power of two we meet is exact, and ``x * 2^k`` never rounds. Rounding therefore
happens exactly once, where the spec says (round half to even, or toward +/-inf for
scales), never as a side effect of scaling.
"""
import torch

from .spec import Element

RNE, UP, DOWN = "rne", "up", "down"


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exactly, from the exponent bits (frexp), not from a float log2."""
    _, e = torch.frexp(a)
    return e.to(torch.int64) - 1


def round_to_grid(v: torch.Tensor, elem: Element, mode: str = RNE) -> torch.Tensor:
    """Round float64 ``v`` (element units) onto ``elem``'s grid, saturating at +-max_normal.

    ``mode``: RNE (round half to even), UP (toward +inf), DOWN (toward -inf). NaN stays NaN;
    +-Inf saturates. Signed zeros keep their sign for float elements.
    """
    a = v.abs().clamp(max=2.0 * elem.max_normal)  # saturation below makes larger values moot
    if elem.kind == "float":
        e = torch.where(a > 0, _floor_log2(a.clamp(min=torch.finfo(torch.float64).tiny)), elem.emin)
        g = torch.clamp(e, min=elem.emin) - elem.mbits
    else:
        g = torch.full_like(a, elem.grid_exponent, dtype=torch.int64)
    n = torch.ldexp(a, -g.to(torch.float64))
    if mode == RNE:
        n = torch.round(n)  # half to even
    elif mode in (UP, DOWN):
        toward_larger = (v >= 0) if mode == UP else (v < 0)
        n = torch.where(toward_larger, torch.ceil(n), torch.floor(n))
    else:
        raise ValueError(f"rounding mode {mode!r}: valid are {RNE}, {UP}, {DOWN}")
    q = torch.ldexp(n, g.to(torch.float64)).clamp(max=elem.max_normal)
    q = torch.where(torch.isnan(v), v, q)
    return torch.copysign(q, v) if elem.kind == "float" else torch.where(v < 0, -q, q)


def to_codes(q: torch.Tensor, elem: Element) -> torch.Tensor:
    """Codes (int64, in [0, 2^bits)) of grid values ``q`` (float64, already on the grid).

    uint elements take the code value itself (zero point handled by the codec).
    """
    if elem.kind == "uint":
        return q.to(torch.int64)
    if elem.kind == "int":
        n = torch.ldexp(q, torch.tensor(-float(elem.grid_exponent), dtype=torch.float64)).to(torch.int64)
        return n & ((1 << elem.bits) - 1)
    a = q.abs()
    sign = torch.signbit(q).to(torch.int64) << (elem.bits - 1)
    e = torch.where(a > 0, _floor_log2(a.clamp(min=torch.finfo(torch.float64).tiny)), elem.emin - 1)
    normal = e >= elem.emin
    e = torch.clamp(e, min=elem.emin)
    mant = torch.ldexp(a, (elem.mbits - e).to(torch.float64)).to(torch.int64)  # in [0, 2^(M+1))
    field = torch.where(normal, e + elem.bias, torch.zeros_like(e))
    mant = torch.where(normal, mant - (1 << elem.mbits), mant)
    return sign | (field << elem.mbits) | mant


def from_codes(codes: torch.Tensor, elem: Element, marker_nan: bool = True) -> torch.Tensor:
    """Element values (float64) of codes; NaN/Inf codes decode to NaN/Inf per the element's policy.

    MX ints never encode the code -2^(N-1) (their grid is symmetric). ``marker_nan=True`` (the
    representable set, and static-scale formats, which write it as their NaN marker): it
    decodes to NaN. ``marker_nan=False`` (how block-scaled formats decode foreign bytes, as OCP
    MX defines MXINT8: code -128 is -2.0): its two's-complement value times 2^GE.
    """
    c = codes.to(torch.int64)
    if elem.kind == "uint":
        return c.to(torch.float64)
    if elem.kind == "int":
        half = 1 << (elem.bits - 1)
        n = torch.where(c >= half, c - (1 << elem.bits), c)
        v = torch.ldexp(n.to(torch.float64), torch.tensor(float(elem.grid_exponent), dtype=torch.float64))
        return torch.where(n == -half, torch.full_like(v, float("nan")), v) if marker_nan else v
    m = elem.mbits
    sign = (c >> (elem.bits - 1)) & 1
    field = (c >> m) & ((1 << elem.ebits) - 1)
    mant = c & ((1 << m) - 1)
    sig = torch.where(field > 0, mant + (1 << m), mant).to(torch.float64)
    exp = torch.clamp(field - elem.bias, min=elem.emin) - m
    v = torch.ldexp(sig, exp.to(torch.float64))
    top = (1 << elem.ebits) - 1
    if elem.policy == "ieee":
        v = torch.where(field == top, torch.where(mant == 0, torch.inf, torch.nan), v)
    elif elem.policy == "fn":
        v = torch.where((field == top) & (mant == (1 << m) - 1), torch.nan, v)
    return torch.where(sign == 1, -v, v)


def code_table(elem: Element, marker_nan: bool = True) -> torch.Tensor:
    """Every code's value, indexed by code (float64): the exhaustive table tests check.
    ``marker_nan``: as :func:`from_codes` (False: the decode table of block-scaled formats)."""
    return from_codes(torch.arange(1 << elem.bits), elem, marker_nan)
