"""Outlier calibration for the static outlier-aware format (Dong et al., arXiv 2411.07942).

Use it once per model and TP size, before serving: run ~256 calibration sequences through
the TP model (uncompressed), and get per all-reduce site the features that travel in bf16
and the fixed INT4 scales of the rest. The result is a small JSON file; its formats
(``qformats.static_outlier_format``) plug into ``tp.all_reduce`` / :class:`tp.CommPolicy`
like any other format and cost ~4 + 16/64 = 4.25 bits per value plus nothing per block.

What is computed, per site (a row-parallel layer's output) and per rank:

1. ``range[r, e]``: an exponential moving average over calibration batches of
   ``max |partial_r[..., e]|`` (the batch's per-feature absolute max of rank r's partial sum),
   ``ema = momentum * ema + (1 - momentum) * batch_max``, the first batch taken as is.
2. Aggregation across ranks: ``agg[e] = sum_r range[r, e]``. A sum of per-rank ranges bounds
   the range of the reduced value (|sum_r x_r| <= sum_r |x_r|), which is what the outlier
   features of the model are about, and it does not depend on which rank computed what.
3. Outliers: the k = floor(E / 64) features (``k`` configurable) with the largest ``agg``
   (ties broken toward the lower index).
4. Static scales of the other features: ``scale[e] = range_used[e] / max_normal(elem)`` in fp32,
   where ``range_used`` is ``max_r range[r, e]`` (``scale_from="max"``, default) or ``agg[e]``
   (``"sum"``). "max" fits what the ``gather`` algorithm quantises (each rank's own partial);
   "sum" also covers the reduced value ``two_shot`` re-quantises, at twice the step for W=2.
   Values beyond the range saturate. A feature that was exactly zero in calibration gets the
   site's smallest non-zero scale (a scale must be positive).
5. Optional clipping (``clip=c``): ``range_used = min(range_used, c * rms_used)`` where
   ``rms`` is the EMA of the per-feature root mean square (per rank; max over ranks, or the
   root of the summed mean squares for ``"sum"``). A static scale set by the largest value
   ever seen leaves typical values only a few of INT4's 15 levels; clipping at a few RMS
   trades rare saturation for resolution (the ACIQ argument of Banner et al., 2019, whose
   MSE-optimal clip for 4-bit Gaussian data is ~2.5 sigma).

The same outliers can go with dynamic block scales for the other features instead of the static
ones (:meth:`Calibration.with_rest`, e.g. ``int4/b64/bf16`` or ``int4/b64/bf16+h32``): each site's
format is then that block format with the site's ``+o[...]``. The selection (steps 1-3) does not
depend on the scales, so every variant of one calibration sends the same features in bf16.
The outlier indices are part of each site's format, fixed at calibration and known to every
rank: the wire carries only their bf16 values (16 bits each), no index.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

import qformats
from qformats import Element

from ..comm.collectives import DEFAULT_MIN_BYTES
from ..comm.policy import CommPolicy

__all__ = ["Calibration", "Calibrator", "SiteCalibration", "calibrate"]

_FILE_KIND = "qformats-tp-calibration"
_VERSION = 2  # 2: "rest" (dynamic block format of the non-outlier features)
_READS = (1, 2)


class Calibrator:
    """Collects the per-rank EMA of per-feature ranges at each site. See the module docstring.

    ``observe`` costs one abs-max reduction over the partial and a copy of E floats to the
    CPU; keep the calibrator outside timed runs.
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self._ema: dict[str, dict[int, torch.Tensor]] = {}
        self._ms: dict[str, dict[int, torch.Tensor]] = {}  # EMA of the per-feature mean square
        self._n: dict[str, dict[int, int]] = {}

    def observe(self, site: str, rank: int, partial: torch.Tensor) -> None:
        """Record one batch of rank ``rank``'s partial output at ``site`` (shape [..., E])."""
        if partial.dim() == 0 or partial.numel() == 0:
            raise ValueError(f"{site}: an empty or scalar partial output cannot be calibrated")
        flat = partial.detach().reshape(-1, partial.shape[-1]).float()
        batch_max = flat.abs().amax(0).cpu()
        batch_ms = flat.square().mean(0).cpu()
        if not torch.isfinite(batch_max).all():
            raise ValueError(f"{site}: rank {rank}'s partial output has NaN/Inf; calibration needs finite values")
        ema = self._ema.setdefault(site, {})
        ms = self._ms.setdefault(site, {})
        n = self._n.setdefault(site, {})
        if rank in ema:
            if ema[rank].shape != batch_max.shape:
                raise ValueError(f"{site}: rank {rank} had {ema[rank].numel()} features, now {batch_max.numel()}")
            ema[rank] = self.momentum * ema[rank] + (1.0 - self.momentum) * batch_max
            ms[rank] = self.momentum * ms[rank] + (1.0 - self.momentum) * batch_ms
        else:
            ema[rank] = batch_max
            ms[rank] = batch_ms
        n[rank] = n.get(rank, 0) + 1

    @property
    def sites(self) -> list[str]:
        return list(self._ema)

    def ranges(self, site: str) -> torch.Tensor:
        """[W, E] fp32 per-rank EMA ranges of ``site`` (ranks 0..W-1 must all have been observed)."""
        if site not in self._ema:
            raise KeyError(f"no observations for site {site!r}; observed: {', '.join(self._ema) or 'none'}")
        ema = self._ema[site]
        w = max(ema) + 1
        missing = [r for r in range(w) if r not in ema]
        if missing:
            raise ValueError(
                f"{site}: ranks {missing} were never observed; in a distributed run call "
                f"Calibrator.gather() so every rank's statistics are merged"
            )
        return torch.stack([ema[r] for r in range(w)])

    def mean_squares(self, site: str) -> torch.Tensor:
        """[W, E] fp32 per-rank EMA of the per-feature mean square of ``site``."""
        self.ranges(site)  # same checks
        return torch.stack([self._ms[site][r] for r in range(len(self._ms[site]))])

    # -- distributed ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"momentum": self.momentum,
                "sites": {s: {r: (t.tolist(), self._n[s][r], self._ms[s][r].tolist()) for r, t in d.items()}
                          for s, d in self._ema.items()}}

    def merge(self, state: dict) -> None:
        """Add another calibrator's observations (other ranks); a (site, rank) seen twice is an error."""
        for s, d in state["sites"].items():
            for r, (vals, n, ms) in d.items():
                r = int(r)
                if r in self._ema.get(s, {}):
                    raise ValueError(f"{s}: rank {r} observed by two calibrators")
                self._ema.setdefault(s, {})[r] = torch.tensor(vals, dtype=torch.float32)
                self._ms.setdefault(s, {})[r] = torch.tensor(ms, dtype=torch.float32)
                self._n.setdefault(s, {})[r] = n

    def gather(self, group=None) -> "Calibrator":
        """Merge every rank's observations into every rank's calibrator (one all_gather_object)."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state(), group=group)
        mine = dist.get_rank(group)
        for r, st in enumerate(states):
            if r != mine:
                self.merge(st)
        return self

    # -- result ------------------------------------------------------------------------------
    def finish(self, k: Optional[int] = None, elem: str = "int4", scale_from: str = "max",
               clip: Optional[float] = None) -> "Calibration":
        """Pick outliers and static scales per site (module docstring); ``k`` default floor(E/64);
        ``clip``: cap each feature's range at ``clip`` times its RMS (None: no cap)."""
        el = Element.parse(elem)
        if el.kind != "int":
            raise ValueError(f"static scales need a signed int element (int4, int8, ...), not {elem}")
        if scale_from not in ("max", "sum"):
            raise ValueError(f"scale_from must be 'max' or 'sum', got {scale_from!r}")
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive number of RMS, got {clip!r}")
        if not self._ema:
            raise ValueError("nothing observed: run calibration batches first")
        sites, world = {}, None
        for s in self._ema:
            ranges = self.ranges(s)
            if world is not None and ranges.shape[0] != world:
                raise ValueError(f"{s}: {ranges.shape[0]} ranks observed, other sites have {world}")
            world = ranges.shape[0]
            sites[s] = _select(ranges, k, el, scale_from, s, min(self._n[s].values()),
                               self.mean_squares(s) if clip is not None else None, clip)
        return Calibration(sites, str(el), scale_from, self.momentum, world, k, clip)


def _select(ranges: torch.Tensor, k: Optional[int], el: Element, scale_from: str, site: str, n: int,
            mean_squares: Optional[torch.Tensor] = None, clip: Optional[float] = None):
    e = ranges.shape[1]
    kk = e // 64 if k is None else int(k)
    if not 0 <= kk < e:
        raise ValueError(f"{site}: k = {kk} outliers out of {e} features; need 0 <= k < {e}")
    agg = ranges.sum(0)
    order = torch.sort(-agg, stable=True).indices  # largest first, lower index wins ties
    outliers = sorted(order[:kk].tolist())
    keep = torch.ones(e, dtype=torch.bool)
    keep[outliers] = False
    used = ranges.amax(0) if scale_from == "max" else agg
    if clip is not None:
        rms = mean_squares.amax(0).sqrt() if scale_from == "max" else mean_squares.sum(0).sqrt()
        used = torch.minimum(used, clip * rms)
    used = used[keep]
    scales = used / torch.tensor(el.max_normal, dtype=torch.float32)
    pos = scales[scales > 0]
    floor = pos.min() if pos.numel() else torch.tensor(1.0)
    scales = torch.where(scales > 0, scales, floor)
    return SiteCalibration(e, tuple(outliers), tuple(scales.tolist()), n)


@dataclass(frozen=True)
class SiteCalibration:
    """One site's result: ``features`` E, bf16 ``outliers`` (increasing), fp32 ``scales`` of the rest."""

    features: int
    outliers: tuple
    scales: tuple
    observations: int = 0

    def __post_init__(self):
        if len(self.outliers) + len(self.scales) != self.features:
            raise ValueError(f"{len(self.outliers)} outliers + {len(self.scales)} scales != {self.features} features")


@dataclass
class Calibration:
    """The outcome of a calibration: per site, the outlier format to use there.

    ``rest`` None: Dong et al.'s static per-feature scales for the non-outlier features; a block
    format (no outliers, no static scales): those features in it, with dynamic block scales
    (:meth:`with_rest`)."""

    sites: dict
    elem: str = "int4"
    scale_from: str = "max"
    momentum: float = 0.9
    world_size: int = 1
    k: Optional[int] = None
    clip: Optional[float] = None
    rest: Optional[qformats.Format] = None
    _formats: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.rest = rest_format(self.rest)

    def with_rest(self, rest) -> "Calibration":
        """The same outliers (and statistics) with ``rest`` for the other features: a block format
        such as ``"int4/b64/bf16+h32"`` (dynamic scales), or None for the static scales.

        Use it to compare static and dynamic scales on one calibration; it costs nothing (the
        formats are built when first asked for). The bits per value are ``rest``'s on the
        non-outlier features plus 16 per outlier (``Format.bits_per_value_at``)."""
        return dataclasses.replace(self, rest=rest, _formats={})

    def format(self, site: str):
        """The ``qformats`` outlier format of ``site`` (a Format, usable as ``fmt=``)."""
        if site not in self.sites:
            raise KeyError(f"site {site!r} was not calibrated; calibrated: {', '.join(list(self.sites)[:6])} ...")
        if site not in self._formats:
            sc = self.sites[site]
            if self.rest is None:
                f = qformats.static_outlier_format(self.elem, sc.outliers, sc.scales)
            else:
                f = dataclasses.replace(self.rest, outliers=sc.outliers)
            self._formats[site] = f
        return self._formats[site]

    def policy(self, algorithm: str = "gather", min_bytes: Optional[int] = None, fmt=None):
        """A :class:`tp.CommPolicy` using this calibration at its sites (``fmt`` elsewhere)."""
        thr = DEFAULT_MIN_BYTES if min_bytes is None else min_bytes
        return CommPolicy(fmt, algorithm, thr).with_calibration(self)

    def to_dict(self) -> dict:
        return {
            "kind": _FILE_KIND,
            "version": _VERSION,
            "elem": self.elem,
            "scale_from": self.scale_from,
            "momentum": self.momentum,
            "world_size": self.world_size,
            "k": self.k,
            "clip": self.clip,
            "rest": None if self.rest is None else str(self.rest),
            "sites": {
                s: {"features": c.features, "outliers": list(c.outliers), "scales": list(c.scales),
                    "observations": c.observations}
                for s, c in self.sites.items()
            },
        }

    def save(self, path) -> None:
        """Write JSON (floats as Python reprs: fp32 scales round-trip exactly)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)

    @staticmethod
    def from_dict(d: dict) -> "Calibration":
        if d.get("kind") != _FILE_KIND or d.get("version") not in _READS:
            raise ValueError(f"not a {_FILE_KIND} file of version {' or '.join(map(str, _READS))} "
                             f"(kind={d.get('kind')!r}, version={d.get('version')!r})")
        sites = {}
        for s, c in d["sites"].items():
            scales = tuple(float(v) for v in c["scales"])
            if not all(math.isfinite(v) and v > 0 for v in scales):
                raise ValueError(f"{s}: scales must be finite and positive")
            sites[s] = SiteCalibration(int(c["features"]), tuple(int(i) for i in c["outliers"]), scales,
                                       int(c.get("observations", 0)))
        return Calibration(sites, d["elem"], d["scale_from"], float(d["momentum"]), int(d["world_size"]), d.get("k"),
                           d.get("clip"), d.get("rest"))

    @staticmethod
    def load(path) -> "Calibration":
        with open(path) as f:
            return Calibration.from_dict(json.load(f))


def rest_format(rest) -> Optional[qformats.Format]:
    """``rest`` (a Format, spec or None) as :attr:`Calibration.rest` takes it: ValueError for a
    format that cannot carry a calibration's outliers (static scales, outliers of its own)."""
    if rest is None:
        return None
    try:
        f = qformats.need_format(rest)
    except (ValueError, TypeError) as e:
        raise ValueError(f"rest: {e}") from None
    if f.scale == "static":
        raise ValueError(f"rest {f}: static scales come from the calibration itself (rest=None)")
    if f.outliers:
        raise ValueError(f"rest {f}: the outliers come from the calibration; give the format without +o[...]")
    return f


@torch.no_grad()
def calibrate(model, batches: Iterable[torch.Tensor], calibrator: Optional[Calibrator] = None,
              momentum: float = 0.9) -> Calibrator:
    """Run ``batches`` (token ids [B, T]) through ``model`` (a :class:`tp.TPLlama`, sharded or
    emulated) with uncompressed all-reduces, observing every row-parallel partial output.

    In a distributed run every rank must call it with the same batches; the returned
    calibrator holds all ranks' statistics (merged with :meth:`Calibrator.gather`), so
    ``calibrate(...).finish()`` gives the same :class:`Calibration` on every rank.
    Costs one forward per batch plus the observation.
    """
    cal = calibrator or Calibrator(momentum)
    layers = model.row_parallel_layers()
    old = [(m.policy, m.observer) for m in layers]
    try:
        for m in layers:
            m.policy = m.policy.replace(fmt=None, rules=())
            m.observer = cal.observe
        n = 0
        for b in batches:
            model(b)
            n += 1
        if n == 0:
            raise ValueError("calibrate: no batches given")
    finally:
        for m, (p, o) in zip(layers, old):
            m.policy, m.observer = p, o
    if model.ctx.sharded:
        cal.gather(model.ctx.group)
    return cal
