"""The one communication policy: which collective gets which format.

Every part of ``tp`` asks the same frozen :class:`CommPolicy`: the TP layers (``tp.model``),
the ``tp.compile`` rewrite pass, the Hugging Face emulation (``tp.hf``) and the eval. A policy
is a default format, an algorithm and a size floor, plus ordered :class:`Rule` overrides that
select call sites (:class:`Site`) by module glob, layer range and site kind; the first rule
that matches decides. It round-trips through JSON (:meth:`CommPolicy.to_file`,
:meth:`CommPolicy.from_file`, :meth:`CommPolicy.from_string`), so an eval or a tuner can write
one and ``tp.compile`` or the launcher read it back. Deciding costs a scan of the rules.

One decision: :meth:`CommPolicy.decide` (site, size, device) answers compress-or-not, the
format, the second hop, the algorithm and the path (plain, NCCL or fused); the size floor
(:func:`tp.comm.collectives.below_floor` of ``min_bytes``) and the fused path's measured window
(:func:`fused_window`) are applied there. The layers, the styles, the compile pass, the
emulator of ``tp.hf``, the vLLM plugin and the fused path ask it (or :func:`fused_window`).

One constructor, :class:`CommPolicy`, and one shorthand: a format where a policy is expected
(``tp.styles.style_policy``: every call compressed, no size floor). The other spellings are
functions that return a CommPolicy: :func:`CollectivePolicy` (``tp.compile``'s
``skip_first``/``skip_last``/``modules``), ``tp.hf.Policy`` (``sites="attn"``,
``layer_formats``) and ``Calibration.policy`` (a calibration's sites).
"""
from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from qformats import Format

from .call import check_algorithm, resolve_format, second_hop
from .collectives import DEFAULT_MIN_BYTES, below_floor

__all__ = ["ATTN_OUTPUTS", "MLP_OUTPUTS", "SITE_KINDS", "CollectivePolicy", "CommPolicy", "Decision", "PolicyError",
           "Rule", "Site", "fused_window", "skip_ends"]

# When the fused path pays (measured on 2xH200 NVLink by benchmarks/allreduce_gpu.py, see
# benchmarks/results/allreduce/allreduce_h200x2_*): the fused pull gather beat NCCL bf16 from 4 MiB inside a
# CUDA graph, but only from 64 MiB in eager mode (4 Triton launches cost ~150 us of host time per
# call), and never for uint4/b128/fp16+zp (its quantize kernel is ~2x slower) nor for mxfp8 above
# 128 MiB. The auto window (a FusedAllReduce with min_bytes=None, and CommPolicy.decide's "fused"
# path) takes the plain all-reduce outside it, so that a call is never slower than NCCL at the
# measured points. Other world sizes: unmeasured.
DEFAULT_FUSED_MIN_BYTES = 4 << 20  # inside a CUDA graph
EAGER_FUSED_MIN_BYTES = 64 << 20  # eager (host launch overhead)
FUSED_MAX_BYTES = {"fp8_e4m3/b32/e8m0": 128 << 20, "uint4/b128/fp16+zp": 0}


def fused_window(fmt, capturing: bool) -> tuple[int, int | None]:
    """(min bytes, max bytes or None) in which the fused path pays for ``fmt`` (the auto window)."""
    f = resolve_format(fmt)
    lo = DEFAULT_FUSED_MIN_BYTES if capturing else EAGER_FUSED_MIN_BYTES
    return lo, FUSED_MAX_BYTES.get(str(f)) if f is not None else None

SITE_KINDS = ("attn", "mlp")
_FILE_KIND = "qformats-tp-policy"
_VERSION = 1

# What the row-parallel projections (the all-reduce sites) are called inside one decoder layer
# of the model families we know; tp.hf finds them by these names, Site.of infers a kind from them.
ATTN_OUTPUTS = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, Granite, ...
    "attn.c_proj",  # GPT-2, StarCoder (GPTBigCode)
    "attention.dense",  # GPT-NeoX / Pythia
    "self_attention.dense",  # Falcon, Bloom
    "self_attn.dense",  # Phi-1/1.5/2
    "attn.out_proj",  # GPT-J
    "self_attn.out_proj",  # OPT
    "attn.o_proj",
    "attention.o_proj",
    "attention.wo",  # gpt-fast, torchtitan (DTensor styles: tp.styles.bind_sites reads it)
)
MLP_OUTPUTS = (
    "mlp.down_proj",  # Llama family, Qwen, Gemma, Phi-3, OLMo
    "mlp.c_proj",  # GPT-2, StarCoder
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, Bloom
    "mlp.fc2",  # Phi-1/1.5/2
    "mlp.fc_out",  # GPT-J
    "fc2",  # OPT
    "feed_forward.w2",
)


def _kind_of(module: str) -> Optional[str]:
    for kind, names in (("attn", ATTN_OUTPUTS), ("mlp", MLP_OUTPUTS)):
        if any(module == n or module.endswith("." + n) for n in names):
            return kind
    return None


def _layer_of(module: str) -> Optional[int]:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(m[1]) if m else None


@dataclass(frozen=True)
class Site:
    """One collective call site, as a policy sees it.

    ``module``: the dotted path of the module that issues it (``"model.layers.3.mlp.down_proj"``;
    ``""`` when unknown). ``layer``: its decoder-layer index, of ``num_layers`` (None when
    unknown: layer rules do not match then). ``kind``: ``"attn"`` (attention output), ``"mlp"``
    (MLP output) or None. ``op``: ``"all_reduce"`` or ``"all_gather"``. ``producer``: the
    module that computed the collective's input where it may differ from ``module`` (compiled
    graphs: ``all_reduce(self.down_proj(h))`` written in the block's forward); module globs
    match either.
    """

    module: str = ""
    layer: Optional[int] = None
    num_layers: Optional[int] = None
    kind: Optional[str] = None
    op: str = "all_reduce"
    producer: Optional[str] = None

    def __post_init__(self):
        if self.kind is not None and self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; valid: {', '.join(SITE_KINDS)}")

    def __str__(self) -> str:
        return f"{self.op} at {self.module or 'an unknown module'}"

    @staticmethod
    def of(module: str, num_layers: Optional[int] = None, op: str = "all_reduce") -> "Site":
        """The site of a module path: the layer is its first integer component, the kind is read
        off its last names (:data:`ATTN_OUTPUTS`, :data:`MLP_OUTPUTS`)."""
        return Site(module, _layer_of(module), num_layers, _kind_of(module), op)


@dataclass(frozen=True)
class Decision:
    """What one collective does, as :meth:`CommPolicy.decide` answers it.

    ``fmt``: the (first-hop) format, None where the call stays plain; ``why``: the reason it stays
    plain (``""`` when compressed); ``second_fmt``: two_shot's second-hop format (``fmt`` when it
    has none of its own; None when plain); ``algorithm``: the policy's; ``path``: ``"plain"``
    (the backend's all-reduce), ``"nccl"`` (the compressed collective over the backend) or
    ``"fused"`` (the symmetric-memory kernels, inside their measured window on CUDA).
    Unpacks as the pair ``fmt, why = policy.decide(site)``.
    """

    fmt: Optional[Format] = None
    why: str = ""
    second_fmt: Optional[Format] = None
    algorithm: str = "gather"
    path: str = "plain"

    def __iter__(self):
        return iter((self.fmt, self.why))


class PolicyError(ValueError, TypeError):
    """A policy field of the wrong type or value; the message names the field.

    One validation path: :class:`Rule` and :class:`CommPolicy` check their fields when built,
    and :meth:`CommPolicy.from_dict` (so every file loader) builds them from the raw JSON values,
    converting nothing first. Both a ValueError and a TypeError, so either ``except`` catches it.
    """


def _int(v, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PolicyError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
    if minimum is not None and v < minimum:
        raise PolicyError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{name} must be true or false, got {v!r} ({type(v).__name__})")
    return v


def _str(v, name: str) -> str:
    if not isinstance(v, str):
        raise PolicyError(f"{name} must be a string, got {v!r} ({type(v).__name__})")
    return v


def _format(v, name: str) -> Optional[Format]:
    if not (v is None or isinstance(v, (str, Format))):
        raise PolicyError(f"{name} must be a format string or null, got {v!r} ({type(v).__name__})")
    try:
        return resolve_format(v)
    except ValueError as e:
        raise PolicyError(f"{name}: {e}") from None


def _modules(v) -> tuple:
    if isinstance(v, str):
        raise PolicyError(f"modules must be a list of glob patterns, got the string {v!r} "
                          f"(one pattern is [{v!r}])")
    if not isinstance(v, (list, tuple)):
        raise PolicyError(f"modules must be a list of glob patterns, got {v!r} ({type(v).__name__})")
    for i, m in enumerate(v):
        if not isinstance(m, str):  # ("" is a pattern too: it names the root module)
            raise PolicyError(f"modules[{i}] must be a glob pattern string, got {m!r}")
    return tuple(v)


def _kind(v) -> Optional[str]:
    if v is not None and (not isinstance(v, str) or v not in SITE_KINDS):
        raise PolicyError(f"unknown site kind {v!r}; valid: {', '.join(SITE_KINDS)} or null (both)")
    return v


def _pair(layers) -> Optional[tuple]:
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)) or len(layers) != 2:
        raise PolicyError(f"layers must be (start, stop) or None, got {layers!r}")
    start, stop = layers
    if isinstance(start, bool) or not isinstance(start, int) or not (
            stop is None or (isinstance(stop, int) and not isinstance(stop, bool))):
        raise PolicyError(f"layers (start, stop) must be integers (stop may be None: the end), got {layers!r}")
    return start, stop


@dataclass(frozen=True)
class Rule:
    """Collectives at sites that match every given selector use ``fmt`` (None: the plain one).

    ``modules``: glob patterns on :attr:`Site.module`, any one matches (``()``: every module).
    ``layers``: ``(start, stop)``, the layers ``start <= layer < stop``; negatives count from the
    end and ``stop=None`` is the end (None: every layer). ``kind``: ``"attn"`` or ``"mlp"``
    (None: both). ``label``: why, for reports (``"first/last skipped"``).
    """

    fmt: Optional[Format] = None
    modules: tuple = ()
    layers: Optional[tuple] = None
    kind: Optional[str] = None
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "fmt", _format(self.fmt, "fmt"))
        object.__setattr__(self, "modules", _modules(self.modules))
        object.__setattr__(self, "layers", _pair(self.layers))
        _kind(self.kind)
        _str(self.label, "label")

    def layer_range(self, num_layers: int) -> range:
        """The layers this rule's ``layers`` select in a model of ``num_layers`` (clamped)."""
        start, stop = self.layers
        start = start + num_layers if start < 0 else start
        stop = num_layers if stop is None else (stop + num_layers if stop < 0 else stop)
        return range(max(0, start), min(num_layers, stop))

    def matches(self, site: Site) -> bool:
        if self.kind is not None and site.kind != self.kind:
            return False
        if self.modules and not any(fnmatch.fnmatchcase(m, p) for p in self.modules
                                    for m in (site.module, site.producer) if m is not None):
            return False
        if self.layers is not None:
            if site.layer is None or site.num_layers is None:
                return False
            return site.layer in self.layer_range(site.num_layers)
        return True

    def to_dict(self) -> dict:
        return {"fmt": _fmt_str(self.fmt), "modules": list(self.modules),
                "layers": list(self.layers) if self.layers is not None else None,
                "kind": self.kind, "label": self.label}


def _fmt_str(f) -> Optional[str]:
    return None if f is None else str(f)


def skip_ends(first: int = 0, last: int = 0) -> tuple:
    """Rules that leave the first ``first`` and the last ``last`` layers uncompressed (the ends of
    the network are the most sensitive to quantisation error)."""
    for name, v in (("skip_first", first), ("skip_last", last)):
        _int(v, name, 0)
    rules = []
    if first:
        rules.append(Rule(None, layers=(0, first), label="first/last skipped"))
    if last:
        rules.append(Rule(None, layers=(-last, None), label="first/last skipped"))
    return tuple(rules)


@dataclass(frozen=True)
class CommPolicy:
    """Which collective gets which format; one frozen value (hashable, printable, JSON).

    Args:
        fmt: the default format (a Format, a preset name, a canonical string) or None (plain).
        algorithm: ``"gather"``, ``"two_shot"`` or ``"fused"`` (:data:`tp.ALGORITHMS`).
        min_bytes: messages smaller than this stay plain: a compressed collective's fixed costs
            (encode/decode launches, a second round trip for two_shot) outweigh the bytes saved
            on small decode-step messages.
        rules: :class:`Rule` overrides, in order; the first that matches a site decides.
        second_fmt: two_shot's second hop: the format the reduced sum (up to W times larger
            than each partial) travels in at every compressed site; None, the default, is the
            site's first-hop format. With ``algorithm="two_shot"``, or ``"fused"`` where it runs
            two_shot (W >= 4; at W <= 3 it is the one-shot gather: ValueError when called);
            gather has no second hop (ValueError).
        all_gather: the compile pass also compresses all-gathers (the layers never do).
        choose: ``choose(site) -> format or None`` decides alone, for what rules cannot say
            (compile pass only; it has no JSON form and is not compared).

    Decisions, in order: ``choose``; all-gathers stay plain unless ``all_gather``; messages
    under ``min_bytes`` stay plain; the first matching rule's format; ``fmt``.
    """

    fmt: Optional[Format] = None
    algorithm: str = "gather"
    min_bytes: int = DEFAULT_MIN_BYTES
    rules: tuple = ()
    second_fmt: Optional[Format] = None
    all_gather: bool = False
    choose: Optional[Callable[[Site], object]] = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "fmt", _format(self.fmt, "fmt"))
        _str(self.algorithm, "algorithm")
        try:
            check_algorithm(self.algorithm)
        except ValueError as e:
            raise PolicyError(str(e)) from None
        _int(self.min_bytes, "min_bytes", 0)
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"rules must be a list of tp.Rule values, got {type(self.rules).__name__}")
        rules = tuple(self.rules)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise PolicyError(f"rules[{i}] must be a tp.Rule, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)
        second = _format(self.second_fmt, "second_fmt")
        object.__setattr__(self, "second_fmt", second)
        _bool(self.all_gather, "all_gather")
        if second is not None and self.algorithm == "gather":
            second_hop(None, second, self.algorithm)  # raises: gather has no second hop
        if self.choose is not None and not callable(self.choose):
            raise TypeError(f"choose must be callable (Site -> format or None), got {type(self.choose).__name__}")

    # -- deciding ------------------------------------------------------------------------------
    def decide(self, site, nbytes: Optional[int] = None, device=None, world: Optional[int] = None) -> Decision:
        """The one decision: whether the collective at ``site`` is compressed, with which format and
        second hop, by which algorithm and path (:class:`Decision`).

        ``site``: a :class:`Site` or a module path; ``nbytes``: the message size when known (else
        the size floor is left to the collective, which gets ``min_bytes``); ``device`` (a
        torch.device or its type), when given, decides the path: ``"fused"`` for the fused
        algorithm on CUDA inside :func:`fused_window` (outside it: plain, as a ``FusedAllReduce``
        with ``min_bytes=None`` does), else ``"nccl"``; ``world``, when known,
        resolves ``"fused"``'s second hop as :func:`tp.comm.call.second_hop` does.

        The ladder, in order: ``choose``; all-gathers stay plain unless ``all_gather``; messages
        under ``min_bytes`` stay plain (:func:`tp.comm.collectives.below_floor`); the first
        matching rule's format; ``fmt``. Costs a scan of the rules: callers on a hot path keep the
        answer per site (and size)."""
        f, why = self._format_at(site, nbytes)
        if f is None:
            if world is not None and nbytes is not None and below_floor(nbytes, self.min_bytes):
                g = self._format_at(site, None)[0]  # under the floor the call is plain, but a second hop
                if g is not None:  # that cannot apply at this world size is still refused, as tp.all_reduce does
                    second_hop(g, self.second_fmt, self.algorithm, world)
            return Decision(None, why, None, self.algorithm, "plain")
        second = second_hop(f, self.second_fmt, self.algorithm, world)
        path = "nccl"
        if self.algorithm == "fused" and device is not None and getattr(device, "type", device) == "cuda":
            path = "fused"
            if nbytes is not None:
                lo, hi = fused_window(f, torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
                if below_floor(nbytes, lo) or (hi is not None and nbytes > hi):
                    return Decision(None, f"outside the fused window [{lo}, {hi}] B", None, self.algorithm, "plain")
        return Decision(f, "", second, self.algorithm, path)

    def _format_at(self, site, nbytes: Optional[int]) -> tuple:
        if isinstance(site, str):
            site = Site.of(site)
        if self.choose is not None:
            try:
                f = resolve_format(self.choose(site))
            except ValueError as e:
                raise ValueError(f"policy.choose returned an unusable format for {site}: {e}") from None
            return (f, "") if f is not None else (None, "policy.choose")
        if site.op == "all_gather" and not self.all_gather:
            return None, "all_gather off"
        if nbytes is not None and below_floor(nbytes, self.min_bytes):
            return None, f"< {self.min_bytes} B"
        for r in self.rules:
            if r.matches(site):
                return (r.fmt, "") if r.fmt is not None else (None, r.label or "rule")
        return (self.fmt, "") if self.fmt is not None else (None, "no format")

    def format_for(self, site) -> Optional[Format]:
        """The format of the collective at ``site`` (a :class:`Site` or module path); None: plain."""
        return self._format_at(site, None)[0]

    def second_for(self, fmt: Optional[Format], algorithm: Optional[str] = None) -> Optional[Format]:
        """The second-hop format of an all-reduce this policy compresses with ``fmt`` under
        ``algorithm`` (default: the policy's): ``second_fmt``, or ``fmt`` when that is None;
        None for a plain call. Raises like :func:`tp.all_reduce` where it cannot apply."""
        if fmt is None:
            return None
        return second_hop(fmt, self.second_fmt, algorithm or self.algorithm)

    @property
    def reads_modules(self) -> bool:
        """Whether decisions can depend on module paths: in a compiled graph those are node
        metadata that inductor's cache key lacks (module globs, and the layers and kinds read
        off the paths), so ``tp.compile`` keys its cache on them then."""
        return self.choose is not None or any(r.modules or r.layers is not None or r.kind for r in self.rules)

    def formats(self) -> tuple:
        """Every format this policy can choose (the default's, the rules', the second hop's), each once."""
        return tuple(dict.fromkeys(f for f in (self.fmt, *(r.fmt for r in self.rules), self.second_fmt)
                                   if f is not None))

    def unmatched_rules(self, sites) -> list:
        """``[(index, rule)]`` of the rules with a selector (modules, layers or kind) that match none
        of ``sites`` (:class:`Site` values, or module paths): they change nothing there."""
        sites = [Site.of(s) if isinstance(s, str) else s for s in sites]
        return [(i, r) for i, r in enumerate(self.rules)
                if (r.modules or r.layers is not None or r.kind is not None) and not any(r.matches(s) for s in sites)]

    def warn_unmatched(self, sites, where: str) -> None:
        """Warn (UserWarning) for every rule that matches none of ``sites`` of ``where``: without it a
        typo in a module glob leaves those collectives silently on the default format."""
        sites = list(sites)
        for i, r in self.unmatched_rules(sites):
            what = ", ".join(f"{k}={v!r}" for k, v in (("modules", list(r.modules)), ("layers", r.layers),
                                                       ("kind", r.kind), ("label", r.label)) if v)
            warnings.warn(f"policy rule {i} ({what}; fmt={_fmt_str(r.fmt)}) matches none of the {len(sites)} "
                          f"collective sites of {where}: it changes nothing there (a typo in a module glob?)",
                          UserWarning, stacklevel=3)

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError for a layer rule that selects no layer of a ``num_layers``-layer model."""
        for r in self.rules:
            if r.layers is not None and not r.layer_range(num_layers):
                raise ValueError(f"rule {r.label or r.layers}: layers {r.layers} out of range for a "
                                 f"{num_layers}-layer model")

    # -- building ------------------------------------------------------------------------------
    def with_calibration(self, calibration) -> "CommPolicy":
        """This policy with every calibrated site using its outlier format (``tp.calibrate``: static
        scales, or dynamic block scales after ``Calibration.with_rest``).

        The calibration replaces the default format at its sites: its rules go after the existing
        ones, so skip and kind rules still apply."""
        extra = tuple(Rule(calibration.format(s), modules=(s,), label="calibrated") for s in calibration.sites)
        return CommPolicy(self.fmt, self.algorithm, self.min_bytes, self.rules + extra, self.second_fmt,
                          self.all_gather, self.choose)

    def replace(self, **changes) -> "CommPolicy":
        """A copy with ``changes`` (field name -> value), validated like a new policy."""
        d = {f: getattr(self, f) for f in ("fmt", "algorithm", "min_bytes", "rules", "second_fmt", "all_gather", "choose")}
        d.update(changes)
        return CommPolicy(**d)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The policy as JSON-ready data (formats as canonical strings)."""
        if self.choose is not None:
            raise ValueError("a policy with choose= has no JSON form (a callable cannot be written)")
        return {"kind": _FILE_KIND, "version": _VERSION, "fmt": _fmt_str(self.fmt), "algorithm": self.algorithm,
                "min_bytes": self.min_bytes, "second_fmt": _fmt_str(self.second_fmt), "all_gather": self.all_gather,
                "rules": [r.to_dict() for r in self.rules]}

    @staticmethod
    def from_dict(d: dict) -> "CommPolicy":
        """The policy of :meth:`to_dict`'s data, checked field by field (:class:`PolicyError`
        names the field); raw values go to :class:`Rule` and :class:`CommPolicy` unconverted."""
        if not isinstance(d, dict) or d.get("kind") != _FILE_KIND or d.get("version") != _VERSION:
            got = (d.get("kind"), d.get("version")) if isinstance(d, dict) else type(d).__name__
            raise PolicyError(f"not a {_FILE_KIND} v{_VERSION} document (got {got})")
        # tuned_for: what qformats tune priced the policy for (device, link, step); read by
        # tp.study.tune.read_tuned_for, passed over here
        known = {"kind", "version", "fmt", "algorithm", "min_bytes", "second_fmt", "all_gather", "rules", "tuned_for"}
        extra = set(d) - known
        if extra:
            raise PolicyError(f"unknown policy fields {sorted(extra)}; valid: {sorted(known)}")
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise PolicyError(f"rules must be a list of rule objects, got {type(raw_rules).__name__}")
        rules = []
        rule_fields = {"fmt", "modules", "layers", "kind", "label"}
        for i, r in enumerate(raw_rules):
            if not isinstance(r, dict):
                raise PolicyError(f"rule {i}: must be an object with fields {sorted(rule_fields)}, "
                                  f"got {type(r).__name__}")
            bad = set(r) - rule_fields
            if bad:
                raise PolicyError(f"rule {i}: unknown fields {sorted(bad)}")
            try:
                rules.append(Rule(**r))
            except ValueError as e:
                raise PolicyError(f"rule {i}: {e}") from None
        try:
            return CommPolicy(**{k: d[k] for k in ("fmt", "algorithm", "min_bytes", "second_fmt", "all_gather")
                                 if k in d}, rules=tuple(rules))
        except PolicyError:
            raise
        except ValueError as e:
            raise PolicyError(str(e)) from None

    def to_string(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_string(text: str) -> "CommPolicy":
        """Parse :meth:`to_string`'s JSON."""
        if not isinstance(text, str):
            raise PolicyError(f"a policy is a JSON document (a str), got {type(text).__name__}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"a policy is a JSON document ({e})") from None
        except RecursionError:
            raise PolicyError("a policy is a JSON document; this one is nested too deeply to be one") from None
        return CommPolicy.from_dict(d)

    def to_file(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_string() + "\n")

    @staticmethod
    def from_file(path) -> "CommPolicy":
        with open(path) as f:
            return CommPolicy.from_string(f.read())

    @staticmethod
    def load(policy) -> "CommPolicy":
        """``policy`` itself, or the policy in the file at ``policy`` (a str or os.PathLike path,
        e.g. ``qformats tune``'s output); what the consumers that take a policy accept."""
        if isinstance(policy, CommPolicy):
            return policy
        if isinstance(policy, (str, os.PathLike)):
            try:
                return CommPolicy.from_file(policy)
            except OSError as e:
                raise ValueError(f"policy file {os.fspath(policy)!r}: {e.strerror or e}") from None
            except ValueError as e:
                raise ValueError(f"policy file {os.fspath(policy)!r}: {e}") from None
        raise TypeError(f"policy must be a tp.CommPolicy or a policy file's path, got {type(policy).__name__}")

    def fingerprint(self) -> Optional[str]:
        """A stable string of everything that decides; None if ``choose`` has no source."""
        chooser = ""
        if self.choose is not None:
            try:
                chooser = getattr(self.choose, "__qualname__", "") + inspect.getsource(self.choose)
            except (OSError, TypeError):
                return None  # a lambda typed at a prompt, a C function: no stable identity
        return repr((self.replace(choose=None).to_dict(), chooser))

    def __str__(self) -> str:
        parts = [f"fmt={self.fmt}", f"algorithm={self.algorithm}", f"min_bytes={self.min_bytes}"]
        if self.second_fmt is not None:
            parts.insert(2, f"second_fmt={self.second_fmt}")
        if self.rules:
            parts.append(f"{len(self.rules)} rules")
        return ", ".join(parts)


def CollectivePolicy(fmt=None, algorithm: str = "gather", min_bytes: int = DEFAULT_MIN_BYTES, skip_first: int = 0,
                     skip_last: int = 0, modules: tuple = (), all_gather: bool = False, choose=None) -> CommPolicy:
    """``tp.compile``'s spelling of a :class:`CommPolicy`: ``fmt`` for the call sites whose module
    matches one of ``modules`` (every site when empty), except the first ``skip_first`` and last
    ``skip_last`` layers (in a compiled graph: positions, see :mod:`tp.comm.passes`)."""
    modules = _modules(modules)
    rules = skip_ends(skip_first, skip_last)
    if modules:
        rules += (Rule(fmt, modules=tuple(modules)), Rule(None, label="module not selected"))
    return CommPolicy(fmt, algorithm, min_bytes, rules, None, all_gather, choose)
