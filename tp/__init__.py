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
# The public names are imported on first use (PEP 562), so that ``import tp`` -- and the
# ``qformats`` command, which lives in tp.cli -- stays as light as torch itself: the
# collectives pull in Triton and the compile pass torch._inductor / torch._dynamo (seconds),
# which ``qformats formats`` never needs. ``from tp import X`` and ``tp.X`` work as before.
import importlib as _importlib

_LAZY = {
    "tp.comm.call": ("ALGORITHMS",),
    "tp.comm.collectives": ("DEFAULT_MIN_BYTES", "Codec", "ReferenceCodec", "all_gather", "all_reduce",
                            "all_reduce_rmsnorm",
                            "get_codec", "reduce_scatter", "set_codec", "wire_bytes"),
    "tp.comm.emulate": ("emulate_all_gather", "emulate_all_reduce", "emulate_all_reduce_rmsnorm", "emulate_reduce_scatter",
                        "plain_sum",
                        "predicted_error"),
    "tp.comm.policy": ("CollectivePolicy", "CommPolicy", "Decision", "Rule", "Site"),
    "tp.model.layers": ("ColumnParallelLinear", "RowParallelLinear", "ShardSpec", "TPContext",
                        "VocabParallelEmbedding", "shard_specs"),
    "tp.model.llama": ("KVCache", "LlamaConfig", "TPLlama", "generate", "init_random_", "valid_tp_sizes"),
    "tp.model.calibrate": ("Calibration", "Calibrator", "calibrate"),
    "tp.comm.compile": ("compile", "print_collectives", "compile_report"),
}
_ALIASES = {"compile_report": "report"}  # tp.compile_report is tp.comm.compile.report
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}
# README's module paths of the fused path and the HF emulation (tp/fused.py and tp/hf.py make
# ``import tp.fused`` give the very module object tp.comm.fused, and tp.hf tp.study.hf).
_SUBMODULES = ("fused", "hf")

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), _ALIASES.get(name, name))
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
