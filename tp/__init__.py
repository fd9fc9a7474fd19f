"""tp: the tensor-parallel runtime of qformats.

Compressed collectives (:func:`all_reduce`, :func:`all_gather`, :func:`reduce_scatter`) with
the ``gather`` and ``two_shot`` algorithms over torch.distributed (NCCL on GPU, gloo on CPU),
their exact single-process emulator (:func:`emulate_all_reduce` and friends), Megatron-style
parallel layers whose row-parallel all-reduce follows a :class:`CommPolicy`, a Llama-style
model (:class:`TPLlama`), Hugging Face checkpoint loading and sharding (``tp.checkpoint``),
outlier calibration after Dong et al. (``tp.calibrate``), and a launcher
(``torchrun --nproc-per-node N -m tp ...``, see ``tp.launch``).
"""
from .collectives import (
    ALGORITHMS,
    DEFAULT_THRESHOLD_BYTES,
    Codec,
    all_gather,
    all_reduce,
    get_codec,
    reduce_scatter,
    set_codec,
    wire_bytes,
)
from .emulate import emulate_all_gather, emulate_all_reduce, emulate_reduce_scatter, plain_sum, predicted_error
from .layers import (
    ColumnParallelLinear,
    CommPolicy,
    RowParallelLinear,
    ShardSpec,
    TPContext,
    VocabParallelEmbedding,
    shard_specs,
)
from .model import KVCache, LlamaConfig, TPLlama, generate, init_random_, valid_tp_sizes
from .calibrate import Calibration, Calibrator, calibrate
from .compile import CollectivePolicy, compile, print_collectives, report as compile_report

__all__ = [
    "CollectivePolicy",
    "compile",
    "compile_report",
    "print_collectives",
    "ALGORITHMS",
    "DEFAULT_THRESHOLD_BYTES",
    "Calibration",
    "Calibrator",
    "Codec",
    "ColumnParallelLinear",
    "CommPolicy",
    "KVCache",
    "LlamaConfig",
    "RowParallelLinear",
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
