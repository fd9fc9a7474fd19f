"""The exact single-process emulator of the compressed collectives.

Use it for accuracy studies (perplexity under a communication format, at any world size,
on one CPU) and as the oracle the distributed tests compare against bit for bit. It costs
the same arithmetic as all ranks together minus the redundancy: a gather all-reduce decodes
the W buffers once, not W times; two_shot reduces each chunk once.

It calls the very same codec methods (:class:`lowering.codec.Codec`) and row bookkeeping
(:func:`tp.comm.call.split_rows` / :func:`merge_rows`) as the distributed path, in the same
order, so the two cannot drift apart: only the data movement is replaced by list indexing.
"""
from __future__ import annotations

from typing import Sequence

import torch

from qformats.codec import saturating_cast

from .call import (check_algorithm, check_tensor, merge_rows, reduce_chunk, resolve_format, rows_view, second_hop,
                   split_rows, wire_algorithm)
from .collectives import compresses, get_codec, straight_through

__all__ = ["emulate_all_gather", "emulate_all_reduce", "emulate_all_reduce_rmsnorm", "emulate_reduce_scatter",
           "plain_sum", "predicted_error"]


def _check_shards(shards: Sequence[torch.Tensor], fmt) -> list[torch.Tensor]:
    if isinstance(shards, torch.Tensor):
        raise TypeError("shards must be a list of tensors, one per rank (got a single tensor)")
    shards = list(shards)
    if not shards:
        raise ValueError("shards is empty: pass one tensor per rank")
    first = shards[0]
    for i, s in enumerate(shards):
        check_tensor(s, fmt, what=f"shards[{i}]")
        if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"shards[{i}] is {s.dtype} {tuple(s.shape)} on {s.device}, but shards[0] is "
                f"{first.dtype} {tuple(first.shape)} on {first.device}: all ranks must contribute the same shape and dtype"
            )
    return shards


def _no_grad_needed(shards, op: str) -> None:
    if torch.is_grad_enabled() and any(s.requires_grad for s in shards):
        raise RuntimeError(f"tp.{op} with a format does not propagate gradients and a shard requires grad: "
                           f"call it under torch.no_grad()")


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the 16/32-bit floats; the dtype itself for everything else: integers sum exactly
    (wrapping like the backends' integer sums), float64 in float64. Through fp32 an int64 or a
    float64 would lose its low bits (2**40 + 1 + 2**41 + 2), which no backend does."""
    if dtype.is_floating_point and torch.finfo(dtype).bits <= 32:
        return torch.float32
    return dtype


def plain_sum(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in rank order, cast back: the uncompressed all-reduce as the emulator models it.

    16/32-bit floats accumulate in fp32; integers and float64 in their own dtype (exact for
    integers). Backends (gloo, NCCL) choose their own summation order and may accumulate bf16
    in bf16, so this equals ``dist.all_reduce`` bit for bit only when the additions are exact
    (always for integers); otherwise within one rounding per addition.
    """
    acc_dtype = _accumulator(shards[0].dtype)
    acc = shards[0].to(acc_dtype, copy=True)
    for s in shards[1:]:
        acc.add_(s.to(acc_dtype))
    return acc.to(shards[0].dtype)


def _checked_call(shards, fmt, algorithm: str, second_fmt):
    """(format, checked shards, world size, second-hop format) of an emulated all-reduce: the
    checks :func:`tp.comm.collectives.all_reduce` makes, for both emulators."""
    fmt = resolve_format(fmt)
    check_algorithm(algorithm)
    shards = _check_shards(shards, fmt)
    world = len(shards)
    second = second_hop(fmt, second_fmt, algorithm, world)
    if second is not fmt:
        _check_shards(shards, second)
    return fmt, shards, world, second


def emulate_all_reduce(
    shards: Sequence[torch.Tensor],
    fmt=None,
    algorithm: str = "gather",
    min_bytes: int = 0,
    *,
    second_fmt=None,
    codec=None,
) -> torch.Tensor:
    """What every rank gets from ``tp.all_reduce`` when rank i contributes ``shards[i]``.

    Same arguments and same checks as :func:`tp.comm.collectives.all_reduce` (world size =
    ``len(shards)``). Bitwise equal to the distributed result for any format and algorithm;
    for ``fmt=None`` (or below ``min_bytes``) it is :func:`plain_sum`. Differentiable
    straight through, like the distributed one: every shard gets the output's gradient.
    """
    fmt, shards, world, second = _checked_call(shards, fmt, algorithm, second_fmt)
    x = shards[0]
    algorithm = wire_algorithm(algorithm, world)  # "fused" computes gather / two_shot's bits
    if not compresses(x, fmt, min_bytes):
        return plain_sum(shards)
    with torch.no_grad():
        y = _compressed_all_reduce(shards, fmt, algorithm, get_codec(codec), world, second)
    return straight_through(y, *shards)  # the plain sum's gradient, as tp.all_reduce


def _compressed_all_reduce(shards, fmt, algorithm: str, codec, world: int, second) -> torch.Tensor:
    x = shards[0]
    mats = [rows_view(s) for s in shards]
    if algorithm == "gather":
        shape = tuple(mats[0].shape)
        bufs = [codec.quantize(m, fmt) for m in mats]
        return saturating_cast(codec.dequant_sum(bufs, fmt, shape), x.dtype).reshape(x.shape)
    # two_shot: chunk j of every rank -> rank j reduces and re-encodes -> everyone decodes
    split = [split_rows(m, world) for m in mats]
    pad = split[0][1]
    cshape = tuple(split[0][0].shape[1:])
    out = []
    for j in range(world):
        bufs = [codec.quantize(chunks[j], fmt) for chunks, _ in split]
        red = reduce_chunk(codec, bufs, fmt, second, cshape)
        out.append(codec.dequantize(red, second, cshape))
    return merge_rows(torch.stack(out), pad, x.shape, x.dtype)


def emulate_all_reduce_rmsnorm(
    shards: Sequence[torch.Tensor],
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fmt=None,
    algorithm: str = "gather",
    min_bytes: int = 0,
    *,
    second_fmt=None,
    codec=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, h): a compressed all-reduce whose last decode ends in the next layer's residual
    add and RMSNorm (``torch.ops.qformats.dequant_sum_rmsnorm``), as every rank gets it.

    Compressed: h is the fp32 sum of the last decode (gather: the rank-order sum of the W
    buffers; two_shot: each chunk's reduced buffer, in ``second_fmt``) plus ``residual``, cast
    once to the shards' dtype (saturating); ``normed`` is
    :func:`lowering.ops.reference_rms_norm` of h with the last decode's block size: bit for bit
    what the fused op computes from those buffers. Not compressed (``fmt=None`` or below
    ``min_bytes``): h = plain sum + residual in the shards' dtype (the unfused arithmetic) and
    the norm with the row as one block. Inference only (no gradient).
    """
    from lowering.ops import reference_rms_norm

    fmt, shards, world, second = _checked_call(shards, fmt, algorithm, second_fmt)
    x = shards[0]
    width = x.shape[-1]
    if residual.shape != x.shape or tuple(weight.shape) != (width,):
        raise ValueError(f"residual must have the shards' shape {tuple(x.shape)} and weight [{width}], got "
                         f"{tuple(residual.shape)} and {tuple(weight.shape)}")
    algorithm = wire_algorithm(algorithm, world)
    with torch.no_grad():
        if not compresses(x, fmt, min_bytes):
            h = plain_sum(shards) + residual
            return reference_rms_norm(h, weight, eps, width), h
        codec = get_codec(codec)
        mats = [rows_view(s) for s in shards]
        res = rows_view(residual).to(torch.float32)
        if algorithm == "gather":
            bufs = [codec.quantize(m, fmt) for m in mats]
            h = saturating_cast(codec.dequant_sum(bufs, fmt, tuple(mats[0].shape)) + res, x.dtype).reshape(x.shape)
            last = fmt
        else:
            split = [split_rows(m, world) for m in mats]
            pad = split[0][1]
            rsplit, _ = split_rows(res, world)
            cshape = tuple(split[0][0].shape[1:])
            out = []
            for j in range(world):
                bufs = [codec.quantize(chunks[j], fmt) for chunks, _ in split]
                red = reduce_chunk(codec, bufs, fmt, second, cshape)
                out.append(codec.dequantize(red, second, cshape) + rsplit[j])
            h = merge_rows(torch.stack(out), pad, x.shape, x.dtype)
            last = second
        return reference_rms_norm(h, weight, eps, last.block_for(width)), h


def emulate_all_gather(shards: Sequence[torch.Tensor], fmt=None, *, codec=None) -> torch.Tensor:
    """What every rank gets from ``tp.all_gather``: the decoded shards concatenated along dim 0."""
    fmt = resolve_format(fmt)
    shards = _check_shards(shards, fmt)
    if shards[0].dim() == 0:
        raise ValueError("all_gather concatenates along dim 0; shards must have at least one dimension")
    if fmt is None or shards[0].numel() == 0:
        return torch.cat(shards)
    _no_grad_needed(shards, "emulate_all_gather")
    codec = get_codec(codec)
    out = []
    for s in shards:
        m = rows_view(s)
        out.append(saturating_cast(codec.dequantize(codec.quantize(m, fmt), fmt, tuple(m.shape)), s.dtype).reshape(s.shape))
    return torch.cat(out)


def emulate_reduce_scatter(shards: Sequence[torch.Tensor], fmt=None, *, codec=None) -> list[torch.Tensor]:
    """What each rank gets from ``tp.reduce_scatter``: element j is rank j's result."""
    fmt = resolve_format(fmt)
    shards = _check_shards(shards, fmt)
    world = len(shards)
    x = shards[0]
    if x.dim() == 0:
        raise ValueError("reduce_scatter splits dim 0; shards must have at least one dimension")
    if fmt is not None and x.dim() == 1:
        raise ValueError(
            f"a compressed reduce_scatter splits dim 0 and quantises along the last dim, so x needs 2 or more "
            f"dimensions; got a 1-D tensor of {x.shape[0]} values (reshape it to [W, n // W] first, or fmt=None)")
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 ({x.shape[0]}) must divide by the world size {world}")
    out_shape = (x.shape[0] // world,) + tuple(x.shape[1:])
    if fmt is None or x.numel() == 0:
        return list(plain_sum(shards).reshape(world, *out_shape).unbind(0))
    _no_grad_needed(shards, "emulate_reduce_scatter")
    codec = get_codec(codec)
    chunked = [s.reshape(world, -1, s.shape[-1]).contiguous() for s in shards]
    cshape = tuple(chunked[0].shape[1:])
    res = []
    for j in range(world):
        bufs = [codec.quantize(c[j], fmt) for c in chunked]
        res.append(saturating_cast(codec.dequant_sum(bufs, fmt, cshape), x.dtype).reshape(out_shape))
    return res


def predicted_error(shards: Sequence[torch.Tensor], fmt, algorithm: str = "gather") -> torch.Tensor:
    """|emulated compressed all-reduce - exact fp32 sum|, elementwise: the error a format adds here."""
    exact = plain_sum([s.float() for s in shards])
    return (emulate_all_reduce(shards, fmt, algorithm).float() - exact).abs()

