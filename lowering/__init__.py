"""lowering: qformats Formats turned into Triton kernels and torch.library custom ops.

Importing this package registers ``torch.ops.qformats.{quantize, dequantize, dequant_sum,
dequant_sum_requant}`` (see :mod:`lowering.ops`). :mod:`lowering.codec` is the codec seam of the
collectives (the protocol, the reference codec and its ``reference_*`` functions, the one
adapter of ``qformats.encode``/``decode`` to the ops' signatures) beside its fast implementations
(:class:`LoweredCodec` in :mod:`lowering.ops`, ``TorchCodec`` in :mod:`lowering.torch_codec`).
:mod:`lowering.constants` is the one place a Format becomes kernel constants;
:mod:`lowering.kernels` holds the one generic kernel (its exact arithmetic in
:mod:`lowering.kernel_math`, its tiles and wire sections in :mod:`lowering.kernel_wire`);
:mod:`lowering.launch` its launchers and their tile table.
"""
from . import ops  # noqa: F401  (registers the custom ops)
from .codec import Codec, ReferenceCodec
from .constants import KernelConstants, Unsupported, lower, unsupported_reason
from .ops import LoweredCodec, path

__all__ = ["Codec", "KernelConstants", "LoweredCodec", "ReferenceCodec", "Unsupported", "lower", "path",
           "unsupported_reason"]
