"""Headers in compressed wire buffers: ranks that disagree get an error, never a result.

The ranks of a group must make the same compressed calls (op, algorithm, format, dtype,
shape) in the same order. When they do not, a backend sums garbage (equal byte counts, e.g.
(4, 64) against (2, 128)) or aborts a process (gloo, on different byte counts), and a rank
that survives can decode memory nobody wrote. Checking with an extra collective on every call
(``validate=True``) costs a round trip per call; this module makes the default safe for
``HEADER_BYTES`` per wire buffer and no extra message on the hot path:

* Every compressed wire buffer travels as ``[header | payload]``. The header names the call
  (:class:`Signature`: op, format, dtype, shape, payload bytes per buffer) and, on CPU, its
  sequence number on the group. A receiver checks every header before decoding: each rank
  receives every rank's header, so on a disagreement all ranks raise the same ValueError; a
  buffer that no peer wrote in this call (uninitialised or stale memory) never passes.
* Different byte counts must never reach the backend, so sizes are agreed before they are
  sent, from history every rank shares: each call's signature is predicted (the signature that
  followed the previous call's signature last time, else the previous call's). A call that
  matches the prediction sends its data at once; a call that does not first sends a CHECK
  message with the *predicted* call's transport and sizes (zeros after the header), so a peer
  that does match receives it as an ordinary message and raises on its header. When every
  rank sent CHECK with the same signature they go on; the next call predicts this one. Steady
  repetition (the same all-reduce in every layer, all-gather/reduce-scatter alternating) is
  always predicted; a mispredicted call costs one extra message of the predicted size (and,
  on CUDA, a host synchronisation).

Cost of a predicted call (2 shared CPU cores, gloo, W=2, mxfp4): 32 B more per buffer
(+0.18% at 8x4096), ~20 us of bookkeeping, and for gather/all_gather one copy of the encoded
payload into the send buffer (13 us at 8x4096, ~0.3 ms at 512x4096): ~3% of a TorchCodec
call at 8x4096 (~0.9-1.7 ms), ~1% at 512x4096 (20-45 ms). Per-call ``validate=True`` adds a
round trip instead (~0.3-0.4 ms here).

On CUDA the fast path checks headers on the device (``torch._assert_async``: no host
synchronisation, CUDA-graph safe), so a rank there stops with a device-side assertion while
the rank that brought the new call raises the ValueError; headers carry no sequence number
(a captured graph replays constant bytes), and inside CUDA-graph capture no CHECK message can
be inspected: the history is neither used nor updated there (capture after an eager warm-up).

Not covered: plain all-reduces (``fmt=None`` or under ``min_bytes``: a sum carries no
header), so also a call that is plain on one rank and compressed on another
(``validate=True`` covers both); a rank whose call raised before its first message while a
peer went on (the peer waits for the process group's timeout); ranks that pass different
``validate``; and the fused symmetric-memory kernels (:mod:`tp.comm.fused` checks each new plan
once instead).
"""
from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

import qformats

__all__ = ["HEADER_BYTES", "SECOND_HOP", "Exchange", "Signature", "begin", "checks", "reset"]

HEADER_BYTES = 32
_MAGIC = b"QFw%d" % qformats.packing.WIRE_VERSION  # the wire layout's version (qformats.packing)
_LAYOUT = struct.Struct("<4sBBBBIIIIII")  # magic, kind, op, dtype, ndim, fmt, shape, rows, width, slot, seq
assert _LAYOUT.size == HEADER_BYTES
DATA, CHECK = 1, 2
# one code per message kind on the wire: two_shot's second exchange has its own
_OPS = {"gather": 1, "two_shot": 2, "two_shot/reduced": 3, "all_gather": 4, "reduce_scatter": 5}
_OP_NAMES = {v: k for k, v in _OPS.items()}
_DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in _DTYPES.items()}
_PREDICTIONS = 256  # remembered successor signatures per group (oldest forgotten first)
_U32 = 0xFFFFFFFF


def _crc(s: str) -> int:
    return zlib.crc32(s.encode()) & _U32


# Canonical format strings every rank can print from a crc (so every rank's message is the same).
_FORMAT_NAMES = {_crc(str(f)): str(f) for f in qformats.PRESETS.values()}
SECOND_HOP = "->"  # two_shot with another second-hop format: "first->second" (collectives.wire_format)


def _format_name(crc: int) -> str:
    """The format (or ``first->second`` pair of presets) a header's crc names; its crc else."""
    name = _FORMAT_NAMES.get(crc)
    if name is None:  # the error path only: try every pair of presets as two_shot's two hops
        name = next((f"{a}{SECOND_HOP}{b}" for a in _FORMAT_NAMES.values() for b in _FORMAT_NAMES.values()
                     if _crc(f"{a}{SECOND_HOP}{b}") == crc), None)
    return name or f"format crc {crc:08x}"


class Signature(NamedTuple):
    """What one compressed call does on the wire; equal on every rank, or the call fails.

    ``fmt``: the canonical format, or ``"first->second"`` for two_shot with a second-hop format
    of its own (both hops agreed before the first byte moves). ``slot``: payload bytes of one
    buffer of the call's first exchange (the whole encoding for gather / all_gather, one row
    chunk's for two_shot / reduce_scatter).
    """

    op: str
    fmt: str
    dtype: torch.dtype
    shape: tuple
    slot: int

    @property
    def transport(self) -> str:
        """The backend collective of the first exchange (what a CHECK message must imitate)."""
        return "all_gather" if self.op in ("gather", "all_gather") else "all_to_all"

    def header(self, kind: int, seq: int, phase: str = "") -> bytes:
        """The ``HEADER_BYTES`` header of this call's messages (``phase``: "" or "/reduced")."""
        key = (self, kind, phase)
        head = _HEADS.get(key)
        if head is None:
            rows = 1
            for d in self.shape[:-1]:
                rows *= int(d)
            width = int(self.shape[-1]) if self.shape else 1
            head = _HEADS[key] = _LAYOUT.pack(
                _MAGIC, kind, _OPS[self.op + phase], _DTYPES.get(self.dtype, 255), min(len(self.shape), 255),
                _crc(self.fmt), _crc(repr(tuple(self.shape))), rows & _U32, width & _U32, self.slot & _U32, 0)[:-4]
            if len(_HEADS) > _CACHED_HEADERS:
                _HEADS.clear()
        return head + _SEQ.pack(seq & _U32)


_SEQ = struct.Struct("<I")  # the last field of the header
_HEADS: dict = {}  # (signature, kind, phase) -> header without its sequence number
_CACHED_HEADERS = 4096


def _describe(row: bytes) -> str:
    magic, kind, op, dt, ndim, fmt, shape, rows, width, slot, seq = _LAYOUT.unpack(row)
    if magic != _MAGIC or kind not in (DATA, CHECK) or op not in _OP_NAMES:
        return "no header (bytes no peer wrote in this call, or a peer running another collective)"
    what = "checked before sending" if kind == CHECK else "sent as predicted"
    name = _format_name(fmt)
    return (f"{_OP_NAMES[op]} {name} {_DTYPE_NAMES.get(dt, '?')} {ndim}-d {rows}x{width} "
            f"(shape crc {shape:08x}), {slot} B per buffer, call #{seq}, {what}")


def _disagreement(rows: list[bytes], seq: int) -> ValueError:
    lines = "; ".join(f"rank {r}: {_describe(b)}" for r, b in enumerate(rows))
    return ValueError(
        f"ranks disagree on compressed collective #{seq} of their group: {lines}. Every rank must make "
        f"the same compressed calls (op, algorithm, format, dtype, shape) in the same order"
    )


class _GroupState:
    """The call history every rank of a group shares: sequence number and predictions."""

    def __init__(self):
        self.seq = 0
        self.checks = 0  # CHECK messages sent (mispredicted calls)
        self.last: Optional[Signature] = None
        self.follow: "OrderedDict[Signature, Signature]" = OrderedDict()

    def predict(self) -> Optional[Signature]:
        return self.follow.get(self.last, self.last)

    def agreed(self, sig: Signature) -> None:
        if self.last is not None:
            self.follow[self.last] = sig
            self.follow.move_to_end(self.last)
            if len(self.follow) > _PREDICTIONS:
                self.follow.popitem(last=False)
        self.last = sig

    def reset(self) -> None:
        self.last = None
        self.follow.clear()


_STATES: dict = {}  # id(process group) -> (group, _GroupState); the group is kept so its id is not reused


def _state(group) -> _GroupState:
    pg = group if group is not None else dist.group.WORLD
    entry = _STATES.get(id(pg))
    if entry is None or entry[0] is not pg:
        entry = _STATES[id(pg)] = (pg, _GroupState())
    return entry[1]


def checks(group=None) -> int:
    """How many CHECK messages this rank sent on ``group``: its calls that were not predicted."""
    return _state(group).checks


def reset() -> None:
    """Forget every group's history (all ranks together, e.g. after re-creating groups)."""
    _STATES.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Exchange:
    """One compressed call's part of the protocol: writes the headers its messages carry and
    checks the ones it receives. Made by :func:`begin`."""

    def __init__(self, sig: Signature, state: _GroupState, seq: int, world: int, device: torch.device):
        self.sig, self.state, self.world, self.device = sig, state, world, device
        self.seq = 0 if device.type == "cuda" else seq  # CUDA: constant bytes, a captured graph replays them

    def write(self, slots: torch.Tensor, phase: str = "") -> None:
        """Write the DATA header into ``slots[:, :HEADER_BYTES]`` ([k, HEADER_BYTES + n] uint8)."""
        if slots.is_cuda:
            slots[:, :HEADER_BYTES] = _cuda_header(self.sig, phase, slots.device)
        else:  # numpy: a tensor op per header would cost more than the whole check
            slots.numpy()[:, :HEADER_BYTES] = np.frombuffer(self.sig.header(DATA, self.seq, phase), np.uint8)

    def check(self, slots: torch.Tensor, phase: str = "") -> None:
        """Raise unless every received header (``slots[:, :HEADER_BYTES]`` of [W, HEADER_BYTES + n]
        uint8) is this call's own."""
        if slots.is_cuda:
            want = _cuda_header(self.sig, phase, slots.device)
            torch._assert_async((slots[:, :HEADER_BYTES] == want).all(), "tp: ranks disagree on a compressed collective")
            return
        got = slots.numpy()[:, :HEADER_BYTES].tobytes()
        if got != self.sig.header(DATA, self.seq, phase) * slots.shape[0]:
            self.state.reset()  # every rank fails this call: the shared history restarts everywhere
            raise _disagreement([got[i: i + HEADER_BYTES] for i in range(0, len(got), HEADER_BYTES)], self.seq)


def _cuda_header(sig: Signature, phase: str, device: torch.device) -> torch.Tensor:
    key = (sig, phase, device)
    h = _CUDA_HEADERS.get(key)
    if h is None:
        if _capturing(device):
            raise RuntimeError(f"tp: the compressed call {sig.op} {sig.fmt} {tuple(sig.shape)} is first made "
                               f"inside CUDA-graph capture: run it once before capturing")
        h = _CUDA_HEADERS[key] = torch.frombuffer(bytearray(sig.header(DATA, 0, phase)), dtype=torch.uint8).to(device)
        if len(_CUDA_HEADERS) > _CACHED_HEADERS:
            _CUDA_HEADERS.popitem(last=False)  # oldest first: variable shapes must not grow it forever
    return h


_CUDA_HEADERS: "OrderedDict" = OrderedDict()  # (signature, phase, device) -> its DATA header on the device


def begin(sig: Signature, group, world: int, device: torch.device) -> Exchange:
    """Start a compressed call on ``group``: agree on ``sig`` with every rank, then return the
    :class:`Exchange` whose headers its messages carry. Raises ValueError (on every rank) when
    the ranks' calls disagree and that showed already in the CHECK message."""
    st = _state(group)
    st.seq += 1
    ex = Exchange(sig, st, st.seq, world, device)
    if _capturing(device):
        return ex  # nothing can be inspected during capture; history untouched
    pred = st.predict()
    if sig != pred:
        _check_message(sig, pred, st, group, world, device)
    st.agreed(sig)
    return ex


def _check_message(sig: Signature, pred: Optional[Signature], st: _GroupState, group, world: int,
                   device: torch.device) -> None:
    """Send a CHECK for ``sig`` shaped like ``pred``'s first exchange; raise unless every rank did the same."""
    st.checks += 1
    mine = sig.header(CHECK, st.seq)
    H = HEADER_BYTES
    head = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device)
    if pred is None:  # a group's first call (or the first after a failure): every rank is here
        recv = torch.empty(world * H, dtype=torch.uint8, device=device)
        dist.all_gather_into_tensor(recv, head, group=group)
    elif pred.transport == "all_gather":
        send = torch.zeros(H + pred.slot, dtype=torch.uint8, device=device)
        send[:H] = head
        recv = torch.empty(world * (H + pred.slot), dtype=torch.uint8, device=device)
        dist.all_gather_into_tensor(recv, send, group=group)
    else:
        send = torch.zeros(world, H + pred.slot, dtype=torch.uint8, device=device)
        send[:, :H] = head
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    got = recv.view(world, -1)[:, :H].cpu().numpy().tobytes()  # the slow path: one synchronisation
    if got != mine * world:
        st.reset()
        raise _disagreement([got[i: i + H] for i in range(0, len(got), H)], st.seq)
