"""The statistics of ``qformats eval`` and ``qformats tune``: per-window scores against the
baseline, their totals and metrics, paired bootstrap intervals over windows, verdicts against
the quality targets and Pareto fronts.

Windows are the sampling unit (they come from different documents). The confidence intervals
are percentile bootstraps that resample windows with replacement, the same windows for the
configuration and the baseline (paired), so they cover which text was drawn, not other
sources of variation. With fewer than 2 windows there is no interval.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import torch

__all__ = [
    "TARGETS_PCT",
    "CONFIDENCE",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "MIN_WINDOWS_FOR_CI",
    "FEW_WINDOWS",
    "WindowScore",
    "compare_logits",
    "total",
    "metrics",
    "bootstrap_ci",
    "kl_ratio_ci",
    "verdict",
    "pareto_front",
]

# The papers' quality targets (perplexity change in %): reference lines and verdicts.
TARGETS_PCT = (1.0, 3.0)
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclasses.dataclass
class WindowScore:
    """Sums over scored positions (add them across windows, then :func:`metrics`)."""

    nll: float = 0.0  # sum of -log p(target)
    kl: float = 0.0  # sum of KL(p_base || p) in nats
    agree: int = 0  # positions whose argmax equals the baseline's argmax
    tokens: int = 0

    def __iadd__(self, other: "WindowScore") -> "WindowScore":
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens
        return self


def compare_logits(base_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> WindowScore:
    """Score one window. ``base_logp``: [N, V] log-softmax of the baseline at
    the N scored positions; ``logits``: [N, V] of the configuration under test
    at the same positions; ``targets``: [N] next tokens. Sums in float64."""
    if base_logp.shape != logits.shape or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: base {tuple(base_logp.shape)}, logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    logp = torch.log_softmax(logits.double(), dim=-1)
    base = base_logp.double()
    nll = -logp.gather(-1, targets[:, None].long()).sum()
    kl = (base.exp() * (base - logp)).sum()
    agree = (base.argmax(-1) == logp.argmax(-1)).sum()
    return WindowScore(float(nll), float(kl), int(agree), int(targets.numel()))


def total(scores: Iterable[WindowScore]) -> WindowScore:
    """The sum of window scores (what :func:`metrics` takes)."""
    acc = WindowScore()
    for s in scores:
        acc += s
    return acc


def metrics(score: WindowScore, baseline: WindowScore) -> dict:
    """Perplexity, its change vs. the baseline in %, mean KL and top-1 agreement."""
    if score.tokens == 0 or score.tokens != baseline.tokens:
        raise ValueError(f"scored {score.tokens} tokens vs. baseline {baseline.tokens}")
    ppl = math.exp(score.nll / score.tokens) if math.isfinite(score.nll) else float("nan")
    base = math.exp(baseline.nll / baseline.tokens)
    return {
        "perplexity": ppl,
        "baseline_perplexity": base,
        "ppl_change_pct": 100.0 * (ppl / base - 1.0),
        "kl": score.kl / score.tokens,
        "top1_agreement": score.agree / score.tokens,
        "tokens": score.tokens,
    }


def bootstrap_ci(baseline: Sequence[WindowScore], scores: Sequence[WindowScore], level: float = CONFIDENCE,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Paired percentile-bootstrap intervals over windows for the perplexity
    change (%), the mean KL and the top-1 agreement:
    ``{"ppl_change_pct": (lo, hi), "kl": (lo, hi), "top1_agreement": (lo, hi)}``.

    ``baseline[i]`` and ``scores[i]`` are the same window. Each resample draws
    windows with replacement and recomputes both statistics exactly as
    :func:`metrics` does on the drawn windows. ``None`` with fewer than 2
    windows. Deterministic for a given ``seed``; costs O(resamples x windows)."""
    import numpy as np

    if len(baseline) != len(scores):
        raise ValueError(f"{len(scores)} windows scored vs. {len(baseline)} for the baseline")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(scores)
    if n < 2:
        return None
    nb = np.array([s.nll for s in baseline], dtype=np.float64)
    nc = np.array([s.nll for s in scores], dtype=np.float64)
    kl = np.array([s.kl for s in scores], dtype=np.float64)
    agree = np.array([s.agree for s in scores], dtype=np.float64)
    tok = np.array([s.tokens for s in scores], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    t = tok[idx].sum(1)
    with np.errstate(over="ignore", invalid="ignore"):
        ppl = 100.0 * np.expm1((nc[idx].sum(1) - nb[idx].sum(1)) / t)
        klm = kl[idx].sum(1) / t
        top1 = agree[idx].sum(1) / t
    q = ((1 - level) / 2, 1 - (1 - level) / 2)

    def interval(v):
        if not np.all(np.isfinite(v)):
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(v, q)
        return (float(lo), float(hi))

    return {"ppl_change_pct": interval(ppl), "kl": interval(klm), "top1_agreement": interval(top1)}


def verdict(ci: Sequence[float] | None, targets: Sequence[float] = TARGETS_PCT) -> str:
    """Where a perplexity-change interval lies against both targets, always naming both:
    "within 1%" (the interval lies below the small target, hence below both), "within 3%, not 1%",
    "within 3%, unresolved vs 1%", "over 1%, unresolved vs 3%", "over 3%" (hence over both), or
    "unresolved vs 1% and 3%" (the interval straddles both); "-" without an interval."""
    if ci is None or not all(math.isfinite(v) for v in ci):
        return "-"
    lo, hi = ci
    small, large = (f"{t:g}%" for t in targets)
    if hi < targets[0]:
        return f"within {small}"
    if lo >= targets[1]:
        return f"over {large}"
    if hi < targets[1]:
        return f"within {large}, not {small}" if lo >= targets[0] else f"within {large}, unresolved vs {small}"
    if lo >= targets[0]:
        return f"over {small}, unresolved vs {large}"
    return f"unresolved vs {small} and {large}"


# Below this many windows a 95% percentile bootstrap over windows is too coarse to trust (its
# tails are a handful of resamples' extremes): the table says so and the verdicts are marked.
MIN_WINDOWS_FOR_CI = 16
FEW_WINDOWS = "few windows"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bits, loss) that no other point beats on both (<= on both, < on
    one), sorted by bits: the cheapest loss at each wire size."""
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    front = [i for i in finite if not any(
        points[j][0] <= points[i][0] and points[j][1] <= points[i][1] and points[j] != points[i] for j in finite)]
    return sorted(front, key=lambda i: points[i])



def kl_ratio_ci(a: Sequence, b: Sequence, level: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean KL of ``a`` over that of ``b`` (window scores of the same windows, e.g. two_shot vs
    gather, TP=2 vs TP=8) with a paired percentile-bootstrap interval over windows, resampled as
    :func:`bootstrap_ci` does: ``{"ratio": r, "ci": (lo, hi)}``."""
    import numpy as np

    if len(a) != len(b) or len(a) < 2 or any(x.tokens != y.tokens for x, y in zip(a, b)):
        raise ValueError(f"need the same >= 2 windows on both sides, got {len(a)} and {len(b)}")
    ka, kb = (np.array([s.kl for s in v], dtype=np.float64) for v in (a, b))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = ka[idx].sum(1) / kb[idx].sum(1)
    lo, hi = np.quantile(ratios, ((1 - level) / 2, 1 - (1 - level) / 2))
    return {"ratio": float(ka.sum() / kb.sum()), "ci": (float(lo), float(hi))}
