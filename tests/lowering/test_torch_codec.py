"""lowering.torch_codec against the reference codec, bit for bit, for every preset and for
the outlier / static formats of ``tp.model.calibrate``.

Comparisons are exact: wire buffers byte for byte; decoded tensors on their integer bit
patterns, so -0 != +0 and NaN payloads and signs count (the fast codec runs on the same CPU
as the reference, so unlike the GPU kernels it has no excuse for a different NaN).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qformats
from lowering import torch_codec
from lowering.torch_codec import TorchCodec
from qformats import Element, Format, QTensor
from qformats.grid import code_table
from lowering.codec import ReferenceCodec
from tp.comm.emulate import emulate_all_reduce

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BITS = {4: torch.int32, 2: torch.int16}


def _calibrated_format() -> Format:
    """An outlier-aware static int4 format as ``tp.model.calibrate`` builds one (k = 2 of 128)."""
    from tp.model.calibrate import Calibrator

    g = torch.Generator().manual_seed(5)
    c = Calibrator()
    for r in range(2):
        part = torch.randn(16, 128, generator=g) * torch.logspace(-3, 2, 128)
        part[:, 0] = 0.0  # a feature that never moved: gets the smallest scale
        c.observe("site", r, part)
    return c.finish().format("site")


OUTLIER_FORMATS = [
    _calibrated_format(),
    qformats.static_outlier_format("int4", (1, 5), [0.5, 1e-3, 3.0, 2.0**-140, 7.0, 1e30]),
    qformats.static_outlier_format("int8", (), [0.25] * 20),
    Format.parse("fp4_e2m1/b32/e8m0+o[3,40]"),
    Format.parse("int4/b16/bf16+o[0,9,10]"),
    Format.parse("uint4/b24/fp16+zp+o[2]"),
    Format.parse("fp4_e2m1/b16/e4m3+ts+o[7]"),
]
EXTRA_FORMATS = ["fp8_e4m3/row/fp32", "int8/b16/bf16", "fp4_e2m1/b64/fp16", "uint3/b24/bf16+zp",
                 "fp6_e3m2/b32/e4m3", "fp5_e3m1ieee/b8/e4m3+ts", "int2/b64/e4m3", "uint7/b8/bf16+zp",
                 "fp2_e1m0/b8/e8m0", "fp8_e5m2/b128/fp32"]

def _id(f) -> str:
    """A preset's name, else the canonical string (static scales cut short)."""
    names = [n for n, p in sorted(qformats.PRESETS.items()) if p == f]
    s = names[0] if names else str(f)
    return s if len(s) < 50 else s[:40] + "..."


# every distinct preset (mxfp4 and fp4_b32 are one format), other element/scale pairs, outliers
FORMATS = list(dict.fromkeys([qformats.PRESETS[n] for n in sorted(qformats.PRESETS)]
                             + [Format.parse(s) for s in EXTRA_FORMATS] + OUTLIER_FORMATS))


def adversarial(f: Format, rows: int, width: int, dtype: torch.dtype, seed: int, nonfinite: bool) -> torch.Tensor:
    """Rows whose blocks each sit at a random binade 2^k of the input dtype's range, holding
    normals, exact ties between grid points and grid points themselves (times 2^k, with a
    max-normal anchor so E8M0 and power-of-two absmax scales make them ties in element units),
    values at and just above max normal, fp32 subnormals and tiny values, +-0, 1e38 and the
    dtype's max, and with ``nonfinite`` some NaN/+-Inf. Static formats scale by their own
    per-feature scales instead of 2^k. Half the rows are non-negative (zero-point ties)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    table = code_table(f.elem)
    grid = table[torch.isfinite(table)].abs().unique()
    mids = (grid[1:] + grid[:-1]) / 2
    top = float(grid[-1])
    fi = torch.finfo(dtype)
    lo, hi = math.frexp(fi.tiny)[1] - 1, math.frexp(fi.max)[1] - 1
    if dtype == torch.float32:
        lo -= 23  # fp32 inputs: subnormal binades too
    bs = f.block or 8
    k = torch.randint(lo, hi - 8, (rows, -(-width // bs)), generator=g).repeat_interleave(bs, 1)[:, :width]

    def pick(vals):
        return vals[torch.randint(len(vals), (rows, width), generator=g)]

    kind = torch.randint(0, 9, (rows, width), generator=g)
    x = torch.randn(rows, width, generator=g, dtype=f64)  # kind 0..1
    x = torch.where(kind == 2, pick(mids), x)
    x = torch.where(kind == 3, pick(grid), x)
    x = torch.where(kind == 4, top, x)
    x = torch.where(kind == 5, top * (1 + 2.0**-20), x)  # just above max normal
    x = torch.where(kind == 6, top * 1.25, x)  # past max normal: saturates
    if f.scale == "static":
        s = torch.ones(width, dtype=f64)
        keep = [j for j in range(width) if j not in f.outliers]
        s[keep] = torch.tensor(f.static_scales, dtype=torch.float32).to(f64)
        x = x * s * 2.0 ** torch.randint(-2, 2, (rows, width), generator=g)
    else:
        x = torch.ldexp(x, k.to(f64))
    sign = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0).to(f64)
    sign[: rows // 2] = 1.0
    x = x * sign
    r = torch.rand(rows, width, generator=g)
    sub = torch.ldexp(torch.randint(1, 1 << 20, (rows, width), generator=g).to(f64), torch.tensor(-149.0, dtype=f64))
    x = torch.where(r < 0.03, sub * sign, x)  # fp32 subnormals
    x = torch.where((r >= 0.03) & (r < 0.05), 2.0**-130 * sign, x)  # tiny
    x = torch.where((r >= 0.05) & (r < 0.07), 0.0, x)
    x = torch.where((r >= 0.07) & (r < 0.09), -0.0, x)
    x = torch.where((r >= 0.09) & (r < 0.10), 1e38 * sign, x)
    x = torch.where((r >= 0.10) & (r < 0.11), fi.max * sign, x)
    x = x.clamp(-fi.max, fi.max).to(dtype)
    if nonfinite:
        sp = torch.rand(rows, width, generator=g)
        x = torch.where(sp < 0.01, float("nan"), x)
        x = torch.where((sp >= 0.01) & (sp < 0.015), float("inf"), x)
        x = torch.where((sp >= 0.015) & (sp < 0.02), -float("inf"), x)
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _ref_decode(buf, f, shape, dtype=torch.float32):
    return qformats.decode(QTensor.from_buffer(buf, f, shape, dtype), dtype)


def _check(x: torch.Tensor, f: Format) -> None:
    before = x.clone()
    ref = qformats.encode(x, f).data
    got = torch_codec.quantize(x, f)
    assert torch.equal(_bits(x), _bits(before)), "encode changed its input"
    assert got.dtype == torch.uint8 and got.dim() == 1 and got.numel() == ref.numel()
    diff = (got != ref).nonzero().flatten()
    assert diff.numel() == 0, f"{f} {x.dtype} {tuple(x.shape)}: {diff.numel()} bytes differ, first at {diff[:8].tolist()}"
    for dt in DTYPES:
        want = _ref_decode(ref, f, x.shape, dt)
        dec = torch_codec.dequantize(got, f, x.shape, dt)
        assert dec.dtype == dt and dec.shape == x.shape
        assert torch.equal(_bits(dec), _bits(want)), f"{f} decode to {dt} differs"


@pytest.mark.parametrize("f", FORMATS, ids=_id)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1), nonfinite=st.booleans())
def test_encode_decode_bitwise_equal_to_the_reference(f, rows, width, dtype, seed, nonfinite):
    """Adversarial values, rows of any width (partial blocks), every input and output dtype."""
    if f.features is not None:
        width = f.features
    elif f.outliers:
        width = max(width, f.outliers[-1] + 1)
    _check(adversarial(f, rows, width, dtype, seed, nonfinite), f)


@pytest.mark.parametrize("f", FORMATS, ids=_id)
def test_decode_of_arbitrary_bytes(f):
    """Any wire bytes (NaN/Inf/negative/subnormal scales, NaN element codes, sNaN payloads)
    decode to the reference's bits: the decode mirrors the reference's NaN propagation."""
    width = f.features or 150
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        buf = torch.randint(0, 256, (f.nbytes((5, width)),), generator=g, dtype=torch.uint8)
        want = _ref_decode(buf, f, (5, width))
        assert torch.equal(_bits(torch_codec.dequantize(buf, f, (5, width))), _bits(want))
    # several buffers decoded in one pass (dequant_sum) keep each one's NaN payloads
    bufs = [torch.randint(0, 256, (f.nbytes((5, width)),), generator=g, dtype=torch.uint8) for _ in range(3)]
    want = ReferenceCodec().dequant_sum(bufs, f, (5, width))
    assert torch.equal(_bits(TorchCodec().dequant_sum(bufs, f, (5, width))), _bits(want))


def test_large_tensors_and_leading_dims():
    """Many blocks at once (the sizes the emulator sees) and a 3-D input."""
    for f in (qformats.PRESETS["mxfp4"], qformats.PRESETS["nvfp4"], qformats.PRESETS["flash_int4"], OUTLIER_FORMATS[0]):
        w = f.features or 576
        _check(adversarial(f, 300, w, torch.float32, 1, nonfinite=False), f)
        _check(adversarial(f, 12, w, torch.bfloat16, 2, nonfinite=True).reshape(3, 4, w), f)


@pytest.mark.parametrize("f", [qformats.PRESETS[n] for n in ("mxfp4", "nvfp4", "flash_int4", "flash_int6", "mxint8",
                                                             "mxfp6_e3m2", "fp3_b64")] + OUTLIER_FORMATS[:2] + [OUTLIER_FORMATS[3]],
                         ids=_id)
def test_dequant_sum_and_dequant_sum_requant_equal_the_reference_codec(f):
    """Rank-order sums of 1..4 buffers and their re-quantisation, from a list or one stacked tensor."""
    ref, fast = ReferenceCodec(), TorchCodec()
    shape = (7, f.features or 200)
    xs = [adversarial(f, *shape, torch.float32, 10 + i, nonfinite=i == 2) for i in range(4)]
    bufs = [ref.quantize(x, f) for x in xs]
    for n in range(1, 5):
        want = ref.dequant_sum(bufs[:n], f, shape)
        assert torch.equal(_bits(fast.dequant_sum(bufs[:n], f, shape)), _bits(want))
        assert torch.equal(_bits(fast.dequant_sum(torch.stack(bufs[:n]), f, shape)), _bits(want))
        assert torch.equal(fast.dequant_sum_requant(bufs[:n], f, shape), ref.dequant_sum_requant(bufs[:n], f, shape))
    assert torch.equal(_bits(fast.dequantize(bufs[0], f, shape)), _bits(ref.dequantize(bufs[0], f, shape)))


@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
def test_emulated_all_reduce_is_bitwise_the_reference(algorithm):
    g = torch.Generator().manual_seed(3)
    shards = [(torch.randn(2, 9, 256, generator=g) * 4).to(torch.bfloat16) for _ in range(3)]
    for f in ("mxfp4", "nvfp4", "flash_int4", "int4_b64"):
        want = emulate_all_reduce(shards, f, algorithm, codec=ReferenceCodec())
        got = emulate_all_reduce(shards, f, algorithm, codec=TorchCodec())
        assert torch.equal(_bits(got), _bits(want))


def test_unlowered_elements_fall_back_to_the_reference_explicitly():
    f = Format(Element("float", 8, 6, 1, "fin"), 32, "e8m0")  # wider than the grammar's e5m5: not lowered
    assert "E<=5" in torch_codec.fallback_reason(f)
    assert torch_codec.fallback_reason("mxfp4") is None
    assert torch_codec.fallback_reason(OUTLIER_FORMATS[0]) is None  # outliers and static scales run fast
    x = adversarial(f, 3, 70, torch.float32, 0, nonfinite=True)
    _check(x, f)
    buf = torch_codec.quantize(x, f)
    assert torch.equal(_bits(TorchCodec().dequant_sum([buf, buf], f, x.shape)), _bits(ReferenceCodec().dequant_sum([buf, buf], f, x.shape)))


def test_errors_match_the_reference():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="required"):
        torch_codec.quantize(x, None)
    with pytest.raises(TypeError, match="not supported"):
        torch_codec.quantize(x.to(torch.int32), "mxfp4")
    with pytest.raises(ValueError, match="bytes"):
        torch_codec.dequantize(torch.zeros(3, dtype=torch.uint8), "mxfp4", (2, 64))
    with pytest.raises(ValueError, match="uint8"):
        torch_codec.dequantize(torch.zeros(68, dtype=torch.int8), "mxfp4", (2, 64))
    with pytest.raises(TypeError, match="decode to"):
        torch_codec.dequantize(torch_codec.quantize(x, "mxfp4"), "mxfp4", (2, 64), torch.int32)
    for f in OUTLIER_FORMATS[:2]:  # a static format refuses rows of another width, as the reference does
        with pytest.raises(ValueError) as want:
            qformats.encode(x, f)
        with pytest.raises(ValueError) as got:
            torch_codec.quantize(x, f)
        assert str(got.value) == str(want.value)


def test_the_eval_runs_on_this_codec_and_restores_the_previous_one(monkeypatch):
    from tests.tp.study.test_eval import WordTokenizer, synthetic_text, tiny_llama
    from tp.study import assets
    from tp.comm.collectives import get_codec, set_codec
    from tp.study.eval import run_eval

    calls = []
    quantize = TorchCodec.quantize
    monkeypatch.setattr(TorchCodec, "quantize", lambda self, x, fmt: calls.append(fmt) or quantize(self, x, fmt))
    mine = ReferenceCodec()
    old = set_codec(mine)
    try:
        text = assets.TextData(synthetic_text(seed=1), synthetic_text(seed=2), "synthetic")
        run_eval(model=tiny_llama(layers=1), tokenizer=WordTokenizer(), text=text, formats=["mxfp4"], tp=[2],
                 algorithms=["gather"], tokens=48, window=48, progress=False, device="cpu")
        assert calls and get_codec() is mine
        # a codec the caller installed on purpose is kept, not replaced
        class Custom(ReferenceCodec):
            used = 0

            def quantize(self, x, fmt):
                Custom.used += 1
                return super().quantize(x, fmt)

        calls.clear()
        set_codec(Custom())
        run_eval(model=tiny_llama(layers=1), tokenizer=WordTokenizer(), text=text, formats=["mxfp4"], tp=[2],
                 algorithms=["gather"], tokens=48, window=48, progress=False, device="cpu")
        assert Custom.used and not calls
    finally:
        set_codec(old)


# ---- formats drawn from the grammar, inputs over the whole range, and issue 14's corners ----------
from tests.qformats.test_bounds import _fit_width, grammar_formats, wide_input  # noqa: E402


@settings(max_examples=60)
@given(f=grammar_formats(), rows=st.integers(1, 4), width=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1), past_domain=st.booleans())
def test_grammar_drawn_formats_bitwise_equal_to_the_reference(f, rows, width, dtype, seed, past_domain):
    """Any format the grammar accepts; block maxima anywhere from the dtype's subnormals to its
    max (past ``max_amax`` too: saturating scales and decodes)."""
    limit = float(torch.finfo(dtype).max) if past_domain else None
    _check(wide_input(f, rows, _fit_width(f, width), dtype, seed, limit), f)


_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


@pytest.mark.parametrize("fmt,value,dtype", [
    ("fp4_e2m1/b32/fp16", 65504.0, torch.float16), ("int4/row/fp16", 65504.0, torch.float16),
    ("int4/b32/bf16", _BF16_MAX, torch.bfloat16), ("fp8_e4m3/b32/bf16", _BF16_MAX, torch.bfloat16),
    ("fp8_e5m2/b32/fp32", 3.4e38, torch.float32), ("fp4_e2m1/b32/e8m0+o[0]", 3.4e38, torch.float32),
    ("fp8_e4m3/b32/fp32", 1e-44, torch.float32), ("fp4_e2m1/b32/bf16", 1.4e-45, torch.float32),
    ("fp4_e2m1/b32/e4m3", 1.4e-45, torch.float32), ("nvfp4", 1e-40, torch.float32),
    ("uint4/b32/fp16+zp", 1.4e-45, torch.float32),
])
def test_issue_corners_decode_finite_and_bitwise(fmt, value, dtype):
    f = Format.parse(fmt)
    x = torch.full((2, 32), value, dtype=dtype)
    x[1, ::2] *= -0.5
    _check(x, f)
    assert torch.isfinite(torch_codec.dequantize(torch_codec.quantize(x, f), f, x.shape, dtype)).all()


def test_zero_point_difference_past_fp32_max():
    x = torch.zeros(3, 32)
    x[0, 0], x[0, 1] = 3e38, -3e38
    x[1, 0], x[1, 1] = 3.3e38, -3.3e38
    x[2] = torch.linspace(-3.3e38, 3.3e38, 32, dtype=torch.float64).float()
    f = Format.parse("uint8/b32/bf16+zp")
    _check(x, f)
    assert torch.isfinite(torch_codec.dequantize(torch_codec.quantize(x, f), f, x.shape)).all()


def test_every_feature_an_outlier_with_a_tensor_scale():
    f = Format.parse("fp4_e2m1/b16/e4m3+ts+o[0,1]")
    _check(torch.tensor([[1.0, -3e38], [0.0, 2.0]]), f)


# (largest finite, Inf) scale words, little-endian, of each scale type with a scale section
_SCALE_WORDS = {"e8m0": ([254], None), "fp32": ([0xFF, 0xFF, 0x7F, 0x7F], [0, 0, 0x80, 0x7F]),
                "bf16": ([0x7F, 0x7F], [0x80, 0x7F])}


@pytest.mark.parametrize("fmt", ["fp8_e5m2/b32/e8m0", "fp8_e5m2/b32/fp32", "fp8_e5m2/b32/bf16", "int4/row/static+s[7f7fffff]"])
def test_decode_saturates_finite_products_and_keeps_inf_codes(fmt):
    """Foreign bytes: random codes (e5m2: Inf and NaN codes too) times the largest scales
    saturate where both are finite; Inf codes and an Inf scale word stay Inf; bitwise the
    reference's for every output dtype."""
    f = Format.parse(fmt)
    shape = (4, 32) if f.features is None else (4, f.features)
    buf = torch.randint(0, 256, (f.nbytes(shape),), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    lay = f.layout(shape)
    a, b = lay.offsets["scale"]
    if b > a:
        big, inf = _SCALE_WORDS[f.scale]
        buf[a:b] = torch.tensor(big * (lay.rows * lay.nblocks), dtype=torch.uint8)
        if inf is not None:  # the last block's scale is Inf
            buf[b - len(inf):b] = torch.tensor(inf, dtype=torch.uint8)
    for dt in DTYPES:
        want = _ref_decode(buf, f, shape, dt)
        assert torch.equal(_bits(torch_codec.dequantize(buf, f, shape, dt)), _bits(want))
        assert (want.abs() == torch.finfo(dt).max).any(), "nothing saturated: the test lost its point"
