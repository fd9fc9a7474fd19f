"""Emulate tensor-parallel (TP) inference with compressed all-reduce on any
Hugging Face causal LM, in one process.

In Megatron-style TP every transformer layer ends its attention block and its
MLP block with a *row-parallel* linear: rank r holds the columns of the weight
that belong to its attention heads (or its slice of the MLP hidden features),
computes a partial product over that slice of the contraction dimension, and
an all-reduce sums the partials. This module finds those projections in a
Hugging Face model by architecture and replaces each with a module that does
exactly that at a chosen TP degree T: split the input features into T
contiguous shards (attention: along head boundaries; MLP: evenly), compute
each rank's partial product in fp32, combine them with
``tp.emulate_all_reduce(partials, fmt, algorithm)`` (bit-for-bit the result of
the distributed compressed all-reduce), add the bias once, cast back.

Use it for accuracy studies (``qformats eval``) and calibration; it needs no
process group and no GPU. Cost: the split matmuls do the same FLOPs as the
original projection; the extra time is the emulated codec on T partials of
shape [tokens, hidden] per site (and, when the model is not fp32, a one-time
fp32 copy of each wrapped weight).

Supported layouts (found by module names inside each decoder layer):
Llama / Mistral / Qwen2/3 / Gemma / Phi-3 / OLMo (``self_attn.o_proj``,
``mlp.down_proj``), GPT-2 / StarCoder (``attn.c_proj``, ``mlp.c_proj``,
Conv1D with a transposed weight), GPT-NeoX / Falcon (``attention.dense`` /
``self_attention.dense``, ``mlp.dense_4h_to_h``), Phi-1/2 (``self_attn.dense``,
``mlp.fc2``), GPT-J (``attn.out_proj``, ``mlp.fc_out``), OPT
(``self_attn.out_proj``, ``fc2``). Mixture-of-experts MLPs are not found
(a clear error); wrap attention only with ``emulate_tp(..., kinds=("attn",))``.

Example::

    emu = emulate_tp(model, tp=4, policy=Policy("mxfp4"), algorithm="gather")
    logits = model(ids).logits        # every row-parallel all-reduce compressed
    emu.configure(tp=8, policy=Policy(None))   # change degree / format in place
    emu.remove()                      # the model is back to its original modules
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..comm.call import check_algorithm
from ..comm.policy import ATTN_OUTPUTS, MLP_OUTPUTS, SITE_KINDS, CommPolicy, Rule, Site, skip_ends
from ..model.layers import emulate_row_parallel

__all__ = [
    "Projection",
    "Policy",
    "TPEmulator",
    "RowParallelEmulated",
    "find_sites",
    "emulate_tp",
    "shard_sizes",
    "wire_bits",
    "SITE_KINDS",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Projection(Site):
    """One row-parallel projection: its :class:`tp.Site` (``module`` is its path in the model,
    the key calibration uses) plus its shape. ``units`` are what TP may not split: attention
    heads (``unit_size`` = head_dim) or single MLP features (``unit_size`` = 1)."""

    in_features: int
    out_features: int
    units: int
    unit_size: int


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if isinstance(module, (nn.ModuleList, nn.Sequential)) and int(part) < len(module) else None
        )
        if module is None:
            return None
    return module


def _weight_layout(module: nn.Module) -> str:
    """"linear" (weight [out, in]) or "conv1d" (transformers Conv1D, weight [in, out])."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    raise TypeError(
        f"cannot emulate TP on a {type(module).__name__}: only torch.nn.Linear and transformers "
        "Conv1D projections are supported (quantized or fused modules are not)"
    )


def _in_out(module: nn.Module) -> tuple[int, int]:
    if _weight_layout(module) == "linear":
        return module.in_features, module.out_features
    w = module.weight
    return w.shape[0], w.shape[1]


def _num_heads(config) -> int:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"cannot find the number of attention heads in the {type(config).__name__}")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if any(_get(mod[0], p) is not None for p in ATTN_OUTPUTS):
                candidates.append((name, mod))
    if len(candidates) != 1:
        kind = getattr(config, "model_type", type(model).__name__)
        found = ", ".join(n for n, _ in candidates) or "none"
        raise ValueError(
            f"cannot find the decoder layers of this {kind} model (candidates: {found}); "
            f"known attention output names: {', '.join(ATTN_OUTPUTS)}"
        )
    return candidates[0]


def find_sites(model: nn.Module, kinds: Iterable[str] = SITE_KINDS) -> list[Projection]:
    """The row-parallel projections of a Hugging Face causal LM, in forward
    order (layer 0 attn, layer 0 mlp, layer 1 attn, ...). Cheap (walks the
    module tree). Raises ``ValueError`` naming the layer and its submodules
    when an architecture is not recognised (e.g. a mixture-of-experts MLP:
    then pass ``kinds=("attn",)``)."""
    kinds = tuple(kinds)
    for k in kinds:
        if k not in SITE_KINDS:
            raise ValueError(f"unknown site kind {k!r}; valid: {', '.join(SITE_KINDS)}")
    prefix, layers = _decoder_layers(model)
    heads = _num_heads(model.config)
    sites = []
    for i, layer in enumerate(layers):
        for kind, names in (("attn", ATTN_OUTPUTS), ("mlp", MLP_OUTPUTS)):
            if kind not in kinds:
                continue
            hits = [p for p in names if _get(layer, p) is not None]
            if len(hits) != 1:
                children = ", ".join(n for n, _ in layer.named_modules() if n and n.count(".") <= 1)
                what = "none" if not hits else ", ".join(hits)
                raise ValueError(
                    f"layer {i} ({prefix}.{i}, {type(layer).__name__}): expected one {kind} output projection, "
                    f"found {what}. Submodules: {children}. Known names: {', '.join(names)}"
                    + (" (mixture-of-experts MLPs are not supported: compress attention only)" if kind == "mlp" else "")
                )
            mod = _get(layer, hits[0])
            if isinstance(mod, RowParallelEmulated):
                raise RuntimeError(f"{prefix}.{i}.{hits[0]} is already wrapped by a TPEmulator; remove() it first")
            fin, fout = _in_out(mod)
            if kind == "attn":
                if fin % heads:
                    raise ValueError(
                        f"{prefix}.{i}.{hits[0]}: {fin} input features do not split into {heads} heads"
                    )
                units, usize = heads, fin // heads
            else:
                units, usize = fin, 1
            sites.append(Projection(module=f"{prefix}.{i}.{hits[0]}", layer=i, kind=kind, in_features=fin,
                                    out_features=fout, units=units, unit_size=usize))
    return [dataclasses.replace(p, num_layers=len(layers)) for p in sites]


def shard_sizes(units: int, tp: int, uneven: str = "error", what: str = "units") -> tuple[int, ...]:
    """How many units (heads or features) each of ``tp`` ranks gets, in rank
    order. ``uneven="error"`` demands ``units % tp == 0`` (what Megatron and
    vLLM require); ``"balanced"`` gives the first ``units % tp`` ranks one
    extra unit. ``tp > units`` is always an error (a rank would hold nothing)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"TP degree must be a positive integer, got {tp!r}")
    if tp > units:
        raise ValueError(f"TP={tp} exceeds the {units} {what} to split: some rank would hold nothing")
    q, r = divmod(units, tp)
    if r and uneven == "error":
        raise ValueError(
            f"{units} {what} do not divide evenly into TP={tp} ranks; use a TP degree that divides "
            f"{units}, or allow uneven shards (uneven='balanced', CLI --uneven balanced) to give "
            f"ranks {q + 1} or {q} {what}"
        )
    if uneven not in ("error", "balanced"):
        raise ValueError(f"uneven must be 'error' or 'balanced', got {uneven!r}")
    return tuple(q + (1 if k < r else 0) for k in range(tp))


PLAIN_BITS = 16.0  # an uncompressed all-reduce sends bf16


def wire_bits(fmt, second_fmt, algorithm: str, width: int) -> float:
    """Bits on the wire per value sent by one all-reduce of rows ``width`` wide.

    ``gather`` sends each partial once in ``fmt``; ``two_shot`` sends as many values on each of
    its two hops (the chunks of the partials in ``fmt``, then the reduced chunk in ``second_fmt``,
    None: ``fmt``), so its figure is the mean of the two formats' bits; a plain call (``fmt``
    None) sends bf16 on both. Block padding of the row is counted (``bits_per_value_at``)."""
    if fmt is None:
        return PLAIN_BITS
    first = float(fmt.bits_per_value_at(width))
    if second_fmt is None or second_fmt == fmt:
        return first
    if check_algorithm(algorithm) != "two_shot":
        raise ValueError(f"second_fmt={second_fmt} applies to two_shot only, not {algorithm}")
    return 0.5 * (first + float(second_fmt.bits_per_value_at(width)))


def format_label(f) -> str:
    """Short printable name of a format (for reports); None is the bf16 baseline."""
    return "bf16" if f is None else str(f)


def Policy(format=None, skip_first: int = 0, skip_last: int = 0, sites: str = "all", layer_formats=()) -> CommPolicy:
    """The eval's spelling of a :class:`tp.CommPolicy` (no size floor: every site counts).

    - ``format``: the format of every compressed site (None, a Format, a spec string), or a
      calibration (``tp.model.calibrate.Calibration``: each calibrated site gets its own format).
    - ``skip_first`` / ``skip_last``: leave the first / last k decoder layers uncompressed.
    - ``sites``: "all", "attn" (attention outputs only) or "mlp" (MLP outputs only).
    - ``layer_formats``: per-layer overrides ``{layer: format}`` (or pairs); negative layers count
      from the end. An override wins over ``format`` and the skip rules; ``sites`` still applies.
    """
    if sites not in ("all",) + SITE_KINDS:
        raise ValueError(f"Policy.sites must be 'all', 'attn' or 'mlp', got {sites!r}")
    rules = []
    if sites != "all":
        rules.append(Rule(None, kind="mlp" if sites == "attn" else "attn", label=f"sites={sites}"))
    items = layer_formats.items() if isinstance(layer_formats, Mapping) else layer_formats
    seen = set()
    for item in items:
        try:
            layer, f = item
        except (TypeError, ValueError):
            raise ValueError(f"Policy.layer_formats entries must be (layer, format) pairs, got {item!r}") from None
        if not isinstance(layer, int):
            raise ValueError(f"Policy.layer_formats: layer must be an int, got {layer!r}")
        if layer in seen:
            raise ValueError(f"Policy.layer_formats names layer {layer} twice")
        seen.add(layer)
        rules.append(Rule(f, layers=(layer, layer + 1 if layer != -1 else None), label=f"layer {layer}"))
    try:
        rules += skip_ends(skip_first, skip_last)
    except ValueError as e:
        raise ValueError(f"Policy.{e}") from None
    if callable(getattr(format, "format", None)) and hasattr(format, "sites"):  # a calibration
        return CommPolicy(None, min_bytes=0, rules=tuple(rules)).with_calibration(format)
    return CommPolicy(format, min_bytes=0, rules=tuple(rules))


class RowParallelEmulated(nn.Module):
    """Stands in for one row-parallel projection. With the emulator inactive
    it calls the original module unchanged; active, it computes the T partial
    products in fp32 and combines them as the configured all-reduce would."""

    def __init__(self, inner: nn.Module, site: Projection, owner: "TPEmulator"):
        super().__init__()
        self.inner = inner
        self.site = site
        self._layout = _weight_layout(inner)
        self._owner = [owner]  # list: keep the owner out of the module tree
        self._w32 = None  # fp32 copy when the weight is not fp32
        self.bounds: tuple[tuple[int, int], ...] = ()
        self.fmt = None
        self.second_fmt = None  # two_shot's second hop (None: fmt's)
        self.algorithm = "gather"

    def extra_repr(self) -> str:
        return f"site={self.site.module}, shards={[e - s for s, e in self.bounds]}, fmt={format_label(self.fmt)}, algorithm={self.algorithm}"

    def _weight32(self) -> torch.Tensor:
        w = self.inner.weight
        if w.dtype == torch.float32:
            return w
        if self._w32 is None or self._w32.device != w.device:
            self._w32 = w.detach().float()
        return self._w32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        if not owner.active:
            return self.inner(x)
        pol = owner.policy
        y = emulate_row_parallel(x.float(), self._weight32(), self.bounds, self.fmt, self.algorithm, pol.min_bytes,
                                 transposed=self._layout == "conv1d", observer=owner.observer, site=self.site.module,
                                 second_fmt=self.second_fmt)
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


class TPEmulator:
    """Handle on a model whose row-parallel projections are wrapped (see
    :func:`emulate_tp`). ``configure`` changes TP degree, policy and
    algorithm in place (cheap); ``active = False`` runs the original modules;
    ``observer(site_name, rank, partial)`` when set sees every rank's fp32
    partial output (a ``tp.model.calibrate.Calibrator.observe`` fits); ``remove``
    restores the original modules. Usable as a context manager."""

    def __init__(self, model: nn.Module, sites: list[Projection]):
        self.model = model
        self.sites = tuple(sites)
        self.num_layers = sites[0].num_layers
        self.observer: Callable[[str, int, torch.Tensor], None] | None = None
        self.active = False
        self.tp: int | None = None
        self.policy = Policy(None)
        self.algorithm = "gather"
        self.uneven = "error"
        self.wrappers: dict[str, RowParallelEmulated] = {}
        for site in sites:
            parent_name, _, child = site.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            inner = getattr(parent, child)
            if isinstance(inner, RowParallelEmulated):
                raise RuntimeError(f"{site.module} is already wrapped by another TPEmulator; remove() it first")
            wrapper = RowParallelEmulated(inner, site, self)
            setattr(parent, child, wrapper)
            self.wrappers[site.module] = wrapper

    def configure(self, tp: int, policy: CommPolicy | None = None, algorithm: str | None = None,
                  uneven: str = "error") -> "TPEmulator":
        """Emulate TP degree ``tp`` with ``policy`` (a :class:`tp.CommPolicy`; default:
        uncompressed), its all-reduce algorithm unless ``algorithm`` overrides it (the eval sweeps
        algorithms under one policy). ``uneven``: see :func:`shard_sizes`. Validates everything
        before changing anything; activates the emulation."""
        policy = Policy(None) if policy is None else policy
        if not isinstance(policy, CommPolicy):
            raise TypeError(f"policy must be a tp.CommPolicy, got {type(policy).__name__}")
        algorithm = check_algorithm(algorithm) if algorithm else policy.algorithm
        policy.check_layers(self.num_layers)
        policy.warn_unmatched(self.sites, f"this {type(self.model).__name__}")
        plan = {}
        for site in self.sites:
            what = "attention heads" if site.kind == "attn" else "MLP features"
            try:
                sizes = shard_sizes(site.units, tp, uneven, what)
            except ValueError as e:
                raise ValueError(f"{site.module}: {e}") from None
            bounds, start = [], 0
            for n in sizes:
                bounds.append((start, start + n * site.unit_size))
                start += n * site.unit_size
            d = policy.decide(site)
            second = d.second_fmt if algorithm == d.algorithm else policy.second_for(d.fmt, algorithm)
            plan[site.module] = (tuple(bounds), d.fmt, second)
        for name, (bounds, fmt, second) in plan.items():
            w = self.wrappers[name]
            w.bounds, w.fmt, w.second_fmt, w.algorithm = bounds, fmt, second, algorithm
        self.tp, self.policy, self.algorithm, self.uneven = tp, policy, algorithm, uneven
        self.active = True
        return self

    def site_formats(self) -> dict:
        """The format in use at each site (None = uncompressed)."""
        return {n: w.fmt for n, w in self.wrappers.items()}

    def shards(self) -> dict[str, tuple[int, ...]]:
        """Units (heads or features) per rank at each site."""
        return {
            n: tuple((e - s) // w.site.unit_size for s, e in w.bounds) for n, w in self.wrappers.items()
        }

    def bits_per_value(self) -> float:
        """Mean wire bits per value sent over all row-parallel all-reduces of one forward pass,
        weighted by their widths (:func:`wire_bits` of each site: uncompressed sites count as
        bf16, 16 bits; scale / zero-point / outlier overhead and block padding of this model's
        rows included; two_shot's two hops averaged)."""
        total = weight = 0.0
        for w in self.wrappers.values():
            e = w.site.out_features
            total += wire_bits(w.fmt, w.second_fmt, w.algorithm, e) * e
            weight += e
        return total / weight

    def remove(self) -> None:
        """Put the original modules back."""
        for name, w in self.wrappers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, w.inner)
        self.wrappers = {}
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def emulate_tp(
    model: nn.Module,
    tp: int | None = None,
    policy: CommPolicy | None = None,
    algorithm: str | None = None,
    uneven: str = "error",
    kinds: Iterable[str] = SITE_KINDS,
) -> TPEmulator:
    """Wrap every row-parallel projection of ``model`` (in place) and return
    the :class:`TPEmulator`. With ``tp`` given it is configured and active at
    once; otherwise call ``configure`` first. ``kinds`` limits which sites are
    wrapped at all (e.g. ``("attn",)`` for mixture-of-experts models)."""
    sites = find_sites(model, kinds)
    emu = TPEmulator(model, sites)
    if tp is not None:
        try:
            emu.configure(tp, policy, algorithm, uneven)
        except BaseException:
            emu.remove()
            raise
    return emu
