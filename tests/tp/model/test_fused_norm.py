"""The all-reduce whose last decode ends in the residual add and RMSNorm: the emulator equals
``torch.ops.qformats.dequant_sum_rmsnorm`` on the buffers the ranks exchange, bit for bit
(gather and two_shot, a second hop, padding rows); TPLlama(fuse_norm=True) takes that path
at compressed emulated sites and keeps the unfused bits elsewhere."""
import pytest
import torch

import tp
import tp.model.layers as layers
from lowering import ops
from lowering.ops import LoweredCodec
from tests.lowering.test_kernels import same_bits
from tp.comm.call import rows_view, split_rows
from tp.comm.emulate import emulate_all_reduce_rmsnorm

Q = torch.ops.qformats


def _inputs(world, shape, dt, seed):
    g = torch.Generator().manual_seed(seed)
    shards = [(torch.randn(shape, generator=g) * (i + 1)).to(dt) for i in range(world)]
    res = (torch.randn(shape, generator=g) * 3).to(dt)
    w = (torch.randn(shape[-1], generator=g) + 1).to(dt)
    return shards, res, w


@pytest.mark.parametrize("fmt,dt", [("mxfp4", torch.bfloat16), ("int5/b32/bf16+h32", torch.float16),
                                    ("fp6_e2m3/b24/fp16", torch.float32)])
@pytest.mark.parametrize("codec", [None, LoweredCodec()], ids=["reference", "lowered"])
def test_gather_equals_the_fused_op(fmt, dt, codec):
    shape = (2, 3, 72)
    shards, res, w = _inputs(2, shape, dt, seed=1)
    y, h = emulate_all_reduce_rmsnorm(shards, res, w, 1e-5, fmt, "gather", codec=codec)
    bufs = torch.stack([Q.quantize(rows_view(s), fmt) for s in shards])
    ey, eh = Q.dequant_sum_rmsnorm(bufs, fmt, [6, 72], dt, rows_view(res), w, 1e-5)
    assert same_bits(h, eh.reshape(shape)) and same_bits(y, ey.reshape(shape))


@pytest.mark.parametrize("fmt,second", [("flash_int4", None), ("int4_b32", "int8/b32/bf16")])
def test_two_shot_equals_the_fused_op_per_chunk(fmt, second):
    """Chunk j's reduced buffer (in the second format) decoded with the epilogue (N = 1); 7 rows
    over 4 ranks (one padding row)."""
    world, shape, dt = 4, (7, 64), torch.bfloat16
    shards, res, w = _inputs(world, shape, dt, seed=2)
    y, h = emulate_all_reduce_rmsnorm(shards, res, w, 1e-6, fmt, "two_shot", second_fmt=second)
    last = second or fmt
    split = [split_rows(s, world)[0] for s in shards]
    rsplit = split_rows(res, world)[0]
    ys, hs = [], []
    for j in range(world):
        bufs = torch.stack([Q.quantize(c[j], fmt) for c in split])
        s = ops.reference_dequant_sum(bufs, fmt, list(split[0][j].shape), torch.float32)
        red = Q.quantize(s, last)[None]
        a, b = Q.dequant_sum_rmsnorm(red, last, list(split[0][j].shape), dt, rsplit[j], w, 1e-6)
        ys.append(a)
        hs.append(b)
    assert same_bits(h, torch.cat(hs)[:7]) and same_bits(y, torch.cat(ys)[:7])


def test_uncompressed_is_plain_sum_plus_residual():
    shards, res, w = _inputs(2, (3, 40), torch.float32, seed=3)
    y, h = emulate_all_reduce_rmsnorm(shards, res, w, 1e-6, None)
    assert torch.equal(h, shards[0] + shards[1] + res)
    assert torch.equal(y, ops.reference_rms_norm(h, w, 1e-6, 40))


CFG = tp.LlamaConfig(250, 64, 128, 2, 8, 4, head_dim=8, rms_norm_eps=1e-6)
IDS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


def _model(fmt, fuse, dtype=torch.float32):
    m = tp.TPLlama(CFG, tp.TPContext.emulated(2), tp.CommPolicy(fmt, "gather", 0), dtype=dtype, fuse_norm=fuse)
    return tp.init_random_(m, seed=3).eval()


@torch.no_grad()
def test_model_fuse_norm(monkeypatch):
    calls = []
    real = layers.emulate_all_reduce_rmsnorm
    monkeypatch.setattr(layers, "emulate_all_reduce_rmsnorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    # nothing compressed: the very same bits as the unfused model, the fused path unused
    assert torch.equal(_model(None, True)(IDS), _model(None, False)(IDS)) and not calls
    ref = _model(None, False)(IDS)
    unfused = _model("mxfp4", False)(IDS)
    fused = _model("mxfp4", True)(IDS)
    assert len(calls) == 2 * CFG.num_hidden_layers
    err = (unfused - ref).abs().max()
    assert 0 < err and (fused - unfused).abs().max() <= 0.1 * err  # (only the norm's rounding moves)
    b16 = _model("mxfp4", True, torch.bfloat16)(IDS)
    assert torch.isfinite(b16).all()
