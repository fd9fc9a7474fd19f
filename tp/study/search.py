"""The search space of ``qformats tune``: site groups (a site kind over a layer range, the unit
that takes one format), the exact Pareto front of an additive cost model over them, and the
policy that an assignment of formats to groups makes. ``qformats tune`` builds fronts with it,
and :func:`tp.study.front.reprice` rebuilds them from a finished tune's figures."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..comm.policy import SITE_KINDS, CommPolicy, Rule
from .hf import format_label

__all__ = [
    "SAME",
    "BITS_EPS",
    "SiteGroup",
    "default_layer_bounds",
    "make_groups",
    "additive_front",
    "prune",
    "assemble",
    "describe",
]

SAME = "same"  # a --second-formats entry: the reduced sum travels in the first hop's format
# Bits are sums of exact per-site figures; a budget holds a point that exceeds it by rounding only.
BITS_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class SiteGroup:
    """One site kind over the layers ``start <= layer < stop``: the unit the tuner assigns a format to."""

    kind: str
    start: int
    stop: int

    @property
    def label(self) -> str:
        last = self.stop - 1
        return f"{self.kind} L{self.start}" + (f"-{last}" if last != self.start else "")

    def rule(self, fmt) -> Rule:
        return Rule(fmt, layers=(self.start, self.stop), kind=self.kind, label=self.label)


def default_layer_bounds(num_layers: int) -> tuple:
    """Layer 0 alone, layers 1-2, the middle, the last 3 (the ends of a network are the most
    sensitive): the boundaries 1, 3, L-3 that fall inside the model."""
    return tuple(sorted({b for b in (1, 3, num_layers - 3) if 0 < b < num_layers}))


def make_groups(num_layers: int, bounds: Sequence[int]) -> list[SiteGroup]:
    edges = [0, *bounds, num_layers]
    if any(not isinstance(b, int) or isinstance(b, bool) for b in bounds) or any(
            a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--layer-groups: boundaries must be increasing integers strictly between 0 and "
                         f"{num_layers} (this model's layers), got {list(bounds)}")
    return [SiteGroup(k, a, b) for a, b in zip(edges, edges[1:]) for k in SITE_KINDS]


def additive_front(options: Sequence[Sequence[tuple]]) -> list[tuple]:
    """The exact Pareto front of choosing one option per group when cost and loss add up.

    ``options[g]``: ``(bits, loss, choice)`` for group g. Returns ``(bits, loss, choices)``
    (one choice per group), sorted by bits, each strictly better in loss than every cheaper
    one. Merges one group at a time and prunes to the front (the front of a sum is within the
    sum of the fronts), so the cost stays small: front size x options per group."""
    front = [(0.0, 0.0, ())]
    for g, opts in enumerate(options):
        if not opts:
            raise ValueError(f"group {g} has no options")
        front = prune([(b + ob, l + ol, ch + (c,)) for b, l, ch in front for ob, ol, c in opts])
    return front


def prune(points: list[tuple]) -> list[tuple]:
    out = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not out or p[1] < out[-1][1]:
            if out and abs(p[0] - out[-1][0]) <= BITS_EPS:  # same bits, lower loss (float ties)
                out[-1] = p
            else:
                out.append(p)
    return out


def assemble(groups, choice, algorithm: str, second) -> CommPolicy:
    """A policy for one format per group: the format covering most groups as the default, rules
    for the others (the groups partition each kind's layers, so every site is decided)."""
    counts = {}
    for f in choice:
        counts[f] = counts.get(f, 0) + 1
    default = max(counts, key=lambda f: (counts[f], -choice.index(f)))
    rules = tuple(g.rule(f) for g, f in zip(groups, choice) if f != default)
    return CommPolicy(default, algorithm, 0, rules, second)


def describe(groups, choice, names: dict) -> dict:
    """{group label: the candidate's name as given (a preset name where one was used)}."""
    return {g.label: names.get(f, format_label(f)) for g, f in zip(groups, choice)}
