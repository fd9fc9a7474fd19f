"""Per-element error bounds derived from the spec, for tests and for users sizing a format.

``error_bound(x, fmt)`` gives, for every element of ``x``, an upper bound on
``|x - quantize_dequantize(x, fmt)|`` from the block's absolute maximum and the format's
derived constants only (no call into the codec), so tests can hold the codec to it.
"""
import math

import torch

from .spec import Format, as_format, scale_element


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


def abs_floor(fmt: Format) -> float:
    """Error allowed regardless of amax: half the smallest step the smallest scale gives."""
    e = fmt.elem
    if fmt.scale == "e8m0":
        return math.ldexp(e.min_subnormal, -127) / 2
    sel = scale_element(fmt.scale)
    tiny = sel.min_subnormal if sel else 2.0**-149
    if fmt.tensor_scale:
        tiny *= 2.0**-126
    step = tiny * (1.0 if fmt.zero_point else e.min_subnormal)
    return step  # half a step of the smallest scale, plus fp32 rounding of a subnormal scale


def max_amax(fmt: Format) -> float:
    """Largest block amax for which ``error_bound`` holds (the scale type's range)."""
    e = fmt.elem
    if fmt.scale == "e8m0":
        return math.ldexp(1.0, 127 + e.emax + 1)
    if fmt.zero_point:  # the zero point (the block min) must itself be representable
        return scale_element(fmt.scale).max_normal
    if fmt.scale in ("fp16", "e4m3") and not fmt.tensor_scale:
        return scale_element(fmt.scale).max_normal * e.max_normal
    return 3.0e38


def error_bound(x: torch.Tensor, fmt) -> torch.Tensor:
    """Elementwise bound on |x - q(x)| (fp64, x's shape), valid for finite x with block amax <= max_amax.

    Static formats bound elements within their calibrated range (scale * max_normal); outliers
    are bounded by bf16 rounding.
    """
    fmt = as_format(fmt)
    amax, keep = _block_amax(x, fmt)
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    out = torch.empty_like(x2)
    if fmt.scale == "static":
        s = torch.tensor(fmt.static_scales, dtype=torch.float64)
        qb = fmt.relative_error_bound * s * fmt.elem.max_normal * (1 + 2.0**-22)
        out[:, keep] = qb.expand_as(amax)
    else:
        floor = abs_floor(fmt)
        if fmt.tensor_scale:  # the smallest block scale is e4m3's min subnormal times the tensor scale
            tamax = amax.max().item() if amax.numel() else 0.0
            e4m3 = scale_element("e4m3")
            floor = max(floor, e4m3.min_subnormal * tamax / (fmt.elem.max_normal * e4m3.max_normal) * fmt.elem.min_subnormal)
        out[:, keep] = fmt.relative_error_bound * amax * (1 + 2.0**-20) + floor
    out[:, ~keep] = x2[:, ~keep].abs() * 2.0**-8 + 2.0**-134  # bf16: half an ulp (2^-8 relative; 2^-134 subnormal)
    return out.reshape(x.shape)
