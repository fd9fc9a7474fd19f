"""tp.comm.fused: planning (offsets, threshold, fallbacks) and the fused kernel sequence.

Everything but the symmetric-memory barrier runs here: :func:`tp.comm.fused.simulate` runs every
rank's kernels (on the GPU if there is one, else in Triton's interpreter) over W ordinary poisoned
buffers in lock-step and must equal the emulator bit for bit (with the RMSNorm epilogue:
emulate_all_reduce_rmsnorm). The real multi-GPU run is the last test (skipped with <2 GPUs);
benchmarks/allreduce_gpu.py repeats it at every benchmarked size.
"""
import math
import os

import pytest
import torch

import qformats
import tp
from tp.comm import collectives, fused as F
from tp.comm.emulate import emulate_all_reduce_rmsnorm

FORMATS = ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "int4/b32/bf16", "uint4/b128/fp16+zp"]
# where the simulated kernel sequence runs: the GPU when there is one (kernels compiled for it
# never take CPU tensors), else the Triton interpreter on CPU (conftest sets TRITON_INTERPRET)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _simulate(shards, fmt, **kw):
    """F.simulate on DEV; outputs back on CPU, where the emulator's reference lives."""
    return [o.cpu() for o in F.simulate([s.to(DEV) for s in shards], fmt, **kw)]


def _shards(world, shape, dtype=torch.bfloat16, seed=0, adversarial=False):
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(1000 * seed + r)
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-5, 6, (shape[-1],), generator=g).float())
        if adversarial:
            f = x.view(-1)
            f[:32] = 0.0
            f[32:64] = -0.0
            if f.numel() > 200:
                f[70] = float("nan") if r == 0 else 1.0
                f[100] = float("inf") if r == world - 1 else 2.0
                f[130:140] = 1e-40
                f[160:170] = 3.0e38
        out.append(x.to(dtype))
    return out


def _bits(t):
    """Bits of t with every NaN as one canonical pattern: NaN payload/sign is not part of the
    contract (the kernels store 0x7FC0 for a bf16 NaN, torch's CPU cast 0xFFFF); everything
    else, signed zeros and infinities included, is compared bit for bit."""
    t = t.contiguous()
    b = t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone()
    b[torch.isnan(t)] = -1
    return b


# --------------------------------------------------------------------------------- planning
def test_plan_gather_offsets_and_alignment():
    f = qformats.as_format("mxfp4")
    p = F.plan((1000, 4096), torch.bfloat16, f, 2, capacity=1 << 30)
    assert p.fused and p.algorithm == "gather" and p.mode == "pull"
    assert p.nbytes == f.nbytes((1000, 4096))
    assert p.slot % F.ALIGN == 0 and p.slot >= p.nbytes and p.need == p.slot
    push = F.plan((1000, 4096), torch.bfloat16, f, 4, capacity=1 << 30, algorithm="gather", mode="push")
    assert push.need == 4 * push.slot
    ranges = [push.slot_range(r) for r in range(4)]
    for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
        assert e0 <= s1 and s0 % F.ALIGN == 0 and e0 - s0 == push.nbytes
    assert ranges[-1][1] <= push.need


def test_plan_two_shot_offsets():
    f = qformats.as_format("uint4/b128/fp16+zp")
    p = F.plan((8, 16, 8192), torch.bfloat16, f, 4, capacity=1 << 30)
    assert p.algorithm == "two_shot" and p.mode == "push" and p.rows == 128 and p.chunk_rows == 32
    assert p.nbytes == f.nbytes((32, 8192))
    assert p.reduced_offset == 4 * p.slot and p.need == 5 * p.slot
    assert p.slot_range(3)[1] <= p.reduced_offset


def test_default_algorithm():
    assert [F.default_algorithm(w) for w in (2, 3, 4, 8)] == ["gather", "gather", "two_shot", "two_shot"]


@pytest.mark.parametrize("world,algorithm", [(2, "gather"), (4, "two_shot"), (8, "two_shot"), (4, "gather")])
def test_buffer_bytes_fits_every_smaller_message(world, algorithm):
    cap = F.buffer_bytes(300, 1000, FORMATS, world, algorithm)
    for fmt in FORMATS:
        for tokens in (1, 7, 64, 299, 300):
            if algorithm == "two_shot":
                tokens = tokens // world * world or world
            for mode in ("pull", "push"):
                p = F.plan((tokens, 1000), torch.bfloat16, fmt, world, capacity=cap, algorithm=algorithm, mode=mode)
                assert p.fused, (fmt, tokens, p.reason)
                assert p.need <= cap
    too_big = F.plan((4000, 1000), torch.bfloat16, "mxfp8_e4m3", world, capacity=cap, algorithm=algorithm)
    assert too_big.kind == "nccl" and "symmetric buffer" in too_big.reason


def test_threshold_and_plain_fallbacks():
    cap = 1 << 30
    assert F.plan((4, 64), torch.bfloat16, None, 2, capacity=cap).kind == "plain"
    p = F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=cap, min_bytes=4 * 64 * 2 + 1)
    assert p.kind == "plain" and "min_bytes" in p.reason
    p = F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=cap, min_bytes=4 * 64 * 2)
    assert p.fused  # at the threshold: compressed
    assert F.plan((0, 64), torch.bfloat16, "mxfp4", 2, capacity=cap).kind == "plain"
    assert F.DEFAULT_FUSED_MIN_BYTES > 0


def test_auto_window_and_max_bytes():
    assert F.auto_window("mxfp4", capturing=True) == (F.DEFAULT_FUSED_MIN_BYTES, None)
    assert F.auto_window("mxfp4", capturing=False) == (F.EAGER_FUSED_MIN_BYTES, None)
    assert F.auto_window("mxfp8_e4m3", True)[1] == F.FUSED_MAX_BYTES["fp8_e4m3/b32/e8m0"]
    assert F.EAGER_FUSED_MIN_BYTES >= F.DEFAULT_FUSED_MIN_BYTES
    p = F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=1 << 30, max_bytes=4 * 64 * 2 - 1)
    assert p.kind == "plain" and "does not pay" in p.reason
    assert F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=1 << 30, max_bytes=4 * 64 * 2).fused
    z = F.plan((4, 64), torch.bfloat16, "uint4/b128/fp16+zp", 2, capacity=1 << 30,
               min_bytes=0, max_bytes=F.auto_window("flash_int4", True)[1])
    assert z.kind == "plain"


@pytest.mark.parametrize("fmt,why", [("nvfp4", "+ts"), ("fp4_e2m1/b32/e8m0+o[1,5]", "outlier")])
def test_unsupported_formats_fall_back_to_the_nccl_path(fmt, why):
    f = qformats.as_format(fmt)
    p = F.plan((4, 64), torch.bfloat16, f, 2, capacity=1 << 30)
    assert p.kind == "nccl" and why in p.reason


def test_other_fallbacks():
    cap = 1 << 30
    assert F.plan((5, 64), torch.bfloat16, "mxfp4", 2, capacity=cap, algorithm="two_shot").kind == "nccl"
    assert F.plan((6, 64), torch.bfloat16, "mxfp4", 2, capacity=cap, algorithm="two_shot").fused
    assert F.plan((4, 64), torch.bfloat16, "mxfp4", 1, capacity=cap).kind == "nccl"
    assert F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=cap, device_type="cpu").kind == "nccl"


def test_plan_errors():
    with pytest.raises(ValueError, match="algorithm"):
        F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=1, algorithm="ring")
    with pytest.raises(ValueError, match="mode"):
        F.plan((4, 64), torch.bfloat16, "mxfp4", 2, capacity=1, mode="both")
    with pytest.raises(TypeError):
        F.plan((4, 64), torch.int32, "mxfp4", 2, capacity=1)
    with pytest.raises(ValueError):
        F.plan((4, 64), torch.bfloat16, "not_a_format", 2, capacity=1)


# --------------------------------------------------------------------------------- kernels (GPU or interpreter)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world,algorithm,mode", [
    (2, "gather", "pull"), (2, "gather", "push"), (2, "two_shot", "push"), (3, "gather", "pull"), (4, "two_shot", "push"),
])
def test_simulated_fused_equals_emulator(fmt, world, algorithm, mode):
    shards = _shards(world, (8, 320), seed=world, adversarial=True)
    ref = tp.emulate_all_reduce(shards, fmt, algorithm)
    outs = _simulate(shards, fmt, algorithm=algorithm, mode=mode)
    for r, o in enumerate(outs):
        assert o.shape == ref.shape and o.dtype == ref.dtype
        assert torch.equal(_bits(o), _bits(ref)), f"rank {r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2, 100), (1, 32)])
def test_simulated_odd_shapes_and_dtypes(dtype, shape):
    shards = _shards(2, shape, dtype=dtype, seed=7)
    for algorithm in ("gather", "two_shot"):
        if algorithm == "two_shot" and math.prod(shape[:-1]) % 2:
            continue
        ref = tp.emulate_all_reduce(shards, "mxfp4", algorithm)
        for o in _simulate(shards, "mxfp4", algorithm=algorithm):
            assert torch.equal(_bits(o), _bits(ref))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fmt,second", [("mxfp4", "mxfp8_e4m3"), ("int4_b32_bf16_h32", "int8/b32/bf16"),
                                        ("mxfp8_e4m3", "mxfp4")])
def test_simulated_fused_two_shot_second_hop_equals_emulator(world, fmt, second):
    """two_shot with the reduced sum in a format of its own (issue 16): the fused kernel sequence
    (dequant-sum to fp32, encode in the second format, every rank decodes it) on every rank
    equals the emulator's, and differs from the single-format result."""
    shards = _shards(world, (8, 320), seed=11 + world, adversarial=True)
    ref = tp.emulate_all_reduce(shards, fmt, "two_shot", second_fmt=second)
    outs = _simulate(shards, fmt, algorithm="two_shot", second_fmt=second)
    for r, o in enumerate(outs):
        assert torch.equal(_bits(o), _bits(ref)), f"rank {r}"
    assert not torch.equal(_bits(ref), _bits(tp.emulate_all_reduce(shards, fmt, "two_shot")))


def test_plan_second_hop_room_and_errors():
    W, rows, H = 4, 64, 512
    small = F.buffer_bytes(rows, H, ["mxfp4"], W, "two_shot")
    big = F.buffer_bytes(rows, H, ["mxfp4"], W, "two_shot", second_fmts=["int8/b32/bf16"])
    c = rows // W
    assert big - small >= qformats.as_format("int8/b32/bf16").nbytes((c, H)) - qformats.as_format("mxfp4").nbytes((c, H)) - F.ALIGN
    p = F.plan((rows, H), torch.bfloat16, "mxfp4", W, capacity=big, algorithm="two_shot", second_fmt="int8/b32/bf16")
    assert p.fused and p.reduced_nbytes == qformats.as_format("int8/b32/bf16").nbytes((c, H))
    assert str(p.kc_second.format) == "int8/b32/bf16" and p.need <= big
    assert F.plan((rows, H), torch.bfloat16, "mxfp4", W, capacity=big, algorithm="two_shot").kc_second is None
    # a buffer sized without the second format: the NCCL path (same bits), never an overflow
    p = F.plan((rows, H), torch.bfloat16, "mxfp4", W, capacity=small, algorithm="two_shot", second_fmt="int8/b32/bf16")
    assert p.kind == "nccl" and "symmetric buffer" in p.reason
    # a second format the kernels cannot carry: the NCCL path
    p = F.plan((rows, H), torch.bfloat16, "mxfp4", W, capacity=big, algorithm="two_shot", second_fmt="nvfp4")
    assert p.kind == "nccl" and "per-tensor scale" in p.reason
    with pytest.raises(ValueError, match="no second hop"):
        F.plan((rows, H), torch.bfloat16, "mxfp4", 2, capacity=big, algorithm="gather", second_fmt="int8/b32/bf16")


def test_simulate_rejects_non_fused_plans():
    with pytest.raises(ValueError, match="not a fused plan"):
        _simulate(_shards(2, (4, 64)), "nvfp4")


# --------------------------------------------------------------------------------- the RMSNorm epilogue
NORM_FORMATS = ["mxfp8_e4m3", "mxfp4", "int8/b32/bf16", "int6/b32/bf16+h32"]
EPS = 1e-5


def _res_weight(shape, dtype, seed=0, res_dtype=None, w_dtype=None):
    """The residual and the weight, the same on every rank (TP's residual stream is replicated)."""
    g = torch.Generator().manual_seed(500 + seed)
    res = (torch.randn(shape, generator=g) * 4).to(res_dtype or dtype)
    w = (torch.randn(shape[-1], generator=g) + 1).to(w_dtype or dtype)
    return res, w


def _simulate_norm(shards, fmt, res, w, eps=EPS, **kw):
    return [(y.cpu(), h.cpu()) for y, h in F.simulate([s.to(DEV) for s in shards], fmt, residual=res.to(DEV),
                                                      weight=w.to(DEV), eps=eps, **kw)]


def _assert_norm_equal(outs, ref):
    ey, eh = ref
    for r, (y, h) in enumerate(outs):
        assert y.shape == ey.shape and y.dtype == ey.dtype and h.shape == eh.shape and h.dtype == eh.dtype
        assert torch.equal(_bits(h), _bits(eh)), f"h: rank {r}"
        assert torch.equal(_bits(y), _bits(ey)), f"normed: rank {r}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", NORM_FORMATS)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_simulated_rmsnorm_equals_emulator(world, fmt, dtype):
    """The last decode with the epilogue (gather's dequant-sum at W <= 3, two_shot's decode of the
    reduced chunks at W >= 4: the fused default) on every rank equals
    emulate_all_reduce_rmsnorm(.., "fused") bit for bit, normed and h. Gather takes an odd row
    count; two_shot fuses only rows divisible by W. Width 96: three 32-blocks, a masked tile slot."""
    rows = 7 if world <= 3 else 2 * world
    shape = (rows, 96)
    shards = _shards(world, shape, dtype=dtype, seed=world, adversarial=world == 2)
    res, w = _res_weight(shape, dtype, seed=world)
    ref = emulate_all_reduce_rmsnorm(shards, res, w, EPS, fmt, "fused")
    _assert_norm_equal(_simulate_norm(shards, fmt, res, w), ref)


@pytest.mark.parametrize("world,algorithm,mode,second", [
    (2, "gather", "push", None), (2, "two_shot", "push", None), (4, "two_shot", "push", "mxfp8_e4m3"),
    (3, "two_shot", "push", "int8/b32/bf16"),
])
def test_simulated_rmsnorm_modes_second_hop_and_mixed_dtypes(world, algorithm, mode, second):
    """gather push (the local slots' dequant-sum) and two_shot with a second-hop format (the norm's
    blocks are the second format's), an fp32 residual and weight under bf16 / fp32 shards, a
    3-D shape; every rank equals the emulator."""
    fmt = "int4_b32_bf16_h32" if second == "int8/b32/bf16" else "mxfp4"
    for dtype, shape in ((torch.bfloat16, (2, world, 64)), (torch.float32, (world, 1, 160))):
        shards = _shards(world, shape, dtype=dtype, seed=20 + world)
        res, w = _res_weight(shape, dtype, seed=3, res_dtype=torch.float32, w_dtype=torch.float32)
        ref = emulate_all_reduce_rmsnorm(shards, res, w, 1e-3, fmt, algorithm, second_fmt=second)
        _assert_norm_equal(_simulate_norm(shards, fmt, res, w, 1e-3, algorithm=algorithm, mode=mode,
                                          second_fmt=second), ref)


def test_simulated_rmsnorm_saturates_and_keeps_special_values():
    """A residual that overflows the sum (h saturates to the dtype's max, as every decode's cast),
    infinities and NaN in the shards: still the emulator's bits."""
    world, shape = 2, (8, 64)
    shards = _shards(world, shape, dtype=torch.float16, seed=9, adversarial=True)
    res, w = _res_weight(shape, torch.float16, seed=9)
    res[4] = 65504.0  # (rows 0-2 hold the shards' special values)
    res[5, :5] = float("inf")
    for alg in ("gather", "two_shot"):
        ref = emulate_all_reduce_rmsnorm(shards, res, w, EPS, "int8/b32/bf16", alg)
        assert (ref[1][4] == 65504.0).any() and torch.isinf(ref[1][5]).any() and torch.isnan(ref[0]).any()
        _assert_norm_equal(_simulate_norm(shards, "int8/b32/bf16", res, w, algorithm=alg), ref)


def _closed_over_nothing():
    """A FusedAllReduce without a process group or a symmetric buffer: enough for the argument
    checks, which all come before the plan."""
    ar = F.FusedAllReduce.__new__(F.FusedAllReduce)
    ar.closed = False
    return ar


@pytest.mark.parametrize("case,err,match", [
    ("residual_shape", ValueError, "residual must have x's shape"),
    ("weight_length", ValueError, r"weight \[64\]"),
    ("x_grad", RuntimeError, r"\((x|shards\[0\])\) does not propagate gradients"),
    ("residual_grad", RuntimeError, r"\(residual\) does not propagate gradients"),
    ("weight_grad", RuntimeError, r"\(weight\) does not propagate gradients"),
    ("residual_dtype", TypeError, "residual has dtype torch.int32"),
    ("weight_missing", ValueError, "residual, weight and eps together"),
])
def test_rmsnorm_refusals(case, err, match):
    """simulate and FusedAllReduce.all_reduce_rmsnorm raise the same clear errors, before any kernel."""
    shards = _shards(2, (4, 64))
    res, w = _res_weight((4, 64), torch.bfloat16)
    kw = dict(residual=res, weight=w, eps=EPS)
    if case == "residual_shape":
        kw["residual"] = res[:2]
    elif case == "weight_length":
        kw["weight"] = torch.ones(63)
    elif case == "x_grad":
        shards = [s.float().requires_grad_() for s in shards]
        kw["residual"] = res.float()
    elif case.endswith("_grad"):
        kw[case[:-5]] = kw[case[:-5]].float().requires_grad_()
    elif case == "residual_dtype":
        kw["residual"] = res.to(torch.int32)
    else:
        kw["weight"] = None
    with pytest.raises(err, match=match):
        F.simulate(shards, "mxfp4", **kw)
    if case != "weight_missing":  # (a required argument of the method)
        with pytest.raises(err, match=match):
            _closed_over_nothing().all_reduce_rmsnorm(shards[0], kw["residual"], kw["weight"], EPS, "mxfp4")


def test_simulate_epilogue_arguments_come_together():
    with pytest.raises(ValueError, match="pass residual too"):
        F.simulate(_shards(2, (4, 64)), "mxfp4", weight=torch.ones(64), eps=EPS)
    with torch.no_grad():  # under no_grad an input that requires grad is fine (inference)
        shards = [s.float().requires_grad_() for s in _shards(2, (4, 64))]
        res, w = _res_weight((4, 64), torch.float32)
        ref = emulate_all_reduce_rmsnorm([s.detach() for s in shards], res, w, EPS, "mxfp4", "gather")
        _assert_norm_equal(_simulate_norm(shards, "mxfp4", res, w, algorithm="gather"), ref)


# --------------------------------------------------------------------------------- routing
def test_wire_algorithm_and_emulated_fused():
    from tp.comm.call import wire_algorithm

    assert [wire_algorithm("fused", w) for w in (1, 2, 3, 4, 8)] == ["gather"] * 3 + ["two_shot"] * 2
    assert wire_algorithm("two_shot", 2) == "two_shot" and F.default_algorithm(4) == "two_shot"
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        wire_algorithm("fast", 2)
    for w, alg in ((2, "gather"), (4, "two_shot")):
        shards = _shards(w, (6, 64), torch.float32)
        assert torch.equal(_bits(tp.emulate_all_reduce(shards, "mxfp4", "fused")),
                           _bits(tp.emulate_all_reduce(shards, "mxfp4", alg)))
    assert tp.CommPolicy("mxfp4", "fused").algorithm == "fused"


def test_fused_for_says_how_to_create_one():
    from types import SimpleNamespace

    with pytest.raises(RuntimeError, match=r"FusedAllReduce\(group, max_tokens=.*before CUDA-graph capture"):
        collectives.fused_for(SimpleNamespace(group_name="no-such-group"))


def _fused_route(rank, world):
    # off CUDA, "fused" is the NCCL-path algorithm with the same bits (gather W<=3, two_shot W>=4)
    return {fmt: tp.all_reduce(_shards(world, (6, 64), torch.bfloat16, seed=5)[rank], fmt, algorithm="fused")
            for fmt in ("mxfp4", "int4/b32/bf16")}


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_fused_off_cuda_equals_emulator(world):
    from tests.tp.multirank import run_ranks

    res = run_ranks(_fused_route, world)
    shards = _shards(world, (6, 64), torch.bfloat16, seed=5)
    for fmt, y0 in res[0].items():
        expect = tp.emulate_all_reduce(shards, fmt, "fused")
        for r in range(world):
            assert torch.equal(_bits(res[r][fmt]), _bits(expect)), (fmt, r)


# --------------------------------------------------------------------------------- GPUs
def _gpu_worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    from datetime import timedelta

    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank),
                            timeout=timedelta(seconds=120))  # a hang fails the ranks, not the whole run
    ar = F.FusedAllReduce(max_tokens=64, hidden=1024, fmts=FORMATS, min_bytes=0)
    fails = []
    for fmt in FORMATS:
        shards = [s.cuda() for s in _shards(world, (64, 1024), seed=3, adversarial=True)]
        for alg, mode in (("gather", "pull"), ("gather", "push"), ("two_shot", "push")):
            ar.algorithm, ar.mode = alg, mode
            ref = tp.emulate_all_reduce([s.cpu() for s in shards], fmt, alg).cuda()
            y = ar(shards[rank], fmt)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                ar(shards[rank], fmt)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                yg = ar(shards[rank], fmt)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            if not (torch.equal(_bits(y), _bits(ref)) and torch.equal(_bits(yg), _bits(ref))):
                fails.append((fmt, alg, mode))
        # tp.all_reduce(..., algorithm="fused") is routed to the registered FusedAllReduce
        ar.algorithm, ar.mode = F.default_algorithm(world), "pull"
        y = tp.all_reduce(shards[rank], fmt, algorithm="fused")
        if collectives.fused_for().plan(shards[rank], fmt).kind != "fused" or not torch.equal(
                _bits(y), _bits(tp.emulate_all_reduce([s.cpu() for s in shards], fmt, "fused").cuda())):
            fails.append((fmt, "tp.all_reduce fused"))
    # two_shot with a second-hop format of its own (room asked for with second_fmts)
    ar2 = F.FusedAllReduce(max_tokens=64, hidden=1024, fmts=FORMATS, min_bytes=0, algorithm="two_shot",
                           second_fmts=["mxfp8_e4m3"])
    for fmt in ("mxfp4", "int4/b32/bf16"):
        shards = [s.cuda() for s in _shards(world, (64, 1024), seed=5, adversarial=True)]
        ref = tp.emulate_all_reduce([s.cpu() for s in shards], fmt, "two_shot", second_fmt="mxfp8_e4m3").cuda()
        y = ar2(shards[rank], fmt, second_fmt="mxfp8_e4m3")
        if ar2.plan(shards[rank], fmt, "mxfp8_e4m3").kind != "fused" or not torch.equal(_bits(y), _bits(ref)):
            fails.append((fmt, "two_shot second hop"))
    # the RMSNorm epilogue in the last decode kernel: eager, in a CUDA graph, and routed from
    # tp.all_reduce_rmsnorm(..., algorithm="fused")
    for fmt in ("mxfp4", "int4/b32/bf16", "mxfp8_e4m3"):
        shards = [s.cuda() for s in _shards(world, (64, 1024), seed=7, adversarial=True)]
        res, w = (t.cuda() for t in _res_weight((64, 1024), torch.bfloat16, seed=7))
        cpu = [s.cpu() for s in shards]
        for alg, mode in (("gather", "pull"), ("gather", "push"), ("two_shot", "push")):
            ar.algorithm, ar.mode = alg, mode
            ey, eh = (t.cuda() for t in emulate_all_reduce_rmsnorm(cpu, res.cpu(), w.cpu(), EPS, fmt, alg))
            y, h = ar.all_reduce_rmsnorm(shards[rank], res, w, EPS, fmt)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                ar.all_reduce_rmsnorm(shards[rank], res, w, EPS, fmt)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                yg, hg = ar.all_reduce_rmsnorm(shards[rank], res, w, EPS, fmt)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            if not all(torch.equal(_bits(a), _bits(b)) for a, b in ((y, ey), (h, eh), (yg, ey), (hg, eh))):
                fails.append((fmt, alg, mode, "rmsnorm"))
        ar.algorithm, ar.mode = F.default_algorithm(world), "pull"
        y, h = tp.all_reduce_rmsnorm(shards[rank], res, w, EPS, fmt, algorithm="fused")
        ey, eh = (t.cuda() for t in emulate_all_reduce_rmsnorm(cpu, res.cpu(), w.cpu(), EPS, fmt, "fused"))
        if not (torch.equal(_bits(y), _bits(ey)) and torch.equal(_bits(h), _bits(eh))):
            fails.append((fmt, "tp.all_reduce_rmsnorm fused"))
        if fmt != "mxfp8_e4m3":
            ey, eh = (t.cuda() for t in emulate_all_reduce_rmsnorm(cpu, res.cpu(), w.cpu(), EPS, fmt, "two_shot",
                                                                   second_fmt="mxfp8_e4m3"))
            y, h = ar2.all_reduce_rmsnorm(shards[rank], res, w, EPS, fmt, second_fmt="mxfp8_e4m3")
            if not (torch.equal(_bits(y), _bits(ey)) and torch.equal(_bits(h), _bits(eh))):
                fails.append((fmt, "rmsnorm two_shot second hop"))
    q.put((rank, fails))
    F.shutdown(ar, ar2)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs with peer access (symmetric memory)")
def test_fused_on_two_gpus_equals_emulator():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_gpu_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = dict(q.get(timeout=300) for _ in procs)  # queue.Empty (the test fails) on a hang
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert res == {0: [], 1: []}


def _fused_first_sight(rank, world):
    # FusedAllReduce's planning without its symmetric buffer (that needs CUDA peers): its first
    # plan of a call checks across ranks that every rank makes that call
    import torch.distributed as dist

    ar = F.FusedAllReduce.__new__(F.FusedAllReduce)
    ar.group, ar.world, ar.rank = dist.group.WORLD, world, rank
    ar.algorithm, ar.mode, ar.capacity, ar.min_bytes, ar._plans = "gather", "pull", 1 << 20, 0, {}
    x = torch.zeros(4, 64)
    same = ar.plan(torch.zeros(8, 64), "mxfp4").kind  # agreed: a plan (nccl on CPU)
    ar.plan(x.reshape(2, 128) if rank else x, "mxfp4")  # a new call on both ranks: same bytes, other shapes
    return same


def test_fused_plans_check_the_first_call_across_ranks():
    from tests.tp.multirank import RankError, run_ranks

    res = run_ranks(_fused_first_sight, 2, timeout=30, expect_errors=True)
    for r in res:
        assert isinstance(r, RankError) and r.type == "ValueError" and "disagree with rank 0 on shape" in r.message, r
