"""The reference codec against the vendored slice of the golden vectors (tests/qformats/golden/,
README there): runs in every clone, under the same contract as test_golden.py's full set."""
import json
import pathlib

import numpy as np
import pytest
import torch

import qformats
from tests.conftest import GOLDEN

SUBSET = pathlib.Path(__file__).resolve().parent / "golden"
ELEMS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4", "int2")
EXCLUDED = ("near_pow2_amax", "large_near_fp32_max")  # plus ties_*: microxcaling's known divergences


def _keep_rows(n_rows: int) -> np.ndarray:
    cats = json.loads((SUBSET / "manifest.json").read_text())["row_categories"]
    keep = np.ones(n_rows, dtype=bool)
    for name, spec in cats.items():
        if name in EXCLUDED or name.startswith("ties_"):
            a, b = spec["rows"]
            keep[a:b] = False
    return keep


def _check(ours, ref, rows, what):
    ok = (ours == ref) | (np.isnan(ours) & np.isnan(ref))  # NaN == NaN, -0 == +0 (the contract)
    ok = ok[rows]
    bad = np.argwhere(~ok)
    assert ok.all(), f"{what}: {len(bad)} elements differ, first at {bad[:5].tolist()}"


def test_the_subset_is_in_the_repository():
    assert sorted(p.name for p in SUBSET.glob("*.npz")) == sorted(f"{e}_b32_c64.npz" for e in ELEMS)


@pytest.mark.parametrize("elem", ELEMS)
def test_golden_subset(elem):
    d = np.load(SUBSET / f"{elem}_b32_c64.npz")
    x = torch.from_numpy(d["x"])
    assert x.shape == (91, 64)
    fmt = qformats.Format.parse(f"{elem}/b32/e8m0")
    q = qformats.encode(x, fmt)
    y = qformats.decode(q).numpy()
    every = np.ones(x.shape[0], dtype=bool)
    _check(y, d["y"], _keep_rows(x.shape[0]), "vs microxcaling y")
    _check(y, d["y_ocp_ref"], every, "vs y_ocp_ref")
    lay = fmt.layout(x.shape)
    a, b = lay.offsets["scale"]
    scales = q.data[a:b].reshape(lay.rows, lay.nblocks).numpy()
    np.testing.assert_array_equal(scales, d["scale_e8m0_ocp_ref"], err_msg="E8M0 bytes vs ocp_ref")
    if "y_torchao_floor" in d:
        _check(y, d["y_torchao_floor"], every, "vs torchao FLOOR")
        np.testing.assert_array_equal(scales, d["scale_e8m0_torchao_floor"], err_msg="E8M0 bytes vs torchao")


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="the full golden set is not beside this checkout")
@pytest.mark.parametrize("elem", ELEMS)
def test_subset_is_a_slice_of_the_full_set(elem):
    sub, full = np.load(SUBSET / f"{elem}_b32_c64.npz"), np.load(GOLDEN / f"{elem}_b32.npz")
    for k in sub.files:
        cols = 2 if k.startswith("scale") else 64
        np.testing.assert_array_equal(sub[k], full[k][:, :cols], err_msg=k)
