"""Where a codec kernel program reads and writes: the tile of blocks it owns and the wire
buffer's sections (bit planes of packed codes, per-block scale and zero-point words).

Use these only inside ``@triton.jit`` code (:mod:`lowering.kernels`). The layout they read and
write is ``qformats``' wire layout (README, semantics); :func:`_load_codes` /
:func:`_store_codes` take the format argument ``F`` (:class:`lowering.constants.KernelFormat`).
Cost: address arithmetic per tile, 16-byte vector accesses when the blocks tile the rows
exactly (``F.EVEN``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernel_math import _load_f32

# ------------------------------------------------------------------------------------------
# the tile a program owns
# ------------------------------------------------------------------------------------------
@triton.jit
def _lanes(blk, bmask, nblk, width, lane, BS: tl.constexpr, EVEN: tl.constexpr):
    """(lanes holding a block's elements, lanes holding real features, element offsets) of
    blocks ``blk`` [BPP] at lanes ``lane`` ([1, n] or [BPP, n], within a block)."""
    inb = bmask[:, None] & (lane < BS)
    if EVEN:
        return inb, inb, blk[:, None] * BS + lane
    else:
        row = blk // nblk
        col = (blk - row * nblk) * BS
        return inb, inb & ((col[:, None] + lane) < width), (row * width + col)[:, None] + lane


@triton.jit
def _tile(pid, total_blocks, nblk, width, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
          EVEN: tl.constexpr, I64: tl.constexpr):
    """The [BPP, BP2] tile of blocks program ``pid`` owns: block ids [BPP], their mask, the
    lanes holding a block's elements, the lanes holding real features, element offsets.

    EVEN (blocks tile the rows exactly, BS a power of two): the tile is one contiguous span,
    so offsets are affine and masks constant along a block (16-byte vector accesses)."""
    if I64:  # int32 offsets unless the tensor or buffer needs more (cheaper index math)
        blk = pid.to(tl.int64) * BPP + tl.arange(0, BPP)
    else:
        blk = pid * BPP + tl.arange(0, BPP)
    bmask = blk < total_blocks
    inb, valid, offs = _lanes(blk, bmask, nblk, width, tl.arange(0, BP2)[None, :], BS, EVEN)
    return blk, bmask, inb, valid, offs


@triton.jit
def _whole_rows(parts, NS: tl.constexpr, BPP: tl.constexpr, CW: tl.constexpr):
    """One [BPP, NS * CW] tensor from NS tiles [BPP, CW] (part c: lanes c * CW ..), each thread
    holding whole rows: ``tl.join`` puts its new axis inside a thread, so joining the parts
    pairwise and reordering the axes moves no data (a reshape or permute of a loaded tile
    would keep its threads-across-lanes layout)."""
    for lvl in tl.static_range(5):
        if (NS >> lvl) > 1:
            nxt = ()
            for i in tl.static_range(NS >> (lvl + 1)):
                nxt = nxt + (tl.join(parts[2 * i], parts[2 * i + 1]),)
            parts = nxt
    x = parts[0]  # [BPP, CW, 2, .., 2]: axis 2 + k is bit k of the part number
    if NS == 2:
        x = tl.permute(x, (0, 2, 1))
    elif NS == 4:
        x = tl.permute(x, (0, 3, 2, 1))
    elif NS == 8:
        x = tl.permute(x, (0, 4, 3, 2, 1))
    elif NS == 16:
        x = tl.permute(x, (0, 5, 4, 3, 2, 1))
    else:
        tl.static_assert(NS == 1, "at most 16 parts")
    return tl.reshape(x, (BPP, NS * CW))


@triton.jit
def _tile_rows(ptr, pid, total_blocks, nblk, width, KIND: tl.constexpr, GPU: tl.constexpr, BPP: tl.constexpr,
               BS: tl.constexpr, BP2: tl.constexpr, CW: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr):
    """:func:`_tile`'s tile with each block's BP2 lanes in one thread, and its values (fp32, 0
    in masked lanes) loaded from ``ptr`` (KIND): BP2 / CW loads of CW contiguous lanes (16
    bytes) per thread. Use it where whole blocks in a thread pay (a quantiser: the rotation,
    the absmax and the per-block scale stay in the thread); neighbouring threads' loads are
    BS elements apart, so each load instruction reads half of each sector it touches and the
    next one the rest (from L1)."""
    if I64:
        blk = pid.to(tl.int64) * BPP + tl.arange(0, BPP)
    else:
        blk = pid * BPP + tl.arange(0, BPP)
    bmask = blk < total_blocks
    NS: tl.constexpr = BP2 // CW
    xs = ()
    lanes = ()
    for c in tl.static_range(NS):
        lane = c * CW + tl.arange(0, CW)[None, :]
        _, valid, offs = _lanes(blk, bmask, nblk, width, lane, BS, EVEN)
        xs = xs + (_load_f32(ptr, offs, valid, KIND, GPU),)
        lanes = lanes + (tl.zeros((BPP, CW), tl.int32) + lane,)
    x = _whole_rows(xs, NS, BPP, CW)
    inb, valid, offs = _lanes(blk, bmask, nblk, width, _whole_rows(lanes, NS, BPP, CW), BS, EVEN)
    return blk, bmask, inb, valid, offs, x


@triton.jit
def _row_tile(pid, nblk, width, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr, EVEN: tl.constexpr,
              I64: tl.constexpr):
    """NORM: the [BPP, BP2] tile of row ``pid``: its ``nblk`` blocks in the first BPP >= nblk
    block slots (the rest masked), as :func:`_tile` returns them, plus each lane's column."""
    if I64:
        row = pid.to(tl.int64)
    else:
        row = pid
    j = tl.arange(0, BPP)
    blk = row * nblk + j
    bmask = j < nblk
    lane = tl.arange(0, BP2)
    cols = (j * BS)[:, None] + lane[None, :]
    if EVEN:
        offs = blk[:, None] * BS + lane[None, :]
        inb = bmask[:, None] & (lane < BP2)[None, :]
        valid = inb
    else:
        inb = bmask[:, None] & (lane < BS)[None, :]
        valid = inb & (cols < width)
        offs = row * width + cols
    return blk, bmask, inb, valid, offs, cols


# ------------------------------------------------------------------------------------------
# wire-buffer sections: packed codes and per-block words
# ------------------------------------------------------------------------------------------
@triton.jit
def _code_mask(bmask, grp, G: tl.constexpr, BS: tl.constexpr, EVEN: tl.constexpr):
    """Mask of the [BPP, NG] code bytes/groups of a tile: constant along a block when EVEN
    (so the accesses vectorise)."""
    if EVEN:
        return bmask[:, None] & (grp >= 0)[None, :]
    else:
        return bmask[:, None] & (grp * G < BS)[None, :]


@triton.jit
def _plane_bytes(blk, bmask, BPP: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr):
    """Byte offsets [BPP * NB / CB, CB] (and their mask) of the NB plane bytes of each block of
    ``blk``, as runs of CB contiguous bytes: one run per thread-sized chunk of the float tile
    (see :func:`_store_plane`)."""
    NCB: tl.constexpr = NB // CB
    R: tl.constexpr = BPP * NCB
    start = tl.reshape(blk[:, None] * NB + (tl.arange(0, NCB) * CB)[None, :], (R,))
    m = tl.reshape(bmask[:, None] & (tl.arange(0, NCB) >= 0)[None, :], (R,))
    return tl.multiple_of(start, CB)[:, None] + tl.arange(0, CB)[None, :], m[:, None] & (tl.arange(0, CB) >= 0)[None, :]


@triton.jit
def _load_plane(ptr, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr, P: tl.constexpr,
                EVEN: tl.constexpr, ROWS: tl.constexpr):
    """The P-bit slices [BPP, BP2] (int32) of blocks ``blk`` from a plane of P-bit codes packed
    8 / P to a byte (P a power of two): one contiguous byte row per block (a decode keeps the
    layout these whole-row loads give: few threads per block, so the rotation's stages and
    the per-block work stay inside a thread)."""
    G: tl.constexpr = 8 // P
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    if ROWS and EVEN and G == 1 and (NG == 32 or NG == 64):  # 16-byte pieces joined: whole rows in a thread
        k = tl.arange(0, 16)
        pieces = ()
        for j in tl.static_range(NG // 16):
            pieces = pieces + (tl.load(ptr + (blk * BS + j * 16)[:, None] + k[None, :],
                                       mask=bmask[:, None] & (k >= 0)[None, :], other=0).to(tl.int32),)
        return _whole_rows(pieces, NG // 16, BPP, 16)
    raw = tl.load(ptr + (blk * (BS // G))[:, None] + grp[None, :], mask=_code_mask(bmask, grp, G, BS, EVEN),
                  other=0).to(tl.int32)
    if G == 1:
        return raw
    elif G == 2:
        return tl.reshape(tl.join(raw & 15, raw >> 4), (BPP, BP2))
    else:
        k = tl.arange(0, G) * P
        return tl.reshape((raw[:, :, None] >> k[None, None, :]) & ((1 << P) - 1), (BPP, BP2))


@triton.jit
def _load_codes(buf_ptr, pl1_off, pl2_off, blk, bmask, F: tl.constexpr, BPP: tl.constexpr):
    """Element codes [BPP, BP2] (int32) of blocks ``blk``: their bit planes (widths F.P0, F.P1,
    F.P2, low bits first; ``qformats.packing``) at byte offsets 0, ``pl1_off``, ``pl2_off``."""
    c = _load_plane(buf_ptr, blk, bmask, BPP, F.BS, F.BP2, F.P0, F.EVEN, F.CODE_ROWS)
    if F.P1 > 0:
        c = c | (_load_plane(buf_ptr + pl1_off, blk, bmask, BPP, F.BS, F.BP2, F.P1, F.EVEN, F.CODE_ROWS) << F.P0)
    if F.P2 > 0:
        c = c | (_load_plane(buf_ptr + pl2_off, blk, bmask, BPP, F.BS, F.BP2, F.P2, F.EVEN, F.CODE_ROWS)
                 << (F.P0 + F.P1))
    return c


@triton.jit
def _store_row_pieces(ptr, b, blk, bmask, BPP: tl.constexpr, NG: tl.constexpr):
    """Store rows ``b`` [BPP, NG] (uint8, NG = 32 or 64, each row inside one thread) at
    ``ptr + blk * NG`` as 16-byte pieces: a store of the whole row would spread it over
    threads (through shared memory); ``tl.split`` of an axis inside a thread moves nothing."""
    p = tl.permute(tl.reshape(b, (BPP, NG // 32, 2, 16)), (0, 1, 3, 2))
    lo, hi = tl.split(p)  # [BPP, NG // 32, 16]: pieces 2k and 2k + 1
    k = tl.arange(0, 16)
    for j in tl.static_range(NG // 32):
        for h in tl.static_range(2):
            if h == 0:
                piece = lo
            else:
                piece = hi
            if NG == 32:
                v = tl.reshape(piece, (BPP, 16))
            else:
                v = tl.reshape(tl.permute(piece, (0, 2, 1)), (BPP, 16, NG // 32))
                v0, v1 = tl.split(v)
                if j == 0:
                    v = v0
                else:
                    v = v1
            tl.store(ptr + (blk * NG + (2 * j + h) * 16)[:, None] + k[None, :], v,
                     mask=bmask[:, None] & (k >= 0)[None, :])


@triton.jit
def _store_plane(ptr, code, keep, blk, bmask, BPP: tl.constexpr, BS: tl.constexpr, BP2: tl.constexpr,
                 P: tl.constexpr, OFF: tl.constexpr, MASK: tl.constexpr, EVEN: tl.constexpr, CW: tl.constexpr):
    """Pack bits [OFF, OFF + P) of codes [BPP, BP2] 8 / P to a byte into one plane (MASK: other
    bits are set above them); ``keep`` [BPP] -1, or 0 to write a block's bytes as zeros.

    EVEN and P < 8: written in runs of CW * P / 8 bytes (the bytes of the CW codes a thread holds
    in the float tile it quantised), so each thread stores its own bytes; a whole-row store
    would first move them between threads through shared memory (a barrier per plane)."""
    G: tl.constexpr = 8 // P
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
    c = code >> OFF
    if MASK:
        c = c & ((1 << P) - 1)
    if G == 1:
        b = c
    elif G == 2 and CW != BP2:  # (from whole rows the sum below: a split there made the compiler
        # compute the codes a second time in another register order)
        lo, hi = tl.split(tl.reshape(c, (BPP, NG, 2)))
        b = lo | (hi << P)
    else:
        k = tl.arange(0, G) * P
        b = tl.sum(tl.reshape(c, (BPP, NG, G)) << k[None, None, :], axis=2)
    b = (b & keep[:, None]).to(tl.uint8)
    CB: tl.constexpr = CW * P // 8
    if EVEN and P < 8 and CB >= 1 and CB < NG:
        offs, m = _plane_bytes(blk, bmask, BPP, NG, CB)
        tl.store(ptr + offs, tl.reshape(b, (BPP * NG // CB, CB)), mask=m)
    elif EVEN and CW == BP2 and (NG == 32 or NG == 64):  # a thread holds whole rows: store 16-byte pieces
        _store_row_pieces(ptr, b, blk, bmask, BPP, NG)
    else:
        tl.store(ptr + (blk * (BS // G))[:, None] + grp[None, :], b, mask=_code_mask(bmask, grp, G, BS, EVEN))


@triton.jit
def _store_codes(buf_ptr, pl1_off, pl2_off, code, keep, blk, bmask, F: tl.constexpr, BPP: tl.constexpr,
                 CW: tl.constexpr):
    """Write codes [BPP, BP2] (int32, in [0, 2^BITS)) as their bit planes (see
    :func:`_load_codes`); ``keep`` [BPP] is -1, or 0 to write a block's codes as zeros (NaN/Inf
    blocks: masked after packing, one logic op per byte)."""
    _store_plane(buf_ptr, code, keep, blk, bmask, BPP, F.BS, F.BP2, F.P0, 0, F.P1 > 0, F.EVEN, CW)
    if F.P1 > 0:
        _store_plane(buf_ptr + pl1_off, code, keep, blk, bmask, BPP, F.BS, F.BP2, F.P1, F.P0, F.P2 > 0, F.EVEN, CW)
    if F.P2 > 0:
        _store_plane(buf_ptr + pl2_off, code, keep, blk, bmask, BPP, F.BS, F.BP2, F.P2, F.P0 + F.P1, False, F.EVEN,
                     CW)


@triton.jit
def _load_word(buf_ptr, off, blk, bmask, SB: tl.constexpr, WALIGN: tl.constexpr):
    """Little-endian SB-byte words (int32) at ``off + blk * SB``; WALIGN: the address is a
    multiple of SB, so one load of a 2- or 4-byte integer does."""
    if SB == 1:
        return tl.load(buf_ptr + off + blk, mask=bmask, other=0).to(tl.int32)
    elif WALIGN and SB == 2:
        return tl.load((buf_ptr + off).to(tl.pointer_type(tl.int16)) + blk, mask=bmask, other=0).to(tl.int32) & 0xFFFF
    elif WALIGN and SB == 4:
        return tl.load((buf_ptr + off).to(tl.pointer_type(tl.int32)) + blk, mask=bmask, other=0)
    else:
        i = tl.arange(0, SB)
        raw = tl.load(buf_ptr + off + blk[:, None] * SB + i[None, :], mask=bmask[:, None], other=0)
        return tl.sum(raw.to(tl.int32) << (i * 8)[None, :], axis=1)


@triton.jit
def _store_word(buf_ptr, off, blk, bmask, w, SB: tl.constexpr, WALIGN: tl.constexpr):
    if SB == 1:
        tl.store(buf_ptr + off + blk, w.to(tl.uint8), mask=bmask)
    elif WALIGN and SB == 2:
        tl.store((buf_ptr + off).to(tl.pointer_type(tl.int16)) + blk, w.to(tl.int16), mask=bmask)
    elif WALIGN and SB == 4:
        tl.store((buf_ptr + off).to(tl.pointer_type(tl.int32)) + blk, w, mask=bmask)
    else:
        i = tl.arange(0, SB)
        b = (w[:, None] >> (i * 8)[None, :]) & 0xFF
        tl.store(buf_ptr + off + blk[:, None] * SB + i[None, :], b.to(tl.uint8), mask=bmask[:, None])
