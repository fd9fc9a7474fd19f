"""Exhaustive code tables for every element type of <= 8 bits, and casts against ml_dtypes."""
import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import qformats
from qformats import grid
from qformats.spec import Element

FLOATS = [Element.parse(f"fp{1 + e + m}_e{e}m{m}") for e in range(1, 6) for m in range(0, 6) if 1 + e + m <= 8]
FLOATS += [Element.parse("fp8_e4m3ieee"), Element.parse("fp8_e5m2fin")]
INTS = [Element("int", n) for n in range(2, 9)] + [Element("uint", n) for n in range(1, 9)]
ALL = FLOATS + INTS


def _spec_value(code: int, el: Element) -> float:
    """The value a code stands for, written straight from the definition (no shared code)."""
    if el.kind == "uint":
        return float(code)
    if el.kind == "int":
        n = code - (1 << el.bits) if code >= 1 << (el.bits - 1) else code
        return math.nan if n == -(1 << (el.bits - 1)) else n * 2.0 ** -(el.bits - 2)
    s = -1.0 if code >> (el.bits - 1) else 1.0
    f = (code >> el.mbits) & ((1 << el.ebits) - 1)
    m = code & ((1 << el.mbits) - 1)
    bias = 2 ** (el.ebits - 1) - 1
    top = 2**el.ebits - 1
    if el.policy == "ieee" and f == top:
        return s * math.inf if m == 0 else math.nan
    if el.policy == "fn" and f == top and m == 2**el.mbits - 1:
        return math.nan
    if f == 0:
        return s * m * 2.0 ** (1 - bias - el.mbits)
    return s * (1 + m / 2**el.mbits) * 2.0 ** (f - bias)


@pytest.mark.parametrize("el", ALL, ids=str)
def test_every_code_decodes_to_its_spec_value(el):
    table = grid.code_table(el).numpy()
    want = np.array([_spec_value(c, el) for c in range(1 << el.bits)])
    np.testing.assert_array_equal(table, want)
    finite = table[np.isfinite(table)]
    assert finite.max() == el.max_normal
    if el.kind == "float":
        assert finite[finite > 0].min() == el.min_subnormal


@pytest.mark.parametrize("el", ALL, ids=str)
def test_every_value_encodes_back_exactly(el):
    """Round every representable value (scaled by E8M0 powers) and get it back, with its code."""
    table = grid.code_table(el)
    codes = torch.arange(1 << el.bits)
    ok = torch.isfinite(table)
    if el.kind == "float":  # -0 and +0 are different codes; both must survive
        np.testing.assert_array_equal(grid.to_codes(table[ok], el).numpy(), codes[ok].numpy())
    else:
        back = grid.to_codes(table[ok], el)
        np.testing.assert_array_equal(grid.from_codes(back, el).numpy(), table[ok].numpy())
    np.testing.assert_array_equal(grid.round_to_grid(table[ok], el).numpy(), table[ok].numpy())


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "int4_b32", "mxint8"])
def test_representable_values_times_every_sampled_scale_are_fixed_points(name):
    fmt = qformats.PRESETS[name]
    el = fmt.elem
    table = grid.code_table(el)
    vals = table[torch.isfinite(table)].to(torch.float32)
    block = fmt.block
    for k in (-126, -100, -30, -1, 0, 1, 7, 60, 127 - el.emax - 1):
        anchor = torch.tensor([el.max_normal], dtype=torch.float32)  # fixes the block scale at 2^k
        x = torch.cat([anchor, vals]) * 2.0**k
        n = -(-x.numel() // block) * block
        xb = torch.cat([anchor.expand(n - x.numel()) * 2.0**k, x]).reshape(-1, block)
        xb[:, 0] = el.max_normal * 2.0**k
        y = qformats.quantize_dequantize(xb, fmt)
        finite = torch.isfinite(xb)
        assert torch.equal(y[finite], xb[finite]), f"scale 2^{k}"


ML = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


@pytest.mark.parametrize("name", list(ML))
def test_element_cast_agrees_with_ml_dtypes(name):
    """Element rounding (RNE) = ml_dtypes' cast, except that we saturate where ml_dtypes overflows."""
    el = Element.parse(name)
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000) * el.max_normal / 3,
        rng.uniform(-2 * el.min_subnormal, 2 * el.min_subnormal, 5000),
        np.frombuffer(rng.bytes(4 * 5000), np.float32).astype(np.float64),
    ]).astype(np.float32)
    x = x[np.isfinite(x)]
    # all midpoints between neighbouring representable values: the ties
    t = grid.code_table(el).numpy()
    t = np.unique(t[np.isfinite(t)])
    x = np.concatenate([x, ((t[1:] + t[:-1]) / 2).astype(np.float32), t.astype(np.float32)])
    ours = grid.round_to_grid(torch.from_numpy(x).double(), el).numpy()
    theirs = x.astype(ML[name]).astype(np.float64)
    inside = np.abs(x) <= el.max_normal
    np.testing.assert_array_equal(ours[inside], theirs[inside])
    assert np.all(np.abs(ours[~inside]) == el.max_normal)  # we saturate (OCP MX); ml_dtypes may give NaN/Inf
    theirs_sat = np.clip(x, -el.max_normal, el.max_normal).astype(ML[name]).astype(np.float64)
    np.testing.assert_array_equal(ours, theirs_sat)


@pytest.mark.parametrize("scale,dtype", [("bf16", ml_dtypes.bfloat16), ("fp16", np.float16), ("e4m3", ml_dtypes.float8_e4m3fn)])
def test_scale_types_round_up_onto_their_grid(scale, dtype):
    """Absmax scales round up (toward +inf) onto the scale type; ml_dtypes gives the neighbours."""
    from qformats.spec import scale_element

    el = scale_element(scale)
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal(20000).astype(np.float32)) * np.float32(min(el.max_normal, 1e4) / 4)
    up = grid.round_to_grid(torch.from_numpy(x).double(), el, grid.UP).numpy()
    near = x.astype(dtype).astype(np.float64)
    assert np.all(up >= x)
    # up is either the RNE value (when that is >= x) or the next representable value above it
    assert np.all((up == near) | (near < x))
    assert np.all(up.astype(dtype).astype(np.float64) == up)


def test_packing_layouts_match_the_documented_bit_order():
    from qformats import packing

    assert packing.pack(torch.tensor([1, 2]), 4).tolist() == [0x21]  # element 2i in the low nibble
    # other widths: power-of-two bit planes, low bits first (wire version 2)
    assert packing.pack(torch.tensor([7, 0, 0, 0, 0, 0, 0, 1]), 3).tolist() == [0x03, 0x40, 0x01]
    assert packing.pack(torch.tensor([0x3F, 0, 0, 0x21]), 6).tolist() == [0x0F, 0x10, 0x83]
    assert packing.pack(torch.tensor([0x1F, 0, 0, 0, 0, 0, 0, 0x10]), 5).tolist() == [0x0F, 0, 0, 0, 0x81]
    assert packing.pack(torch.tensor([0x7F, 0, 0, 0, 0, 0, 0, 0x40]), 7).tolist() == [0x0F, 0, 0, 0, 0x03, 0, 0x81]
    assert packing.WIRE_VERSION == 3  # 3: the same bit planes, absmax elements scaled by a reciprocal


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    from qformats import packing

    g = torch.Generator().manual_seed(bits)
    for n in (packing.group_size(bits), 8 * 37):
        c = torch.randint(0, 1 << bits, (n,), generator=g)
        p = packing.pack(c, bits)
        assert p.dtype == torch.uint8 and p.numel() == n * bits // 8
        assert torch.equal(packing.unpack(p, bits, n), c)
