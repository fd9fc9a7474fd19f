"""The codec seam: the four operations a compressed collective does arithmetic with.

:class:`Codec` is the protocol; :class:`ReferenceCodec` implements it with the reference codec
(``qformats.encode`` / ``decode``): exact, slow, the default of ``tp``'s collectives and emulator.
The fast implementations live beside it: :class:`lowering.ops.LoweredCodec` (the Triton ops, for
GPUs) and :class:`lowering.torch_codec.TorchCodec` (whole-tensor torch ops, for CPUs). Install
one with ``tp.set_codec``. Every implementation must be bitwise equal to the reference: decode
to fp32 exactly as ``qformats.decode`` does and add the decoded buffers in list order, one fp32
addition at a time (never a tree or a Kahan sum).

Shapes passed in are 2-D ``(rows, H)``; formats are resolved ``qformats.Format`` values (the
caller resolves once); buffers are 1-D uint8 of ``fmt.nbytes(shape)``.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

import qformats
from qformats import Format, QTensor

__all__ = ["CODEC_METHODS", "Codec", "ReferenceCodec", "check_codec"]

CODEC_METHODS = ("quantize", "dequantize", "dequant_sum", "dequant_sum_requant")


@runtime_checkable
class Codec(Protocol):
    """Quantize, dequantize and rank-order reduction of wire buffers: all the arithmetic of a collective.

    The methods are named after the ``torch.ops.qformats`` ops they mirror (:mod:`lowering.ops`), with
    the collectives' narrower signatures: no dtype (every decode here is fp32), ``bufs`` a list of
    buffers (or the rows of one [N, nbytes] tensor), and ``dequant_sum_requant`` returning only the
    new buffer."""

    name: str

    def quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        """Wire buffer of ``x`` (any supported float dtype), uint8 1-D."""

    def dequantize(self, buf: torch.Tensor, fmt: Format, shape: tuple) -> torch.Tensor:
        """fp32 values of one wire buffer."""

    def dequant_sum(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        """fp32 sum of the decoded buffers, added in list (= rank) order."""

    def dequant_sum_requant(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        """``quantize(dequant_sum(bufs))``: the middle step of two_shot (one fused kernel on GPU)."""


def check_codec(codec) -> None:
    """Raise TypeError unless ``codec`` has the four callable methods of :class:`Codec`."""
    for m in CODEC_METHODS:
        if not callable(getattr(codec, m, None)):
            raise TypeError(f"a codec needs a callable .{m}(); {type(codec).__name__} has none")


class ReferenceCodec:
    """:class:`Codec` on the reference codec: the oracle the others are held to."""

    name = "reference"

    def quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        return qformats.encode(x, fmt).data

    def dequantize(self, buf: torch.Tensor, fmt: Format, shape: tuple) -> torch.Tensor:
        return qformats.decode(QTensor.from_buffer(buf, fmt, shape, torch.float32), torch.float32)

    def dequant_sum(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        acc = self.dequantize(bufs[0], fmt, shape)
        for b in bufs[1:]:
            acc = acc.add_(self.dequantize(b, fmt, shape))
        return acc

    def dequant_sum_requant(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        return self.quantize(self.dequant_sum(bufs, fmt, shape), fmt)
