"""qformats: block formats (element type, block size, scale type) and their exact reference codec.

This package is pure torch and imports nothing else of the project; ``lowering`` turns its
formats into kernels and ``tp`` uses both inside compressed collectives.
"""
from .codec import QTensor, decode, encode, quantize_dequantize
from .spec import PRESETS
from .spec import Element, Format, Layout, as_format, need_format, static_outlier_format

__all__ = [
    "Element",
    "Format",
    "Layout",
    "PRESETS",
    "QTensor",
    "as_format",
    "need_format",
    "decode",
    "encode",
    "quantize_dequantize",
    "static_outlier_format",
]
