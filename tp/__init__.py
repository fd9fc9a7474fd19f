"""tp: the tensor-parallel runtime of qformats.

Compressed collectives (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`) with
the ``gather`` and ``two_shot`` algorithms over torch.distributed (NCCL on GPU, gloo on CPU),
their exact single-process emulator (:func:`emulate_all_reduce` and friends), Megatron-style
parallel layers whose row-parallel all-reduce follows a :class:`CommPolicy`, a Llama-style
model (:class:`TPLlama`), Hugging Face checkpoint loading and sharding (``tp.model.checkpoint``),
outlier calibration after Dong et al. (``tp.model.calibrate``), and a launcher
(``torchrun --nproc-per-node N -m tp ...``, see ``tp.model.launch``).
"""
from .comm.collectives import (
    ALGORITHMS,
    DEFAULT_MIN_BYTES,
    Codec,
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
