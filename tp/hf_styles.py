"""A Hugging Face transformers TP style whose row-parallel all-reduce is compressed.

Use it when a model runs tensor-parallel through transformers itself
(``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N, tp_plan=...))``, under
``torchrun``): :func:`compressed_tp_plan` returns the model's own ``tp_plan`` with its
row-parallel projections (``*.o_proj``, ``*.down_proj`` by default) switched to
:class:`CompressedRowwise`, registered in transformers' style registry
(``ALL_PARALLEL_STYLES``); everything else, the vocab-parallel embedding and the gathered
``lm_head`` included, stays as transformers ships it (exact)::

    from transformers import AutoModelForCausalLM, DistributedConfig
    from tp.hf_styles import compressed_tp_plan
    plan = compressed_tp_plan(AutoConfig.from_pretrained(path), "mxfp8_e4m3")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, tp_plan=plan))

What runs: transformers' own ``RowwiseParallel`` (weight ``Shard(-1)``, local input, bias
hidden during the local matmul and added after the sum), with its in-place
``dist.all_reduce`` replaced by ``torch.ops.qformats.all_reduce`` (:func:`tp.all_reduce` as
a custom op): bitwise what ``tp.study.hf.emulate_tp(model, tp=N, policy=tp.study.hf.Policy(fmt))``
computes in one process, and traceable by ``torch.compile(fullgraph=True)``. The local path
is taken with autograd on too, so the forward gives the same values; the op's gradient is
straight-through (see :mod:`tp.compile`), but training through this style is not tested.

A :class:`tp.CommPolicy` (e.g. ``qformats tune``'s file) in place of the format decides per
module; when it has module, layer or kind rules, call :func:`bind_sites` on the loaded model
(every rank, before the first forward) so each projection knows its path::

    plan = compressed_tp_plan(config, tp.CommPolicy.from_file("policy.json"))
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, tp_plan=plan))
    bind_sites(model)    # equals tp.study.hf.emulate_tp(model, tp=2, policy=the same policy)

Supported transformers: :data:`SUPPORTED_TRANSFORMERS` (5.16 introduced the
``TensorParallelLayer.transform_output_post_forward`` API this class overrides; older 5.x and
4.x hook DTensor styles differently and are refused at import). Importing this module imports
transformers (seconds); ``import tp`` does not.
"""
from __future__ import annotations

import fnmatch
import hashlib
import warnings

import torch
import transformers
from packaging.version import Version
from torch import nn

from .comm.policy import CommPolicy
from .styles import PolicyStyle, attach_policy, bind_sites, reduce_partial, site_call, style_policy

MIN_TRANSFORMERS = "5.16"  # first release with transformers.distributed.tensor_parallel's hook API
FIRST_UNTESTED_TRANSFORMERS = "5.25"  # newest tested: 5.24 (CI) and 5.17 (the GPU machines' image)
SUPPORTED_TRANSFORMERS = f">={MIN_TRANSFORMERS},<{FIRST_UNTESTED_TRANSFORMERS}"

_version = Version(transformers.__version__)
if _version < Version(MIN_TRANSFORMERS):
    raise ImportError(f"tp.hf_styles needs transformers {SUPPORTED_TRANSFORMERS}, found {transformers.__version__} "
                      "(its TP styles hook the forward differently before 5.16)")
if _version >= Version(FIRST_UNTESTED_TRANSFORMERS):
    warnings.warn(f"tp.hf_styles is tested with transformers {SUPPORTED_TRANSFORMERS}, found "
                  f"{transformers.__version__}: check tests/tp/test_hf_styles.py passes", stacklevel=2)

from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES, RowwiseParallel  # noqa: E402

__all__ = ["CompressedRowwise", "ROW_PARALLEL", "SUPPORTED_TRANSFORMERS", "bind_sites", "compressed_tp_plan",
           "register_style"]

STYLE_PREFIX = "qformats_rowwise"
ROW_PARALLEL = ("*.o_proj", "*.down_proj")  # the Llama-family names of the attention / MLP output projections
PLAIN_ROWWISE = "rowwise"  # transformers' style for those: input Shard(-1), output Replicate


class CompressedRowwise(PolicyStyle, RowwiseParallel):
    """transformers' ``RowwiseParallel`` for ``nn.Linear`` whose all-reduce is the compressed one.

    Args: ``fmt`` (a format or a :class:`tp.CommPolicy`), ``algorithm``, ``min_bytes``,
    ``second_fmt`` as :class:`tp.styles.CompressedRowwiseParallel` (``min_bytes=0``, the default,
    compresses every call, as the emulator does). Register instances with :func:`register_style`
    (or let :func:`compressed_tp_plan` do it).
    """

    def __init__(self, fmt, algorithm: str | None = None, *, min_bytes: int | None = None, second_fmt=None):
        super().__init__()  # input Shard(-1), output Replicate, local output
        self.policy = style_policy(fmt, algorithm, min_bytes, second_fmt)

    def should_use_local_tensors(self, module):
        # Always the local path (bias hidden, local weight shard), also with autograd on, so the
        # partial is exactly the emulator's; the stock style takes it only without autograd.
        return isinstance(module, nn.Linear) or super().should_use_local_tensors(module)

    def install_forward(self, module, mesh):
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{type(self).__name__} shards nn.Linear only, got {type(module).__name__}")
        attach_policy(module, self.policy)
        return super().install_forward(module, mesh)

    def transform_output_post_forward(self, module, output, mesh):
        group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")
        call = site_call(module)
        y = reduce_partial(output, call.fmt, group.group_name, call.algorithm, call.min_bytes, call.second_fmt)
        bias = module._parameters.get("bias")
        if bias is not None:
            y = y + (bias.to_local() if hasattr(bias, "to_local") else bias)
        return y

    def __repr__(self) -> str:
        rules = f", {len(self.policy.rules)} rules" if self.policy.rules else ""
        second = f", second_fmt={str(self.policy.second_fmt)!r}" if self.policy.second_fmt is not None else ""
        return f"{type(self).__name__}(fmt={self.fmt!r}, algorithm={self.algorithm!r}{second}{rules}, min_bytes={self.min_bytes})"


def register_style(fmt, algorithm: str | None = None, *, min_bytes: int | None = None, second_fmt=None) -> str:
    """Register a :class:`CompressedRowwise` in ``ALL_PARALLEL_STYLES``; returns its plan name.

    The name encodes the arguments (``qformats_rowwise:fp8_e4m3/b32/e8m0:gather:0``; a policy:
    ``qformats_rowwise:policy:<digest of its JSON>``), so registering the same style twice is
    harmless and different formats can share one plan. Every rank must register before
    ``from_pretrained`` (importing and calling this does).
    """
    style = CompressedRowwise(fmt, algorithm, min_bytes=min_bytes, second_fmt=second_fmt)
    pol = style.policy
    if isinstance(fmt, CommPolicy) or pol.second_fmt is not None:
        name = f"{STYLE_PREFIX}:policy:{hashlib.sha256(pol.to_string().encode()).hexdigest()[:16]}"
    else:
        name = f"{STYLE_PREFIX}:{style.fmt}:{style.algorithm}:{style.min_bytes}"
    ALL_PARALLEL_STYLES.register(name, style)
    return name


def _model_tp_plan(model_or_config) -> dict:
    """The full tp_plan transformers applies to a model (built on the meta device from a config)."""
    if isinstance(model_or_config, transformers.PretrainedConfig):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    elif isinstance(model_or_config, transformers.PreTrainedModel):
        model = model_or_config
    else:
        raise TypeError(f"expected a transformers PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}")
    plan = dict(model.tp_plan or {})
    if not plan:
        raise ValueError(f"{type(model).__name__} has no tp_plan: transformers cannot shard it for TP")
    return plan


def compressed_tp_plan(model_or_config, fmt, algorithm: str | None = None, *, min_bytes: int | None = None,
                       second_fmt=None, modules=ROW_PARALLEL) -> dict:
    """The model's full ``tp_plan`` with the ``"rowwise"`` entries matching ``modules`` compressed.

    Args:
        model_or_config: a ``PreTrainedModel`` or its ``PretrainedConfig`` (a causal LM; built on
            the meta device to read its plan, no weights are loaded).
        fmt, algorithm, min_bytes, second_fmt: the style (see :class:`CompressedRowwise`); ``fmt``
            may be a :class:`tp.CommPolicy` (then see :func:`bind_sites`).
        modules: glob patterns of plan keys to compress (default :data:`ROW_PARALLEL`).

    Returns a new dict for ``DistributedConfig(tp_plan=...)``: complete, so it means the same
    whether the transformers version replaces the model's plan with it (5.16-5.17) or merges
    it (later). Raises ValueError if no ``rowwise`` entry matches, or a match is another
    style (a packed or split-input projection this style does not shard).
    """
    if isinstance(modules, str):
        raise TypeError(f"modules must be a tuple of glob patterns, got the string {modules!r}")
    plan = _model_tp_plan(model_or_config)
    name = register_style(fmt, algorithm, min_bytes=min_bytes, second_fmt=second_fmt)
    hits = {k: v for k, v in plan.items() if any(fnmatch.fnmatchcase(k, p) for p in modules)}
    other = {k: v for k, v in hits.items() if v != PLAIN_ROWWISE}
    if other:
        raise ValueError(f"plan entries {other} match {tuple(modules)} but are not {PLAIN_ROWWISE!r}: "
                         f"{CompressedRowwise.__name__} replaces plain row-parallel linears only")
    if not hits:
        raise ValueError(f"no tp_plan entry matches {tuple(modules)}; the plan's keys: {sorted(plan)}")
    return {k: (name if k in hits else v) for k, v in plan.items()}
