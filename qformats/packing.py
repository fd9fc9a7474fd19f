"""Dense bit packing of 1..8-bit codes, little-endian bit order.

Code i occupies bits [i*b, (i+1)*b) of the byte stream, least significant bit first, so
4-bit codes put element 2i in the low nibble (as torchao does), 8 3-bit codes fill 3
bytes, 8 5-bit codes 5 bytes and 4 6-bit codes 3 bytes. Every group of
``8 / gcd(b, 8)`` codes packs into whole bytes on its own.
"""
import math

import torch


def group_size(bits: int) -> int:
    """Codes per independent group (whole bytes)."""
    return 8 // math.gcd(bits, 8)


def packed_nbytes(n: int, bits: int) -> int:
    if n % group_size(bits):
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes (pad to a multiple of {group_size(bits)})")
    return n * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any int dtype, values in [0, 2^bits)) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"code width {bits}: valid are 1..8 bits")
    flat = codes.reshape(-1).to(torch.int64)
    nbytes = packed_nbytes(flat.numel(), bits)
    if bits == 8:
        return flat.to(torch.uint8)
    g = group_size(bits)
    shifts = torch.arange(g, device=flat.device, dtype=torch.int64) * bits
    words = ((flat.view(-1, g) & ((1 << bits) - 1)) << shifts).sum(-1)  # up to 56 bits per group
    gb = g * bits // 8
    byte_shifts = torch.arange(gb, device=flat.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(nbytes)


def unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes as int64."""
    if not 1 <= bits <= 8:
        raise ValueError(f"code width {bits}: valid are 1..8 bits")
    nbytes = packed_nbytes(n, bits)
    if data.numel() != nbytes:
        raise ValueError(f"{n} codes of {bits} bits need {nbytes} bytes, got {data.numel()}")
    raw = data.reshape(-1).to(torch.int64)
    if bits == 8:
        return raw
    g = group_size(bits)
    gb = g * bits // 8
    byte_shifts = torch.arange(gb, device=raw.device, dtype=torch.int64) * 8
    words = (raw.view(-1, gb) << byte_shifts).sum(-1)
    shifts = torch.arange(g, device=raw.device, dtype=torch.int64) * bits
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n)
