"""A DTensor parallel style whose row-parallel reduction is the compressed all-reduce.

Use :class:`CompressedRowwiseParallel` where a ``torch.distributed.tensor.parallel`` model
(torchtitan, gpt-fast-style stacks) says ``RowwiseParallel()``: the weight is sharded the same
way (``Shard(1)``, bias replicated), but the module's partial output is summed by
``torch.ops.qformats.all_reduce`` (:func:`tp.all_reduce` as a custom op, registered by
:mod:`tp.compile`) instead of DTensor's ``Partial -> Replicate`` redistribute::

    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from tp.styles import CompressedRowwiseParallel
    parallelize_module(model, mesh, {"layers.*.attention.wo": CompressedRowwiseParallel("mxfp8_e4m3"),
                                     "layers.*.feed_forward.w2": CompressedRowwiseParallel("mxfp4"),
                                     "layers.*.attention.wq": ColwiseParallel(), ...})

The op is opaque to ``torch.compile(fullgraph=True)`` (one graph node per reduction, with a
fake implementation) and allocates nothing a CUDA graph could not replay. Results are bitwise
those of calling ``tp.all_reduce(partial, fmt, group, algorithm)`` on each rank's local
partial product, hence of ``tp.emulate_all_reduce`` of all ranks' partials; a bias is added
once, after the reduction (as ``tp.study.hf.emulate_tp`` and the transformers style do), not split
into the partials as DTensor's own ``RowwiseParallel`` does.

Models parallelised with the stock ``RowwiseParallel`` need no new style to be compressed:
DTensor's ``Partial -> Replicate`` redistribute emits ``_c10d_functional.all_reduce``, which
``tp.compile(model, tp.CollectivePolicy(fmt, modules=("layers.*.attention.wo", ...)))``
rewrites (the ``modules=`` globs match the row-parallel module's own path). The difference:
there a bias is inside each partial (DTensor adds ``bias / W`` on every rank), and it needs a
compile; this style works eagerly too.

Costs: those of :func:`tp.all_reduce` (an encode, the collective of the compressed bytes, W
decodes for ``gather``); below ``min_bytes`` the plain all-reduce runs instead.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import RowwiseParallel

from .comm import compile as _registers_ops  # noqa: F401  - defines torch.ops.qformats.all_reduce
from .comm.collectives import check_algorithm, resolve_format

__all__ = ["CompressedRowwiseParallel", "reduce_partial"]


def reduce_partial(partial: Tensor, fmt: Optional[str], group_name: str, algorithm: str,
                   min_bytes: int = 0) -> Tensor:
    """Sum each rank's local ``partial`` over the group ``group_name``: the compressed op when
    ``fmt`` is set and the message is at least ``min_bytes``, else the plain functional
    all-reduce. Traceable (both are graph nodes under ``torch.compile``)."""
    if fmt is None or partial.numel() * partial.element_size() < min_bytes:
        return funcol.wait_tensor(funcol.all_reduce(partial, "sum", group_name))
    return torch.ops.qformats.all_reduce(partial, fmt, group_name, algorithm)


def check_style_args(fmt, algorithm: str, min_bytes: int) -> Optional[str]:
    """Validate a style's arguments at construction (not at the first forward); the canonical format string."""
    f = resolve_format(fmt)
    check_algorithm(algorithm)
    if not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"min_bytes must be an int >= 0, got {min_bytes!r}")
    return None if f is None else str(f)


def _linear_without_bias(self: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, self.weight)


class CompressedRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for ``nn.Linear`` whose output is summed by the compressed all-reduce.

    Args:
        fmt: the wire format (a ``qformats.Format``, preset name, canonical string), or None for
            the plain all-reduce (then this is RowwiseParallel with the bias added after the sum).
        algorithm: ``"gather"`` (TP=2), ``"two_shot"`` (TP>=4) or ``"fused"`` (GPU symmetric memory;
            create a ``tp.comm.fused.FusedAllReduce`` for the mesh's group first).
        min_bytes: messages smaller than this (this rank's partial, numel * itemsize) use the
            plain all-reduce. 0 (the default) compresses every call, as ``tp.all_reduce`` does for
            an explicit format; pass ``tp.DEFAULT_MIN_BYTES`` to keep small decode steps plain.
        input_layouts: as RowwiseParallel (default ``Shard(-1)``).
        output_layouts: must be ``Replicate()`` (the default): the compressed reduction is an
            all-reduce. For a sequence-parallel ``Shard`` output use RowwiseParallel.
        use_local_output: return a plain tensor (default) or a ``Replicate`` DTensor.
    """

    def __init__(self, fmt, algorithm: str = "gather", *, min_bytes: int = 0, input_layouts=None,
                 output_layouts=None, use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        if self.output_layouts != (Replicate(),):
            raise ValueError(f"CompressedRowwiseParallel reduces with an all-reduce: output_layouts must be "
                             f"Replicate(), got {self.output_layouts[0]} (use RowwiseParallel for a Shard output)")
        self.fmt = check_style_args(fmt, algorithm, min_bytes)
        self.algorithm = algorithm
        self.min_bytes = min_bytes

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(
                f"CompressedRowwiseParallel shards nn.Linear only, got {type(module).__name__} (an embedding's "
                "vocab-parallel sum is exact, one rank contributes each row: keep it on RowwiseParallel)")
        if device_mesh.ndim != 1:
            raise ValueError(f"CompressedRowwiseParallel needs a 1-D (TP) mesh, got {device_mesh.ndim}-D")
        group_name = device_mesh.get_group().group_name
        module = super()._apply(module, device_mesh)
        if module.bias is not None:
            # Partials without the bias (DTensor would add bias / W on every rank); the bias is
            # added once, after the reduction, in _prepare_output_fn.
            module.forward = types.MethodType(_linear_without_bias, module)  # a bound method: deepcopy rebinds it
        module._qformats_group_name = group_name  # a str constant for the traced output hook
        return module

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        if not isinstance(outputs, DTensor) or not all(p.is_partial() for p in outputs.placements):
            raise RuntimeError(f"CompressedRowwiseParallel expected a Partial DTensor from the sharded linear, got "
                               f"{type(outputs).__name__} {getattr(outputs, 'placements', '')}")
        y = reduce_partial(outputs.to_local(), self.fmt, mod._qformats_group_name, self.algorithm, self.min_bytes)
        if mod.bias is not None:
            y = y + mod.bias.to_local()
        if use_local_output:
            return y
        return DTensor.from_local(y, device_mesh, output_layouts, run_check=False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(fmt={self.fmt!r}, algorithm={self.algorithm!r}, "
                f"min_bytes={self.min_bytes}, input_layouts={self.input_layouts}, "
                f"use_local_output={self.use_local_output})")
