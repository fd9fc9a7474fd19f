"""Parallel layers: sharded (fork-started gloo ranks) and emulated results against full layers."""
import pytest
import torch
import torch.nn.functional as F

import tp
from tests.tp.multirank import run_ranks
from tp.model.layers import ShardSpec, gather_last_dim


def _full(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


X = _full(0, 3, 5, 32)  # [batch, tokens, in]
W_COL = _full(1, 48, 32)
B_COL = _full(2, 48)
W_ROW = _full(3, 40, 48)
B_ROW = _full(4, 40)
EMB = _full(5, 10, 16)  # vocabulary 10: not a multiple of 4
IDS = torch.tensor([[0, 9, 3, 7, 2, 5], [8, 1, 4, 6, 9, 0]])


def _load(mod, **full):
    specs = mod.shard_specs()
    with torch.no_grad():
        for name, t in full.items():
            s = specs.get(name)
            getattr(mod, name).copy_(t if s is None else s.take(t))


def _layers(rank, world, fmt, second_fmt=None):
    ctx = tp.TPContext.from_group()
    col = tp.ColumnParallelLinear(32, 48, ctx, bias=True)
    _load(col, weight=W_COL, bias=B_COL)
    col_g = tp.ColumnParallelLinear(32, 48, ctx, bias=True, gather_output=True)
    _load(col_g, weight=W_COL, bias=B_COL)
    row = tp.RowParallelLinear(48, 40, ctx, bias=True, site="s", policy=tp.CommPolicy(fmt, "two_shot", 0, second_fmt=second_fmt))
    _load(row, weight=W_ROW, bias=B_ROW)
    emb = tp.VocabParallelEmbedding(10, 16, ctx)
    _load(emb, weight=EMB)
    h = col(X)
    partials = []
    row.observer = lambda site, r, p: partials.append(p.clone())
    return {"col": h, "col_gathered": col_g(X), "row": row(F.gelu(h)), "partial": partials[0], "emb": emb(IDS)}


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layers_match_full_layers(world):
    res = run_ranks(_layers, world, None)
    h_full = F.linear(X, W_COL, B_COL)
    per = 48 // world
    for r in range(world):
        assert torch.allclose(res[r]["col"], h_full[..., r * per : (r + 1) * per], atol=1e-5)
        assert torch.allclose(res[r]["col_gathered"], h_full, atol=1e-5)
        assert torch.allclose(res[r]["row"], F.linear(F.gelu(h_full), W_ROW, B_ROW), atol=1e-4)
        assert torch.equal(res[r]["emb"], F.embedding(IDS, EMB))  # exact: one non-zero term per token
        assert torch.equal(res[r]["row"], res[0]["row"])


def test_row_parallel_compressed_reduces_its_partials_exactly():
    """What the layer returns is the emulator applied to the partial sums the ranks computed."""
    res = run_ranks(_layers, 2, "mxfp4")
    partials = [res[r]["partial"] for r in range(2)]
    expect = tp.emulate_all_reduce(partials, "mxfp4", "two_shot") + B_ROW
    for r in range(2):
        assert torch.equal(res[r]["row"], expect)


def test_row_parallel_sends_the_reduced_sum_in_the_policy_second_format():
    res = run_ranks(_layers, 2, "mxfp4", "mxfp8_e4m3")
    partials = [res[r]["partial"] for r in range(2)]
    expect = tp.emulate_all_reduce(partials, "mxfp4", "two_shot", second_fmt="mxfp8_e4m3") + B_ROW
    assert not torch.equal(expect, tp.emulate_all_reduce(partials, "mxfp4", "two_shot") + B_ROW)
    for r in range(2):
        assert torch.equal(res[r]["row"], expect)
    # the emulated layer honours the same policy
    ctx = tp.TPContext.emulated(2)
    row = tp.RowParallelLinear(48, 40, ctx, site="x", policy=tp.CommPolicy("mxfp4", "two_shot", 0, second_fmt="mxfp8_e4m3"))
    _load(row, weight=W_ROW)
    x = _full(9, 7, 48)
    halves = [F.linear(x[:, 24 * r : 24 * r + 24], W_ROW[:, 24 * r : 24 * r + 24]) for r in range(2)]
    assert torch.equal(row(x), tp.emulate_all_reduce(halves, "mxfp4", "two_shot", second_fmt="mxfp8_e4m3"))


def test_emulated_row_parallel_equals_emulator_on_column_slices():
    ctx = tp.TPContext.emulated(4)
    row = tp.RowParallelLinear(48, 40, ctx, site="x", policy=tp.CommPolicy("int4_b32", "gather", 0))
    _load(row, weight=W_ROW)
    x = _full(9, 7, 48)
    partials = [F.linear(x[:, 12 * r : 12 * r + 12], W_ROW[:, 12 * r : 12 * r + 12]) for r in range(4)]
    assert torch.equal(row(x), tp.emulate_all_reduce(partials, "int4_b32", "gather"))
    assert row.weight.shape == (40, 48)  # emulation keeps full weights


def test_single_process_layers_do_not_quantise():
    row = tp.RowParallelLinear(48, 40, tp.TPContext(), site="x", policy=tp.CommPolicy("mxfp4", "gather", 0))
    _load(row, weight=W_ROW)
    assert torch.equal(row(_full(9, 7, 48)), F.linear(_full(9, 7, 48), W_ROW))


def test_policy_resolution():
    p = tp.CommPolicy("mxfp4", rules=(tp.Rule(None, modules=("model.layers.0.mlp.down_proj",)),
                                      tp.Rule("int4_b32", modules=("*.mlp.down_proj",))))
    assert str(p.format_for("model.layers.3.self_attn.o_proj")) == "fp4_e2m1/b32/e8m0"
    assert str(p.format_for("model.layers.3.mlp.down_proj")) == "int4/b32/e8m0"
    assert p.format_for("model.layers.0.mlp.down_proj") is None
    assert p.min_bytes == tp.DEFAULT_MIN_BYTES
    with pytest.raises(ValueError, match="unknown algorithm"):
        tp.CommPolicy("mxfp4", "ring")
    with pytest.raises(ValueError, match="unsupported communication format"):
        tp.CommPolicy("nonsense")


def test_below_threshold_the_policy_sends_uncompressed():
    ctx = tp.TPContext.emulated(2)
    row = tp.RowParallelLinear(48, 40, ctx, site="x", policy=tp.CommPolicy("mxfp4", "gather", 7 * 40 * 4 + 1))
    _load(row, weight=W_ROW)
    x = _full(9, 7, 48)
    exact = F.linear(x[:, :24], W_ROW[:, :24]) + F.linear(x[:, 24:], W_ROW[:, 24:])
    assert torch.equal(row(x), exact)


def test_shard_spec_pads_vocabulary():
    full = torch.arange(10.0).reshape(10, 1)
    s = ShardSpec(0, 9, 12, 10)
    assert s.take(full).flatten().tolist() == [9.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="expected 10"):
        s.take(full[:9])


def test_indivisible_shapes_raise_clearly():
    ctx = tp.TPContext(world_size=4, rank=1)
    with pytest.raises(ValueError, match="out_features = 30 does not divide by the tensor-parallel size 4"):
        tp.ColumnParallelLinear(8, 30, ctx, name="ColumnParallelLinear")
    with pytest.raises(ValueError, match="in_features = 30 does not divide"):
        tp.RowParallelLinear(30, 8, ctx, site="s")
    with pytest.raises(ValueError, match="not valid"):
        tp.TPContext(world_size=2, rank=2)


def _gather(rank, world):
    y = torch.full((2, 3, 2), float(rank))
    return gather_last_dim(y, tp.TPContext.from_group())


def test_gather_last_dim_orders_by_rank():
    res = run_ranks(_gather, 4)
    assert res[0].shape == (2, 3, 8) and res[0][0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
