"""Issue 26's measured targets for "a format is resolved once" (counted, not timed).

- A warm two_shot ``tp.all_reduce(x, "mxfp4", algorithm="two_shot", codec=LoweredCodec())``
  turns the Format into a string at most once (the torch op boundary is the only string round
  trip; tests run the ops' kernels in Triton's interpreter).
- One emulated site (``tp.emulate_all_reduce``, what ``qformats eval`` runs at each row-parallel
  projection) computes ``Format.layout`` at most twice, even for a Format value seen for the
  first time (layouts are cached on the frozen Format).

``python tests/tp/comm/test_resolve_once.py`` prints the counts.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import tp
from lowering.codec import ReferenceCodec
from lowering.ops import LoweredCodec
from lowering.torch_codec import TorchCodec
from qformats import Format
from tp.comm.emulate import emulate_all_reduce

MAX_STR = 1
MAX_LAYOUTS = 2


@contextlib.contextmanager
def counting():
    """Count ``Format.__str__`` calls (string conversions) and layout computations."""
    counts = {"str": 0, "layout": 0}
    to_str, compute = Format.__str__, Format._compute_layout

    def str_(self):
        counts["str"] += 1
        return to_str(self)

    def layout(self, shape):
        counts["layout"] += 1
        return compute(self, shape)

    Format.__str__, Format._compute_layout = str_, layout
    try:
        yield counts
    finally:
        Format.__str__, Format._compute_layout = to_str, compute


def warm_all_reduce_counts(algorithm: str = "two_shot") -> dict:
    x = torch.randn(64, 256)
    codec = LoweredCodec()
    tp.all_reduce(x, "mxfp4", algorithm=algorithm, codec=codec)  # warm: caches filled
    with counting() as c:
        tp.all_reduce(x, "mxfp4", algorithm=algorithm, codec=codec)
    return c


def _rank_counts(rank: int, world: int, algorithm: str) -> dict:
    return warm_all_reduce_counts(algorithm)


def emulated_site_counts(codec, algorithm: str, world: int) -> dict:
    fmt = dataclasses.replace(Format.parse("mxfp4"))  # an equal Format value with empty caches
    shards = [torch.randn(6, 256) for _ in range(world)]
    with counting() as c:
        emulate_all_reduce(shards, fmt, algorithm, codec=codec)
    return c


def test_warm_two_shot_all_reduce_converts_the_format_at_most_once():
    assert warm_all_reduce_counts()["str"] <= MAX_STR


def test_warm_two_shot_all_reduce_on_two_ranks_converts_the_format_at_most_once():
    """On gloo ranks the wire headers name the format: that is the one conversion."""
    from tests.tp.multirank import run_ranks

    for c in run_ranks(_rank_counts, 2, "two_shot"):
        assert c["str"] <= MAX_STR and c["layout"] == 0, c


@pytest.mark.parametrize("codec", [ReferenceCodec(), TorchCodec(), LoweredCodec()], ids=lambda c: c.name)
@pytest.mark.parametrize("algorithm", ["gather", "two_shot"])
@pytest.mark.parametrize("world", [2, 4])
def test_an_emulated_site_computes_at_most_two_layouts(codec, algorithm, world):
    assert emulated_site_counts(codec, algorithm, world)["layout"] <= MAX_LAYOUTS


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout: tests.tp.multirank
    print("warm two_shot all_reduce (LoweredCodec), one process:", warm_all_reduce_counts())
    from tests.tp.multirank import run_ranks

    print("the same on 2 gloo ranks:", run_ranks(_rank_counts, 2, "two_shot"))
    for codec in (ReferenceCodec(), TorchCodec(), LoweredCodec()):
        for algorithm in ("gather", "two_shot"):
            for world in (2, 4):
                print(f"emulated site {codec.name} {algorithm} W={world}:",
                      emulated_site_counts(codec, algorithm, world))
