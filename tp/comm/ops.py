"""``torch.ops.qformats.all_reduce`` / ``all_reduce_rmsnorm`` / ``all_gather``: the compressed
collectives as graph-safe custom ops, the process group named by its ``group_name``.

Whoever emits them imports them from here: the ``tp.compile`` rewrite pass
(:mod:`tp.comm.compile`) inserts them into graphs, the DTensor style (:mod:`tp.styles`) and the
transformers style call :data:`all_reduce_op` in their forward. The format travels as its
canonical string (the torch op boundary is the format's one string round trip) and is resolved
once per call here; every call is :func:`tp.all_reduce` / :func:`tp.all_reduce_rmsnorm` /
:func:`tp.all_gather` of that format.
The ops have fake implementations (``torch.compile(fullgraph=True)`` traces one node per
collective) and allocate nothing a CUDA graph could not replay beyond what the collective does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .call import check_algorithm, check_norm_inputs, resolve_format, second_hop
from .collectives import all_gather, all_reduce, all_reduce_rmsnorm

__all__ = ["ALL_GATHER", "ALL_REDUCE", "ALL_REDUCE_RMSNORM", "all_gather_op", "all_reduce_op", "all_reduce_rmsnorm_op",
           "group_by_name"]


def group_by_name(group_name: str):
    """The process group of ``group_name`` (RuntimeError without torch.distributed)."""
    if not dist.is_initialized():
        raise RuntimeError(f"qformats.all_reduce: torch.distributed is not initialised (group {group_name!r})")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


# the plain collective is _c10d_functional's: these ops always carry a format
_NEEDS = "qformats.all_reduce/all_reduce_rmsnorm/all_gather"


def _all_reduce_args(fmt: str, algorithm: str, second_fmt: Optional[str]) -> tuple:
    f = resolve_format(fmt, required=_NEEDS)
    check_algorithm(algorithm)
    return f, algorithm, second_hop(f, second_fmt, algorithm)


@torch.library.custom_op("qformats::all_reduce", mutates_args=())
def all_reduce_op(x: Tensor, fmt: str, group_name: str, algorithm: str, second_fmt: Optional[str] = None) -> Tensor:
    """``tp.all_reduce(x, fmt, group, algorithm, second_fmt=...)`` with the group by name: a
    graph-safe op. ``second_fmt``: two_shot's second hop (None or ``fmt`` itself: the first hop's)."""
    f, algorithm, second = _all_reduce_args(fmt, algorithm, second_fmt)
    y = all_reduce(x, f, group_by_name(group_name), algorithm, second_fmt=second)
    # the fake promises contiguous memory; gather's decode of a width that is not a multiple of
    # the block returns a view of padded rows (compiled code asserts the strides)
    return y.contiguous()


@all_reduce_op.register_fake
def _(x, fmt, group_name, algorithm, second_fmt=None):
    _all_reduce_args(fmt, algorithm, second_fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _straight_through_backward(ctx, grad):
    return grad, None, None, None, None  # the plain all-reduce's gradient (tp.comm.collectives, Autograd)


all_reduce_op.register_autograd(_straight_through_backward)


def _norm_args(x: Tensor, residual: Tensor, weight: Tensor) -> None:
    # the checks tp.all_reduce_rmsnorm makes, also at trace time (the fake sees only shapes)
    check_norm_inputs(x, residual, weight, "qformats.all_reduce_rmsnorm: ")


@torch.library.custom_op("qformats::all_reduce_rmsnorm", mutates_args=())
def all_reduce_rmsnorm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float, fmt: str, group_name: str,
                          algorithm: str, second_fmt: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``tp.all_reduce_rmsnorm(x, residual, weight, eps, fmt, group, algorithm, second_fmt=...)``
    with the group by name: (normed, h), h = all_reduce(x) + residual, normed = RMSNorm(h) *
    weight, bitwise :func:`tp.comm.emulate.emulate_all_reduce_rmsnorm`. What the compile pass
    emits where an all-reduce ends in the residual add and an RMSNorm (``fuse_norm=True``).
    Inference only: no autograd formula (calling it on an input that requires grad raises)."""
    f, algorithm, second = _all_reduce_args(fmt, algorithm, second_fmt)
    _norm_args(x, residual, weight)
    normed, h = all_reduce_rmsnorm(x, residual, weight, eps, f, group_by_name(group_name), algorithm,
                                   second_fmt=second)
    return normed.contiguous(), h.contiguous()  # as the fake promises (no copy where they already are)


@all_reduce_rmsnorm_op.register_fake
def _(x, residual, weight, eps, fmt, group_name, algorithm, second_fmt=None):
    _all_reduce_args(fmt, algorithm, second_fmt)
    _norm_args(x, residual, weight)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def _no_gradient(ctx, *grads):
    raise RuntimeError("qformats.all_reduce_rmsnorm has no gradient")  # unreachable: _refuse_grad raised


def _refuse_grad(ctx, inputs, output):
    # autograd calls this only when grad is enabled and an input requires grad: refuse in the
    # forward (as tp.all_reduce_rmsnorm does), not at a later backward; the collective has run
    # by now, on every rank alike, so every rank raises
    raise RuntimeError("tp.all_reduce_rmsnorm does not propagate gradients and an input requires grad: call it "
                       "under torch.no_grad() (inference), or compile without fuse_norm for training")


all_reduce_rmsnorm_op.register_autograd(_no_gradient, setup_context=_refuse_grad)


@torch.library.custom_op("qformats::all_gather", mutates_args=())
def all_gather_op(x: Tensor, fmt: str, group_size: int, group_name: str) -> Tensor:
    """``tp.all_gather(x, fmt, group)`` (concatenation along dim 0, rank order) by group name."""
    group = group_by_name(group_name)
    if dist.get_world_size(group) != group_size:
        raise ValueError(f"qformats.all_gather: group {group_name!r} has {dist.get_world_size(group)} ranks, "
                         f"the graph says {group_size}")
    return all_gather(x, resolve_format(fmt, required=_NEEDS), group)


@all_gather_op.register_fake
def _(x, fmt, group_size, group_name):
    resolve_format(fmt, required=_NEEDS)
    return x.new_empty((group_size * x.shape[0],) + tuple(x.shape[1:]))


# the overloads a graph holds (what the pass inserts and the styles call)
ALL_REDUCE = torch.ops.qformats.all_reduce.default
ALL_REDUCE_RMSNORM = torch.ops.qformats.all_reduce_rmsnorm.default
ALL_GATHER = torch.ops.qformats.all_gather.default
