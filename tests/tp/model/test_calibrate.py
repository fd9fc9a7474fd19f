"""Outlier calibration (Dong et al.): EMA ranges, rank aggregation, top-k selection, scales, the file."""
import json

import pytest
import torch

import qformats
import tp
from tests.tp.multirank import run_ranks
from tp.model.calibrate import Calibration, Calibrator, calibrate


def test_ema_of_per_feature_absmax():
    c = Calibrator(momentum=0.75)
    b1 = torch.tensor([[1.0, -4.0, 0.5], [-2.0, 1.0, 0.0]])
    b2 = torch.tensor([[[0.0, 8.0, -1.0]]])  # any leading shape
    c.observe("s", 0, b1)
    c.observe("s", 0, b2)
    c.observe("s", 1, b2)
    r = c.ranges("s")
    assert torch.equal(r[0], 0.75 * torch.tensor([2.0, 4.0, 0.5]) + 0.25 * torch.tensor([0.0, 8.0, 1.0]))
    assert torch.equal(r[1], torch.tensor([0.0, 8.0, 1.0]))


def test_selection_uses_the_sum_of_rank_ranges():
    e = 128  # k = floor(128 / 64) = 2
    c = Calibrator()
    r0, r1 = torch.ones(e), torch.ones(e)
    r0[5] = 10.0  # one rank large: sum 11
    r0[70], r1[70] = 6.0, 6.0  # both medium: sum 12 > 11, though max 6 < 10
    r0[100], r1[100] = 5.5, 5.0  # sum 10.5: third
    c.observe("s", 0, r0[None])
    c.observe("s", 1, r1[None])
    cal = c.finish()
    assert cal.sites["s"].outliers == (5, 70)
    assert c.finish(k=3).sites["s"].outliers == (5, 70, 100)
    assert c.finish(k=0).sites["s"].outliers == ()
    # scales of the others: max over ranks / max_normal(int4) = r / 1.75 in fp32
    site = cal.sites["s"]
    keep = [i for i in range(e) if i not in (5, 70)]
    expect = torch.stack([r0, r1]).amax(0)[keep] / torch.tensor(1.75)
    assert torch.equal(torch.tensor(site.scales), expect)
    summed = c.finish(scale_from="sum").sites["s"]
    assert torch.equal(torch.tensor(summed.scales), (r0 + r1)[keep] / torch.tensor(1.75))


def test_clip_caps_ranges_at_a_multiple_of_the_rms():
    e = 64  # k = 1
    c = Calibrator(momentum=0.5)
    g = torch.Generator().manual_seed(0)
    b = [torch.randn(16, e, generator=g) * torch.linspace(0.1, 3.0, e) for _ in range(4)]
    for i, x in enumerate(b):
        c.observe("s", i % 2, x)  # ranks 0 and 1 see two batches each
    ms = torch.stack([0.5 * b[r].square().mean(0) + 0.5 * b[r + 2].square().mean(0) for r in (0, 1)])
    assert torch.allclose(c.mean_squares("s"), ms)
    for clip, frm in ((2.5, "max"), (1.0, "sum")):
        cal = c.finish(scale_from=frm, clip=clip)
        site = cal.sites["s"]
        keep = [i for i in range(e) if i not in site.outliers]
        ranges = c.ranges("s")
        used = ranges.amax(0) if frm == "max" else ranges.sum(0)
        rms = c.mean_squares("s").amax(0).sqrt() if frm == "max" else c.mean_squares("s").sum(0).sqrt()
        expect = torch.minimum(used, clip * rms)[keep] / torch.tensor(1.75)
        assert torch.equal(torch.tensor(site.scales), expect)
        assert (expect < used[keep] / 1.75).any()  # the cap bit somewhere
        assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))).clip == clip
    assert c.finish().clip is None
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="clip must be a positive"):
            c.finish(clip=bad)


def test_ties_and_zero_ranges():
    c = Calibrator()
    x = torch.zeros(1, 64)
    x[0, 10] = x[0, 20] = 3.0  # a tie: the lower index wins
    x[0, 30] = 0.5
    c.observe("s", 0, x)
    site = c.finish(k=1).sites["s"]
    assert site.outliers == (10,)
    assert min(site.scales) == pytest.approx(0.5 / 1.75) and all(s > 0 for s in site.scales)


def test_calibrated_format_saturates_only_outside_the_range():
    c = Calibrator()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    x[:, 7] *= 100  # an outlier feature
    c.observe("s", 0, x)
    fmt = c.finish(k=2).format("s")
    assert 7 in fmt.outliers and fmt.features == 128
    y = qformats.quantize_dequantize(x, fmt)
    assert torch.equal(y[:, 7], x[:, 7].to(torch.bfloat16).float())  # bf16 outlier
    err = (y - x).abs()
    keep = [i for i in range(128) if i not in fmt.outliers]
    steps = torch.tensor(fmt.static_scales) * 0.25  # int4 grid step 2^-2 times the scale
    assert (err[:, keep] <= steps / 2 + 1e-6).all()  # calibrated on this batch: nothing saturates


def test_save_load_round_trip(tmp_path):
    c = Calibrator(0.5)
    for r in range(2):
        c.observe("model.layers.0.mlp.down_proj", r, torch.randn(4, 128, generator=torch.Generator().manual_seed(r)))
    cal = c.finish(k=3, scale_from="sum")
    p = tmp_path / "cal.json"
    cal.save(p)
    back = Calibration.load(p)
    assert back == cal
    site = "model.layers.0.mlp.down_proj"
    assert str(back.format(site)) == str(cal.format(site)) and back.format(site).scale == "static"
    assert back.world_size == 2 and back.scale_from == "sum" and back.k == 3
    d = json.loads(p.read_text())
    d["kind"] = "something else"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a qformats-tp-calibration"):
        Calibration.load(p)


def test_bad_calibrations_raise():
    c = Calibrator()
    with pytest.raises(ValueError, match="nothing observed"):
        c.finish()
    c.observe("s", 1, torch.ones(2, 64))
    with pytest.raises(ValueError, match=r"ranks \[0\] were never observed"):
        c.finish()
    c.observe("s", 0, torch.ones(2, 64))
    with pytest.raises(ValueError, match="need 0 <= k < 64"):
        c.finish(k=64)
    with pytest.raises(ValueError, match="signed int element"):
        c.finish(elem="fp4_e2m1")
    with pytest.raises(ValueError, match="NaN/Inf"):
        c.observe("s", 0, torch.full((1, 64), float("inf")))
    with pytest.raises(ValueError, match="momentum"):
        Calibrator(momentum=1.0)
    with pytest.raises(KeyError, match="not calibrated"):
        c.finish().format("other")


# ---- the same outliers with dynamic block scales (issue 16, Dong et al. again) --------------------
DYNAMIC = ("int4/b64/bf16", "int4/b64/bf16+h32")  # the eval's outlier_int4_dyn / outlier_int4_dyn_h32


def _two_site_calibrator(e=576):
    """Two sites of E features (k = floor(E/64)) over 2 ranks, heavy-tailed features spread out."""
    g = torch.Generator().manual_seed(3)
    c = Calibrator()
    for site in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        spread = torch.logspace(-1, 1.5, e)[torch.randperm(e, generator=g)]
        for r in range(2):
            for _ in range(3):
                c.observe(site, r, torch.randn(8, e, generator=g) * spread)
    return c


def test_dynamic_variants_share_the_calibrated_outliers():
    c = _two_site_calibrator()
    static = c.finish(clip=2.5)
    for s, sc in static.sites.items():
        assert len(sc.outliers) == 576 // 64
    for frm, clip in (("max", 2.5), ("sum", None)):  # the selection does not depend on the scales
        assert {s: v.outliers for s, v in c.finish(scale_from=frm, clip=clip).sites.items()} == \
            {s: v.outliers for s, v in static.sites.items()}
    for rest in DYNAMIC:
        dyn = static.with_rest(rest)
        assert dyn.sites == static.sites and static.rest is None  # with_rest copies, the original is unchanged
        base = qformats.Format.parse(rest)
        for s, sc in static.sites.items():
            f, fs = dyn.format(s), static.format(s)
            assert f.outliers == fs.outliers == sc.outliers
            assert (f.elem, f.block, f.scale, f.rotation) == (base.elem, base.block, base.scale, base.rotation)
            assert f.static_scales == () and fs.scale == "static"
            # 567 int4 codes in 9 blocks of 64 (one zero-padded), 9 bf16 scales, 9 bf16 outliers; no index
            assert f.nbytes((1, 576)) == 9 * 64 // 2 + 9 * 2 + 9 * 2
            assert f.bits_per_value_at(576) == pytest.approx(4.5)
        assert static.format(s).bits_per_value_at(576) == pytest.approx((568 * 4 + 9 * 16) / 576)


def test_dynamic_variants_encode_the_same_in_the_reference_and_torch_codec():
    """Rotation over the non-outlier features (with the zero-padded last block) and bf16 outliers:
    TorchCodec's wire bytes and decodes are the reference's, bit for bit, on adversarial rows
    (NaN/Inf, subnormals, saturation), on every input dtype; and its all-reduce sum is the
    reference's."""
    from lowering.codec import ReferenceCodec
    from lowering.torch_codec import TorchCodec
    from tests.lowering.test_torch_codec import DTYPES, _bits, _check, adversarial

    cal = _two_site_calibrator().finish()
    site = "model.layers.0.mlp.down_proj"
    for rest in DYNAMIC:
        f = cal.with_rest(rest).format(site)
        for i, dt in enumerate(DTYPES):
            x = adversarial(f, 6, 576, dt, seed=11 + i, nonfinite=i == 0)
            x[:, f.outliers[0]] = 3e4  # a real outlier: kept in bf16, not quantised with its block
            _check(x, f)
        ref, fast = ReferenceCodec(), TorchCodec()
        bufs = [ref.quantize(adversarial(f, 4, 576, torch.float32, 30 + r, r == 1), f) for r in range(3)]
        assert torch.equal(_bits(fast.dequant_sum(bufs, f, (4, 576))), _bits(ref.dequant_sum(bufs, f, (4, 576))))
        assert torch.equal(fast.dequant_sum_requant(bufs, f, (4, 576)), ref.dequant_sum_requant(bufs, f, (4, 576)))


def test_with_rest_round_trips_and_refuses_what_cannot_carry_outliers(tmp_path):
    c = _two_site_calibrator(e=128)
    cal = c.finish(k=2).with_rest("int4/b64/bf16+h32")
    p = tmp_path / "cal.json"
    cal.save(p)
    back = Calibration.load(p)
    assert back == cal and str(back.rest) == "int4/b64/bf16+h32"
    site = next(iter(cal.sites))
    assert str(back.format(site)) == str(cal.format(site))
    # a version-1 file (before "rest" existed) still reads, as the static format
    d = json.loads(p.read_text())
    d["version"] = 1
    del d["rest"]
    assert Calibration.from_dict(d).rest is None and Calibration.from_dict(d).format(site).scale == "static"
    for bad, msg in (("int4/row/static+s[3f800000]", "static scales come from the calibration"),
                     ("int4/b64/bf16+o[1]", "outliers come from the calibration"), ("garbage", "rest: format")):
        with pytest.raises(ValueError, match=msg):
            cal.with_rest(bad)



# ---- on a model -----------------------------------------------------------------------------------
CFG = tp.LlamaConfig(200, 128, 256, 2, 4, 2)
PLANTED = (11, 77, 120)  # k = 2 by default at E = 128; we ask for 3
BATCHES = [torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _planted_model(ctx):
    m = tp.init_random_(tp.TPLlama(CFG, ctx), seed=1).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight[list(PLANTED)] *= 50.0  # these output features get 50x the range
    return m


def test_model_calibration_finds_planted_outliers():
    m = _planted_model(tp.TPContext.emulated(2))
    cal = calibrate(m, BATCHES).finish(k=3)
    assert set(cal.sites) == set(m.sites) and len(cal.sites) == 4
    for s in cal.sites.values():
        assert s.outliers == PLANTED and s.features == 128 and s.observations == 3
    # the calibrated formats plug into the policy; logits move less than with plain int4 rows
    with torch.no_grad():
        ref = m(BATCHES[0])
        m.set_policy(cal.policy(min_bytes=0))
        err_cal = (m(BATCHES[0]) - ref).abs().max()
        m.set_policy(tp.CommPolicy("int4/row/fp32", min_bytes=0))
        err_row = (m(BATCHES[0]) - ref).abs().max()
    assert 0 < err_cal < err_row
    # the same outliers with dynamic (and rotated) block scales for the rest: also through the
    # policy, and better than that block format without the outliers
    for rest in DYNAMIC:
        pol = cal.with_rest(rest).policy(min_bytes=0)
        for s in cal.sites:
            assert pol.format_for(tp.Site.of(s)) == cal.with_rest(rest).format(s)
        with torch.no_grad():
            m.set_policy(pol)
            err_dyn = (m(BATCHES[0]) - ref).abs().max()
            m.set_policy(tp.CommPolicy(rest, min_bytes=0))
            err_plain = (m(BATCHES[0]) - ref).abs().max()
        assert 0 < err_dyn < err_plain, rest
        back = tp.CommPolicy.from_dict(json.loads(json.dumps(pol.to_dict())))  # a policy file keeps them
        assert back.rules == pol.rules


@torch.no_grad()
def _calibrate_distributed(rank, world):
    cal = calibrate(_planted_model(tp.TPContext.from_group()), BATCHES).finish(k=3)
    return cal.to_dict()


def test_distributed_calibration_merges_ranks():
    res = run_ranks(_calibrate_distributed, 2, timeout=90)
    assert res[0] == res[1]
    emulated = calibrate(_planted_model(tp.TPContext.emulated(2)), BATCHES).finish(k=3).to_dict()
    for site, d in emulated["sites"].items():
        got = res[0]["sites"][site]
        assert got["outliers"] == d["outliers"] == list(PLANTED)
        assert torch.allclose(torch.tensor(got["scales"]), torch.tensor(d["scales"]), rtol=1e-5)
