"""Compressed collectives for tensor parallelism: all-reduce, all-gather, reduce-scatter.

Use these where a plain ``torch.distributed`` collective would move activations between
tensor-parallel ranks (after every row-parallel layer, or around sequence-parallel regions)
and the link, not the GPU, is the bottleneck. Each call quantises with a ``qformats`` format,
moves the packed bytes as uint8 (float8 dtypes fail on gloo, and bytes let one buffer carry
codes, scales and outliers), and dequantises. What it costs: one encode per rank, W decodes
(``gather``) or 2 encodes + W + W decodes of 1/W-sized chunks (``two_shot``), plus the
quantisation error of the format. With the pure-torch reference codec the encode/decode is
far slower than the link it saves; a faster one plugs in through :class:`lowering.codec.Codec`.

Algorithms (``algorithm=``):

``gather`` (one-shot, Dong et al.)
    encode the local tensor once, ``all_gather_into_tensor`` the wire buffers, every rank
    decodes all W buffers and sums them in fp32 in rank order (rank 0 first). One
    round trip; each rank receives (W-1) compressed tensors. Best for W = 2.
``two_shot`` (Flash Communication, Li et al.)
    view x as [R, H], zero-pad R to a multiple of W, split the rows into W chunks, encode
    each chunk, ``all_to_all_single`` so rank j gets every rank's chunk j, decode and
    fp32-sum them in rank order, re-encode the sum, ``all_gather_into_tensor`` the re-encoded
    chunks, decode, cut the padding. Two round trips, each rank receives ~2 (W-1)/W
    compressed tensors; the result is quantised twice. Better for W >= 4.
``fmt=None``
    the backend's plain ``all_reduce`` (the uncompressed baseline).

Guarantees: every rank returns a bitwise identical tensor of x's shape and dtype, equal to
:func:`tp.comm.emulate.emulate_all_reduce` (same codec, same order of fp32 additions, same
casts). The arithmetic lives in the codec (:mod:`lowering.codec`) and :func:`split_rows` / :func:`merge_rows`,
which the emulator calls too; only the data movement differs. ``fmt=None`` is the backend's
own reduction, whose summation order the backend chooses (exactly a rank-order sum only when
the additions are exact, e.g. for 2 ranks or integer-valued data).

Errors: everything that can be wrong with (shape, dtype, format, algorithm) on one rank is
checked before the first message is sent, so when the ranks agree they all raise together and
nobody is left waiting in a collective. Ranks that disagree (a caller bug: shapes, formats,
dtypes, algorithms or the order of calls differ) get a ValueError on every rank, never a
result, at no extra message on the hot path: every compressed wire buffer carries a
:data:`tp.comm.wirecheck.HEADER_BYTES` header that the receivers check before decoding, and sizes
are agreed before they reach the backend (:mod:`tp.comm.wirecheck`; on CUDA a rank on the fast
path stops with a device-side assertion instead). An error only one rank sees (a header damaged
on its way there, a codec that raises there) never leaves a peer waiting or the ranks' call
histories apart: the failing rank still sends its part with an ERROR header, so its peers raise
at that exchange too (where there is one), and every rank's next call works. The default ``validate=None`` does that;
``validate=True`` (or ``TP_VALIDATE_COLLECTIVES=1``) also spends one small all-gather per call
on a signature, which covers the plain all-reduce (``fmt=None``, under ``min_bytes``)
too; ``validate=False`` sends bare buffers with no check (only where the ranks provably
agree). Use the same ``validate`` on every rank.

Autograd: the compressed collectives are straight-through. ``all_reduce`` of any format has
the gradient of the plain all-reduce (each rank's ``x`` gets the output's gradient unchanged:
the row-parallel rule of Megatron-style TP, the quantisation taken as the identity), so
``fmt`` never changes what backward computes. ``all_gather`` and ``reduce_scatter`` (plain or
compressed) do not propagate gradients and raise when ``x`` requires grad in grad mode.
"""
from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from lowering.codec import Codec, ReferenceCodec, check_codec
from qformats import Format
from qformats.codec import saturating_cast
from qformats.numeric import DTYPE_CODES, SUPPORTED_DTYPES

from . import wirecheck
from .call import (check_algorithm, check_norm_inputs, check_tensor, merge_rows, reduce_chunk, resolve_format, rows_view,
                   second_hop, split_rows, wire_algorithm, wire_format)
from .wirecheck import HEADER_BYTES, Signature

__all__ = [
    "DEFAULT_MIN_BYTES",
    "SUPPORTED_DTYPES",
    "Codec",
    "ReferenceCodec",
    "all_gather",
    "all_reduce",
    "all_reduce_rmsnorm",
    "below_floor",
    "get_codec",
    "reduce_scatter",
    "set_codec",
    "straight_through",
]

# A compressed collective pays a fixed cost per call (encode/decode launches, two round
# trips for two_shot) that only a large enough message amortises; below this size callers
# with a policy (tp.CommPolicy's default min_bytes) use the plain all-reduce. 64 KiB is
# ~32k bf16 values, i.e. a decode step of a 4k-hidden model at batch 8.
DEFAULT_MIN_BYTES = 64 * 1024

_VALIDATE_ENV = "TP_VALIDATE_COLLECTIVES"

# torch >= 2.12 deprecates all_gather_into_tensor in favour of all_gather_single, which the
# GPU machines' torch 2.11 lacks; keep the old name and silence only that one warning.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# The arithmetic seam (lowering.codec: the protocol beside its implementations)
# ---------------------------------------------------------------------------------------------
_codec: Codec = ReferenceCodec()


def set_codec(codec) -> object:
    """Install the codec every collective and the emulator use by default; returns the previous one."""
    global _codec
    check_codec(codec)
    old, _codec = _codec, codec
    return old


def get_codec(codec=None):
    """``codec`` if given, else the installed default (the reference codec unless replaced)."""
    return _codec if codec is None else codec


# ---------------------------------------------------------------------------------------------
# Process-group helpers
# ---------------------------------------------------------------------------------------------
def _world_and_rank(group) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 1, 0  # a single process without torch.distributed: world size 1
    rank = dist.get_rank(group)
    if rank < 0:  # torch answers -1 (world size and rank) on a rank outside the group
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group it calls a "
            f"collective on; only the group's ranks {_group_ranks(group)} may call it")
    return dist.get_world_size(group), rank


def _group_ranks(group) -> str:
    try:
        return str(dist.get_process_group_ranks(group))
    except Exception:  # noqa: BLE001 - only for the message
        return "(unknown)"


def _validate_across_ranks(x: torch.Tensor, fmt: Optional[Format], op: str, algorithm: str, group, world: int,
                           second: Optional[Format] = None):
    """One small all-gather of (op, algorithm, format(s), dtype, shape); every rank raises on a mismatch."""
    shape = list(x.shape)
    fmt_name = str(fmt) if fmt is None else wire_format(fmt, second)
    sig = _signature_words(op, algorithm, fmt_name, x.dtype, shape)
    mine = torch.tensor(sig, dtype=torch.int64, device=x.device)
    allsig = torch.empty(world * mine.numel(), dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(allsig, mine, group=group)
    rows = allsig.view(world, -1).cpu()
    bad = [r for r in range(world) if not torch.equal(rows[r], rows[0])]
    if bad:
        names = ["op", "algorithm", "format", "dtype", "ndim", "shape"]
        diff = [n for i, n in enumerate(names) if any(rows[r, i] != rows[0, i] for r in bad)]
        if not diff:  # only the digest differs: names whose checksums collide
            diff = ["format or shape (same checksum, different signature digest)"]
        raise ValueError(
            f"{op}: ranks {bad} disagree with rank 0 on {', '.join(diff) or 'shape'} "
            f"(this rank: {x.dtype}, shape {tuple(x.shape)}, format {fmt_name}, algorithm {algorithm})"
        )


def _signature_words(op: str, algorithm: str, fmt_name: str, dtype: torch.dtype, shape: list) -> list[int]:
    """The int64 words ``validate=True`` compares across ranks: readable checksums (for the
    message), the first 8 dims, and a 128-bit BLAKE2b digest of everything (two formats or
    shapes whose 32-bit checksums collide still differ)."""
    digest = wirecheck.signature_digest(op, algorithm, fmt_name, str(dtype), tuple(int(d) for d in shape))
    return [
        zlib.crc32(op.encode()),
        zlib.crc32(algorithm.encode()),
        zlib.crc32(fmt_name.encode()),
        DTYPE_CODES.get(dtype, zlib.crc32(str(dtype).encode())),
        len(shape),
        zlib.crc32(repr(shape).encode()),
    ] + (list(shape) + [0] * 8)[:8] + [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8)]


def _want_validate(validate: Optional[bool]) -> bool:
    if validate is None:
        return os.environ.get(_VALIDATE_ENV, "") not in ("", "0")
    return bool(validate)


def _exchange(op: str, fmt: Format, x: torch.Tensor, slot: int, group, world: int, validate: Optional[bool],
              second: Optional[Format] = None):
    """The :class:`tp.comm.wirecheck.Exchange` of a compressed call (None with ``validate=False``: bare buffers)."""
    if validate is False:
        return None
    sig = Signature(op, wire_format(fmt, second), x.dtype, tuple(x.shape), slot)
    return wirecheck.begin(sig, group, world, x.device)


class _StraightThrough(torch.autograd.Function):
    """``y`` in the forward; in the backward every input gets ``y``'s gradient unchanged."""

    @staticmethod
    def forward(ctx, y, *xs):
        ctx.dtypes = [x.dtype for x in xs]
        return y.view_as(y)  # a view, not y itself: y is the caller's, the output autograd's

    @staticmethod
    def backward(ctx, grad):
        return (None, *[grad.to(dt) for dt in ctx.dtypes])


def straight_through(y: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
    """``y`` (computed without autograd) with its gradient passed unchanged to each of ``xs``
    (of ``y``'s shape), when one of them wants a gradient; ``y`` itself otherwise."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return _StraightThrough.apply(y, *xs)
    return y


def _no_grad_needed(x: torch.Tensor, op: str) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"tp.{op} does not propagate gradients and x requires grad: call it under torch.no_grad() "
            f"(inference), or use torch.distributed's differentiable collectives for training"
        )


# ---------------------------------------------------------------------------------------------
# The fused path's registry (tp.comm.fused registers here; this module never imports it)
# ---------------------------------------------------------------------------------------------
# group name -> the open FusedAllReduce that serves algorithm="fused" on that group
_FUSED: dict = {}


def register_fused(group_name: str, fused) -> None:
    """Serve ``all_reduce(..., algorithm="fused")`` on ``group_name`` with ``fused``."""
    _FUSED[group_name] = fused


def unregister_fused(group_name: str, fused) -> None:
    """Stop serving ``group_name`` with ``fused`` (a newer registration stays)."""
    if _FUSED.get(group_name) is fused:
        del _FUSED[group_name]


def fused_for(group=None):
    """The open fused all-reduce of ``group`` (the last one constructed for it).

    Raises RuntimeError, saying what to do, when there is none: the symmetric buffer is a
    collective allocation that must happen on every rank before the first call (and before
    any CUDA-graph capture), so it is never created behind the caller's back.
    """
    g = group or dist.group.WORLD
    ar = _FUSED.get(g.group_name)
    if ar is None or ar.closed:
        raise RuntimeError(
            "algorithm='fused' on CUDA needs a tp.comm.fused.FusedAllReduce for this process group: "
            "create FusedAllReduce(group, max_tokens=..., hidden=..., fmts=[...]) on every rank "
            "before the first call (and before CUDA-graph capture)")
    return ar


# ---------------------------------------------------------------------------------------------
# The data movement (each returns fp32 in the [.., c, H] chunk layout; callers cast)
# ---------------------------------------------------------------------------------------------
def _gather_bufs(buf: torch.Tensor, world: int, group, ex=None, phase: str = "") -> list[torch.Tensor]:
    """All-gather one uint8 buffer per rank; returns the W buffers in rank order.

    With an Exchange ``ex`` each buffer travels behind its header, checked before it is returned."""
    n = buf.numel()
    h = HEADER_BYTES if ex is not None else 0
    send = buf
    if ex is not None:
        send = torch.empty(1, h + n, dtype=torch.uint8, device=buf.device)
        ex.write(send, phase)
        send[0, h:] = buf
        send = send.view(-1)
    out = torch.empty(world * (h + n), dtype=torch.uint8, device=buf.device)
    dist.all_gather_into_tensor(out, send, group=group)
    slots = out.view(world, h + n)
    if ex is not None:
        ex.check(slots, phase)
    return list(slots[:, h:].unbind(0))


def _payload(ex, n: int, device, make) -> torch.Tensor:
    """``make()``, this rank's ``n``-byte payload. With an Exchange, an error in it (this rank's
    alone: a codec failure) does not skip the exchange, which would leave the peers waiting in
    it: the error is kept for after the exchange (:meth:`Exchange.fail`: its header says ERROR,
    so every peer raises there too) and zeros travel instead."""
    if ex is None:
        return make()
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - raised after the exchange
        if ex.error is None:
            ex.fail(e)
        return torch.zeros(n, dtype=torch.uint8, device=device)


def _exchange_chunks(chunks: torch.Tensor, fmt: Format, codec, world: int, group, ex=None) -> list[torch.Tensor]:
    """Encode each of the W chunks, all-to-all: returns every rank's encoding of *my* chunk, in rank order."""
    shape = tuple(chunks.shape[1:])
    n = fmt.nbytes(shape)
    h = HEADER_BYTES if ex is not None else 0
    send = torch.empty(world, h + n, dtype=torch.uint8, device=chunks.device)
    for j in range(world):
        send[j, h:] = _payload(ex, n, chunks.device, lambda j=j: _encoded(codec, chunks[j], fmt, n))
    if ex is not None:
        ex.write(send)  # after the payloads: an ERROR header if one of them failed
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    if ex is not None:
        ex.check(recv)
    return list(recv[:, h:].unbind(0))


def _encoded(codec, x2: torch.Tensor, fmt: Format, n: Optional[int] = None) -> torch.Tensor:
    """codec.quantize with a size check: a wrong-sized buffer would desynchronise the collective."""
    buf = codec.quantize(x2, fmt)
    n = fmt.nbytes(tuple(x2.shape)) if n is None else n
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != n:
        raise RuntimeError(
            f"codec {getattr(codec, 'name', type(codec).__name__)} returned {buf.dtype} {tuple(buf.shape)} "
            f"for {fmt} of shape {tuple(x2.shape)}; expected uint8 ({n},)"
        )
    return buf


# ---------------------------------------------------------------------------------------------
# Public collectives
# ---------------------------------------------------------------------------------------------
def below_floor(nbytes: int, min_bytes: int) -> bool:
    """The size floor, in one place: a message of ``nbytes`` under ``min_bytes`` stays plain.

    :meth:`tp.CommPolicy.decide` applies it with the policy's ``min_bytes`` (every layer, style,
    the compile pass and the vLLM plugin ask that), :func:`all_reduce` with its own argument, the
    fused path with its measured window (:func:`tp.comm.policy.fused_window`)."""
    return nbytes < min_bytes


def compresses(x: torch.Tensor, fmt: Optional[Format], min_bytes: int = 0) -> bool:
    """Whether a collective of ``x`` with ``fmt`` is compressed: a format is given and the
    message (``x.numel() * itemsize``) is non-empty and not :func:`below_floor`; else it is plain."""
    return fmt is not None and x.numel() > 0 and not below_floor(x.numel() * x.element_size(), min_bytes)


def all_reduce(
    x: torch.Tensor,
    fmt=None,
    group=None,
    algorithm: str = "gather",
    min_bytes: int = 0,
    *,
    second_fmt=None,
    codec=None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``, compressed with ``fmt``; out of place.

    Args:
        x: this rank's partial sum, float32/bfloat16/float16 (any dtype the backend sums when
            ``fmt`` is None), any shape; quantised along its last dimension.
        fmt: a ``qformats.Format``, a preset name (``"mxfp4"``), a canonical string
            (``"int4/b32/bf16"``) or None for the plain all-reduce.
        group: the process group (default: the world). Without torch.distributed initialised
            and ``group=None`` the world size is 1.
        algorithm: ``"gather"`` or ``"two_shot"`` (see the module docstring), or ``"fused"``:
            on CUDA the symmetric-memory kernels of :mod:`tp.comm.fused` (create a
            :class:`tp.comm.fused.FusedAllReduce` for the group first; it also decides, by its
            measured size window, when the plain all-reduce is faster), elsewhere the NCCL-path
            algorithm with the same bits (:func:`wire_algorithm`).
        min_bytes: messages smaller than this (x.numel() * itemsize) use the plain
            all-reduce. 0 here (an explicit format is honoured); :class:`tp.CommPolicy`
            applies :data:`DEFAULT_MIN_BYTES`.
        second_fmt: two_shot's second hop: the format the reduced sum travels in (None, the
            default: ``fmt``). The reduced sum is up to W times larger than each partial, so a
            finer second format buys accuracy for (W-1)/W of one chunk's extra bytes. Gather
            (no second hop) and ``"fused"`` at W <= 3 (the one-shot gather) raise ValueError
            unless it equals ``fmt``.
        codec: the arithmetic (default: :func:`get_codec`).
        validate: None (default): ranks that disagree get a ValueError from the wire headers
            (module docstring); True (or env ``TP_VALIDATE_COLLECTIVES=1``): also one small
            all-gather per call, which checks plain calls too; False: no check at all.

    Returns a new tensor of x's shape and dtype, bitwise identical on every rank and equal to
    ``tp.emulate_all_reduce([x_0, ..., x_{W-1}], fmt, algorithm, second_fmt=second_fmt)``. At world size 1 a format
    still applies (the result is quantise-dequantise), matching the emulator. Differentiable
    straight through (module docstring, Autograd).
    """
    fmt, world, second = _begin_all_reduce(x, fmt, group, algorithm, second_fmt, validate, "all_reduce")
    if not compresses(x, fmt, min_bytes):
        return _plain_all_reduce(x, world, group)
    if algorithm == "fused" and x.is_cuda and world > 1:
        with torch.no_grad():
            return straight_through(fused_for(group)(x, fmt, second_fmt=second), x)
    codec = get_codec(codec)
    with torch.no_grad():
        bufs, last, shape, pad = _compressed_exchange(x, fmt, group, wire_algorithm(algorithm, world), codec, world,
                                                      validate, second)
        if pad is None:  # gather: the rank-order fp32 sum of the W buffers
            y = saturating_cast(codec.dequant_sum(bufs, last, shape), x.dtype).reshape(x.shape)
        else:  # two_shot: the W reduced chunks
            y = merge_rows(torch.stack([codec.dequantize(b, last, shape) for b in bufs]), pad, x.shape, x.dtype)
    return straight_through(y, x)


def all_reduce_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fmt=None,
    group=None,
    algorithm: str = "gather",
    min_bytes: int = 0,
    *,
    second_fmt=None,
    codec=None,
    validate: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, h): :func:`all_reduce` of ``x`` whose last decode ends in the next layer's
    residual add and RMSNorm, h = sum + ``residual`` and normed = RMSNorm(h) * ``weight``.

    Same arguments, checks, wire protocol and error handling as :func:`all_reduce` (the headers
    are those of the all-reduce: the norm is a local epilogue); ``residual`` has x's shape,
    ``weight`` is [x.shape[-1]]. Both results are bitwise identical on every rank and equal to
    :func:`tp.comm.emulate.emulate_all_reduce_rmsnorm` of the ranks' ``x``:

    * gather: the gathered buffers go through ``torch.ops.qformats.dequant_sum_rmsnorm`` (the
      fused decode-sum + residual + norm; one kernel on GPU).
    * two_shot: each reduced chunk (in the second-hop format) is decoded with the epilogue on
      its own (the op with N = 1 and that chunk's residual rows), padding rows cut.
    * plain (``fmt=None`` or below ``min_bytes``): the unfused composition, h = the backend's
      all-reduce + residual in x's dtype, normed = :func:`lowering.ops.reference_rms_norm` with
      the row as one block (equal to the emulator where the backend's sum is, module docstring).

    ``algorithm="fused"``: on CUDA (world > 1) the registered
    :class:`tp.comm.fused.FusedAllReduce` of the group (:func:`fused_for`; RuntimeError when
    there is none; its measured size window picks the plain path where that is faster, as in
    :func:`all_reduce`), whose last decode kernel takes the epilogue
    (:meth:`~tp.comm.fused.FusedAllReduce.all_reduce_rmsnorm`: that kernel also reads the
    residual and writes both outputs, nothing else changes); elsewhere the NCCL-path algorithm
    with the same bits (:func:`wire_algorithm`). The ``codec`` carries the first hops; the last
    decode is the op's. Inference only: raises when an input requires grad.
    """
    from lowering.ops import reference_rms_norm  # lowering imports Triton: only when called

    check_norm_inputs(x, residual, weight)
    width = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else None
    for t, what in ((x, "x"), (residual, "residual"), (weight, "weight")):
        _no_grad_needed(t, f"all_reduce_rmsnorm ({what})")
    fmt, world, second = _begin_all_reduce(x, fmt, group, algorithm, second_fmt, validate, "all_reduce_rmsnorm")
    with torch.no_grad():
        if not compresses(x, fmt, min_bytes):
            h = _plain_all_reduce(x, world, group) + residual
            return reference_rms_norm(h, weight, eps, width), h
        if algorithm == "fused" and x.is_cuda and world > 1:
            return fused_for(group).all_reduce_rmsnorm(x, residual, weight, eps, fmt, second_fmt=second)
        bufs, last, shape, pad = _compressed_exchange(x, fmt, group, wire_algorithm(algorithm, world),
                                                      get_codec(codec), world, validate, second)
        norm = torch.ops.qformats.dequant_sum_rmsnorm
        res = rows_view(residual)
        if pad is None:  # gather
            y, h = norm(torch.stack(bufs), str(last), list(shape), x.dtype, res, weight, float(eps))
            return y.reshape(x.shape), h.reshape(x.shape)
        rchunks, _ = split_rows(res, world)
        ys, hs = zip(*[norm(b[None], str(last), list(shape), x.dtype, rchunks[j], weight, float(eps))
                       for j, b in enumerate(bufs)])
        rows = res.shape[0]
        return torch.cat(ys)[:rows].reshape(x.shape), torch.cat(hs)[:rows].reshape(x.shape)


def _begin_all_reduce(x, fmt, group, algorithm: str, second_fmt, validate, op: str):
    """The checks every all-reduce makes before its first message (module docstring, Errors):
    returns (format, world size, second-hop format); with ``validate`` the per-call signature."""
    fmt = resolve_format(fmt)
    check_algorithm(algorithm)
    check_tensor(x, fmt)
    world, _ = _world_and_rank(group)
    second = second_hop(fmt, second_fmt, algorithm, world)
    if second is not fmt:
        check_tensor(x, second)
    if world > 1 and _want_validate(validate):
        _validate_across_ranks(x, fmt, op, algorithm, group, world, second)
    return fmt, world, second


def _plain_all_reduce(x: torch.Tensor, world: int, group) -> torch.Tensor:
    y = x.clone(memory_format=torch.contiguous_format)  # collectives need contiguous memory
    if world > 1:
        dist.all_reduce(y, group=group)
    return y


def _compressed_exchange(x, fmt: Format, group, algorithm: str, codec, world: int, validate,
                         second: Optional[Format] = None):
    """The data movement of a compressed all-reduce, up to its last decode, which the caller does.

    Returns (bufs, fmt, shape, pad): gather: the W encodings of the whole [R, H] x in rank
    order, ``pad`` None; two_shot: the W reduced chunks of shape [c, H] (chunk j reduced by
    rank j, in the second-hop format) and the padding rows to cut after merging them."""
    second = fmt if second is None else second
    x2 = rows_view(x)
    if algorithm == "gather":
        shape = tuple(x2.shape)
        if world == 1:
            return [_encoded(codec, x2, fmt)], fmt, shape, None
        n = fmt.nbytes(shape)
        ex = _exchange("gather", fmt, x, n, group, world, validate)
        return _gather_bufs(_payload(ex, n, x.device, lambda: _encoded(codec, x2, fmt)), world, group, ex), fmt, shape, None
    # two_shot
    chunks, pad = split_rows(x2, world)
    cshape = tuple(chunks.shape[1:])
    if world == 1:
        mine = [_encoded(codec, chunks[0], fmt)]
        ex = None
        red = reduce_chunk(codec, mine, fmt, second, cshape)
        _check_buf(red, second, cshape, codec)
    else:
        ex = _exchange("two_shot", fmt, x, fmt.nbytes(cshape), group, world, validate, second)
        try:
            mine = _exchange_chunks(chunks, fmt, codec, world, group, ex)
            red = reduce_chunk(codec, mine, fmt, second, cshape)
            _check_buf(red, second, cshape, codec)
        except Exception as e:  # noqa: BLE001 - re-raised after the second exchange
            if ex is None or ex.error is not None or getattr(e, "everyone", False):
                raise  # every rank stops here (or nobody checks): no second exchange
            # an error only this rank may have: still take part in the second exchange, with an
            # ERROR header, so the peers raise there too instead of waiting for this rank
            ex.fail(e)
            red = torch.zeros(second.nbytes(cshape), dtype=torch.uint8, device=x.device)
    bufs = _gather_bufs(red, world, group, ex, "/reduced") if world > 1 else [red]
    return bufs, second, cshape, pad


def _check_buf(buf, fmt, shape, codec):
    n = fmt.nbytes(shape)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != n:
        raise RuntimeError(
            f"codec {getattr(codec, 'name', type(codec).__name__)}.dequant_sum_requant returned {buf.dtype} "
            f"{tuple(buf.shape)} for {fmt} of shape {shape}; expected uint8 ({n},)"
        )


def _plain(collective, x: torch.Tensor, out_shape, world: int, group) -> torch.Tensor:
    """The uncompressed all_gather / reduce_scatter (``collective`` is the torch.distributed
    call writing into a new ``out_shape`` tensor); one rank: a copy."""
    if world == 1:
        return x.clone()
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    collective(out, x.contiguous(), group=group)
    return out


def all_gather(
    x: torch.Tensor, fmt=None, group=None, *, codec=None, validate: Optional[bool] = None
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), compressed with ``fmt``.

    For sequence parallelism: gathering the sequence-sharded activations before a
    column-parallel layer. Each rank encodes its x once and decodes all W buffers, including
    its own (so every rank sees the same quantised values of its own shard as the others do).
    Returns shape [W * x.shape[0], *x.shape[1:]] in x's dtype; ``fmt=None`` is the plain
    ``all_gather_into_tensor``. Equal to :func:`tp.comm.emulate.emulate_all_gather`.
    """
    fmt = resolve_format(fmt)
    check_tensor(x, fmt)
    if x.dim() == 0:
        raise ValueError("all_gather concatenates along dim 0; x must have at least one dimension")
    _no_grad_needed(x, "all_gather")
    world, _ = _world_and_rank(group)
    if world > 1 and _want_validate(validate):
        _validate_across_ranks(x, fmt, "all_gather", "-", group, world)
    out_shape = (world * x.shape[0],) + tuple(x.shape[1:])
    if fmt is None or x.numel() == 0:
        return _plain(dist.all_gather_into_tensor, x, out_shape, world, group)
    codec = get_codec(codec)
    x2 = rows_view(x)
    shape = tuple(x2.shape)
    if world > 1:
        n = fmt.nbytes(shape)
        ex = _exchange("all_gather", fmt, x, n, group, world, validate)
        bufs = _gather_bufs(_payload(ex, n, x.device, lambda: _encoded(codec, x2, fmt)), world, group, ex)
    else:
        bufs = [_encoded(codec, x2, fmt)]
    return torch.cat([saturating_cast(codec.dequantize(b, fmt, shape), x.dtype).reshape(x.shape) for b in bufs])


def reduce_scatter(
    x: torch.Tensor, fmt=None, group=None, *, codec=None, validate: Optional[bool] = None
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's 1/W slice of dim 0, compressed with ``fmt``.

    For sequence parallelism: after a row-parallel layer each rank keeps its sequence shard of
    the reduced output. x.shape[0] must divide by the world size (the outputs of all ranks
    must have one shape). Every rank encodes its W chunks, all-to-all, decodes and sums the W
    encodings of its chunk in fp32 in rank order, casts. Returns [x.shape[0] // W, ...];
    ``fmt=None`` is the plain ``reduce_scatter_tensor``. Rank j's result equals
    ``tp.comm.emulate.emulate_reduce_scatter(shards, fmt)[j]``.
    """
    fmt = resolve_format(fmt)
    check_tensor(x, fmt)
    if x.dim() == 0:
        raise ValueError("reduce_scatter splits dim 0; x must have at least one dimension")
    if fmt is not None and x.dim() == 1:
        raise ValueError(
            f"a compressed reduce_scatter splits dim 0 and quantises along the last dim, so x needs 2 or more "
            f"dimensions; got a 1-D tensor of {x.shape[0]} values (reshape it to [W, n // W] first, or fmt=None)")
    _no_grad_needed(x, "reduce_scatter")
    world, rank = _world_and_rank(group)
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 of x ({x.shape[0]}) must divide by the world size {world}")
    if world > 1 and _want_validate(validate):
        _validate_across_ranks(x, fmt, "reduce_scatter", "-", group, world)
    out_shape = (x.shape[0] // world,) + tuple(x.shape[1:])
    if fmt is None or x.numel() == 0:
        return _plain(dist.reduce_scatter_tensor, x, out_shape, world, group)
    codec = get_codec(codec)
    chunks = x.reshape(world, -1, x.shape[-1]).contiguous()  # chunk j = rows of x[j*n:(j+1)*n]
    cshape = tuple(chunks.shape[1:])
    if world == 1:
        mine = [_encoded(codec, chunks[0], fmt)]
    else:
        ex = _exchange("reduce_scatter", fmt, x, fmt.nbytes(cshape), group, world, validate)
        mine = _exchange_chunks(chunks, fmt, codec, world, group, ex)
    return saturating_cast(codec.dequant_sum(mine, fmt, cshape), x.dtype).reshape(out_shape)


@dataclass(frozen=True)
class CollectiveStats:
    """Wire bytes one rank sends for one call (for reports; no timing)."""

    algorithm: str
    fmt: Optional[str]
    sent_bytes: int
    plain_bytes: int
    second_fmt: Optional[str] = None  # two_shot's second hop when it differs from fmt


def wire_bytes(shape, dtype: torch.dtype, fmt, algorithm: str, world: int, second_fmt=None) -> CollectiveStats:
    """Bytes one rank sends in ``all_reduce`` of a tensor of ``shape`` (ring all-reduce for fmt=None).

    Use it to pick a format/algorithm for a message size before measuring; it counts payload
    only (no protocol overhead) and matches what the collectives above put on the wire.
    ``second_fmt``: two_shot's second hop (as :func:`all_reduce`; None: ``fmt``).
    """
    fmt = resolve_format(fmt)
    second = second_hop(fmt, second_fmt, algorithm, world)
    algorithm = wire_algorithm(algorithm, world)
    numel = 1
    for d in shape:
        numel *= int(d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plain = 2 * (world - 1) * numel * itemsize // max(world, 1)
    if fmt is None:
        return CollectiveStats(algorithm, None, plain, plain)
    h = int(shape[-1])
    rows = numel // h
    if algorithm == "gather":
        sent = (world - 1) * fmt.nbytes((rows, h))  # all-gather: my buffer reaches W-1 peers
    else:
        c = -(-rows // world)
        # all-to-all of first-hop chunks + all-gather of my reduced chunk in the second format
        sent = (world - 1) * (fmt.nbytes((c, h)) + second.nbytes((c, h)))
    return CollectiveStats(algorithm, str(fmt), sent, plain, None if second == fmt else str(second))
