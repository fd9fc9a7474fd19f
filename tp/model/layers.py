"""Tensor-parallel layers (Megatron style) whose all-reduce follows a communication policy.

* :class:`ColumnParallelLinear` splits the output features: no communication on the way in,
  optionally an all-gather of the outputs (the LM head).
* :class:`RowParallelLinear` splits the input features: each rank computes a partial sum of
  the full output, then all-reduces it. That all-reduce is the one the papers compress; its
  format, algorithm and size floor come from a :class:`tp.CommPolicy`, per layer ("site").
* :class:`VocabParallelEmbedding` splits the vocabulary (zero-padded to a multiple of the
  world size); its all-reduce stays uncompressed because it adds exact zeros.

A :class:`TPContext` says which rank of how many this process is. ``TPContext.emulated(W)``
runs all W ranks in one process: the layers hold full weights, a row-parallel layer computes
the W partial sums from column slices and reduces them through the exact emulator, so
accuracy studies of a format at TP=W need one CPU and no process group. Column-parallel
layers and attention need no emulation (they communicate nothing).

Every parallel module describes how its parameters are cut from a full checkpoint tensor
(:meth:`shard_specs`), which random init and checkpoint loading both use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm.collectives import all_gather, all_reduce, all_reduce_rmsnorm
from ..comm.emulate import emulate_all_reduce, emulate_all_reduce_rmsnorm
from ..comm.policy import CommPolicy, Decision, Site

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ShardSpec",
    "TPContext",
    "VocabParallelEmbedding",
    "emulate_row_parallel",
    "shard_specs",
]


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPContext:
    """Which tensor-parallel rank of how many this process is.

    ``TPContext()`` is a single process (world 1); :meth:`from_group` reads torch.distributed;
    :meth:`emulated` plays all ranks in this one process (full weights, emulated reductions).
    """

    world_size: int = 1
    rank: int = 0
    group: object = None
    emulate: bool = False

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world size {self.world_size} is not valid")

    @staticmethod
    def from_group(group=None) -> "TPContext":
        """The context of this process in ``group`` (default: the world); world 1 without torch.distributed."""
        if group is None and not dist.is_initialized():
            return TPContext()
        return TPContext(dist.get_world_size(group), dist.get_rank(group), group)

    @staticmethod
    def emulated(world_size: int) -> "TPContext":
        """All ``world_size`` ranks in this process, reductions through ``tp.comm.emulate``."""
        return TPContext(world_size, 0, None, emulate=True)

    @property
    def sharded(self) -> bool:
        """True when this process holds 1/W of each parallel weight (not emulated, W > 1)."""
        return self.world_size > 1 and not self.emulate

    def split(self, n: int, what: str) -> int:
        """Per-rank share of ``n``; a clear error when it does not divide."""
        if n % self.world_size:
            raise ValueError(f"{what} = {n} does not divide by the tensor-parallel size {self.world_size}")
        return n // self.world_size


@dataclass(frozen=True)
class ShardSpec:
    """How this rank's parameter is cut from the full (checkpoint) tensor.

    ``full[start:stop]`` along ``dim``; rows at or beyond ``full_len`` (vocabulary padding) are
    zeros. ``None`` instead of a ShardSpec means the parameter is replicated.
    """

    dim: int
    start: int
    stop: int
    full_len: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``full`` (a view where possible, zero-padded past ``full_len``)."""
        if full.shape[self.dim] != self.full_len:
            raise ValueError(f"expected {self.full_len} along dim {self.dim}, got shape {tuple(full.shape)}")
        stop = min(self.stop, self.full_len)
        part = full.narrow(self.dim, self.start, max(0, stop - self.start))
        missing = self.stop - self.start - part.shape[self.dim]
        if missing:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = missing
            part = torch.cat([part, full.new_zeros(pad_shape)], dim=self.dim)
        return part


def _cut(ctx: TPContext, n: int, dim: int) -> Optional[ShardSpec]:
    if not ctx.sharded:
        return None
    per = n // ctx.world_size
    return ShardSpec(dim, ctx.rank * per, (ctx.rank + 1) * per, n)


def shard_specs(model: nn.Module) -> dict:
    """``{parameter name: ShardSpec or None}`` for every parameter of ``model`` (tied ones once)."""
    specs, seen = {}, set()
    for mname, mod in model.named_modules():
        own = mod.shard_specs() if hasattr(mod, "shard_specs") else {}
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            specs[f"{mname}.{pname}" if mname else pname] = own.get(pname)
    return specs


UNCOMPRESSED = CommPolicy()


# ---------------------------------------------------------------------------------------------
def _init_param(shape, dtype, device) -> nn.Parameter:
    # Zeros, not empty: an unloaded parameter must never feed garbage into a collective.
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; each rank computes its slice of y.

    Use it for the first linear of a pair (q/k/v, gate/up) and for the LM head
    (``gather_output=True``, which all-gathers the slices: W-1 slices of traffic). Costs no
    communication otherwise. ``out_features`` must divide by the world size.
    """

    def __init__(self, in_features, out_features, ctx: TPContext, bias=False, gather_output=False,
                 dtype=None, device=None, name="ColumnParallelLinear", checkpoint_out=None):
        super().__init__()
        # checkpoint_out: rows of the checkpoint tensor when out_features is padded (vocabulary)
        self.checkpoint_out = checkpoint_out or out_features
        self.ctx, self.in_features, self.out_features = ctx, in_features, out_features
        self.gather_output = gather_output
        self.out_local = ctx.split(out_features, f"{name} out_features") if ctx.sharded else out_features
        self.weight = _init_param((self.out_local, in_features), dtype, device)
        self.bias = _init_param((self.out_local,), dtype, device) if bias else None

    def shard_specs(self):
        s = _cut(self.ctx, self.out_features, 0)
        if s is not None:
            s = ShardSpec(0, s.start, s.stop, self.checkpoint_out)
        return {"weight": s, "bias": s}

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.ctx.sharded:
            y = gather_last_dim(y, self.ctx)
        return y

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features} (local {self.out_local}), gather_output={self.gather_output}"


def gather_last_dim(y: torch.Tensor, ctx: TPContext) -> torch.Tensor:
    """Uncompressed all-gather of per-rank slices of the last dim, concatenated in rank order."""
    lead, n = y.shape[:-1], y.shape[-1]
    g = all_gather(y.reshape(-1, n).contiguous(), None, ctx.group)  # [W * N, n]
    w = ctx.world_size
    return g.view(w, -1, n).permute(1, 0, 2).reshape(*lead, w * n)


def emulate_row_parallel(x: torch.Tensor, weight: torch.Tensor, bounds: Sequence[tuple], fmt=None,
                         algorithm: str = "gather", min_bytes: int = 0, *, transposed: bool = False,
                         observer: Optional[Callable] = None, site: str = "", second_fmt=None) -> torch.Tensor:
    """What a row-parallel linear (without bias) computes at TP = ``len(bounds)``, in one process.

    Rank r holds the input features ``bounds[r] = (start, stop)`` of ``x`` and the matching
    columns of ``weight`` (``[out, in]``; ``[in, out]`` with ``transposed``, as transformers'
    Conv1D stores it). Its partial product, in the dtype of ``x`` and ``weight``, goes to
    ``observer(site, r, partial)`` when given (calibration), and the partials are reduced as the
    compressed all-reduce reduces them (:func:`tp.emulate_all_reduce`; ``fmt=None`` is the plain
    fp32 sum in rank order; ``second_fmt``: two_shot's second hop). Costs the FLOPs of the
    unsplit product plus the emulated codec.
    """
    if transposed:
        partials = [torch.matmul(x[..., s:e], weight[s:e]) for s, e in bounds]
    else:
        partials = [F.linear(x[..., s:e], weight[:, s:e]) for s, e in bounds]
    if observer is not None:
        for r, p in enumerate(partials):
            observer(site, r, p)
    return emulate_all_reduce(partials, fmt, algorithm, min_bytes, second_fmt=second_fmt)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b with W's input columns split across ranks.

    Use it for the second linear of a pair (o_proj, down_proj): its input arrives already
    split by the column-parallel layer before it. The all-reduce of the [..., out_features]
    partial sums is the expensive collective of TP inference; ``policy`` decides its format at
    the :class:`tp.Site` of ``site`` (a module path) in a model of ``num_layers`` layers.
    ``observer(site, rank, partial)``, when set, sees every rank's partial sum before the
    reduction (calibration).
    """

    def __init__(self, in_features, out_features, ctx: TPContext, bias=False, site="", policy=None,
                 dtype=None, device=None, num_layers=None):
        super().__init__()
        self.ctx, self.in_features, self.out_features, self.site = ctx, in_features, out_features, site
        self.call_site = Site.of(site, num_layers)
        self.policy = policy or UNCOMPRESSED
        self._decisions: dict = {}
        self.observer: Optional[Callable] = None
        if ctx.world_size > 1:
            ctx.split(in_features, f"{site or 'RowParallelLinear'} in_features")
        self.in_local = in_features // ctx.world_size if ctx.sharded else in_features
        self.weight = _init_param((out_features, self.in_local), dtype, device)
        self.bias = _init_param((out_features,), dtype, device) if bias else None

    def shard_specs(self):
        return {"weight": _cut(self.ctx, self.in_features, 1), "bias": None}

    def decision(self, nbytes: int) -> Decision:
        """The policy's :class:`tp.Decision` for this layer's all-reduce of ``nbytes``, kept per
        size (a policy assigned later starts a new cache)."""
        if type(nbytes) is not int:  # a symbolic size (torch.compile, dynamic shapes): no cache key
            return self.policy.decide(self.call_site, nbytes, world=self.ctx.world_size)
        cache = self._decisions
        if cache.get("policy") is not self.policy or len(cache) > 256:
            cache.clear()
            cache["policy"] = self.policy
        d = cache.get(nbytes)
        if d is None:
            d = cache[nbytes] = self.policy.decide(self.call_site, nbytes, world=self.ctx.world_size)
        return d

    def forward(self, x):
        ctx = self.ctx
        d = None
        if ctx.world_size > 1:  # the partial is [..., out_features] in x's dtype
            d = self.decision(math.prod(x.shape[:-1]) * self.out_features * x.element_size())
        if ctx.emulate and ctx.world_size > 1:
            per = self.in_features // ctx.world_size
            bounds = [(r * per, (r + 1) * per) for r in range(ctx.world_size)]
            y = emulate_row_parallel(x, self.weight, bounds, d.fmt, d.algorithm, observer=self.observer,
                                     site=self.site, second_fmt=d.second_fmt)
        else:
            p = F.linear(x, self.weight)
            if self.observer is not None:
                self.observer(self.site, ctx.rank, p)
            y = all_reduce(p, d.fmt, ctx.group, d.algorithm, second_fmt=d.second_fmt) if d is not None else p
        return y + self.bias if self.bias is not None else y

    def forward_add_norm(self, x, residual, norm):
        """(norm(h), h) for h = residual + self(x): the all-reduce's decode fused with the next
        residual add and RMSNorm (``norm``: a module with ``weight`` and ``eps``) at a site the
        policy compresses, without bias, on more than one rank: emulated
        (:func:`tp.comm.emulate.emulate_all_reduce_rmsnorm`) or on real ranks
        (:func:`tp.comm.collectives.all_reduce_rmsnorm`, bit for bit the emulated result; the
        NCCL-path algorithm also for ``"fused"``, which has the same bits). There h is the fp32
        sum + residual rounded once and the norm is ``lowering.ops.reference_rms_norm`` (the fused
        op); inference only (computed without autograd). Elsewhere the unfused composition, bit
        for bit ``norm(residual + self(x))``."""
        ctx, pol = self.ctx, self.policy
        if ctx.world_size > 1 and self.bias is None:
            d = self.decision(math.prod(x.shape[:-1]) * self.out_features * x.element_size())
            if d.fmt is not None and residual.numel() > 0:
                with torch.no_grad():
                    if ctx.emulate:
                        per = self.in_features // ctx.world_size
                        partials = [F.linear(x[..., r * per:(r + 1) * per], self.weight[:, r * per:(r + 1) * per])
                                    for r in range(ctx.world_size)]
                        if self.observer is not None:
                            for r, p in enumerate(partials):
                                self.observer(self.site, r, p)
                        return emulate_all_reduce_rmsnorm(partials, residual, norm.weight, norm.eps, d.fmt,
                                                          d.algorithm, pol.min_bytes, second_fmt=d.second_fmt)
                    p = F.linear(x, self.weight)
                    if self.observer is not None:
                        self.observer(self.site, ctx.rank, p)
                    return all_reduce_rmsnorm(p, residual, norm.weight, norm.eps, d.fmt, ctx.group, d.algorithm,
                                              pol.min_bytes, second_fmt=d.second_fmt)
        h = residual + self(x)
        return norm(h), h

    def extra_repr(self):
        return f"in={self.in_features} (local {self.in_local}), out={self.out_features}, site={self.site!r}"


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks (padded with zero rows to a multiple of W).

    Each rank looks up the tokens in its range and zeroes the rest; an uncompressed all-reduce
    (exact: every position has one non-zero contribution) assembles the embeddings. Costs one
    all-reduce of [tokens, hidden] per forward; use it when the embedding table is too large
    to replicate (128k x 8k = 2 GB in bf16 for Llama-3-70B).
    """

    def __init__(self, num_embeddings, embedding_dim, ctx: TPContext, dtype=None, device=None):
        super().__init__()
        self.ctx, self.num_embeddings, self.embedding_dim = ctx, num_embeddings, embedding_dim
        w = ctx.world_size if ctx.sharded else 1
        self.per_rank = math.ceil(num_embeddings / w)
        self.padded = self.per_rank * w
        self.start = ctx.rank * self.per_rank if ctx.sharded else 0
        self.weight = _init_param((self.per_rank, embedding_dim), dtype, device)

    def shard_specs(self):
        if not self.ctx.sharded:
            return {"weight": None}
        return {"weight": ShardSpec(0, self.start, self.start + self.per_rank, self.num_embeddings)}

    def forward(self, ids):
        if not self.ctx.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        y = F.embedding(torch.where(inside, local, 0), self.weight)
        y = torch.where(inside.unsqueeze(-1), y, 0.0)  # where, not a product: 0 * inf would be NaN
        return all_reduce(y, None, self.ctx.group)

    def extra_repr(self):
        return f"{self.num_embeddings} (local {self.per_rank}, padded {self.padded}), {self.embedding_dim}"
