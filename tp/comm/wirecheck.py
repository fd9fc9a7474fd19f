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

Cost of a predicted call (2 shared CPU cores, gloo, W=2, mxfp4; measured when headers were 32 B,
they are 64 B now): 32 B more per buffer (+0.18% at 8x4096), ~20 us of bookkeeping, and for
gather/all_gather one copy of the encoded payload into the send buffer (13 us at 8x4096, ~0.3 ms
at 512x4096): ~3% of a TorchCodec call at 8x4096 (~0.9-1.7 ms), ~1% at 512x4096 (20-45 ms). Per-call ``validate=True`` adds a
round trip instead (~0.3-0.4 ms here).

What a header compares: besides readable fields (for the error message) it carries a 128-bit
BLAKE2b digest of the whole signature (op, phase, canonical format string(s), dtype, shape,
slot), so two formats or shapes whose 32-bit checksums collide are still told apart, and an
8-byte BLAKE2b checksum of the header itself, so a header damaged in transit is recognised as
such.

One-sided errors (an error only some ranks see: a header damaged on its way to one rank, or
a codec that raises on one rank) never leave the ranks' histories different: the history is
reset only on a disagreement that every rank sees (every rank receives every rank's header,
all of them intact), so every rank resets together. A rank that fails alone keeps the history
its peers have, and where its call has another exchange it still takes part in it, sending an
ERROR header instead of data: its peers then raise at that exchange too (no rank waits in a
collective the failed rank never joins), and the next call works on every rank.

On CUDA the fast path checks headers on the device (``torch._assert_async``: no host
synchronisation, CUDA-graph safe), so a rank there stops with a device-side assertion while
the rank that brought the new call raises the ValueError; headers carry no sequence number
(a captured graph replays constant bytes), and inside CUDA-graph capture no CHECK message can
be inspected: the history is neither used nor updated there (capture after an eager warm-up).

Not covered: plain all-reduces (``fmt=None`` or under ``min_bytes``: a sum carries no
header), so also a call that is plain on one rank and compressed on another
(``validate=True`` covers both); a rank whose call raised before the protocol began (its own
argument checks) while a peer went on (the peer waits for the process group's timeout; an
error after that, even in the encoder before the first message, travels as an ERROR header);
CUDA's device-side checks (an assertion there is fatal to the process); ranks that pass different
``validate``; and the fused symmetric-memory kernels (:mod:`tp.comm.fused` checks each new plan
once instead).
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

import qformats
from qformats.numeric import DTYPE_CODES

__all__ = ["HEADER_BYTES", "SECOND_HOP", "DamagedHeader", "Exchange", "PeerFailed", "Signature", "WireError", "begin",
           "checks", "reset", "signature_digest"]

HEADER_BYTES = 64
_MAGIC = b"QFw%d" % qformats.packing.WIRE_VERSION  # the wire layout's version (qformats.packing)
# magic, kind, op, dtype, ndim, fmt crc, shape crc, rows, width, slot, digest (the signature's),
# then seq (4), then the header's own checksum (8) and zero padding to HEADER_BYTES
_LAYOUT = struct.Struct("<4sBBBBIIIII16s")
_SEQ = struct.Struct("<I")
_MAC_BYTES = 8
_PAD = bytes(HEADER_BYTES - _LAYOUT.size - _SEQ.size - _MAC_BYTES)
assert _LAYOUT.size + _SEQ.size + _MAC_BYTES + len(_PAD) == HEADER_BYTES
DATA, CHECK, ERROR = 1, 2, 3
# one code per message kind on the wire: two_shot's second exchange has its own
_OPS = {"gather": 1, "two_shot": 2, "two_shot/reduced": 3, "all_gather": 4, "reduce_scatter": 5}
_OP_NAMES = {v: k for k, v in _OPS.items()}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in DTYPE_CODES.items()}
_PREDICTIONS = 256  # remembered successor signatures per group (oldest forgotten first)
_U32 = 0xFFFFFFFF


class WireError(ValueError):
    """Ranks disagree on a compressed call. ``everyone``: every rank of the group raises at
    this exchange (it saw the same intact headers); ``restarts``: the call history restarts."""

    everyone = True
    restarts = True


class PeerFailed(WireError):
    """A peer gave up on this call after an error of its own (its ERROR header); history kept."""

    restarts = False


class DamagedHeader(WireError):
    """A header that arrived damaged: possibly only this rank saw it, so the call history is kept."""

    everyone = False
    restarts = False


def _mac(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_MAC_BYTES).digest()


def signature_digest(*fields) -> bytes:
    """128-bit BLAKE2b digest of ``repr(fields)``: what ranks compare (collision resistant)."""
    return hashlib.blake2b(repr(fields).encode(), digest_size=16).digest()


def _crc(s: str) -> int:
    return zlib.crc32(s.encode()) & _U32


# Canonical format strings every rank can print from a crc (so every rank's message is the same).
_FORMAT_NAMES = {_crc(str(f)): str(f) for f in qformats.PRESETS.values()}
SECOND_HOP = "->"  # two_shot with another second-hop format: "first->second" (call.wire_format)


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
            digest = signature_digest(self.op + phase, self.fmt, str(self.dtype), tuple(int(d) for d in self.shape),
                                      int(self.slot))
            head = _HEADS[key] = _LAYOUT.pack(
                _MAGIC, kind, _OPS[self.op + phase], DTYPE_CODES.get(self.dtype, 255), min(len(self.shape), 255),
                _crc(self.fmt), _crc(repr(tuple(self.shape))), rows & _U32, width & _U32, self.slot & _U32, digest)
            if len(_HEADS) > _CACHED_HEADERS:
                _HEADS.clear()
        body = head + _SEQ.pack(seq & _U32)
        return body + _mac(body) + _PAD


_HEADS: dict = {}  # (signature, kind, phase) -> header without its sequence number and checksum
_CACHED_HEADERS = 4096
_BODY = _LAYOUT.size + _SEQ.size


def _intact(row: bytes) -> bool:
    """Whether ``row`` is a header some rank wrote whole (magic and checksum)."""
    return row[:4] == _MAGIC and row[_BODY:_BODY + _MAC_BYTES] == _mac(row[:_BODY])


def _kind(row: bytes) -> int:
    return row[4]


def _describe(row: bytes) -> str:
    if row[:4] != _MAGIC:
        return "no header (bytes no peer wrote in this call, or a peer running another collective)"
    if not _intact(row):
        return "a header damaged on its way here (its checksum fails)"
    magic, kind, op, dt, ndim, fmt, shape, rows, width, slot, digest = _LAYOUT.unpack(row[:_LAYOUT.size])
    (seq,) = _SEQ.unpack(row[_LAYOUT.size:_BODY])
    if kind not in (DATA, CHECK, ERROR) or op not in _OP_NAMES:
        return "no header (bytes no peer wrote in this call, or a peer running another collective)"
    what = {CHECK: "checked before sending", DATA: "sent as predicted",
            ERROR: "gave up on this call after an error of its own"}[kind]
    name = _format_name(fmt)
    return (f"{_OP_NAMES[op]} {name} {_DTYPE_NAMES.get(dt, '?')} {ndim}-d {rows}x{width} "
            f"(shape crc {shape:08x}, signature {digest[:6].hex()}), {slot} B per buffer, call #{seq}, {what}")


def _disagreement(rows: list[bytes], seq: int) -> WireError:
    """The error of a call whose headers differ: a :class:`WireError` every rank raises alike
    when every header is intact, a :class:`DamagedHeader` (possibly this rank's alone) else."""
    lines = "; ".join(f"rank {r}: {_describe(b)}" for r, b in enumerate(rows))
    if all(_intact(b) for b in rows):
        failed = [r for r, b in enumerate(rows) if _kind(b) == ERROR]
        if failed:
            return PeerFailed(f"compressed collective #{seq} of the group failed on rank(s) {failed} (their own "
                             f"error says why); no rank returns its result: {lines}")
        return WireError(
            f"ranks disagree on compressed collective #{seq} of their group: {lines}. Every rank must make "
            f"the same compressed calls (op, algorithm, format, dtype, shape) in the same order")
    return DamagedHeader(f"compressed collective #{seq} of the group: a header this rank received is damaged or "
                         f"missing: {lines}. The ranks' call history is kept, so the next call can work")


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
        self.error: Optional[BaseException] = None  # set by fail(): this rank gave up on the call

    def fail(self, error: BaseException) -> None:
        """This rank gave up on the call (an error only it saw): its remaining messages carry an
        ERROR header, so its peers raise at that exchange, and :meth:`check` raises ``error``."""
        self.error = error

    def write(self, slots: torch.Tensor, phase: str = "") -> None:
        """Write the DATA (or, after :meth:`fail`, ERROR) header into ``slots[:, :HEADER_BYTES]``
        ([k, HEADER_BYTES + n] uint8)."""
        kind = DATA if self.error is None else ERROR
        if slots.is_cuda:
            slots[:, :HEADER_BYTES] = _cuda_header(self.sig, phase, slots.device, kind)
        else:  # numpy: a tensor op per header would cost more than the whole check
            slots.numpy()[:, :HEADER_BYTES] = np.frombuffer(self.sig.header(kind, self.seq, phase), np.uint8)

    def check(self, slots: torch.Tensor, phase: str = "") -> None:
        """Raise unless every received header (``slots[:, :HEADER_BYTES]`` of [W, HEADER_BYTES + n]
        uint8) is this call's own (after :meth:`fail`: raise that error)."""
        if self.error is not None:
            raise self.error
        if slots.is_cuda:
            want = _cuda_header(self.sig, phase, slots.device)
            torch._assert_async((slots[:, :HEADER_BYTES] == want).all(), "tp: ranks disagree on a compressed collective")
            return
        got = slots.numpy()[:, :HEADER_BYTES].tobytes()
        if got != self.sig.header(DATA, self.seq, phase) * slots.shape[0]:
            err = _disagreement([got[i: i + HEADER_BYTES] for i in range(0, len(got), HEADER_BYTES)], self.seq)
            if err.restarts:
                self.state.reset()  # every rank saw these intact headers: the history restarts everywhere
            raise err


def _cuda_header(sig: Signature, phase: str, device: torch.device, kind: int = DATA) -> torch.Tensor:
    key = (sig, phase, device, kind)
    h = _CUDA_HEADERS.get(key)
    if h is None:
        if _capturing(device):
            raise RuntimeError(f"tp: the compressed call {sig.op} {sig.fmt} {tuple(sig.shape)} is first made "
                               f"inside CUDA-graph capture: run it once before capturing")
        h = _CUDA_HEADERS[key] = torch.frombuffer(bytearray(sig.header(kind, 0, phase)), dtype=torch.uint8).to(device)
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
        try:
            _check_message(sig, pred, st, group, world, device)
        except DamagedHeader as e:
            ex.fail(e)  # the peers agreed and go on: take part in the call's exchange with an ERROR header
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
        err = _disagreement([got[i: i + H] for i in range(0, len(got), H)], st.seq)
        if err.restarts:
            st.reset()  # every rank saw these intact headers
        raise err
