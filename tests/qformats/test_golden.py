"""The reference codec against external golden vectors (microxcaling, torchao), under the
contract in ../shared/golden/README.md."""
import json

import numpy as np
import pytest
import torch

import qformats
from tests.conftest import GOLDEN

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden vectors not found at {GOLDEN}")

ELEMS = {
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "fp6_e3m2": "fp6_e3m2",
    "fp6_e2m3": "fp6_e2m3",
    "fp4_e2m1": "fp4_e2m1",
    "int8": "int8",
    "int4": "int4",
    "int2": "int2",
}
EXCLUDED = ("near_pow2_amax", "large_near_fp32_max")  # plus ties_*: microxcaling's known divergences
FILES = [(e, bs, "") for e in ELEMS for bs in (16, 32, 64)] + [(e, 32, "_w80") for e in ELEMS]


def _manifest():
    return json.loads((GOLDEN / "manifest.json").read_text())


def _rows_outside_divergences(n_rows):
    cats = _manifest()["row_categories"]
    keep = np.ones(n_rows, dtype=bool)
    for name, spec in cats.items():
        if name in EXCLUDED or name.startswith("ties_"):
            a, b = spec["rows"]
            keep[a:b] = False
    return keep


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Value equality with NaN == NaN (and -0 == +0, as the contract says)."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _check(ours, ref, mask, what):
    ok = _same(ours[mask], ref[mask])
    bad = np.argwhere(~ok)
    assert ok.all(), f"{what}: {len(bad)} elements differ, first at {bad[:5].tolist()}"


@pytest.mark.parametrize("elem,bs,suffix", FILES, ids=[f"{e}_b{b}{s}" for e, b, s in FILES])
def test_golden(elem, bs, suffix):
    path = GOLDEN / f"{elem}_b{bs}{suffix}.npz"
    d = np.load(path)
    x = torch.from_numpy(d["x"])
    fmt = qformats.Format.parse(f"{ELEMS[elem]}/b{bs}/e8m0")
    q = qformats.encode(x, fmt)
    y = qformats.decode(q).numpy()
    rows = np.ones(x.shape[0], dtype=bool)
    # rule 1: microxcaling (RNE) outside its known divergences
    _check(y, d["y"], np.broadcast_to(_rows_outside_divergences(x.shape[0])[:, None], y.shape), "vs microxcaling y")
    if suffix:  # rule 4: the partial block; _w80 files carry only microxcaling's arrays
        full = qformats.quantize_dequantize(torch.from_numpy(np.load(GOLDEN / f"{elem}_b{bs}.npz")["x"]), fmt)
        np.testing.assert_array_equal(y[:, :64], full[:, :64].numpy(), err_msg="first two blocks = full-width file")
        return
    # rule 3: the OCP rule everywhere (independent exact implementation)
    _check(y, d["y_ocp_ref"], np.broadcast_to(rows[:, None], y.shape), "vs y_ocp_ref")
    lay = fmt.layout(x.shape)
    a, b = lay.offsets["scale"]
    scales = q.data[a:b].reshape(lay.rows, lay.nblocks).numpy()
    np.testing.assert_array_equal(scales, d["scale_e8m0_ocp_ref"], err_msg="E8M0 bytes vs ocp_ref")
    if "y_torchao_floor" in d:  # rule 2: fp elements, every row, value and scale bytes
        _check(y, d["y_torchao_floor"], np.broadcast_to(rows[:, None], y.shape), "vs torchao FLOOR")
        np.testing.assert_array_equal(scales, d["scale_e8m0_torchao_floor"], err_msg="E8M0 bytes vs torchao")


def test_all_golden_files_are_covered():
    names = {p.name for p in GOLDEN.glob("*.npz") if not p.name.startswith(("elemwise_", "float16", "bfloat16"))}
    covered = {f"{e}_b{b}{s}.npz" for e, b, s in FILES}
    assert names == covered
