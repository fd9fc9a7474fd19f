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

The ``reference_*`` functions are the one adapter of the reference codec to the ops' signatures
(``torch.ops.qformats.*``, :mod:`lowering.ops`): :class:`ReferenceCodec` is built on them, the
ops fall back to them and the tests hold the kernels to them. Pure torch, CPU (CUDA tensors are
copied there and back by the reference codec); reference speed.

The shared bit recipes
----------------------
Three arithmetics implement one definition: the reference codec (``qformats.codec``: float64
where it matters; it *is* the definition), :class:`lowering.torch_codec.TorchCodec` (whole-tensor
fp32/int32 torch ops, 15-27x the reference on CPU) and the Triton kernel (``lowering.kernels``,
one tile of blocks per program). They share these recipes; a change to one is a change in all
three places (the tests compare bits, but only on the inputs they draw). Names are functions of
``qformats.codec`` / ``lowering.torch_codec`` / the kernel modules (``lowering.kernels`` and the
``kernel_math`` / ``kernel_wire`` helpers it imports) unless qualified; fp32
constants (``FP32_TINY``, ``FP32_RNE_MAGIC``, ...) are ``qformats.numeric``'s.

round half to even onto a float element's grid, then its code
    reference   ``grid.round_to_grid`` (float64), ``grid.to_codes``
    TorchCodec  ``_float_codes``: add and subtract 1.5 * 2^(g + 23), 2^g the grid step read off
                the exponent bits; the code by a table look-up on the top bits (``_element_tables``)
    kernel      ``_element_codes``: the same add and subtract, the code by one shift (fp8 on a
                GPU: the hardware's ``cvt.rn.satfinite``)
round half to even to an integer (int / uint elements)
    reference   ``grid.round_to_grid``, ``grid.to_codes``
    TorchCodec  ``_int_codes``: clamp, + ``FP32_RNE_MAGIC``; the sum's low bits are the code
    kernel      ``_element_codes`` (integer branch): clamp, + 1.5 * 2^23
e8m0 scale: s = floor(log2 amax) - emax, clamped to [-127, 127]; byte s + 127, NaN block 0xFF
    reference   ``_encode_blocks`` (``grid._floor_log2`` of the float64 absmax)
    TorchCodec  ``_block_sections`` (the exponent field of the integer max over ``|x|``'s bits)
    kernel      ``_encode_e8m0`` (``_flog2``)
absmax scale (fp32 / bf16 / fp16 / e4m3): fp32(amax / max_normal) rounded up onto the scale
type; quotients below ``FP32_TINY`` rounded up exactly (at least one step)
    reference   ``_absmax_scale``, ``_round_scale``
    TorchCodec  ``_block_sections``, ``_signed_code`` / ``_round_onto_scale_grid``,
                ``_tiny_scale_codes``
    kernel      ``_encode_absmax``, ``_round_mag_int`` (``S_INV_STEP_*`` for tiny)
absmax elements: x times the block's rounded reciprocal, (x f) * fp32(1 / (scale f)) (wire version 3)
    reference   ``times_reciprocal`` (its docstring is the definition)
    TorchCodec  ``qformats.codec.times_reciprocal`` itself
    kernel      ``_times_reciprocal`` (an int grid's 2^-GE folded into the reciprocal)
+ts per-tensor scale: tamax / (max_normal * 448), at least ``FP32_TINY``
    reference   ``_encode_blocks``
    TorchCodec  ``_block_sections`` (``maxn_ts``)
    kernel      ``_encode_absmax`` (``F.TS``; ``launch.quantize`` finds the absmax in a first pass)
+zp zero point: block min rounded down, (max - zero) / max_code rounded up, halved on overflow
    reference   ``_encode_blocks`` (zero-point branch)
    TorchCodec  ``_block_sections`` (``kc.ZP`` branch)
    kernel      ``_encode_zero_point``
static per-feature scales
    reference   ``_encode_static``; TorchCodec ``_static_codes``; kernel: not lowered
stored scale words (e4m3 codes, bf16/fp16/fp32 bits, canonical NaN) and their values
    reference   ``_store_scale``, ``_load_scale``
    TorchCodec  ``_signed_code``, ``_word_bytes`` / ``_words``, ``_scale_values``,
                ``_load_scales``, ``_e8m0_values``, ``_e4m3_values``
    kernel      ``_round_mag_int``, ``_store_word`` / ``_load_word``, ``_scale_value``
code packing: 1/2/4/8-bit codes dense, 3/5/6/7-bit codes as bit planes (``packing.planes``)
    reference   ``packing.pack``, ``packing.unpack``
    TorchCodec  ``_pack``, ``_code_values``
    kernel      ``_store_codes`` / ``_store_plane``, ``_load_codes`` / ``_load_plane``
                (``KernelConstants.plane_offsets``)
element decode: code value * scale (+ zero point), one rounding, finite products saturating
    reference   ``grid.from_codes``, ``decode``, ``saturate_fp32``
    TorchCodec  ``_code_values`` (``grid.code_table``), ``_decode_rows``, ``_saturate_overflow``
    kernel      ``_element_values`` (``lowering.constants.value_table``), ``_scaled``
+h{N} Hadamard rotation: butterfly stages s = 0 .. k-1 in that order, then one 2^-c multiply
    reference   ``rotate`` (its docstring is the definition)
    TorchCodec  ``qformats.codec.rotate`` itself
    kernel      ``_rotate``, ``_butterfly``
rank-order sum: fp32 decodes added in list order, one addition at a time
    reference   ``_rank_order_sum`` (this module)
    TorchCodec  ``TorchCodec.dequant_sum``
    kernel      ``_sources`` (``SRC_BUFS``)
cast to bf16 / fp16: round half to even, finite values saturating at the dtype's max
    reference   ``saturating_cast``
    TorchCodec  ``dequantize`` (a plain cast where the per-block bound allows), ``saturating_cast``
    kernel      ``_saturating``, ``_store_f32``
"""
from __future__ import annotations

from typing import Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

import qformats
from qformats import Format, QTensor, need_format
from qformats.codec import saturating_cast

__all__ = ["CODEC_METHODS", "Codec", "ReferenceCodec", "check_codec", "reference_dequant_sum",
           "reference_dequant_sum_requant", "reference_dequantize", "reference_quantize"]

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


# ------------------------------------------------------------------------------------------
# the reference codec with the ops' signatures (oracle and fallback)
# ------------------------------------------------------------------------------------------
def reference_quantize(x: torch.Tensor, fmt) -> torch.Tensor:
    """``qformats.encode(x, fmt).data``: the op ``quantize``'s definition."""
    f = need_format(fmt)
    return qformats.encode(x, f).data


def reference_dequantize(buf: torch.Tensor, fmt, shape: List[int], dtype: torch.dtype) -> torch.Tensor:
    """``qformats.decode`` of one wire buffer as ``dtype``: the op ``dequantize``'s definition."""
    f = need_format(fmt)
    return qformats.decode(QTensor.from_buffer(buf, f, shape, dtype), dtype)


def _rank_order_sum(dequantize: Callable[[torch.Tensor], torch.Tensor], bufs) -> torch.Tensor:
    """The fp32 ``dequantize(b)`` of every buffer of ``bufs`` (a list, or the rows of an
    [N, nbytes] tensor) added in list (= rank) order, one fp32 addition at a time."""
    acc = dequantize(bufs[0])
    for b in bufs[1:]:
        acc = acc + dequantize(b)
    return acc


def _reference_sum(bufs, f: Format, shape) -> torch.Tensor:
    return _rank_order_sum(lambda b: reference_dequantize(b, f, shape, torch.float32), bufs)


def reference_dequant_sum(bufs, fmt, shape: List[int], dtype: torch.dtype,
                          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rank-order fp32 sum of the decodes (+ ``residual`` cast to fp32, added last), as
    ``dtype`` (saturating): the op ``dequant_sum``'s definition."""
    f = need_format(fmt)
    acc = _reference_sum(bufs, f, shape)
    if residual is not None:
        acc = acc + residual.to(torch.float32)
    return saturating_cast(acc, dtype)


def reference_dequant_sum_requant(bufs: torch.Tensor, fmt, shape: List[int],
                                  dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(quantize of the fp32 rank-order sum, its decode as ``dtype`` or an empty tensor): the op
    ``dequant_sum_requant``'s definition."""
    f = need_format(fmt)
    buf = reference_quantize(_reference_sum(bufs, f, shape), f)
    if dtype is None:
        return buf, bufs.new_empty((0,), dtype=torch.float32)
    return buf, reference_dequantize(buf, f, shape, dtype)


class ReferenceCodec:
    """:class:`Codec` on the reference codec: the oracle the others are held to. The sums go
    through ``self.dequantize`` and ``self.quantize``, so a subclass that changes those two
    changes every operation (the tests' instrumented codecs do)."""

    name = "reference"

    def quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        return reference_quantize(x, fmt)

    def dequantize(self, buf: torch.Tensor, fmt: Format, shape: tuple) -> torch.Tensor:
        return reference_dequantize(buf, fmt, shape, torch.float32)

    def dequant_sum(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        return _rank_order_sum(lambda b: self.dequantize(b, fmt, shape), bufs)

    def dequant_sum_requant(self, bufs: Sequence[torch.Tensor], fmt: Format, shape: tuple) -> torch.Tensor:
        return self.quantize(self.dequant_sum(bufs, fmt, shape), fmt)
