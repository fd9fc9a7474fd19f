"""What a collective call is, resolved once: its format, algorithm and second hop, its tensor
checked, its rows laid out across ranks.

Shared by every path that must give the same bits: the NCCL-path collectives
(:mod:`tp.comm.collectives`), the one-process emulator (:mod:`tp.comm.emulate`), the fused
symmetric-memory path (:mod:`tp.comm.fused`), the policy (:mod:`tp.comm.policy`) and the ops.
Use :func:`resolve_format` at a public entry point and pass the Format down. Cost: microseconds
(no collective, no kernel; :func:`split_rows` copies only when it pads).
"""
from __future__ import annotations

from typing import Optional

import torch

import qformats
from qformats import Format
from qformats.codec import saturating_cast
from qformats.numeric import SUPPORTED_DTYPES

from .wirecheck import SECOND_HOP

__all__ = ["ALGORITHMS", "check_algorithm", "check_norm_inputs", "check_tensor", "merge_rows", "reduce_chunk", "resolve_format", "rows_view",
           "second_hop", "split_rows", "wire_algorithm", "wire_format"]

ALGORITHMS = ("gather", "two_shot", "fused")


def resolve_format(fmt, required: Optional[str] = None) -> Optional[Format]:
    """A Format, a preset name, a canonical string or None -> Format or None, with a clear error.

    tp's one resolver: every public entry point calls it once and passes the Format down.
    ``required``: who cannot take None (it raises then, naming them)."""
    try:
        f = qformats.as_format(fmt)
    except ValueError as e:
        raise ValueError(f"unsupported communication format {fmt!r}: {e}") from None
    if f is None and required:
        raise ValueError(f"{required} needs a format, got {fmt!r}")
    return f


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: valid are {', '.join(ALGORITHMS)}")
    return algorithm


def wire_algorithm(algorithm: str, world: int) -> str:
    """The NCCL-path algorithm whose result ``algorithm`` computes at ``world`` ranks.

    ``"fused"`` is the one-shot gather at W <= 3 and two_shot at W >= 4 (tp.comm.fused picks its
    kernels the same way), so the emulator and every fallback give the fused result's bits.
    """
    if check_algorithm(algorithm) == "fused":
        return "gather" if world <= 3 else "two_shot"
    return algorithm


def second_hop(fmt: Optional[Format], second_fmt, algorithm: str, world: Optional[int] = None) -> Optional[Format]:
    """The format two_shot's reduced sum travels in: ``second_fmt`` resolved, or ``fmt`` when
    it is None (the default). ``algorithm`` is the caller's, before :func:`wire_algorithm`;
    ``world``, when known, resolves ``"fused"`` to the algorithm it runs there.

    Raises ValueError for a second format that cannot apply: gather has no second hop (nor has
    ``"fused"`` at W <= 3, where it is the one-shot gather), and a plain call has no first one.
    """
    second = resolve_format(second_fmt)
    if second is None or second == fmt:
        return fmt
    wire = wire_algorithm(algorithm, world) if world is not None else algorithm
    if algorithm == "gather":
        raise ValueError(f"second_fmt={second} applies to two_shot only: gather sends each partial once "
                         f"and has no second hop (leave second_fmt=None or equal to fmt)")
    if wire == "gather":
        raise ValueError(f"second_fmt={second} applies to two_shot only: algorithm='fused' at {world} ranks runs the "
                         f"one-shot gather, which has no second hop (fused is two_shot from 4 ranks)")
    if fmt is None:
        raise ValueError(f"second_fmt={second} needs a first-hop format (fmt=None is the plain all-reduce)")
    return second


def reduce_chunk(codec, bufs, fmt: Format, second: Format, shape: tuple) -> torch.Tensor:
    """two_shot's middle step: decode and fp32-sum ``bufs`` (``fmt``) in rank order, encode the
    sum in ``second``. One fused codec call when the hops share a format."""
    if second == fmt:
        return codec.dequant_sum_requant(bufs, fmt, shape)
    return codec.quantize(codec.dequant_sum(bufs, fmt, shape), second)


def wire_format(fmt: Format, second: Optional[Format]) -> str:
    """The format name a call's wire headers carry: ``fmt``, or ``"fmt->second"`` with a
    second hop of another format (so ranks that disagree on either hop are told apart)."""
    return str(fmt) if second is None or second == fmt else f"{fmt}{SECOND_HOP}{second}"


def check_tensor(x: torch.Tensor, fmt: Optional[Format], what: str = "x") -> None:
    """Raise TypeError/ValueError for what no compressed collective can carry."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if fmt is not None:
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{what} has dtype {x.dtype}; compressed collectives take float32, bfloat16 or float16 "
                f"(use fmt=None for other dtypes)"
            )
        if x.dim() == 0:
            raise ValueError(f"{what} is a scalar; compressed collectives quantise along the last dimension")
        fmt.layout((1, x.shape[-1]))  # raises for a static format calibrated for another width


def check_norm_inputs(x: torch.Tensor, residual, weight, what: str = "") -> None:
    """Raise TypeError/ValueError unless ``residual`` (x's shape) and ``weight`` ([x.shape[-1]])
    can take the RMSNorm epilogue of an all-reduce of ``x``: the one check of
    :func:`tp.comm.collectives.all_reduce_rmsnorm`, the fused path's and the op's (its fake too:
    shapes only). ``what``: a prefix for the message (who is checking)."""
    if not isinstance(residual, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what}residual and weight must be torch.Tensors")
    width = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else None
    if isinstance(x, torch.Tensor) and (residual.shape != x.shape or width is None
                                        or tuple(weight.shape) != (width,)):
        raise ValueError(f"{what}residual must have x's shape {tuple(x.shape)} and weight [{width}], got "
                         f"{tuple(residual.shape)} and {tuple(weight.shape)}")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous [R, H] matrix (H = last dim): the unit encode works on."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def split_rows(x2: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """Zero-pad an [R, H] matrix to a multiple of ``world`` rows; returns ([world, c, H], pad).

    Chunk j (``out[j]``) is what rank j reduces in two_shot. Padding rows are zeros, which every
    format encodes and decodes to zeros, and :func:`merge_rows` cuts them off again.
    """
    r, h = x2.shape
    c = -(-r // world)
    pad = c * world - r
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, h)])
    return x2.view(world, c, h), pad


def merge_rows(chunks: torch.Tensor, pad: int, shape, dtype) -> torch.Tensor:
    """[world, c, H] fp32 -> x's shape and dtype (finite values saturating), padding rows removed."""
    y = chunks.reshape(-1, chunks.shape[-1])
    if pad:
        y = y[: y.shape[0] - pad]
    return saturating_cast(y, dtype).reshape(shape)
