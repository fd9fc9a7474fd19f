"""Bad inputs: every error path gives a clear error naming the bad part, never a wrong answer."""
import pytest
import torch

import qformats


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("fp4_e2m1/b33/e8m0", "multiples of 8"),
        ("fp4_e2m1/b8192/e8m0", "multiples of 8"),
        ("fp4_e2m1/32/e8m0", "block '32'"),
        ("fp9_e6m2/b32/e8m0", "1<=E<=5"),
        ("fp5_e2m1/b32/e8m0", "1 + E + M"),
        ("int9/b32/e8m0", "2..8"),
        ("int4/b32/e5m2", "scale 'e5m2'"),
        ("uint4/b32/fp16", "needs a zero point"),
        ("int4/b32/fp16+zp", "+zp is for uint"),
        ("uint4/b32/fp32+zp", "16-bit scale"),
        ("uint4/b32/e8m0+zp", "16-bit scale"),
        ("fp4_e2m1/b32/bf16+ts", "+ts"),
        ("int4/row/static", "per-feature scales"),
        ("int4/b32/static+s[3f800000]", "'row'"),
        ("fp4_e2m1/row/static+s[3f800000]", "int elements"),
        ("int4/b32/e8m0+s[3f800000]", "needs scale 'static'"),
        ("fp4_e2m1/b32/e8m0+o[5,3]", "increasing"),
        ("fp4_e2m1/b32/e8m0+foo", "option +foo"),
        ("fp4_e2m1/b32", "ELEMENT/BLOCK/SCALE"),
        ("mxfp5", "preset name"),
        ("nonsense/b32/e8m0", "element 'nonsense'"),
    ],
)
def test_bad_strings_name_the_bad_part(spec, needle):
    with pytest.raises(ValueError, match=None) as ei:
        qformats.Format.parse(spec)
    assert needle in str(ei.value), str(ei.value)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError):
        qformats.Format.parse(32)


@pytest.mark.parametrize("x,err", [
    (torch.zeros(4, 32, dtype=torch.float64), TypeError),
    (torch.zeros(4, 32, dtype=torch.int32), TypeError),
    (torch.zeros(0, 32), ValueError),
    (torch.tensor(1.0), ValueError),
    ([1.0, 2.0], TypeError),
])
def test_bad_tensors(x, err):
    with pytest.raises(err):
        qformats.encode(x, "mxfp4")


def test_none_format_is_rejected_by_the_codec():
    with pytest.raises(ValueError, match="format is required"):
        qformats.encode(torch.zeros(2, 32), None)


def test_non_contiguous_input_is_handled_correctly():
    x = torch.randn(64, 48)
    assert torch.equal(qformats.quantize_dequantize(x.t(), "mxfp4"), qformats.quantize_dequantize(x.t().contiguous(), "mxfp4"))


def test_wrong_buffer_sizes_and_types_are_rejected():
    q = qformats.encode(torch.randn(4, 64), "mxfp4")
    with pytest.raises(ValueError, match="needs 136 bytes"):
        qformats.QTensor.from_buffer(q.data[:-1], "mxfp4", (4, 64))
    with pytest.raises(ValueError, match="uint8"):
        qformats.QTensor.from_buffer(q.data.view(torch.int8), "mxfp4", (4, 64))
    with pytest.raises(TypeError, match="QTensor"):
        qformats.decode(q.data)
    with pytest.raises(TypeError, match="cannot decode"):
        qformats.decode(q, torch.int8)


def test_static_formats_check_the_row_length_and_outlier_range():
    f = qformats.static_outlier_format("int4", outliers=(2,), scales=[1.0] * 7)
    with pytest.raises(ValueError, match="calibrated for rows of 8"):
        qformats.encode(torch.zeros(2, 16), f)
    with pytest.raises(ValueError, match="out of range"):
        qformats.encode(torch.zeros(2, 4), "fp4_e2m1/b32/e8m0+o[7]")
    with pytest.raises(ValueError, match="finite and positive"):
        qformats.static_outlier_format("int4", (), [0.0])


def test_as_format():
    assert qformats.as_format(None) is None and qformats.as_format("bf16") is None
    assert qformats.as_format("mxfp4") is qformats.PRESETS["mxfp4"]
    with pytest.raises(ValueError):
        qformats.as_format(3.0)
