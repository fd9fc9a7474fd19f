"""Human-readable descriptions of formats (the ``qformats formats`` / ``inspect`` output)."""
from .spec import PRESETS
from .spec import Format


def format_table() -> str:
    """One line per preset: canonical string, bits/value, compression vs bf16, max normal, error bound."""
    head = f"{'preset':<17} {'format':<24} {'bits/val':>8} {'vs bf16':>8} {'max normal':>11} {'rel. err':>9}"
    lines = [head, "-" * len(head)]
    for name, f in PRESETS.items():
        lines.append(
            f"{name:<17} {str(f):<24} {f.bits_per_value:>8.3f} {f.compression_ratio:>7.2f}x "
            f"{f.elem.max_normal:>11.6g} {f.relative_error_bound:>9.4g}"
        )
    lines.append("rel. err: largest |x - q(x)| over the block's absolute maximum (see Format.relative_error_bound);"
                 " +h formats: in the rotated coordinates")
    return "\n".join(lines)


def explain(spec: str) -> str:
    """A paragraph on one format: what it stores and what it costs."""
    f = Format.parse(spec)
    e = f.elem
    lines = [f"format      {f}"]
    if e.kind == "float":
        lines.append(
            f"element     float e{e.ebits}m{e.mbits} ({e.bits} bits, {e.policy}): bias {e.bias}, emax {e.emax}, "
            f"emin {e.emin}, max normal {e.max_normal:g}, min subnormal {e.min_subnormal:g}"
        )
    elif e.kind == "int":
        lines.append(
            f"element     MX int{e.bits}: codes +-{e.max_code} times 2^{e.grid_exponent}, max {e.max_normal:g}"
        )
    else:
        lines.append(f"element     uint{e.bits}: codes 0..{e.max_code}, with a zero point")
    blk = "the whole row" if f.block == 0 else f"{f.block} values"
    lines.append(f"block       {blk}; scale {f.scale}" + (" + zero point" if f.zero_point else "")
                 + (" + fp32 per-tensor scale" if f.tensor_scale else ""))
    if f.rotation:
        lines.append(f"rotation    Walsh-Hadamard over each run of {f.rotation} quantised features before encoding, "
                     "inverted after decoding (qformats.codec.rotate); no extra bytes")
    if f.outliers:
        lines.append(f"outliers    {len(f.outliers)} features in bf16")
    lines.append(f"bits/value  {f.bits_per_value:.4f} (compression {f.compression_ratio:.2f}x vs bf16)")
    lines.append(f"error bound {f.relative_error_bound:.4g} x block amax"
                 + (" (in the rotated coordinates)" if f.rotation else ""))
    lay = f.layout((1, 8192 if not f.features else f.features))
    lines.append(f"wire bytes  {lay.total} per row of {lay.width} (codes {lay.code_bytes}, scales {lay.scale_bytes}"
                 f", zero points {lay.zp_bytes}, outliers {lay.out_bytes})")
    return "\n".join(lines)
