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
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Site",
    "Policy",
    "TPEmulator",
    "RowParallelEmulated",
    "find_sites",
    "emulate_tp",
    "shard_sizes",
    "SITE_KINDS",
]

SITE_KINDS = ("attn", "mlp")

# (path inside a decoder layer, kind). Tried in order; each layer must match
# exactly one attention and (unless the policy is attention-only) one MLP name.
_ATTN_NAMES = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, Granite, ...
    "attn.c_proj",  # GPT-2, StarCoder (GPTBigCode)
    "attention.dense",  # GPT-NeoX / Pythia
    "self_attention.dense",  # Falcon, Bloom
    "self_attn.dense",  # Phi-1/1.5/2
    "attn.out_proj",  # GPT-J
    "self_attn.out_proj",  # OPT
    "attn.o_proj",
    "attention.o_proj",
)
_MLP_NAMES = (
    "mlp.down_proj",  # Llama family, Qwen, Gemma, Phi-3, OLMo
    "mlp.c_proj",  # GPT-2, StarCoder
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
    "mlp.fc2",  # Phi-1/1.5/2
    "mlp.fc_out",  # GPT-J
    "fc2",  # OPT
    "feed_forward.w2",
)


@dataclasses.dataclass(frozen=True)
class Site:
    """One row-parallel projection: ``name`` is its module path in the model
    (the key calibration uses), ``layer`` its decoder-layer index, ``kind``
    "attn" or "mlp". ``units`` are what TP may not split: attention heads
    (``unit_size`` = head_dim) or single MLP features (``unit_size`` = 1)."""

    name: str
    layer: int
    kind: str
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
            if any(_get(mod[0], p) is not None for p in _ATTN_NAMES):
                candidates.append((name, mod))
    if len(candidates) != 1:
        kind = getattr(config, "model_type", type(model).__name__)
        found = ", ".join(n for n, _ in candidates) or "none"
        raise ValueError(
            f"cannot find the decoder layers of this {kind} model (candidates: {found}); "
            f"known attention output names: {', '.join(_ATTN_NAMES)}"
        )
    return candidates[0]


def find_sites(model: nn.Module, kinds: Iterable[str] = SITE_KINDS) -> list[Site]:
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
        for kind, names in (("attn", _ATTN_NAMES), ("mlp", _MLP_NAMES)):
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
            sites.append(Site(f"{prefix}.{i}.{hits[0]}", i, kind, fin, fout, units, usize))
    return sites


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


def _is_format(f) -> bool:
    return hasattr(f, "bits_per_value")


def _normalize_format(f):
    """None, a Format, a calibration-like source (has ``.format(site_name)``),
    or a string (preset name / canonical spec, parsed by qformats)."""
    if f is None or _is_format(f):
        return f
    if isinstance(f, str):
        if f.strip().lower() in ("none", "bf16", ""):
            return None
        import qformats

        return qformats.as_format(f)
    if callable(getattr(f, "format", None)):
        return f
    raise TypeError(f"not a format: {f!r} (expected None, a qformats.Format, a spec string or a Calibration)")


def format_label(f) -> str:
    """Short printable name of a format or format source (for reports)."""
    if f is None:
        return "bf16"
    if _is_format(f):
        return str(f)
    return getattr(f, "label", None) or type(f).__name__


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which format each row-parallel all-reduce uses.

    - ``format``: the format of every compressed site: ``None`` (uncompressed),
      a ``qformats.Format``, a spec string, or a calibration (anything with
      ``.format(site_name) -> Format``, e.g. ``tp.calibrate.Calibration``;
      then each site gets its own calibrated format).
    - ``skip_first`` / ``skip_last``: leave the first / last k decoder layers
      uncompressed (the papers note the ends of the network are the most
      sensitive).
    - ``sites``: "all", "attn" (attention outputs only) or "mlp" (MLP down
      projections only); the others stay uncompressed.
    - ``layer_formats``: per-layer overrides ``((layer, format), ...)`` (a
      dict is accepted); negative layers count from the end. An override wins
      over ``format`` and the skip rules; ``sites`` still applies.

    Frozen and cheap; strings are parsed once, here.
    """

    format: Any = None
    skip_first: int = 0
    skip_last: int = 0
    sites: str = "all"
    layer_formats: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "format", _normalize_format(self.format))
        for key in ("skip_first", "skip_last"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Policy.{key} must be a non-negative integer, got {v!r}")
        if self.sites not in ("all",) + SITE_KINDS:
            raise ValueError(f"Policy.sites must be 'all', 'attn' or 'mlp', got {self.sites!r}")
        lf = self.layer_formats
        items = lf.items() if isinstance(lf, Mapping) else lf
        norm = []
        for item in items:
            try:
                layer, f = item
            except (TypeError, ValueError):
                raise ValueError(f"Policy.layer_formats entries must be (layer, format) pairs, got {item!r}") from None
            if not isinstance(layer, int):
                raise ValueError(f"Policy.layer_formats: layer must be an int, got {layer!r}")
            norm.append((layer, _normalize_format(f)))
        layers = [l for l, _ in norm]
        if len(set(layers)) != len(layers):
            raise ValueError(f"Policy.layer_formats names a layer twice: {layers}")
        object.__setattr__(self, "layer_formats", tuple(sorted(norm, key=lambda t: t[0])))

    def format_for(self, site: Site, num_layers: int):
        """The Format (or None) used at ``site`` in a model of ``num_layers`` layers."""
        if self.sites != "all" and site.kind != self.sites:
            return None
        for layer, f in self.layer_formats:
            if layer % num_layers == site.layer:
                return self._resolve(f, site)
        if site.layer < self.skip_first or site.layer >= num_layers - self.skip_last:
            return None
        return self._resolve(self.format, site)

    @staticmethod
    def _resolve(f, site: Site):
        if f is None or _is_format(f):
            return f
        return f.format(site.name)

    def check(self, num_layers: int) -> None:
        """Raise ``ValueError`` if a layer override is out of range."""
        for layer, _ in self.layer_formats:
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"Policy.layer_formats: layer {layer} out of range for a {num_layers}-layer model")

    def describe(self) -> dict:
        """JSON-ready description of the knobs (the format itself is reported separately)."""
        return {
            "skip_first": self.skip_first,
            "skip_last": self.skip_last,
            "sites": self.sites,
            "layer_formats": {str(l): format_label(f) for l, f in self.layer_formats},
        }


def _emulate_all_reduce_fn() -> Callable:
    import tp

    fn = getattr(tp, "emulate_all_reduce", None)
    if fn is None:
        try:
            from tp.emulate import emulate_all_reduce as fn  # noqa: N813
        except ImportError as e:
            raise RuntimeError(
                "compressed formats need tp.emulate_all_reduce (tp/emulate.py), which is not available: " + str(e)
            ) from e
    return fn


class RowParallelEmulated(nn.Module):
    """Stands in for one row-parallel projection. With the emulator inactive
    it calls the original module unchanged; active, it computes the T partial
    products in fp32 and combines them as the configured all-reduce would."""

    def __init__(self, inner: nn.Module, site: Site, owner: "TPEmulator"):
        super().__init__()
        self.inner = inner
        self.site = site
        self._layout = _weight_layout(inner)
        self._owner = [owner]  # list: keep the owner out of the module tree
        self._w32 = None  # fp32 copy when the weight is not fp32
        self.bounds: tuple[tuple[int, int], ...] = ()
        self.fmt = None
        self.algorithm = "gather"

    def extra_repr(self) -> str:
        return f"site={self.site.name}, shards={[e - s for s, e in self.bounds]}, fmt={format_label(self.fmt)}, algorithm={self.algorithm}"

    def _weight32(self) -> torch.Tensor:
        w = self.inner.weight
        if w.dtype == torch.float32:
            return w
        if self._w32 is None or self._w32.device != w.device:
            self._w32 = w.detach().float()
        return self._w32

    def partials(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each rank's fp32 partial product (no bias), in rank order."""
        w = self._weight32()
        x32 = x.float()
        out = []
        for s, e in self.bounds:
            if self._layout == "linear":
                out.append(F.linear(x32[..., s:e], w[:, s:e]))
            else:
                out.append(torch.matmul(x32[..., s:e], w[s:e]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        if not owner.active:
            return self.inner(x)
        parts = self.partials(x)
        if owner.observer is not None:
            for rank, p in enumerate(parts):
                owner.observer(self.site.name, rank, p)
        if self.fmt is None:
            y = parts[0]
            for p in parts[1:]:  # the uncompressed all-reduce: fp32 sum in rank order
                y = y + p
        else:
            y = owner._all_reduce(parts, self.fmt, self.algorithm)
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


class TPEmulator:
    """Handle on a model whose row-parallel projections are wrapped (see
    :func:`emulate_tp`). ``configure`` changes TP degree, policy and
    algorithm in place (cheap); ``active = False`` runs the original modules;
    ``observer(site_name, rank, partial)`` when set sees every rank's fp32
    partial output (a ``tp.calibrate.Calibrator.observe`` fits); ``remove``
    restores the original modules. Usable as a context manager."""

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model = model
        self.sites = tuple(sites)
        self.num_layers = 1 + max(s.layer for s in sites)
        self.observer: Callable[[str, int, torch.Tensor], None] | None = None
        self.active = False
        self.tp: int | None = None
        self.policy = Policy(None)
        self.algorithm = "gather"
        self.uneven = "error"
        self._emulate = None
        self.wrappers: dict[str, RowParallelEmulated] = {}
        for site in sites:
            parent_name, _, child = site.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            inner = getattr(parent, child)
            if isinstance(inner, RowParallelEmulated):
                raise RuntimeError(f"{site.name} is already wrapped by another TPEmulator; remove() it first")
            wrapper = RowParallelEmulated(inner, site, self)
            setattr(parent, child, wrapper)
            self.wrappers[site.name] = wrapper

    def _all_reduce(self, parts, fmt, algorithm):
        return self._emulate(parts, fmt, algorithm)

    def configure(self, tp: int, policy: Policy | None = None, algorithm: str = "gather", uneven: str = "error") -> "TPEmulator":
        """Emulate TP degree ``tp`` with ``policy`` (default: uncompressed) and
        the all-reduce ``algorithm`` ("gather" or "two_shot", passed to
        ``tp.emulate_all_reduce``). ``uneven``: see :func:`shard_sizes`.
        Validates everything before changing anything; activates the emulation."""
        policy = Policy(None) if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a tp.hf.Policy, got {type(policy).__name__}")
        policy.check(self.num_layers)
        plan = {}
        for site in self.sites:
            what = "attention heads" if site.kind == "attn" else "MLP features"
            try:
                sizes = shard_sizes(site.units, tp, uneven, what)
            except ValueError as e:
                raise ValueError(f"{site.name}: {e}") from None
            bounds, start = [], 0
            for n in sizes:
                bounds.append((start, start + n * site.unit_size))
                start += n * site.unit_size
            plan[site.name] = (tuple(bounds), policy.format_for(site, self.num_layers))
        if any(f is not None for _, f in plan.values()):
            self._emulate = _emulate_all_reduce_fn()
        for name, (bounds, fmt) in plan.items():
            w = self.wrappers[name]
            w.bounds, w.fmt, w.algorithm = bounds, fmt, algorithm
        self.tp, self.policy, self.algorithm, self.uneven = tp, policy, algorithm, uneven
        self.active = True
        return self

    def site_formats(self) -> dict[str, Any]:
        """The format in use at each site (None = uncompressed)."""
        return {n: w.fmt for n, w in self.wrappers.items()}

    def shards(self) -> dict[str, tuple[int, ...]]:
        """Units (heads or features) per rank at each site."""
        return {
            n: tuple((e - s) // w.site.unit_size for s, e in w.bounds) for n, w in self.wrappers.items()
        }

    def bits_per_value(self) -> float:
        """Mean wire bits per reduced value over all row-parallel all-reduces
        of one forward pass, weighted by their widths; uncompressed sites count
        as bf16 (16 bits). Includes scale / zero-point / outlier overhead."""
        total = weight = 0.0
        for w in self.wrappers.values():
            e = w.site.out_features
            if w.fmt is None:
                bits = 16.0
            elif hasattr(w.fmt, "bits_per_value_at"):
                bits = float(w.fmt.bits_per_value_at(e))
            else:
                bits = float(w.fmt.bits_per_value)
            total += bits * e
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
    policy: Policy | None = None,
    algorithm: str = "gather",
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
