"""Per-element error bounds derived from the spec, for tests and for users sizing a format.

``error_bound(x, fmt)`` gives, for every element of ``x``, an upper bound on
``|x - quantize_dequantize(x, fmt)|`` from the block's absolute maximum and the format's
derived constants only (no call into the codec), so tests can hold the codec to it. It holds
for every format the grammar accepts except rotated ones (``+h``: :func:`error_bound` says why), for finite ``x`` whose block maxima are at most
:func:`max_amax` (static formats: elements inside their calibrated range), whatever their
exponent: subnormal inputs, and scales in their type's subnormal range, included.

How the bound is made (absmax scales; zero points and static scales alike): an element's
error is at most half its grid step times the block scale, plus the fp32 roundings of the
codec (``x / scale`` as x times the rounded reciprocal: two, the decode product, the scale
quotient: each relative 2^-24, or
absolute 2^-150 for an fp32 subnormal), plus the saturation that a scale rounded a hair below
amax / max_normal causes. The scale itself is at most amax / max_normal rounded up onto its
type, i.e. at most (1 + 2^-Ms) times that quotient *plus* the type's smallest step (in the
type's subnormal range the grid step is absolute, not relative): that step, times half the
element's top step, is the absolute floor. Decoding to bf16/fp16 adds that dtype's rounding.
"""
import math

import torch

from .numeric import DTYPE_ROUNDING, FP32_MAX, FP32_MIN_SUBNORMAL, FP32_TINY
from .spec import Format, as_format, scale_element

_ROUNDING = 2.0**-20  # relative slack for the codec's fp32 roundings (a few times 2^-24), rounded up


def _block_amax(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Each element's block amax (fp64), broadcast back to x's [R, H] shape; outliers get 0."""
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    lay = fmt.layout(x.shape)
    keep = torch.ones(lay.width, dtype=torch.bool)
    keep[list(fmt.outliers)] = False
    xq = torch.nn.functional.pad(x2[:, keep].abs(), (0, lay.padded - lay.qwidth))
    if fmt.scale == "static":
        return xq[:, : lay.qwidth], keep
    amax = xq.reshape(lay.rows, lay.nblocks, lay.block).amax(-1, keepdim=True)
    return amax.expand(-1, -1, lay.block).reshape(lay.rows, lay.padded)[:, : lay.qwidth], keep


def _top_step(fmt: Format) -> float:
    """The element grid's largest step (its top binade's; ints and uints: the grid step)."""
    e = fmt.elem
    return math.ldexp(1.0, (e.emax - e.mbits) if e.kind == "float" else e.grid_exponent)


def scale_step(fmt: Format) -> float:
    """The smallest step of the block scale's grid (its smallest subnormal); 0 for e8m0/static."""
    if fmt.scale in ("e8m0", "static"):
        return 0.0
    sel = scale_element(fmt.scale)
    return sel.min_subnormal if sel else FP32_MIN_SUBNORMAL


def abs_floor(fmt: Format, scale_step_value: float | None = None) -> float:
    """Error allowed regardless of amax: what the smallest scale step costs an element.

    e8m0: half the smallest element step at the smallest scale 2^-127. absmax / zero points:
    the scale's smallest step ``scale_step_value`` (default :func:`scale_step`; +ts formats
    pass it times their tensor scale) times half the element's top step, plus the fp32
    subnormal roundings of the codec."""
    e = fmt.elem
    if fmt.scale == "e8m0":
        return math.ldexp(e.min_subnormal, -127) / 2
    step = scale_step(fmt) if scale_step_value is None else scale_step_value
    if fmt.zero_point:  # half a code step of the scale, plus the zero point's own rounding
        return step * (1 + _ROUNDING) + 2 * FP32_MIN_SUBNORMAL
    return step * (_top_step(fmt) / 2 + 2.0**-24 * e.max_normal) + FP32_MIN_SUBNORMAL * (1 + e.max_normal)


def max_amax(fmt: Format) -> float:
    """Largest block amax for which ``error_bound`` holds (the scale type's range)."""
    e = fmt.elem
    if fmt.scale == "e8m0":
        return min(FP32_MAX, math.ldexp(1.0, 127 + e.emax + 1))
    if fmt.scale == "static":
        return FP32_MAX  # static formats bound elements by their calibrated range instead
    sel = scale_element(fmt.scale)
    smax = sel.max_normal if sel else FP32_MAX
    if fmt.zero_point:  # the zero point (>= -amax) and the scale (<= 2 amax / max_code) must fit
        slack = 1 + math.ldexp(1.0, -sel.mbits)
        return smax * min(1.0, e.max_code / (2 * slack * slack) * (1 - _ROUNDING))
    if fmt.tensor_scale:
        return FP32_MAX
    return min(FP32_MAX, smax * e.max_normal)


def error_bound(x: torch.Tensor, fmt, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound on |x - q(x)| (fp64, x's shape), valid for finite x with block amax <= max_amax.

    ``dtype``: the dtype decoded to (default: x's, as ``quantize_dequantize`` does). Static
    formats bound elements within their calibrated range (scale * max_normal); outliers are
    bounded by bf16 rounding.
    """
    fmt = as_format(fmt)
    if fmt.rotation:
        raise ValueError(
            f"error_bound: {fmt} is rotated (+h{fmt.rotation}), which this bound does not cover: the "
            "quantisation error is bounded per element of the rotated block, and the inverse transform "
            f"sums {fmt.rotation} of those errors into every decoded value (worst case "
            f"2^ceil(log2({fmt.rotation})/2) times the largest rotated error), plus its own fp32 roundings; "
            "bound the rotated coordinates "
            "(qformats.codec.rotate) with the unrotated format instead")
    dtype = dtype or x.dtype
    amax, keep = _block_amax(x, fmt)
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    out = torch.empty_like(x2)
    e = fmt.elem
    if fmt.scale == "static":
        s = torch.tensor(fmt.static_scales, dtype=torch.float32).to(torch.float64)
        qb = (fmt.relative_error_bound * (1 + _ROUNDING) + _ROUNDING) * s * e.max_normal + 2 * FP32_MIN_SUBNORMAL
        out[:, keep] = qb.expand_as(amax)
        size = (s * e.max_normal).expand_as(amax)
    else:
        step = scale_step(fmt)
        if fmt.tensor_scale:  # block scales are e4m3 values times the tensor scale (an fp32 product)
            tamax = amax.max().item() if amax.numel() else 0.0
            e4m3 = scale_element("e4m3")
            ts = max(tamax / (e.max_normal * e4m3.max_normal) * (1 + _ROUNDING), FP32_TINY)
            step = step * ts * (1 + _ROUNDING) + FP32_MIN_SUBNORMAL
        extra = 0.0 if fmt.scale == "e8m0" else (2 * _ROUNDING if fmt.zero_point else _ROUNDING)
        out[:, keep] = (fmt.relative_error_bound * (1 + _ROUNDING) + extra) * amax + abs_floor(fmt, step)
        size = amax
    out[:, ~keep] = x2[:, ~keep].abs() * 2.0**-8 + 2.0**-134  # bf16: half an ulp (2^-8 relative; 2^-134 subnormal)
    size_all = x2.abs()
    size_all[:, keep] = size
    rel, absolute = DTYPE_ROUNDING[dtype]
    out = out + rel * (size_all + out) + absolute  # |decoded| <= |x| + error, then its rounding to dtype
    return out.reshape(x.shape)
