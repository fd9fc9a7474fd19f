"""Properties every format guarantees, on adversarial hypothesis-drawn inputs."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qformats
from qformats.bounds import error_bound, max_amax

# rotated presets (+h) are excluded: these are properties of the unrotated coordinates (error bound,
# signed zeros, fixed points); tests/qformats/test_rotation.py covers rotation
NAMES = sorted(n for n, f in qformats.PRESETS.items() if not f.rotation)
EXTRA = ["fp8_e4m3/row/fp32", "int8/b16/bf16", "fp4_e2m1/b64/fp16", "uint3/b24/bf16+zp", "fp6_e3m2/b32/e4m3",
         "int4/b32/bf16", "fp4_e2m1/b32/e8m0+o[3,40]"]
FORMATS = NAMES + EXTRA


@st.composite
def adversarial(draw, fmt, allow_nonfinite=False):
    """Rows mixing ordinary data, outliers, exact ties, subnormals, zeros (+-0) and huge values."""
    f = qformats.Format.parse(fmt)
    rows = draw(st.integers(1, 3))
    width = draw(st.integers(1, 150))
    if f.outliers:
        width = max(width, f.outliers[-1] + 1)
    lim = min(max_amax(f) / 4, 1e37)
    kinds = st.sampled_from(["normal", "tie", "subnormal", "zero", "huge", "outlier", "pow2"])
    vals = []
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e20]))
    scale = min(scale, lim / 1e3)
    table = qformats.grid.code_table(f.elem).numpy()
    table = np.unique(table[np.isfinite(table)])
    for _ in range(rows * width):
        k = draw(kinds)
        s = draw(st.sampled_from([-1.0, 1.0]))
        if k == "normal":
            v = draw(st.floats(-4, 4)) * scale
        elif k == "tie":
            i = draw(st.integers(0, len(table) - 2))
            v = float((table[i] + table[i + 1]) / 2) * scale
        elif k == "subnormal":
            v = s * draw(st.floats(2.0**-149, 2.0**-127, width=32))
        elif k == "zero":
            v = s * 0.0
        elif k == "huge":
            v = s * draw(st.floats(lim / 1e3, lim))
        elif k == "outlier":
            v = s * scale * 1e3
        else:
            v = s * 2.0 ** draw(st.integers(-140, 100)) if scale > 1e-20 else s * scale
        vals.append(v)
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, width)
    x = torch.where(x.abs() > lim, torch.sign(x) * lim, x)
    if allow_nonfinite and draw(st.booleans()):
        i, j = draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))
        x[i, j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


def _q(x, fmt):
    return qformats.quantize_dequantize(x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_error_within_the_derived_bound(fmt, data):
    x = data.draw(adversarial(fmt))
    err = (_q(x, fmt).double() - x.double()).abs()
    bound = error_bound(x, fmt)
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst:g}"


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_idempotent_where_the_scale_allows_and_odd(fmt, data):
    x = data.draw(adversarial(fmt, allow_nonfinite=True))
    f = qformats.Format.parse(fmt)
    y = _q(x, fmt)
    if f.scale in ("e8m0", "static"):
        # power-of-two and fixed scales: q(x) re-derives the same scale. (Absmax scales are
        # re-derived from the rounded amax, so there only the error bound is promised.)
        assert torch.equal(_q(y, fmt).nan_to_num(7.0), y.nan_to_num(7.0)), "q(q(x)) != q(x)"
    if not f.zero_point:  # asymmetric formats are not odd by design
        assert torch.equal(_q(-x, fmt).nan_to_num(7.0), (-y).nan_to_num(7.0)), "q(-x) != -q(x)"


@pytest.mark.parametrize("fmt", [n for n in NAMES if qformats.PRESETS[n].scale == "e8m0"])
@given(data=st.data(), k=st.integers(-20, 20))
def test_e8m0_power_of_two_equivariance(fmt, data, k):
    x = data.draw(adversarial(fmt)).clamp(-1e30, 1e30)
    amax = x.abs().max().item()
    # stay inside the E8M0 range and away from fp32 subnormals for both x and 2^k x
    x = torch.where(x.abs() < 2.0**-100, 0.0, x) if amax > 0 else x
    y = _q(x * 2.0**k, fmt)
    assert torch.equal(y, _q(x, fmt) * 2.0**k)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_encode_decode_is_quantize_dequantize_and_round_trips_bytes(fmt, data, dtype):
    x = data.draw(adversarial(fmt, allow_nonfinite=True)).to(dtype)
    q = qformats.encode(x, fmt)
    assert q.data.dtype == torch.uint8 and q.data.is_contiguous() and q.data.dim() == 1
    assert q.data.numel() == qformats.Format.parse(fmt).nbytes(x.shape)
    y = qformats.decode(q)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.nan_to_num(7.0), qformats.quantize_dequantize(x, fmt).nan_to_num(7.0))
    q2 = qformats.QTensor.from_buffer(q.data.clone(), fmt, x.shape, dtype)
    assert torch.equal(qformats.decode(q2).nan_to_num(7.0), y.nan_to_num(7.0))
    f = qformats.Format.parse(fmt)
    if f.scale == "e8m0":  # OCP MX quantisation is idempotent: the decoded values re-encode to the same bytes
        assert torch.equal(qformats.encode(qformats.decode(q, torch.float32), fmt).data, q.data)


@given(fmt=st.sampled_from(FORMATS))
def test_parse_str_round_trip(fmt):
    f = qformats.Format.parse(fmt)
    assert qformats.Format.parse(str(f)) == f
    assert str(qformats.Format.parse(str(f))) == str(f)


@given(e=st.integers(1, 5), m=st.integers(0, 5), bs=st.integers(1, 512), scale=st.sampled_from(["e8m0", "fp32", "bf16", "fp16", "e4m3"]))
def test_grammar_round_trip_over_the_whole_space(e, m, bs, scale):
    s = f"fp{1 + e + m}_e{e}m{m}/b{bs * 8}/{scale}"
    if 1 + e + m > 8:  # codes pack into bytes: wider elements are refused by name, not at encode time
        with pytest.raises(ValueError, match="at most 8 bits"):
            qformats.Format.parse(s)
        return
    f = qformats.Format.parse(s)
    assert str(f) == s and qformats.Format.parse(str(f)) == f


@pytest.mark.parametrize("fmt", ["mxfp4", "int4_b32", "nvfp4", "flash_int4", "fp8_e4m3/b32/bf16"])
def test_nan_or_inf_poisons_only_its_block(fmt):
    f = qformats.Format.parse(fmt)
    x = torch.randn(2, f.block * 3)
    x[0, 1] = math.nan
    x[1, f.block + 2] = math.inf
    y = _q(x, fmt)
    assert torch.isnan(y[0, : f.block]).all() and torch.isnan(y[1, f.block : 2 * f.block]).all()
    assert torch.isfinite(y[0, f.block :]).all() and torch.isfinite(y[1, : f.block]).all()


def test_signed_zeros_keep_their_sign_with_float_elements():
    x = torch.tensor([[-0.0, 0.0, -1e-30, 1.0] + [0.0] * 28])
    for fmt in ("mxfp4", "mxfp8_e4m3", "fp4_e2m1/b32/bf16"):
        y = _q(x, fmt)
        assert torch.signbit(y[0, 0]) and not torch.signbit(y[0, 1]) and torch.signbit(y[0, 2])


def test_partial_block_is_zero_padded_and_cut():
    x = torch.randn(3, 45)
    full = torch.nn.functional.pad(x, (0, 19))
    assert torch.equal(_q(x, "mxfp4"), _q(full, "mxfp4")[:, :45])


def test_static_outlier_format_keeps_outliers_in_bf16_and_uses_fixed_scales():
    f = qformats.static_outlier_format("int4", outliers=(1, 5), scales=[0.5] * 6)
    assert f.features == 8 and qformats.Format.parse(str(f)) == f
    x = torch.tensor([[0.3, 1234.5678, -0.2, 10.0, 0.0, -999.0, math.nan, 0.26]])
    y = _q(x, f)
    assert y[0, 1] == torch.tensor(1234.5678).bfloat16().float() and y[0, 5] == -1000.0  # -999 in bf16
    assert y[0, 3] == 0.5 * 1.75  # saturates at the calibrated range
    assert torch.isnan(y[0, 6])  # NaN marker code, not a silent number
    assert y[0, 0] == 0.25 and y[0, 7] == 0.25
    # 6 quantised features pad to 8 codes (whole bytes for any width), then 2 bf16 outliers
    assert f.bits_per_value == pytest.approx((8 * 4 + 2 * 16) / 8)
