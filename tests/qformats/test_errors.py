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
        ("fp9_e5m3/b32/e8m0", "at most 8 bits"),
        ("fp11_e5m5/b32/fp32", "at most 8 bits"),
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


@pytest.mark.parametrize("spec,needle", [
    ("fp4_e2m1/b0/e8m0", "write row"),  # b0 is not a spelling of row
    ("fp4_e2m1/b000/e8m0", "write row"),
    ("fp4_e2m1/b\u0663\u0662/e8m0", "block"),  # Arabic-Indic digits: not b32
    ("fp\u0664_e2m1/b32/e8m0", "element"),
    ("fp4_e2m1/b32/e8m0+o[\u0663]", "option"),
    ("fp4_e2m1/b32/e8m0+o[1]+o[2]", "+o is given twice"),
    ("int4/row/static+s[3f800000]+s[40000000]", "+s is given twice"),
    ("uint4/b32/fp16+zp+zp", "+zp is given twice"),
    ("fp4_e2m1/b" + "1" * 5000 + "/e8m0", "block 'b111"),  # names the block, not Python's int limit
    ("fp4_e2m1/b32/e8m0+o[" + "9" * 5000 + "]", "option +'o[999"),
    ("fp" + "4" * 5000 + "_e2m1/b32/e8m0", "element 'fp444"),
])
def test_grammar_leniency_is_gone(spec, needle):
    with pytest.raises(ValueError) as ei:
        qformats.Format.parse(spec)
    assert needle in str(ei.value) and len(str(ei.value)) < 400, str(ei.value)[:400]


@pytest.mark.parametrize("arg", [["mxfp4"], {"mxfp4": 1}, None, b"mxfp4"])
def test_parse_rejects_unhashable_and_other_non_strings_with_one_error(arg):
    with pytest.raises(ValueError, match="format string is expected"):
        qformats.Format.parse(arg)


def test_whitespace_is_ignored_around_presets_and_specs_alike():
    assert qformats.Format.parse(" mxfp4\n") is qformats.PRESETS["mxfp4"]
    assert qformats.Format.parse("\tfp4_e2m1/b32/e8m0 ") == qformats.PRESETS["mxfp4"]
    assert qformats.as_format(" none ") is None


@pytest.mark.parametrize("kw,needle", [
    (dict(block=32.0), "block size must be an integer"),
    (dict(block=True), "block size must be an integer"),
    (dict(block=32, outliers=(1.5,)), "outlier index must be an integer"),
    (dict(block=32, outliers=("3",)), "outlier index must be an integer"),
    (dict(block=32, zero_point=1), "zero_point must be True or False"),
])
def test_constructor_checks_its_field_types(kw, needle):
    with pytest.raises(ValueError, match=needle):
        qformats.Format(qformats.Element("float", 4, 2, 1), scale="e8m0", **kw)
    with pytest.raises(ValueError, match="must be an integer"):
        qformats.Element("float", 4.0, 2, 1)


def test_constructor_normalises_integer_like_fields_and_static_scales():
    import numpy as np

    f = qformats.Format(qformats.Element("float", 4, 2, 1), np.int64(32), "e8m0", outliers=(np.int32(3),))
    assert f == qformats.Format.parse("fp4_e2m1/b32/e8m0+o[3]") and type(f.block) is int
    g = qformats.Format(qformats.Element("int", 4), 0, "static", static_scales=(0.1,))  # kept as its fp32 value
    assert qformats.Format.parse(str(g)) == g
    with pytest.raises(ValueError, match="finite and positive"):
        qformats.Format(qformats.Element("int", 4), 0, "static", static_scales=(1e39,))


@pytest.mark.parametrize("shape,needle", [((-4, -64), "non-negative"), ((4, -64), "non-negative"),
                                          ((4.5, 64), "integers"), (("4", 64), "integers")])
def test_negative_and_non_integer_shapes_are_rejected(shape, needle):
    f = qformats.Format.parse("mxfp4")
    with pytest.raises(ValueError, match=needle):
        f.nbytes(shape)
    with pytest.raises(ValueError, match=needle):
        qformats.QTensor.from_buffer(torch.zeros(136, dtype=torch.uint8), f, shape)
    assert f.nbytes(torch.Size([4, 64])) == 136
