"""The error bound and finiteness over the whole grammar: formats drawn from the grammar (not
only presets), inputs across the full exponent range of each input dtype (subnormals, scales
in their type's subnormal range, block maxima up to ``max_amax``), and the cases of issue 14."""
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qformats
from qformats.bounds import error_bound, max_amax
from qformats.grid import code_table

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXP_LO = {torch.float32: -149, torch.bfloat16: -133, torch.float16: -24}  # smallest subnormal's exponent


@st.composite
def grammar_formats(draw, static=True):
    """A canonical string of any shape the grammar accepts (small blocks keep tests cheap)."""
    kind = draw(st.sampled_from(["float", "int", "uint"] + (["static"] if static else [])))
    block = draw(st.sampled_from(["row"] + [f"b{8 * k}" for k in (1, 2, 3, 4, 5, 8, 16, 32)]))
    if kind == "float":
        e = draw(st.integers(1, 5))
        m = draw(st.integers(0, min(5, 7 - e)))  # codes of at most 8 bits
        policies = ["fin"] + (["ieee"] if e >= 2 else []) + (["fn"] if m >= 1 else [])
        elem = f"fp{1 + e + m}_e{e}m{m}{draw(st.sampled_from(policies))}"
    else:
        elem = f"{'u' if kind == 'uint' else ''}int{draw(st.integers(1 if kind == 'uint' else 2, 8))}"
    if kind == "uint":
        spec = f"{elem}/{block}/{draw(st.sampled_from(['bf16', 'fp16']))}+zp"
    elif kind == "static":
        n = draw(st.integers(1, 40))
        scales = [draw(st.sampled_from([2.0**-149, 1e-40, 2.0**-126, 3e-30, 1e-3, 0.37, 1.0, 5e4, 1e30, 2.0**120]))
                  for _ in range(n)]
        spec = f"{elem}/row/static+s[" + "".join(struct.pack(">f", v).hex() for v in scales) + "]"
    else:
        scale = draw(st.sampled_from(["e8m0", "fp32", "bf16", "fp16", "e4m3"]))
        spec = f"{elem}/{block}/{scale}" + ("+ts" if scale == "e4m3" and draw(st.booleans()) else "")
    if draw(st.booleans()) and kind != "static":
        idx = sorted(set(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))))
        spec += "+o[" + ",".join(map(str, idx)) + "]"
    f = qformats.Format.parse(spec)
    assert qformats.Format.parse(str(f)) == f
    return f


def wide_input(f, rows: int, width: int, dtype: torch.dtype, seed: int, limit: float | None = None) -> torch.Tensor:
    """Finite values, each block at its own binade anywhere from the dtype's smallest subnormal
    to ``limit`` (default: the bound's domain, ``max_amax``): Gaussians, element grid points and
    midpoints between them (ties), the limit itself, dtype subnormals, +-0. Static formats:
    inside each feature's calibrated range instead."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    fi = torch.finfo(dtype)
    lim = min(max_amax(f) if limit is None else limit, float(fi.max))
    table = code_table(f.elem)
    grid = table[torch.isfinite(table)].abs().unique()
    mids = (grid[1:] + grid[:-1]) / 2 if grid.numel() > 1 else grid
    top = float(grid[-1])

    def pick(vals):
        return vals[torch.randint(len(vals), (rows, width), generator=g)]

    kind = torch.randint(0, 8, (rows, width), generator=g)
    u = torch.randn(rows, width, generator=g, dtype=f64) / 3
    u = torch.where(kind == 2, pick(mids) / top, u)
    u = torch.where(kind == 3, pick(grid) / top, u)
    u = torch.where(kind == 4, 1.0, u)
    sign = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0).to(f64)
    sign[: rows // 2] = 1.0  # non-negative rows: zero points at +0
    if f.scale == "static":
        keep = [j for j in range(width) if j not in f.outliers]
        rng = torch.ones(width, dtype=f64) * 1e3
        rng[keep] = torch.tensor(f.static_scales, dtype=torch.float32).to(f64) * f.elem.max_normal
        x = u.clamp(-1, 1) * rng.clamp(max=float(fi.max))
    else:
        bs = f.block_for(width) if not f.outliers else 8
        hi = math.frexp(lim)[1]
        k = torch.randint(_EXP_LO[dtype] - 1, hi + 1, (rows, -(-width // bs)), generator=g)
        k = k.repeat_interleave(bs, 1)[:, :width].to(f64)
        x = (u * torch.ldexp(torch.ones_like(u), k)).clamp(-lim, lim)
        x = torch.where(kind == 5, lim, x)
    r = torch.rand(rows, width, generator=g)
    sub = torch.ldexp(torch.randint(1, 64, (rows, width), generator=g).to(f64), torch.tensor(float(_EXP_LO[dtype]), dtype=f64))
    x = torch.where(r < 0.05, sub, x)
    x = torch.where((r >= 0.05) & (r < 0.08), 0.0, x) * sign
    if f.scale == "static":
        x = torch.maximum(torch.minimum(x, rng), -rng)
    x = x.to(dtype)
    over = x.double().abs() > lim  # the cast may round past the limit
    return torch.where(over, x * 0.5, x)


def _fit_width(f, width: int) -> int:
    if f.features is not None:
        return f.features
    return max(width, f.outliers[-1] + 1) if f.outliers else width


def _worst(x, f, dtype=None):
    q = qformats.decode(qformats.encode(x, f), dtype or x.dtype)
    err = (q.double() - x.double()).abs()
    return (err / error_bound(x, f, dtype or x.dtype)).max().item()


@settings(max_examples=150)
@given(f=grammar_formats(), rows=st.integers(1, 3), width=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_error_bound_holds_for_grammar_drawn_formats_over_the_whole_range(f, rows, width, dtype, seed):
    x = wide_input(f, rows, _fit_width(f, width), dtype, seed)
    assert torch.isfinite(x).all()
    worst = _worst(x, f)
    assert worst <= 1.0, f"{f} {dtype}: error is {worst:.4g} x the bound"


@settings(max_examples=100)
@given(f=grammar_formats(), rows=st.integers(1, 3), width=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       out=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_finite_inputs_decode_finite_to_every_dtype(f, rows, width, dtype, out, seed):
    """Anywhere in the dtype's range (past ``max_amax`` too), decoded to any dtype."""
    x = wide_input(f, rows, _fit_width(f, width), dtype, seed, limit=float(torch.finfo(dtype).max))
    y = qformats.decode(qformats.encode(x, f), out)
    assert torch.isfinite(y).all(), f"{f}: {dtype} -> {out} gives {y[~torch.isfinite(y)][:4].tolist()}"


@settings(max_examples=60)
@given(f=grammar_formats(static=False), e=st.integers(-149, -100), dtype=st.sampled_from(DTYPES))
def test_non_zero_blocks_never_get_a_zero_scale(f, e, dtype):
    if f.scale == "e8m0":
        return  # E8M0 has no zero scale: the smallest is 2^-127
    width = _fit_width(f, 16)
    x = torch.full((2, width), math.ldexp(1.0, max(e, _EXP_LO[dtype])), dtype=dtype)
    x[:, ::2] *= 2  # a range in every block (a constant block's zero point alone is exact)
    x[1] *= -1
    q = qformats.encode(x, f)
    lay = f.layout(x.shape)
    a, b = lay.offsets["scale"]
    words = q.data[a:b].reshape(lay.rows * lay.nblocks, -1)
    assert (words != 0).any(-1).all(), f"{f}: a zero scale word for a non-zero block"


# ---- the cases of issue 14, exactly as reported -------------------------------------------------
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


@pytest.mark.parametrize("fmt,value,dtype", [
    ("fp4_e2m1/b32/fp16", 65504.0, torch.float16),
    ("int8/b32/fp16", 65504.0, torch.float16),
    ("int4/row/fp16", 65504.0, torch.float16),
    ("fp8_e5m2/b32/fp16", 65504.0, torch.float16),
    ("int4/b32/bf16", _BF16_MAX, torch.bfloat16),
    ("int8/b32/bf16", _BF16_MAX, torch.bfloat16),
    ("fp8_e4m3/b32/bf16", _BF16_MAX, torch.bfloat16),
    ("fp4_e2m1/b32/e8m0+o[0]", 3.4e38, torch.float32),  # an outlier past bf16's max
    ("fp4_e2m1/b32/e8m0+o[0]", 65504.0, torch.float16),  # bf16(65504) = 65536 > fp16's max
])
def test_dtype_max_decodes_finite(fmt, value, dtype):
    x = torch.full((2, 32), value, dtype=dtype)
    x[1] *= -1
    y = qformats.quantize_dequantize(x, fmt)
    assert torch.isfinite(y).all(), y[:, 0]
    assert _worst(x, fmt) <= 1.0


def test_zero_point_difference_past_fp32_max_decodes_finite_and_in_bound():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 3e38, -3e38
    f = "uint8/b32/bf16+zp"
    assert 3e38 <= max_amax(qformats.Format.parse(f))
    y = qformats.quantize_dequantize(x, f)
    assert torch.isfinite(y).all(), y[0, :2]
    assert _worst(x, f) <= 1.0


def test_decoding_saturates_only_finite_products():
    """Foreign bytes: an E8M0 scale of 2^127 times 6 saturates; an Inf element code (e5m2)
    stays Inf and a NaN block stays NaN."""
    f = qformats.Format.parse("fp8_e5m2/b32/e8m0")
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[0], codes[1], codes[2] = 0x7B, 0x7C, 0xFB  # 57344, +Inf, -57344
    y = qformats.decode(qformats.QTensor.from_buffer(torch.cat([codes, torch.tensor([254], dtype=torch.uint8)]), f, (1, 32)))
    assert y[0, 0] == torch.finfo(torch.float32).max and y[0, 1] == math.inf and y[0, 2] == -torch.finfo(torch.float32).max
    nan_block = torch.cat([codes, torch.tensor([255], dtype=torch.uint8)])
    assert torch.isnan(qformats.decode(qformats.QTensor.from_buffer(nan_block, f, (1, 32)))).all()


@pytest.mark.parametrize("fmt,x", [
    ("fp8_e4m3/b32/fp32", torch.full((1, 32), 1e-44)),  # amax / max_normal underflows fp32
    ("fp8_e4m3/b32/e4m3", torch.randn(256, 32, generator=torch.Generator().manual_seed(0))),  # e4m3 subnormal scales
    ("fp8_e5m2/b32/fp16", torch.randn(256, 32, generator=torch.Generator().manual_seed(0)) * 1e-5),
    ("fp4_e2m1/b32/fp16", torch.randn(256, 32, generator=torch.Generator().manual_seed(0)) * 1e-6),
    ("fp4_e2m1/b32/fp32", torch.full((1, 32), 1.4e-45)),
])
def test_issue_cases_are_within_the_bound(fmt, x):
    assert _worst(x, fmt) <= 1.0


@pytest.mark.parametrize("fmt", ["fp4_e2m1/b32/fp16", "fp4_e2m1/b32/bf16", "fp4_e2m1/b32/e4m3", "fp4_e2m1/b32/fp32",
                                 "nvfp4", "uint4/b32/fp16+zp"])
def test_the_smallest_input_gets_the_smallest_scale_not_zero(fmt):
    f = qformats.Format.parse(fmt)
    x = torch.full((1, 32), 1.4e-45)
    q = qformats.encode(x, f)
    lay = f.layout(x.shape)
    a, b = lay.offsets["scale"]
    words = q.data[a:b].reshape(lay.nblocks, -1).tolist()
    assert all(int.from_bytes(bytes(w), "little") == 1 for w in words), words  # the type's smallest step


def test_absmax_elements_are_x_times_the_rounded_reciprocal():
    """Wire version 3: an absmax block's elements are x times fp32(1 / scale), not x / scale.
    Block max 20193/8192 gives int8/b32/bf16 (max normal 127/64) the scale 159/128, exact in
    bf16; x = 0.06793212890625 is 3.5 steps of scale/64, a tie that x / scale rounds to the even
    code 4, but x * fp32(1 / scale) lies just below it: code 3."""
    from qformats.codec import times_reciprocal

    scale = 159 / 128
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 20193 / 8192, 0.06793212890625
    out = qformats.quantize_dequantize(x, "int8/b32/bf16")
    assert out[0, 0].item() == 127 * scale / 64
    assert out[0, 1].item() == 3 * scale / 64  # x / scale would give code 4
    q = times_reciprocal(torch.tensor([0.06793212890625, -0.0, 0.0]), torch.tensor(scale))
    assert q[0].item() * 64 < 3.5 == 0.06793212890625 / scale * 64
    assert torch.equal(torch.signbit(q[1:]), torch.tensor([True, False]))
    # extreme scales: brought into range by 2^+-64 before the reciprocal (a plain 1 / 2^-140 is inf)
    tiny, huge = torch.tensor(2.0**-140), torch.tensor(2.0**120)
    assert times_reciprocal(torch.tensor([2.0**-138]), tiny).item() == 4.0
    assert times_reciprocal(torch.tensor([2.0**122]), huge).item() == 4.0


@settings(max_examples=300, deadline=None)
@given(xb=st.integers(0, 0x7F7FFFFF), sb=st.integers(1, 0x7F7FFFFF), neg=st.booleans())
def test_times_reciprocal_is_within_two_roundings_of_the_quotient(xb, sb, neg):
    """The promise behind wire version 3, over the whole fp32 range (subnormal and huge scales
    included): x times the block's reciprocal is finite where x / scale is, keeps x's sign (zeros
    too), and lies within 2^-23 relative of the exact quotient where that is a normal fp32
    (two roundings of 2^-24 each); the pre-scaling by 2^+-64 is what keeps extreme scales in."""
    from qformats.codec import times_reciprocal

    x = torch.tensor([xb], dtype=torch.int32).view(torch.float32) * (-1.0 if neg else 1.0)
    s = torch.tensor([sb], dtype=torch.int32).view(torch.float32)
    q = times_reciprocal(x, s)
    exact = x.double() / s.double()
    assert torch.signbit(q).item() == torch.signbit(x).item()
    if abs(exact.item()) <= 3.0e38:
        assert torch.isfinite(q).item()
    if 2.0**-126 <= abs(exact.item()) <= 3.0e38:
        assert abs(q.double().item() - exact.item()) <= 2.0**-23 * abs(exact.item())
