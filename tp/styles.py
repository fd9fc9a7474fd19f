"""A DTensor parallel style whose row-parallel reduction is the compressed all-reduce.

Use :class:`CompressedRowwiseParallel` where a ``torch.distributed.tensor.parallel`` model
(torchtitan, gpt-fast-style stacks) says ``RowwiseParallel()``: the weight is sharded the same
way (``Shard(1)``, bias replicated), but the module's partial output is summed by
``torch.ops.qformats.all_reduce`` (:func:`tp.all_reduce` as a custom op, defined in
:mod:`tp.comm.ops`) instead of DTensor's ``Partial -> Replicate`` redistribute::

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

A :class:`tp.CommPolicy` (or a policy file from ``qformats tune``) in place of the format
decides per module: one style serves every row-parallel entry of the plan, and
:func:`bind_sites` (after ``parallelize_module``) gives each module its site (path, layer, kind,
read off the path as :meth:`tp.Site.of` does) and so its format and second hop::

    style = CompressedRowwiseParallel(tp.CommPolicy.from_file("policy.json"))
    parallelize_module(model, mesh, {"layers.*.attention.wo": style, "layers.*.feed_forward.w2": style, ...})
    bind_sites(model)          # {"layers.0.attention.wo": "int8/b32/bf16", ...}

A policy without module, layer or kind rules needs no binding (the same decision everywhere).

Costs: those of :func:`tp.all_reduce` (an encode, the collective of the compressed bytes, W
decodes for ``gather``); below ``min_bytes`` the plain all-reduce runs instead.
"""
from __future__ import annotations

import types
from typing import NamedTuple, Optional

import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import RowwiseParallel

from .comm.collectives import below_floor
from .comm.ops import ALL_REDUCE
from .comm.policy import CommPolicy, Site

__all__ = ["CompressedRowwiseParallel", "SiteCall", "bind_sites", "reduce_partial", "style_policy"]

# Set on each module a policy style shards: the policy, and (once its site is known) the call.
_POLICY_ATTR, _CALL_ATTR = "_qformats_policy", "_qformats_call"


def reduce_partial(partial: Tensor, fmt: Optional[str], group_name: str, algorithm: str,
                   min_bytes: int = 0, second_fmt: Optional[str] = None) -> Tensor:
    """Sum each rank's local ``partial`` over the group ``group_name``: the compressed op when
    ``fmt`` is set and the message is at least ``min_bytes``, else the plain functional
    all-reduce. ``second_fmt``: two_shot's second hop (None: ``fmt``). Traceable (both are graph
    nodes under ``torch.compile``)."""
    if fmt is None or below_floor(partial.numel() * partial.element_size(), min_bytes):
        return funcol.wait_tensor(funcol.all_reduce(partial, "sum", group_name))
    return ALL_REDUCE(partial, fmt, group_name, algorithm, second_fmt)


class SiteCall(NamedTuple):
    """What one module's reduction does (canonical format strings; None: plain)."""

    fmt: Optional[str]
    second_fmt: Optional[str]
    algorithm: str
    min_bytes: int

    @staticmethod
    def of(policy: CommPolicy, site: Site) -> "SiteCall":
        """The policy's :meth:`~tp.CommPolicy.decide` at ``site`` (the size is not known yet: the
        call applies ``min_bytes``), as the strings the op takes."""
        d = policy.decide(site)
        f, second = d.fmt, d.second_fmt
        return SiteCall(None if f is None else str(f), None if second is None or second == f else str(second),
                        d.algorithm, policy.min_bytes)


def style_policy(fmt, algorithm: Optional[str] = None, min_bytes: Optional[int] = None, second_fmt=None) -> CommPolicy:
    """A style's arguments as one :class:`tp.CommPolicy`, validated at construction (not at the
    first forward). ``fmt``: a format (the shorthand: ``algorithm`` default ``"gather"``,
    ``min_bytes`` default 0, every call compressed) or a CommPolicy, which then says all
    (passing ``algorithm``/``min_bytes``/``second_fmt`` beside it is an error)."""
    if isinstance(fmt, CommPolicy):
        given = [n for n, v in (("algorithm", algorithm), ("min_bytes", min_bytes), ("second_fmt", second_fmt)) if v is not None]
        if given:
            raise ValueError(f"a CommPolicy says its own {', '.join(given)}: set it in the policy (policy.replace(...))")
        if fmt.choose is not None:
            raise ValueError("a policy with choose= decides in the compile pass only; use rules for a TP style")
        return fmt
    return CommPolicy(fmt, algorithm or "gather", 0 if min_bytes is None else min_bytes, second_fmt=second_fmt)


def attach_policy(module: nn.Module, policy: CommPolicy) -> None:
    """Mark ``module`` as reduced by ``policy``; decided now when the policy reads no module paths."""
    setattr(module, _POLICY_ATTR, policy)
    setattr(module, _CALL_ATTR, None if policy.reads_modules else SiteCall.of(policy, Site()))


def site_call(module: nn.Module) -> SiteCall:
    """The decided call of a module a policy style shards; raises until :func:`bind_sites` ran."""
    call = getattr(module, _CALL_ATTR, None)
    if call is None:
        raise RuntimeError(
            "this module's policy decides by module path, layer or site kind, which a parallel style does "
            "not see: call tp.styles.bind_sites(model) once after sharding, before the first forward")
    return call


def bind_sites(model: nn.Module, num_layers: Optional[int] = None) -> dict:
    """Decide every policy-style module of ``model`` by its site: its path in ``model``, its layer
    (the first integer in the path) of ``num_layers`` (default: ``model.config.num_hidden_layers``
    if there is one, else one more than the largest layer index found), its kind (the path's last
    names, :data:`tp.comm.policy.ATTN_OUTPUTS` / ``MLP_OUTPUTS``). Returns {path: SiteCall}. Cheap
    (a walk of the module tree); call it on every rank, after sharding and before compiling."""
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, _POLICY_ATTR)]
    if not mods:
        raise ValueError("no module of this model is sharded by a compressed style with a policy")
    if num_layers is None:
        num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if num_layers is None:
        found = [lay for lay in (Site.of(n).layer for n, _ in mods) if lay is not None]
        num_layers = 1 + max(found) if found else None
    out = {}
    for name, mod in mods:
        policy = getattr(mod, _POLICY_ATTR)
        if num_layers is not None:
            policy.check_layers(num_layers)
        call = SiteCall.of(policy, Site.of(name, num_layers))
        setattr(mod, _CALL_ATTR, call)
        out[name] = call
    for policy in {id(getattr(m, _POLICY_ATTR)): getattr(m, _POLICY_ATTR) for _, m in mods}.values():
        policy.warn_unmatched([Site.of(n, num_layers) for n, m in mods if getattr(m, _POLICY_ATTR) is policy],
                              "this model's compressed modules")
    return out


def _linear_without_bias(self: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, self.weight)


class PolicyStyle:
    """What a compressed style's ``policy`` (a :class:`tp.CommPolicy`) says, as attributes: the
    one place both TP styles (DTensor's and transformers') read them from."""

    policy: CommPolicy

    @property
    def fmt(self) -> Optional[str]:
        """The default format (canonical string; None: plain): a policy's rules may override it per module."""
        return None if self.policy.fmt is None else str(self.policy.fmt)

    @property
    def algorithm(self) -> str:
        return self.policy.algorithm

    @property
    def min_bytes(self) -> int:
        return self.policy.min_bytes


class CompressedRowwiseParallel(PolicyStyle, RowwiseParallel):
    """``RowwiseParallel`` for ``nn.Linear`` whose output is summed by the compressed all-reduce.

    Args:
        fmt: the wire format (a ``qformats.Format``, preset name, canonical string), or None for
            the plain all-reduce (then this is RowwiseParallel with the bias added after the sum);
            or a :class:`tp.CommPolicy` that decides per module (see :func:`bind_sites`).
        algorithm: ``"gather"`` (the default; TP=2), ``"two_shot"`` (TP>=4) or ``"fused"`` (GPU
            symmetric memory; create a ``tp.comm.fused.FusedAllReduce`` for the mesh's group first).
        min_bytes: messages smaller than this (this rank's partial, numel * itemsize) use the
            plain all-reduce. 0 (the default) compresses every call, as ``tp.all_reduce`` does for
            an explicit format; pass ``tp.DEFAULT_MIN_BYTES`` to keep small decode steps plain.
        second_fmt: two_shot's second hop (the reduced sum's format; None: ``fmt``).
        input_layouts: as RowwiseParallel (default ``Shard(-1)``).
        output_layouts: must be ``Replicate()`` (the default): the compressed reduction is an
            all-reduce. For a sequence-parallel ``Shard`` output use RowwiseParallel.
        use_local_output: return a plain tensor (default) or a ``Replicate`` DTensor.
    """

    def __init__(self, fmt, algorithm: Optional[str] = None, *, min_bytes: Optional[int] = None, second_fmt=None,
                 input_layouts=None, output_layouts=None, use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        if self.output_layouts != (Replicate(),):
            raise ValueError(f"CompressedRowwiseParallel reduces with an all-reduce: output_layouts must be "
                             f"Replicate(), got {self.output_layouts[0]} (use RowwiseParallel for a Shard output)")
        self.policy = style_policy(fmt, algorithm, min_bytes, second_fmt)

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
        attach_policy(module, self.policy)
        return module

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        if not isinstance(outputs, DTensor) or not all(p.is_partial() for p in outputs.placements):
            raise RuntimeError(f"CompressedRowwiseParallel expected a Partial DTensor from the sharded linear, got "
                               f"{type(outputs).__name__} {getattr(outputs, 'placements', '')}")
        call = site_call(mod)
        y = reduce_partial(outputs.to_local(), call.fmt, mod._qformats_group_name, call.algorithm, call.min_bytes,
                           call.second_fmt)
        if mod.bias is not None:
            y = y + mod.bias.to_local()
        if use_local_output:
            return y
        return DTensor.from_local(y, device_mesh, output_layouts, run_check=False)

    def __repr__(self) -> str:
        rules = f", {len(self.policy.rules)} rules" if self.policy.rules else ""
        second = f", second_fmt={str(self.policy.second_fmt)!r}" if self.policy.second_fmt is not None else ""
        return (f"{type(self).__name__}(fmt={self.fmt!r}, algorithm={self.algorithm!r}{second}{rules}, "
                f"min_bytes={self.min_bytes}, input_layouts={self.input_layouts}, "
                f"use_local_output={self.use_local_output})")
