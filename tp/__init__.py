"""tp: the tensor-parallel runtime of qformats, in three wings.

``tp.comm``: compressed collectives (:func:`all_reduce`, :func:`all_gather`,
:func:`reduce_scatter`; ``gather``, ``two_shot`` and the fused symmetric-memory path), their
exact one-process emulator (:func:`emulate_all_reduce` ...), ``tp.compile`` (a torch.compile pass
that rewrites a model's collectives), and the one :class:`CommPolicy` that says which collective
gets which format. ``tp.model``: Megatron-style layers, a Llama-style model (:class:`TPLlama`),
checkpoint loading, outlier calibration after Dong et al., the launcher
(``torchrun --nproc-per-node N -m tp ...``). ``tp.study``: TP emulation on any Hugging Face model
(``tp.hf``), the ``qformats eval`` job and the ``qformats tune`` search for per-site policies.
"""
from .comm.collectives import (
    ALGORITHMS,
    DEFAULT_MIN_BYTES,
    Codec,
    ReferenceCodec,
    all_gather,
    all_reduce,
    get_codec,
    reduce_scatter,
    set_codec,
    wire_bytes,
)
from .comm.emulate import emulate_all_gather, emulate_all_reduce, emulate_reduce_scatter, plain_sum, predicted_error
from .comm.policy import CollectivePolicy, CommPolicy, Rule, Site
from .model.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    TPContext,
    VocabParallelEmbedding,
    shard_specs,
)
from .model.llama import KVCache, LlamaConfig, TPLlama, generate, init_random_, valid_tp_sizes
from .model.calibrate import Calibration, Calibrator, calibrate
from .comm.compile import compile, print_collectives, report as compile_report

__all__ = [
    "CollectivePolicy",
    "compile",
    "compile_report",
    "print_collectives",
    "ALGORITHMS",
    "DEFAULT_MIN_BYTES",
    "Calibration",
    "Calibrator",
    "Codec",
    "ReferenceCodec",
    "ColumnParallelLinear",
    "CommPolicy",
    "KVCache",
    "LlamaConfig",
    "RowParallelLinear",
    "Rule",
    "Site",
    "ShardSpec",
    "TPContext",
    "TPLlama",
    "VocabParallelEmbedding",
    "all_gather",
    "all_reduce",
    "calibrate",
    "emulate_all_gather",
    "emulate_all_reduce",
    "emulate_reduce_scatter",
    "generate",
    "get_codec",
    "init_random_",
    "plain_sum",
    "predicted_error",
    "reduce_scatter",
    "set_codec",
    "shard_specs",
    "valid_tp_sizes",
    "wire_bytes",
]

# README's module paths of the fused path and the HF emulation: the same module objects.
import sys as _sys

from .comm import fused
from .study import hf

_sys.modules[__name__ + ".fused"] = fused
_sys.modules[__name__ + ".hf"] = hf
