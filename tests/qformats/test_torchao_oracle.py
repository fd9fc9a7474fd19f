"""A live OCP MX oracle: torchao's ``to_mx(x, elem, block, ScaleCalculationMode.FLOOR)`` and its
dequantize, compared byte for byte with our codec (E8M0 scale bytes, element codes, decoded fp32
bits) on hypothesis-drawn and adversarial inputs, for every OCP element type (fp8 e4m3/e5m2, fp6
e2m3/e3m2, fp4 e2m1) and blocks of 16, 32 and 64. It needs only pip (torchao is a test
dependency), unlike tests/qformats/test_golden.py, which needs ../shared/golden.

torchao 0.18.0 (the newest release) differs from the OCP rule on two kinds of block, both fixed
upstream by pytorch/ao#4725 (commit 5d73a0c, "Refine MXFP8 CUDA quantization semantics"): there
the test does not accept whatever we give, it checks our codec against the OCP rule itself:

* ``SCALE_2_POW_MINUS_127``: blocks whose E8M0 scale byte is 0 (scale 2^-127: the block max is
  below 2^(emax_elem - 126), e.g. FP32 subnormals). 0.18.0 clamps the fp32 divisor to 2^-126
  (its ``F32_MIN_NORMAL`` workaround) but decodes with 2^-127, so its values come out halved (or
  worse, after rounding). OCP divides by 2^-127; doubling the input undoes the clamp exactly,
  so torchao's element codes of 2x must equal ours of x, and our values must be code * 2^-127.
* ``INF_WITHOUT_NAN``: blocks with an Inf and no NaN. 0.18.0 takes the scale from Inf's
  exponent (a finite 2^(128 - emax)) and saturates the Inf; our codec (DESIGN.md: a NaN or Inf
  block decodes to NaN) and torchao since #4725 store the NaN scale 0xFF: all NaN.

Any other disagreement fails with the element type, block size, row, block, both scale bytes
and a few values: it would be a bug of ours (or a new torchao behaviour to look at).
Element codes inside NaN-scale blocks are not compared: they carry no information (the block
decodes to NaN whatever they are) and the two codecs fill them differently.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import qformats
from qformats import packing

# torchao logs "Failed to load ....so" for each CUDA/C++ extension of a CPU build, and torch's pytree
# a deprecation line for torchao's enum: noise in every CPU test run, silenced for the import only.
_quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
_levels = [lg.level for lg in _quiet]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchao warns about its CUDA/C++ extensions on a CPU build
    for lg in _quiet:
        lg.setLevel(logging.ERROR)
    try:
        mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    finally:
        for lg, level in zip(_quiet, _levels):
            lg.setLevel(level)

ScaleCalculationMode, to_mx, to_dtype = mx_tensor.ScaleCalculationMode, mx_tensor.to_mx, mx_tensor.to_dtype

ELEMENTS = {  # our element name -> torchao's element dtype
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp6_e2m3": DTYPE_FP6_E2M3,
    "fp6_e3m2": DTYPE_FP6_E3M2,
    "fp4_e2m1": torch.float4_e2m1fn_x2,
}
BLOCKS = (16, 32, 64)
CASES = [(e, b) for e in ELEMENTS for b in BLOCKS]
CASE_IDS = [f"{e}_b{b}" for e, b in CASES]
E8M0_NAN = 0xFF
E8M0_MIN = 0  # the byte of 2^-127
SCALE_2_POW_MINUS_127 = "scale byte 0 (2^-127): torchao 0.18.0 divides by 2^-126 (fixed by pytorch/ao#4725)"
INF_WITHOUT_NAN = "Inf without NaN: torchao 0.18.0 keeps a finite scale and saturates (fixed by pytorch/ao#4725)"


# ---------------------------------------------------------------------------------------------
# the two codecs, as (scale bytes [R, nb], element codes [R, W], fp32 values [R, W])
# ---------------------------------------------------------------------------------------------
def ours(x: torch.Tensor, elem: str, bs: int):
    fmt = qformats.Format.parse(f"{elem}/b{bs}/e8m0")
    q = qformats.encode(x, fmt)
    lay = fmt.layout(x.shape)
    a, b = lay.offsets["code"]
    codes = packing.unpack(q.data[a:b], fmt.elem.bits, lay.rows * lay.padded).reshape(lay.rows, lay.padded)
    a, b = lay.offsets["scale"]
    scales = q.data[a:b].reshape(lay.rows, lay.nblocks)
    return scales.to(torch.int64), codes, qformats.decode(q, torch.float32)


def torchao(x: torch.Tensor, elem: str, bs: int):
    dtype = ELEMENTS[elem]
    scale, data = to_mx(x.contiguous(), dtype, bs, ScaleCalculationMode.FLOOR)
    values = to_dtype(data, scale, dtype, bs, torch.float32)
    raw = data.view(torch.uint8).reshape(x.shape[0], -1)
    if dtype == torch.float4_e2m1fn_x2:  # two codes per byte, element 2i in the low nibble (as ours)
        codes = torch.stack([raw & 0xF, raw >> 4], -1).reshape(x.shape[0], -1)
    else:  # fp8 bytes, fp6 unpacked one code per byte
        codes = raw
    return scale.view(torch.uint8).reshape(x.shape[0], -1).to(torch.int64), codes.to(torch.int64), values


def _blocks(t: torch.Tensor, bs: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, bs)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal fp32 bit patterns, or both NaN (NaN payloads are not part of the contract)."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


# ---------------------------------------------------------------------------------------------
def compare(x: torch.Tensor, elem: str, bs: int) -> dict:
    """Compare both codecs on ``x`` [R, W] (W a multiple of bs); returns {reason: number of blocks}
    for the known divergences, after checking our codec against the OCP rule on each; raises
    AssertionError for any other difference."""
    s_o, c_o, v_o = ours(x, elem, bs)
    s_t, c_t, v_t = torchao(x, elem, bs)
    xb = _blocks(x.float(), bs)
    inf_only = xb.isinf().any(-1) & ~xb.isnan().any(-1)
    tiny = s_o == E8M0_MIN
    nan_scale = s_o == E8M0_NAN
    codes_ok = (_blocks(c_o, bs) == _blocks(c_t, bs)).all(-1) | nan_scale
    values_ok = _same_bits(_blocks(v_o, bs), _blocks(v_t, bs)).all(-1)
    agree = (s_o == s_t) & codes_ok & values_ok
    explained = {SCALE_2_POW_MINUS_127: ~agree & tiny, INF_WITHOUT_NAN: ~agree & inf_only}
    unexplained = ~agree & ~tiny & ~inf_only
    if unexplained.any():
        r, k = (int(i) for i in unexplained.nonzero()[0])
        sl = slice(k * bs, (k + 1) * bs)
        raise AssertionError(
            f"{elem}/b{bs}: {int(unexplained.sum())} blocks differ from torchao FLOOR outside its known divergences; "
            f"first at row {r} block {k}: scale byte ours {int(s_o[r, k])} torchao {int(s_t[r, k])}; "
            f"x {x[r, sl][:6].tolist()}; ours {v_o[r, sl][:6].tolist()}; torchao {v_t[r, sl][:6].tolist()}")
    if explained[SCALE_2_POW_MINUS_127].any():
        # OCP: elements = Q(x / 2^-127). torchao's codes of 2x are Q(2x / 2^-126) = Q(x / 2^-127)
        # (doubling is exact here: these blocks are tiny), decoded with our scale byte 0.
        m = explained[SCALE_2_POW_MINUS_127]
        _, c_2x, _ = torchao(x * 2, elem, bs)
        bad = m & ~(_blocks(c_o, bs) == _blocks(c_2x, bs)).all(-1)
        assert not bad.any(), f"{elem}/b{bs}: element codes at scale 2^-127 break the OCP rule at {_where(bad)}"
        expect = _blocks(_element_values(c_o, elem), bs) * 2.0**-127
        bad = m & ~_same_bits(_blocks(v_o, bs), expect).all(-1)
        assert not bad.any(), f"{elem}/b{bs}: values at scale 2^-127 are not code * 2^-127 at {_where(bad)}"
    if explained[INF_WITHOUT_NAN].any():
        m = explained[INF_WITHOUT_NAN]
        bad = m & ~((s_o == E8M0_NAN) & _blocks(v_o, bs).isnan().all(-1))
        assert not bad.any(), f"{elem}/b{bs}: a block with Inf must store the NaN scale and decode to NaN ({_where(bad)})"
    return {why: int(mask.sum()) for why, mask in explained.items()}


def _where(mask: torch.Tensor) -> str:
    r, k = (int(i) for i in mask.nonzero()[0])
    return f"{int(mask.sum())} blocks, first row {r} block {k}"


def _element_values(codes: torch.Tensor, elem: str) -> torch.Tensor:
    """fp32 value of each element code (the element grid, from our spec)."""
    e = qformats.Format.parse(f"{elem}/b32/e8m0").elem
    table = torch.tensor([_code_value(c, e) for c in range(1 << e.bits)], dtype=torch.float32)
    return table[codes]


def _code_value(code: int, e) -> float:
    """Sign-exponent-mantissa value of one OCP float element code. The NaN/Inf codes (e4m3's
    S.1111.111, e5m2's exponent 31) come out as if finite: callers use codes up to max normal."""
    sign = -1.0 if code >> (e.bits - 1) else 1.0
    exp = (code >> e.mbits) & ((1 << e.ebits) - 1)
    man = code & ((1 << e.mbits) - 1)
    bias = (1 << (e.ebits - 1)) - 1
    if exp == 0:
        return sign * math.ldexp(man, 1 - bias - e.mbits)
    return sign * math.ldexp((1 << e.mbits) + man, exp - bias - e.mbits)


# ---------------------------------------------------------------------------------------------
# adversarial inputs: every corner the golden set has, built here from the element's own grid
# ---------------------------------------------------------------------------------------------
def adversarial(elem: str, bs: int, seed: int = 0) -> torch.Tensor:
    """[rows, 4 * bs] float32: rows of named corner cases (the row order is irrelevant)."""
    g = torch.Generator().manual_seed(seed)
    e = qformats.Format.parse(f"{elem}/b{bs}/e8m0").elem
    w = 4 * bs
    f32 = torch.finfo(torch.float32)
    rows = [
        torch.randn(w, generator=g),
        torch.randn(w, generator=g) ** 3 * 10,  # heavy tails
        torch.randn(w, generator=g) * torch.exp2(torch.randint(-30, 30, (4,), generator=g).float()).repeat_interleave(bs),
        torch.zeros(w), -torch.zeros(w),
        torch.where(torch.rand(w, generator=g) < 0.5, 0.0, -0.0) * torch.ones(w),  # mixed signed zeros
        torch.randn(w, generator=g) * 1e-40,  # FP32 subnormals: scale byte 0
        torch.randn(w, generator=g) * 1e-38,  # tiny normals: the scale clamps at 2^-127
        torch.randn(w, generator=g) * 2.0 ** (e.emax - 127),  # right at the clamp boundary
        torch.randn(w, generator=g) * 3e37,  # near the top of FP32 (scale up to 2^127)
        torch.full((w,), f32.max) * torch.randn(w, generator=g).sign(),
    ]
    # block maxima 1 ulp below, at, and 1 ulp above a power of two (the float-log2 trap)
    for k in (-3, 0, 5):
        p = torch.tensor(2.0**k)
        for amax in (torch.nextafter(p, torch.tensor(0.0)), p, torch.nextafter(p, torch.tensor(math.inf))):
            r = torch.rand(w, generator=g) * amax
            r[::bs] = amax
            rows.append(r)
    # exact rounding ties of the element grid, their float neighbours, and the saturation tie
    grid = sorted({abs(_code_value(c, e)) for c in range(1 << e.bits) if math.isfinite(_code_value(c, e))})
    grid = [v for v in grid if v <= e.max_normal]
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])] + [e.max_normal + (grid[-1] - grid[-2]) / 2]
    ties = torch.tensor(mids, dtype=torch.float32)
    for s in (0, 7):  # block scale 2^s: an anchor of 2^(emax) * 2^s in each block pins it
        for nb in (ties, torch.nextafter(ties, torch.tensor(0.0)), torch.nextafter(ties, torch.tensor(math.inf))):
            r = nb.repeat(-(-w // len(nb)))[:w] * 2.0**s
            r = r * torch.where(torch.rand(w, generator=g) < 0.5, -1.0, 1.0)
            r[::bs] = 2.0 ** (e.emax + s)
            rows.append(r)
    special = torch.randn(w, generator=g)
    special[3], special[bs + 5], special[2 * bs], special[2 * bs + 1] = math.nan, math.inf, -math.inf, math.nan
    rows.append(special)  # block 0: NaN; 1: +Inf; 2: -Inf and NaN; 3: clean
    rows.append(torch.randint(-(2**31), 2**31 - 1, (w,), generator=g, dtype=torch.int64).to(torch.int32)
                .view(torch.float32))  # random bit patterns (NaN and Inf included)
    return torch.stack(rows)


@pytest.mark.parametrize("elem,bs", CASES, ids=CASE_IDS)
def test_adversarial_inputs_match_torchao(elem, bs):
    found = compare(adversarial(elem, bs), elem, bs)
    # the divergences are really exercised (and checked against the OCP rule above)
    assert found[INF_WITHOUT_NAN] >= 1 and found[SCALE_2_POW_MINUS_127] >= 1, found


def test_bf16_inputs_match_torchao():
    x = adversarial("fp8_e4m3", 32, seed=1).bfloat16()
    for elem in ELEMENTS:
        compare(x, elem, 32)


# hypothesis: blocks of float32 at a drawn power-of-two scale, sometimes raw float32 patterns
_block_scale = st.integers(-140, 120)
_values = st.floats(width=32, allow_nan=True, allow_infinity=True)
_unit = st.floats(-8.0, 8.0, width=32)


@st.composite
def mx_inputs(draw, bs):
    rows, nblocks = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    w = nblocks * bs
    if draw(st.booleans()):
        x = draw(hnp.arrays(np.float32, (rows, w), elements=_values))
    else:
        x = draw(hnp.arrays(np.float32, (rows, w), elements=_unit))
        scales = np.exp2(np.array(draw(st.lists(_block_scale, min_size=rows * nblocks, max_size=rows * nblocks)),
                                  dtype=np.float64)).reshape(rows, nblocks, 1)
        with np.errstate(over="ignore"):
            x = (x.reshape(rows, nblocks, bs).astype(np.float64) * scales).astype(np.float32).reshape(rows, w)
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("elem,bs", CASES, ids=CASE_IDS)
@given(data=st.data())
def test_drawn_inputs_match_torchao(elem, bs, data):
    compare(data.draw(mx_inputs(bs)), elem, bs)
