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

# ------------------------------------------------------------------------------------------
# the tile a program owns
# ------------------------------------------------------------------------------------------
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
    lane = tl.arange(0, BP2)
    if EVEN:
        offs = blk[:, None] * BS + lane[None, :]
        inb = bmask[:, None] & (lane < BP2)[None, :]
        valid = inb
    else:
        row = blk // nblk
        col = (blk - row * nblk) * BS
        inb = bmask[:, None] & (lane < BS)[None, :]
        valid = inb & ((col[:, None] + lane[None, :]) < width)
        offs = (row * width + col)[:, None] + lane[None, :]
    return blk, bmask, inb, valid, offs


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
                EVEN: tl.constexpr):
    """The P-bit slices [BPP, BP2] (int32) of blocks ``blk`` from a plane of P-bit codes packed
    8 / P to a byte (P a power of two): one contiguous byte row per block (a decode keeps the
    layout these whole-row loads give: few threads per block, so the rotation's stages and
    the per-block work stay inside a thread)."""
    G: tl.constexpr = 8 // P
    NG: tl.constexpr = BP2 // G
    grp = tl.arange(0, NG)
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
    c = _load_plane(buf_ptr, blk, bmask, BPP, F.BS, F.BP2, F.P0, F.EVEN)
    if F.P1 > 0:
        c = c | (_load_plane(buf_ptr + pl1_off, blk, bmask, BPP, F.BS, F.BP2, F.P1, F.EVEN) << F.P0)
    if F.P2 > 0:
        c = c | (_load_plane(buf_ptr + pl2_off, blk, bmask, BPP, F.BS, F.BP2, F.P2, F.EVEN) << (F.P0 + F.P1))
    return c


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
    elif G == 2:
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
