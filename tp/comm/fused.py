"""``algorithm="fused"``: compressed all-reduce as Triton kernels over torch symmetric memory.

Use it on CUDA for the all-reduce after row-parallel layers when the ranks of the TP group
share peer-accessible memory (NVLink). It computes exactly what the NCCL-path algorithms of
:mod:`tp.comm.collectives` compute (bitwise equal to :func:`tp.emulate_all_reduce` with the same
algorithm), with no NCCL call and no intermediate copies: the wire buffers are written
straight into (or read straight out of) the peers' symmetric buffers.

Algorithms (one plan per call, :func:`plan`):

``gather`` (one-shot; the default at W <= 3)
    ``pull`` (default): every rank quantises its x into its own symmetric buffer, barrier,
    every rank dequantises all W buffers (W-1 of them read over NVLink) and sums them in fp32
    in rank order in one kernel, barrier. ``push``: every rank quantises its x W times, once
    straight into each peer's slot ``rank`` (remote stores), barrier, every rank decodes its W
    local slots in rank order, barrier. Result = ``emulate_all_reduce(shards, fmt, "gather")``.
``two_shot`` (the default at W >= 4)
    every rank quantises row-chunk j of x straight into rank j's slot ``rank`` (push), barrier,
    every rank dequant-sums its W slots in rank order and re-quantises the sum into its own
    reduced buffer (one kernel; with a second-hop format of its own, ``second_fmt``, two: the
    fp32 sum, then its encode in that format), barrier, every rank decodes every rank's reduced
    chunk into its rows of the output (pull), barrier. Result = ``emulate_all_reduce(..,
    "two_shot", second_fmt=...)``.

Epilogue (:meth:`FusedAllReduce.all_reduce_rmsnorm`, what ``tp.all_reduce_rmsnorm(...,
algorithm="fused")`` runs on CUDA): the last decode -- gather's dequant-sum of the W buffers,
two_shot's decode of the W reduced chunks -- ends in the next layer's residual add and RMSNorm,
the same kernel with its NORM constexpr on. Result = ``emulate_all_reduce_rmsnorm(shards,
residual, weight, eps, fmt, algorithm, second_fmt=...)``. Cost: that kernel also reads the
residual (and the weight) and writes two [rows, width] outputs (normed, h) instead of one,
with one program per row; no other kernel, barrier or byte on the wire changes.

Synchronisation: a barrier is one tiny Triton kernel on the signal pads (one program per
peer: set the peer's flag 0 -> 1 with a system-scope release CAS, wait for one's own flag
1 -> 0 with an acquire CAS). The flags reset themselves, so no host-side counter or epoch
exists and the calls can be captured in a CUDA graph and replayed any number of times.
Each barrier of a call uses its own channel of the pad.

Fallbacks (:func:`plan` says which and why): fmt None or a message under ``min_bytes``
-> the plain ``dist.all_reduce`` (the emulator's ``min_bytes`` models the same);
formats the kernels do not lower (outliers, static, per-tensor scale ``+ts``), two_shot with
rows not divisible by W, or a message larger than the symmetric buffer -> the NCCL-path
compressed algorithm (:func:`tp.comm.collectives.all_reduce` with the lowered codec): same bits,
NCCL speed.

Ranks that disagree (shape, dtype, format): the symmetric buffers are fixed-capacity, so a
peer's different shape cannot overflow them or fault a transport, but its slot would decode as
garbage, and the wire headers of :mod:`tp.comm.wirecheck` are not carried here (checking them
would cost a kernel per peer or a host synchronisation per call). Instead the first call of
each (shape, dtype, format) on a rank -- when its plan is made, outside CUDA-graph capture --
spends one small all-gather checking that every rank makes the same call
(``tp.comm.collectives._validate_across_ranks``): ranks that disagree from their first such call
all raise the same ValueError. Not caught: a disagreement where one rank repeats a call it
made before while another makes a new one (the new one's check meets the other's fused
kernels, and both wait: a hang, not a result); plans made during capture. Pass
``validate=True`` to ``tp.all_reduce`` to check every call (one all-gather and a
synchronisation each; not inside capture). The NCCL-path fallback carries the wire headers.

Lifecycle: :class:`FusedAllReduce` allocates one symmetric buffer sized from ``max_tokens x
hidden`` for the largest format it will carry, rendezvouses it (collective: every rank, before
any CUDA-graph capture) and frees it in :meth:`FusedAllReduce.close`. A program that used
symmetric memory can hang in ``destroy_process_group``: call :func:`shutdown` (close, barrier,
destroy with a watchdog that exits the process if it hangs).

Costs at TP=2 (gather/pull): one quantise pass over x (HBM), one dequant-sum pass whose remote
half reads (bits/16) of x's bytes over NVLink, two barriers (a few us each).

The planning half (:func:`plan`, :class:`Plan`, :func:`buffer_bytes`) is pure Python and runs
on CPU; :func:`simulate` runs the very same kernel sequence in one process over W ordinary
tensors (Triton's interpreter on CPU), so everything but the barrier is CPU-testable.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from lowering import launch as K
from lowering.constants import KernelConstants, lower, unsupported_reason, value_table
from qformats import Format

from . import collectives
from .call import check_norm_inputs, check_tensor, resolve_format, rows_view, second_hop, wire_algorithm
from .collectives import below_floor
from .policy import DEFAULT_FUSED_MIN_BYTES, EAGER_FUSED_MIN_BYTES, FUSED_MAX_BYTES, fused_window  # noqa: F401

__all__ = [
    "ALIGN",
    "DEFAULT_FUSED_MIN_BYTES",
    "EAGER_FUSED_MIN_BYTES",
    "FUSED_MAX_BYTES",
    "FusedAllReduce",
    "Plan",
    "auto_window",
    "buffer_bytes",
    "default_algorithm",
    "plan",
    "shutdown",
    "simulate",
]

# The fused path's measured window (where it pays) is the policy's: tp.comm.policy.fused_window.
auto_window = fused_window

ALIGN = 256  # byte alignment of every wire-buffer slot inside the symmetric buffer
SIGNAL_CHANNEL_BASE = 8  # pad channels 8.. are ours (torch's own barrier uses channel 0)
N_CHANNELS = 3


# ---------------------------------------------------------------------------------------------
# Planning (pure Python; unit-tested on CPU)
# ---------------------------------------------------------------------------------------------
def _align(n: int, a: int = ALIGN) -> int:
    return -(-int(n) // a) * a


def _not_fused(fmt: Format) -> str | None:
    """Why the fused kernels cannot carry ``fmt`` (None if they can): lowering's answer, plus the
    per-tensor scale, which needs a global absmax pass."""
    why = unsupported_reason(fmt)
    if why:
        return why
    if fmt.tensor_scale:
        return "per-tensor scale (+ts) needs a global absmax pass: not fused"
    return None


def default_algorithm(world: int) -> str:
    """One-shot gather for W <= 3 (one quantisation, each rank reads W-1 peer buffers),
    two-shot for W >= 4 (each rank receives ~2 (W-1)/W of one buffer); the same choice as
    :func:`tp.comm.call.wire_algorithm`, whose NCCL-path result the fused one equals."""
    return wire_algorithm("fused", world)


@dataclass(frozen=True)
class Plan:
    """What one call does, with byte offsets into the symmetric buffer.

    ``kind``: ``"fused"``, ``"plain"`` (dist.all_reduce) or ``"nccl"`` (the NCCL-path compressed
    algorithm of tp.comm.collectives, same result as fused); ``reason`` says why not fused.
    ``algorithm``/``mode``: gather (pull|push) or two_shot (push). ``rows``/``width``: x as
    [rows, width]; ``chunk_rows``: rows per chunk (two_shot) or rows; ``nbytes``: bytes of one
    wire buffer (of the whole x for gather, of one chunk for two_shot); ``slot``: nbytes
    aligned; ``slots_offset``: W slots ([W, slot]) start here; ``reduced_offset``: two_shot's
    re-quantised chunk, ``reduced_nbytes`` its bytes (in the second-hop format); ``need``: bytes
    of symmetric buffer the call uses; ``kc`` / ``kc_second``: the lowered formats (the second
    None when the reduced sum travels in the first).
    """

    kind: str
    reason: str
    algorithm: str
    mode: str
    world: int
    rows: int
    width: int
    chunk_rows: int
    nbytes: int
    slot: int
    slots_offset: int
    reduced_offset: int
    need: int
    kc: KernelConstants | None = None  # the lowered format at this width (fused plans): lowered once
    reduced_nbytes: int = 0
    kc_second: KernelConstants | None = None

    @property
    def fused(self) -> bool:
        return self.kind == "fused"

    def slot_range(self, src_rank: int) -> tuple[int, int]:
        """[start, end) bytes of the slot that holds ``src_rank``'s wire buffer."""
        s = self.slots_offset + src_rank * self.slot
        return s, s + self.nbytes


def _layout(algorithm: str, mode: str, world: int, rows: int, width: int, fmt: Format, second: Format | None = None):
    """(chunk rows, wire bytes, slot bytes, slots offset, reduced offset, bytes needed, reduced
    bytes) of one call; ``second``: two_shot's second-hop format (None: ``fmt``)."""
    if algorithm == "gather":
        c = rows
        n = fmt.nbytes((rows, width))
        slot = _align(n)
        nslots = 1 if mode == "pull" else world
        return c, n, slot, 0, 0, nslots * slot, 0
    c = rows // world
    n = fmt.nbytes((c, width))
    slot = _align(n)
    red = world * slot
    n2 = (second or fmt).nbytes((c, width))
    return c, n, slot, 0, red, red + _align(n2), n2


def buffer_bytes(max_tokens: int, hidden: int, fmts: Sequence, world: int, algorithm: str | None = None,
                 mode: str = "pull", second_fmts: Sequence = ()) -> int:
    """Symmetric-buffer bytes that carry a [max_tokens, hidden] message in every format of ``fmts``
    (with ``algorithm``, default :func:`default_algorithm`), two_shot's reduced sum also in every
    format of ``second_fmts``; fewer tokens always fit."""
    algorithm = algorithm or default_algorithm(world)
    lowered = [f for f in map(resolve_format, fmts) if f is not None and not _not_fused(f)]
    seconds = [f for f in map(resolve_format, second_fmts) if f is not None and not _not_fused(f)]
    need = ALIGN
    rows = max_tokens if algorithm == "gather" else -(-max_tokens // world) * world
    for f in lowered:
        for s in [None] + (seconds if algorithm == "two_shot" else []):
            need = max(need, _layout(algorithm, mode, world, rows, hidden, f, s)[5])
        if algorithm == "gather":  # also room for the other mode
            need = max(need, _layout(algorithm, "push", world, rows, hidden, f)[5])
    return _align(need)


def plan(shape, dtype: torch.dtype, fmt, world: int, *, capacity: int, min_bytes: int = 0,
         algorithm: str | None = None, mode: str = "pull", device_type: str = "cuda",
         max_bytes: int | None = None, second_fmt=None) -> Plan:
    """The plan of one all-reduce of a ``shape``/``dtype`` tensor (see :class:`Plan`);
    ``second_fmt``: two_shot's second-hop format (None: ``fmt``; ValueError for gather).

    Raises ValueError/TypeError for what no all-reduce can carry (same checks as
    tp.comm.collectives.all_reduce); otherwise always returns a plan, falling back as the module
    docstring says.
    """
    fmt = resolve_format(fmt)
    algorithm = algorithm or default_algorithm(world)
    if algorithm not in ("gather", "two_shot"):
        raise ValueError(f"unknown fused algorithm {algorithm!r}: valid are gather, two_shot")
    if mode not in ("pull", "push"):
        raise ValueError(f"unknown gather mode {mode!r}: valid are pull, push")
    if algorithm == "two_shot":
        mode = "push"
    second = second_hop(fmt, second_fmt, algorithm)
    second = None if second is fmt else second
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    width = shape[-1] if shape else 1
    rows = numel // width if width else 0

    def other(kind, reason):
        return Plan(kind, reason, algorithm, mode, world, rows, width, 0, 0, 0, 0, 0, 0)

    if fmt is None:
        return other("plain", "no format")
    if dtype not in collectives.SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} cannot be compressed: use float32, bfloat16 or float16")
    if not shape:
        raise ValueError("a scalar cannot be compressed: blocks run along the last dimension")
    fmt.layout((1, width))  # raises for a static format calibrated for another width
    if numel == 0:
        return other("plain", "empty tensor")
    if below_floor(numel * itemsize, min_bytes):
        return other("plain", f"{numel * itemsize} bytes < min_bytes {min_bytes}")
    if max_bytes is not None and numel * itemsize > max_bytes:
        return other("plain", f"{numel * itemsize} bytes > {max_bytes}: the fused path does not pay there")
    why = _not_fused(fmt) or (second is not None and _not_fused(second))
    if why:
        return other("nccl", why)
    if device_type != "cuda":
        return other("nccl", f"device {device_type}: fused kernels need CUDA peers")
    if world < 2:
        return other("nccl", "world size 1: nothing to exchange")
    if algorithm == "two_shot" and rows % world:
        return other("nccl", f"two_shot needs rows ({rows}) divisible by the world size {world}")
    c, n, slot, so, ro, need, n2 = _layout(algorithm, mode, world, rows, width, fmt, second)
    if need > capacity:
        return other("nccl", f"needs {need} bytes of symmetric buffer, has {capacity}")
    return Plan("fused", "", algorithm, mode, world, rows, width, c, n, slot, so, ro, need, lower(fmt, width, device_type),
                n2, None if second is None else lower(second, width, device_type))


# ---------------------------------------------------------------------------------------------
# Kernels (the codec arithmetic is lowering.kernels'; only the addressing is new here)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _barrier_kernel(pad_ptrs, rank, CHANNEL: tl.constexpr, WORLD: tl.constexpr):
    """Program p: raise my flag in peer p's pad, then wait for (and clear) p's flag in mine.

    Self-resetting: a flag goes 0 -> 1 (sender, waits while the previous signal is unconsumed)
    and 1 -> 0 (receiver), so the pads are all zero between calls and a CUDA graph replays it."""
    p = tl.program_id(0)
    peer_pad = tl.load(pad_ptrs + p).to(tl.pointer_type(tl.int32))
    my_pad = tl.load(pad_ptrs + rank).to(tl.pointer_type(tl.int32))
    send = peer_pad + CHANNEL * WORLD + rank
    while tl.atomic_cas(send, 0, 1, sem="release", scope="sys") != 0:
        pass
    recv = my_pad + CHANNEL * WORLD + p
    while tl.atomic_cas(recv, 1, 0, sem="acquire", scope="sys") != 1:
        pass


@dataclass(frozen=True)
class _Epilogue:
    """The RMSNorm epilogue of one call's last decode: ``residual`` [rows, width] (contiguous,
    any float dtype), ``weight`` [width] (contiguous, any float dtype), ``eps`` and ``h``, the
    [rows, width] output (x's dtype) that receives the new residual."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    h: torch.Tensor


def _norm_inputs(x: torch.Tensor, residual, weight, eps, op: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(residual as a contiguous [rows, width], weight contiguous, eps as a float) of an
    all-reduce with the RMSNorm epilogue; raises what :func:`tp.comm.collectives.all_reduce_rmsnorm`
    raises for the same inputs (and a clear error for what the kernel could not take)."""
    check_norm_inputs(x, residual, weight)
    for t, what in ((residual, "residual"), (weight, "weight")):
        if t.dtype not in collectives.SUPPORTED_DTYPES:
            raise TypeError(f"{what} has dtype {t.dtype}; the epilogue takes float32, bfloat16 or float16")
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device}, x on {x.device}")
    for t, what in ((x, "x"), (residual, "residual"), (weight, "weight")):
        collectives._no_grad_needed(t, f"{op} ({what})")
    return rows_view(residual), weight.detach().contiguous(), float(eps)


def _steps(p: Plan, x2: torch.Tensor, kc, bufs: Sequence[torch.Tensor], ptrs: torch.Tensor, rank: int,
           out: torch.Tensor, kc_second=None, epilogue: _Epilogue | None = None):
    """One rank's kernel sequence; yields where a barrier over all ranks must stand.
    ``kc`` / ``kc_second``: the plan's lowered formats, for the device the kernels run on.

    ``bufs[j]``: a uint8 tensor over rank j's symmetric buffer (a peer view on GPU);
    ``ptrs``: int64 tensor of their base addresses on x's device; ``out``: [rows, width].
    ``epilogue``: the RMSNorm epilogue (:class:`_Epilogue`), taken by the last decode (the same
    kernel with NORM on): ``out`` receives the normed rows and ``epilogue.h`` the new residual."""
    W, R, H = p.world, p.rows, p.width
    mine = bufs[rank]
    if p.algorithm == "gather":
        if p.mode == "pull":
            K.quantize(x2, kc, out=mine[: p.nbytes])
            yield
            if epilogue is None:
                K.dequantize_peers(ptrs, 0, kc, R, H, out, summed=True)
            else:
                e = epilogue
                K.dequantize_peers_rmsnorm(ptrs, 0, kc, R, H, out.dtype, e.residual, e.weight, e.eps, out=out,
                                           res_out=e.h, summed=True)
            yield
        else:
            s, e = p.slot_range(rank)
            for k in range(1, W + 1):  # peers first, own slot last
                j = (rank + k) % W
                K.quantize(x2, kc, out=bufs[j][s:e])
            yield
            slots = mine[p.slots_offset: p.slots_offset + W * p.slot].view(W, p.slot)[:, : p.nbytes]
            if epilogue is None:
                K.dequantize(slots, kc, R, H, out.dtype, out=out)
            else:
                e = epilogue
                K.dequantize_rmsnorm(slots, kc, R, H, out.dtype, e.residual, e.weight, e.eps, out=out, res_out=e.h)
            yield
        return
    # two_shot
    c = p.chunk_rows
    s, e = p.slot_range(rank)
    for k in range(1, W + 1):
        j = (rank + k) % W
        K.quantize(x2[j * c: (j + 1) * c], kc, out=bufs[j][s:e])
    yield
    slots = mine[p.slots_offset: p.slots_offset + W * p.slot].view(W, p.slot)[:, : p.nbytes]
    red = mine[p.reduced_offset: p.reduced_offset + p.reduced_nbytes]
    if kc_second is None:
        K.quantize(None, kc, shape=(c, H), bufs=slots, out=red)  # rank-order sum, re-quantised
    else:  # the fp32 rank-order sum, then its encode in the second-hop format (two kernels)
        K.quantize(K.dequantize(slots, kc, c, H, torch.float32), kc_second, out=red)
    yield
    last = kc if kc_second is None else kc_second
    if epilogue is None:
        K.dequantize_peers(ptrs, p.reduced_offset, last, c, H, out, summed=False)
    else:  # each reduced chunk alone, with its rows of the residual (rows j*c.. of out and h)
        e = epilogue
        K.dequantize_peers_rmsnorm(ptrs, p.reduced_offset, last, c, H, out.dtype, e.residual, e.weight, e.eps,
                                   out=out, res_out=e.h, summed=False)
    yield


def simulate(shards: Sequence[torch.Tensor], fmt, *, algorithm: str | None = None, mode: str = "pull",
             poison: int = 0xA5, second_fmt=None, residual: torch.Tensor | None = None,
             weight: torch.Tensor | None = None, eps: float | None = None) -> list:
    """Run the fused kernel sequence of every rank in one process over W ordinary buffers.

    The barriers become lock-step phases (every rank's step k runs before any rank's step
    k + 1). On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1). Returns each
    rank's output; they must all equal ``tp.emulate_all_reduce(shards, fmt, algorithm,
    second_fmt=second_fmt)``. With ``residual`` (x's shape, the same on every rank, as the
    residual stream of tensor parallelism is), ``weight`` [width] and ``eps``, the last decode
    takes the RMSNorm epilogue (:meth:`FusedAllReduce.all_reduce_rmsnorm`) and each rank's
    output is (normed, h), which must equal ``tp.comm.emulate.emulate_all_reduce_rmsnorm(shards,
    residual, weight, eps, fmt, algorithm, second_fmt=second_fmt)``. Inference only, like the
    real call: raises when an input requires grad.
    Buffers start filled with ``poison`` so a byte nobody wrote shows up as a wrong result.
    """
    fmt = resolve_format(fmt)
    shards = list(shards)
    W = len(shards)
    x = shards[0]
    for s in shards:
        check_tensor(s, fmt)
    if residual is None:
        if weight is not None or eps is not None:
            raise ValueError("weight and eps are the RMSNorm epilogue's: pass residual too")
    elif weight is None or eps is None:
        raise ValueError("the RMSNorm epilogue needs residual, weight and eps together")
    else:
        for i, s in enumerate(shards):
            collectives._no_grad_needed(s, f"comm.fused.simulate (shards[{i}])")
        residual, weight, eps = _norm_inputs(x, residual, weight, eps, "comm.fused.simulate")
    algorithm = algorithm or default_algorithm(W)
    seconds = [] if second_fmt is None else [second_fmt]
    cap = buffer_bytes(rows_view(x).shape[0], x.shape[-1], [fmt], W, algorithm, mode, seconds)
    p = plan(x.shape, x.dtype, fmt, W, capacity=cap, algorithm=algorithm, mode=mode, device_type="cuda",
             second_fmt=second_fmt)
    if not p.fused:
        raise ValueError(f"not a fused plan: {p.kind} ({p.reason})")
    kc = lower(fmt, p.width, x.device)  # planned as CUDA, lowered for where it runs
    kc_second = None if p.kc_second is None else lower(p.kc_second.format, p.width, x.device)
    bufs = [torch.full((cap,), poison, dtype=torch.uint8, device=x.device) for _ in range(W)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=x.device)
    outs = [torch.empty((p.rows, p.width), dtype=x.dtype, device=x.device) for _ in range(W)]
    epilogues = [None] * W
    if residual is not None:
        epilogues = [_Epilogue(residual, weight, eps, torch.empty_like(outs[r])) for r in range(W)]
    with torch.no_grad():
        gens = [_steps(p, rows_view(shards[r]), kc, bufs, ptrs, r, outs[r], kc_second, epilogues[r])
                for r in range(W)]
        alive = True
        while alive:
            alive = False
            for g in gens:
                try:
                    next(g)
                    alive = True
                except StopIteration:
                    pass
    if residual is None:
        return [o.reshape(x.shape) for o in outs]
    return [(o.reshape(x.shape), e.h.reshape(x.shape)) for o, e in zip(outs, epilogues)]


# ---------------------------------------------------------------------------------------------
# The runtime object (CUDA, torch.distributed, symmetric memory)
# ---------------------------------------------------------------------------------------------
class FusedAllReduce:
    """Fused compressed all-reduce over one symmetric buffer; ``ar(x, fmt)`` returns the sum,
    ``ar.all_reduce_rmsnorm(x, residual, weight, eps, fmt)`` (normed, h) with the RMSNorm epilogue.

    Args:
        group: the TP process group (default: world). Construct on every rank together
            (rendezvous is collective), before any CUDA-graph capture.
        max_tokens, hidden: the largest [tokens, hidden] message it will carry fused.
        fmts: the formats it must fit (the buffer is sized for the largest).
        second_fmts: two_shot's second-hop formats it must also fit (``second_fmt=`` of a call).
        min_bytes: messages under this use the plain all-reduce; None (default): the
            measured auto policy (:func:`auto_window`: 4 MiB inside a CUDA graph, 64 MiB eager,
            per-format upper bounds).
        algorithm: "gather" / "two_shot" / None (:func:`default_algorithm`); mode: gather's
            "pull" (default) or "push".
        nccl_codec: the codec of the NCCL-path fallback (default lowering.LoweredCodec()).
    """

    def __init__(self, group=None, *, max_tokens: int, hidden: int, fmts: Sequence = ("mxfp8_e4m3",),
                 min_bytes: int | None = None, algorithm: str | None = None,
                 mode: str = "pull", device=None, nccl_codec=None, second_fmts: Sequence = ()):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group or dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.min_bytes = None if min_bytes is None else int(min_bytes)
        self.algorithm = algorithm or default_algorithm(self.world)
        self.mode = mode
        if nccl_codec is None:
            from lowering import LoweredCodec

            nccl_codec = LoweredCodec()
        self.nccl_codec = nccl_codec
        self.capacity = buffer_bytes(max_tokens, hidden, fmts, self.world, self.algorithm, mode, second_fmts)
        pad_need = 4 * self.world * (SIGNAL_CHANNEL_BASE + N_CHANNELS)
        try:
            if symm_mem.get_signal_pad_size() < pad_need:
                symm_mem.set_signal_pad_size(pad_need)
        except AttributeError:  # older torch has no get/set_signal_pad_size: its fixed pad is large enough
            pass
        except RuntimeError as e:  # torch fixes the size at the first allocation: a smaller pad would overflow
            raise RuntimeError(f"FusedAllReduce needs a symmetric-memory signal pad of {pad_need} bytes at "
                               f"{self.world} ranks and torch could not grow it ({e}); create the FusedAllReduce "
                               f"of the largest group first") from e
        group_name = self.group.group_name
        try:
            symm_mem.enable_symm_mem_for_group(group_name)
        except AttributeError:  # newer torch: removed, every group is enabled
            pass
        self._buf = symm_mem.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(self._buf, group_name)
        h = self._handle
        self._bufs = [self._buf if j == self.rank else h.get_buffer(j, (self.capacity,), torch.uint8)
                      for j in range(self.world)]
        self._ptrs = torch.tensor(list(h.buffer_ptrs), dtype=torch.int64, device=self.device)
        self._pads = torch.tensor(list(h.signal_pad_ptrs), dtype=torch.int64, device=self.device)
        for f in list(fmts) + list(second_fmts):  # the decode tables reach the GPU now, not inside a capture
            f = resolve_format(f)
            if f is not None and not _not_fused(f):
                value_table(lower(f, hidden, self.device), self.device)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self.closed = False
        self._plans: dict = {}
        collectives.register_fused(group_name, self)  # serves tp.all_reduce(..., algorithm="fused")

    def plan(self, x: torch.Tensor, fmt, second_fmt=None) -> Plan:
        """The (cached) plan of ``ar(x, fmt, second_fmt=second_fmt)``."""
        fmt = resolve_format(fmt)
        second = second_hop(fmt, second_fmt, self.algorithm)  # ValueError for gather
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (tuple(x.shape), x.dtype, str(fmt), str(second), self.algorithm, self.mode, x.device.type,
               self.min_bytes, capturing)
        p = self._plans.get(key)
        if p is None:
            check_tensor(x, fmt)
            if second is not fmt:
                check_tensor(x, second)
            if self.world > 1 and not capturing:  # first sight of this call: do all ranks make it? (docstring)
                collectives._validate_across_ranks(x, fmt, "all_reduce", "fused", self.group, self.world, second)
            if self.min_bytes is None:
                lo, hi = fused_window(fmt, capturing)
            else:
                lo, hi = self.min_bytes, None
            p = self._plans[key] = plan(x.shape, x.dtype, fmt, self.world, capacity=self.capacity,
                                        min_bytes=lo, max_bytes=hi, algorithm=self.algorithm,
                                        mode=self.mode, device_type=x.device.type, second_fmt=second)
        return p

    def barrier(self, channel: int) -> None:
        _barrier_kernel[(self.world,)](self._pads, self.rank, CHANNEL=SIGNAL_CHANNEL_BASE + channel,
                                       WORLD=self.world, num_warps=1)

    def __call__(self, x: torch.Tensor, fmt=None, *, inplace: bool = False, second_fmt=None) -> torch.Tensor:
        """Sum of ``x`` over the group, compressed with ``fmt``: bitwise identical on all ranks and
        equal to ``tp.emulate_all_reduce(shards, fmt, self.algorithm, min_bytes)``.

        ``inplace=True`` lets the plain fallback reduce a contiguous ``x`` in place and return it
        (no copy: what a row-parallel layer's temporary partial sum allows); the fused path is
        always out of place. The measured benchmark rows used ``inplace=False``. ``second_fmt``:
        two_shot's second-hop format (None: ``fmt``; ValueError for gather); its buffer room must
        have been asked for with ``second_fmts=`` (else the call takes the NCCL path)."""
        if self.closed:
            raise RuntimeError("FusedAllReduce is closed")
        fmt = resolve_format(fmt)
        p = self.plan(x, fmt, second_fmt)  # checks x and the formats the first time a call is seen
        if p.kind == "plain":
            y = x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(y, group=self.group)
            return y
        if p.kind == "nccl":
            return collectives.all_reduce(x, fmt, self.group, algorithm=p.algorithm, codec=self.nccl_codec,
                                          second_fmt=second_fmt)
        return self._fused(p, x).reshape(x.shape)

    def all_reduce_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           fmt=None, *, second_fmt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, h): the sum of ``x`` over the group (as ``ar(x, fmt, second_fmt=second_fmt)``)
        whose last decode ends in the next layer's residual add and RMSNorm: h = sum +
        ``residual`` (x's shape, any float dtype), normed = RMSNorm(h) * ``weight`` ([width]),
        both x's dtype. Bitwise identical on all ranks and equal to
        ``tp.comm.emulate.emulate_all_reduce_rmsnorm(shards, residual, weight, eps, fmt,
        self.algorithm, min_bytes, second_fmt=second_fmt)``. Use it (or
        :func:`tp.comm.collectives.all_reduce_rmsnorm` with ``algorithm="fused"``, which calls it
        on CUDA) where a row-parallel layer's all-reduce is followed by the next norm.

        Fused, the epilogue is the last decode's kernel with NORM on (gather: the dequant-sum of
        the W peer buffers; two_shot: the decode of the W reduced chunks), in the same kernel
        sequence, barriers and plan as ``ar(x, fmt)``: the exchange is the same, the norm is
        local. Its cost, in that kernel: one more read ([rows, width] residual, plus the weight)
        and one more write (h), and one program per row (the row's sum of squares is one fixed
        tree) where the plain decode spreads a row over programs of a few blocks, so a message of
        few rows runs on few programs. Against ``ar`` followed by a separate add + norm pass it
        saves that pass's read of the sum, the sum's write and a launch.
        Fallbacks: the plain plan is the plain all-reduce + residual, normed by
        :func:`lowering.ops.reference_rms_norm` (the unfused composition, as the NCCL path's
        plain branch); the NCCL plan is :func:`tp.comm.collectives.all_reduce_rmsnorm` with
        the plan's algorithm. Inference only: raises when an input requires grad."""
        if self.closed:
            raise RuntimeError("FusedAllReduce is closed")
        fmt = resolve_format(fmt)
        check_tensor(x, fmt)
        res2, w, eps = _norm_inputs(x, residual, weight, eps, "all_reduce_rmsnorm")
        p = self.plan(x, fmt, second_fmt)
        with torch.no_grad():
            if p.kind == "plain":
                from lowering.ops import reference_rms_norm

                y = x.clone(memory_format=torch.contiguous_format)
                dist.all_reduce(y, group=self.group)
                h = y + residual
                return reference_rms_norm(h, weight, eps, p.width), h
            if p.kind == "nccl":
                return collectives.all_reduce_rmsnorm(x, residual, weight, eps, fmt, self.group, p.algorithm,
                                                      codec=self.nccl_codec, second_fmt=second_fmt)
            epilogue = _Epilogue(res2, w, eps, torch.empty((p.rows, p.width), dtype=x.dtype, device=x.device))
            out = self._fused(p, x, epilogue)
        return out.reshape(x.shape), epilogue.h.reshape(x.shape)

    def _fused(self, p: Plan, x: torch.Tensor, epilogue: _Epilogue | None = None) -> torch.Tensor:
        """Run the fused plan ``p`` on this rank (a barrier between its steps); returns the [rows,
        width] output (the normed rows with ``epilogue``, whose ``h`` receives the new residual)."""
        out = torch.empty((p.rows, p.width), dtype=x.dtype, device=x.device)
        for k, _ in enumerate(_steps(p, rows_view(x), p.kc, self._bufs, self._ptrs, self.rank, out, p.kc_second,
                                     epilogue)):
            self.barrier(k)
        return out

    def close(self) -> None:
        """Free the symmetric buffer (all ranks together; no call may be in flight)."""
        if self.closed:
            return
        torch.cuda.synchronize(self.device)
        collectives.unregister_fused(self.group.group_name, self)
        self._bufs = self._ptrs = self._pads = None
        self._handle = None
        self._buf = None
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shutdown(*objs, timeout_s: float = 30.0, hang_exit_code: int = 124) -> None:
    """Close ``objs`` (FusedAllReduce), barrier, destroy the process group.

    A watchdog ends the process if destroy_process_group hangs for ``timeout_s`` (seen after
    symmetric memory): output flushed, a line on stderr, exit code ``hang_exit_code`` (124, as
    ``timeout`` reports a hang; 0 would pass a hung teardown off as success)."""
    import sys

    for o in objs:
        if o is not None:
            o.close()
    if not dist.is_initialized():
        return
    torch.cuda.synchronize()
    dist.barrier()

    def _kill():
        sys.stdout.flush()
        print(f"tp.comm.fused.shutdown: destroy_process_group hung for {timeout_s} s; exiting with code "
              f"{hang_exit_code}", file=sys.stderr, flush=True)
        os._exit(hang_exit_code)

    t = threading.Timer(timeout_s, _kill)
    t.daemon = True
    t.start()
    dist.destroy_process_group()
    t.cancel()
