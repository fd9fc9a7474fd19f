"""Bit packing of 1..8-bit codes: power-of-two widths densely, other widths as bit planes.

Codes of 1, 2, 4 or 8 bits pack densely, least significant bit first: code i occupies bits
[i*b, (i+1)*b) of the byte stream, so 4-bit codes put element 2i in the low nibble (as torchao
does). Codes of 3, 5, 6 or 7 bits are split into power-of-two *planes* (the binary digits of
the width, low bits first: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1): plane k holds
bits [o_k, o_k + p_k) of every code, packed densely as p_k-bit codes, and the planes follow
each other (all low nibbles of the section, then all high bits, ...). Same size as dense
packing (b/8 bytes per code), but every plane is a power-of-two packing, so a kernel reads and
writes it with whole-word vector accesses and fixed shifts (dense 5- and 6-bit groups of 5 and
3 bytes cost byte-by-byte access: wire version 1 used them; this layout is wire version 2).

A section of n codes needs n to be a multiple of :func:`group_size` (whole bytes in every
plane). Cost: a few elementwise passes over the codes per plane.
"""
import math

import torch

WIRE_VERSION = 3  # 3: absmax elements are x times the block's rounded reciprocal (2: x / scale);
# 2: bit planes for 3/5/6/7-bit codes (1: dense LSB-first groups)


def planes(bits: int) -> tuple[tuple[int, int], ...]:
    """(bit offset, width) of each plane of ``bits``-bit codes, in wire order (low bits first)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"code width {bits}: valid are 1..8 bits")
    out, off = [], 0
    for p in (4, 2, 1) if bits < 8 else (8,):
        if bits - off >= p:
            out.append((off, p))
            off += p
    return tuple(out)


def group_size(bits: int) -> int:
    """Codes per independent group (whole bytes in every plane)."""
    return max(8 // math.gcd(p, 8) for _, p in planes(bits))


def packed_nbytes(n: int, bits: int) -> int:
    if n % group_size(bits):
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes (pad to a multiple of {group_size(bits)})")
    return n * bits // 8


def _pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.uint8)
    g = 8 // bits
    shifts = torch.arange(g, device=codes.device, dtype=torch.int64) * bits
    return ((codes.view(-1, g) & ((1 << bits) - 1)) << shifts).sum(-1).to(torch.uint8)


def _unpack_dense(raw: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return raw
    shifts = torch.arange(8 // bits, device=raw.device, dtype=torch.int64) * bits
    return ((raw.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any int dtype, values in [0, 2^bits)) into a flat uint8 tensor."""
    pl = planes(bits)
    flat = codes.reshape(-1).to(torch.int64) & ((1 << bits) - 1)
    packed_nbytes(flat.numel(), bits)
    return torch.cat([_pack_dense(flat >> off, p) for off, p in pl])


def unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes as int64."""
    pl = planes(bits)
    nbytes = packed_nbytes(n, bits)
    if data.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {data.numel()}")
    raw = data.reshape(-1).to(torch.int64)
    out, start = torch.zeros(n, dtype=torch.int64, device=raw.device), 0
    for off, p in pl:
        out |= _unpack_dense(raw[start : start + n * p // 8], p) << off
        start += n * p // 8
    return out
