"""The arguments of ``qformats eval`` (and the parsers ``qformats tune`` shares), checked before
anything is loaded: format names (presets, specs, the baseline, the calibrated outlier formats),
per-layer formats, policy files, positive integers and comma-separated lists; an eval's
:class:`Plan` (every argument of a run) and its :class:`Config` s (one per format x TP degree x
algorithm, or per policy x TP degree). Every refusal is a ValueError naming the option."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from ..comm.policy import CommPolicy
from .hf import Policy, format_label
from .names import BASELINE, OUTLIER_FORMAT, OUTLIER_FORMATS, OUTLIER_PREFIX, calibrated_rest, suggest
from .stats import MIN_WINDOWS_FOR_CI
from .windows import bos_id

__all__ = [
    "DEFAULT_FORMATS",
    "POLICY_LABEL",
    "as_list",
    "positive_int",
    "csv_list",
    "tp_list",
    "Calibrated",
    "calibrated_format",
    "resolve_formats",
    "parse_layer_formats",
    "resolve_policies",
    "Config",
    "Plan",
    "validate",
    "check_model",
]

POLICY_LABEL = "policy"  # the format column of a --policy configuration (its rules decide per site)
# The baseline's name and the calibrated outlier formats (Dong et al.): tp.study.names, which
# `qformats inspect` reads too.
# One format per source: the OCP MX 8- and 4-bit formats (mxfp4 is Verma et al.'s FP4 with
# blocks of 32), NVIDIA's NVFP4, Flash Communication's INT4 and Dong et al.'s outlier INT4.
DEFAULT_FORMATS = (
    BASELINE,
    "mxfp8_e4m3",
    "nvfp4",
    "mxfp4",
    "flash_int4",  # uint4/b128/fp16+zp (Flash Communication)
    OUTLIER_FORMAT,
)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str  # as the user wrote it
    tp: int
    algorithm: str
    policy: CommPolicy
    knobs: CommPolicy  # the knobs alone (no format): the key's and the record's "policy"
    calibrated: bool = False
    outlier_rest: object = None  # calibrated: the non-outliers' block format (None: static scales)
    from_policy: bool = False  # a whole policy (--policy): knobs is that policy

    @property
    def key(self) -> str:
        """Identity of this configuration's scores in progress.jsonl."""
        fmt = "calibrated" if self.calibrated else POLICY_LABEL if self.from_policy else format_label(self.policy.fmt)
        return json.dumps([self.name, fmt, self.tp, self.algorithm, self.knobs.to_dict()], sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every argument of a run, checked before anything is loaded."""

    formats: tuple  # ((name, Format or Calibrated), ...), compressed ones only
    tps: tuple
    algorithms: tuple
    tokens: int
    window: int
    knobs: dict  # Policy fields other than the format
    calib_tokens: int
    calib_clip: float | None
    uneven: str
    device: torch.device
    threads: int | None
    policies: tuple = ()  # ((name, CommPolicy), ...): each one configuration per TP degree, its own algorithm

    @property
    def need_calibration(self) -> bool:
        return any(isinstance(f, Calibrated) for _, f in self.formats)

    def configs(self) -> list[Config]:
        out = []
        knobs = Policy(None, **self.knobs)
        for name, f in self.formats:
            for t in self.tps:
                for a in self.algorithms:
                    if isinstance(f, Calibrated):  # the policy's format is set once calibrated
                        out.append(Config(name, t, a, Policy(None, **self.knobs), knobs, calibrated=True,
                                           outlier_rest=f.rest))
                    else:
                        out.append(Config(name, t, a, Policy(f, **self.knobs), knobs))
        for name, pol in self.policies:
            for t in self.tps:
                out.append(Config(name, t, pol.algorithm, pol, pol, from_policy=True))
        return out


def as_list(v, what: str) -> list:
    if isinstance(v, int) and not isinstance(v, bool):  # tp=8
        return [v]
    if isinstance(v, str):
        return [p for p in (s.strip() for s in v.split(",")) if p]
    try:
        return list(v)
    except TypeError:
        raise ValueError(f"{what}: expected a comma-separated string or a list, got {v!r}") from None


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """A format name that needs the outlier calibration: ``rest`` is the non-outlier features'
    block format (None: Dong et al.'s static scales)."""

    rest: object = None


def calibrated_format(key: str):
    """The Calibrated of an outlier format name, None if ``key`` is not one; ValueError for a bad
    ``outlier:SPEC``."""
    calibrated, rest = calibrated_rest(key)
    if not calibrated:
        return None
    from ..model.calibrate import rest_format

    return Calibrated(rest_format(rest))


def resolve_formats(formats) -> list[tuple[str, object]]:
    import qformats

    out, bad = [], []
    for name in as_list(formats, "--formats"):
        if not isinstance(name, str):
            bad.append(f"{name!r}: not a string")
            continue
        key = name.strip()
        if not key:
            continue
        if key.lower() in (BASELINE, "none"):
            out.append((BASELINE, None))
        else:
            try:
                cal = calibrated_format(key)
            except ValueError as e:
                bad.append(f"{key}: {e}")
                continue
            if cal is not None:
                out.append((key.lower() if key.lower() in OUTLIER_FORMATS else key, cal))
                continue
            try:
                out.append((key, qformats.as_format(key)))
            except (ValueError, TypeError) as e:
                if "/" in key:  # a spec: the grammar's message names the bad part
                    bad.append(f"{key}: {e}")
                else:  # a name: the valid ones are listed once, below
                    bad.append(f"{key}: not a known name{suggest(key, [BASELINE, *OUTLIER_FORMATS])}")
    if bad:
        names = ", ".join(sorted(qformats.PRESETS))
        raise ValueError(
            "--formats: unknown format(s):\n  " + "\n  ".join(bad)
            + f"\nvalid: {BASELINE}, {', '.join(OUTLIER_FORMATS)}, {OUTLIER_PREFIX}SPEC, a preset ({names}) "
            "or a spec such as fp4_e2m1/b64/e8m0"
        )
    seen, uniq = set(), []
    for name, f in out:
        if name not in seen:
            seen.add(name)
            uniq.append((name, f))
    return uniq


def parse_layer_formats(items) -> tuple:
    """``["0=mxfp8_e4m3", "-1=bf16"]`` (or a dict / pairs) -> ((layer, Format or None), ...), formats parsed."""
    import qformats

    if not items:
        return ()
    pairs = items.items() if isinstance(items, dict) else items
    out = []
    for it in pairs:
        if isinstance(it, str):
            layer, sep, fmt = it.partition("=")
            if not sep:
                raise ValueError(f"--layer-format expects LAYER=FORMAT (e.g. 0=mxfp8_e4m3 or -1=bf16), got {it!r}")
            try:
                layer = int(layer.strip())
            except ValueError:
                raise ValueError(f"--layer-format {it!r}: the layer must be an integer") from None
            what = it
        else:
            try:
                layer, fmt = it
            except (TypeError, ValueError):
                raise ValueError(f"--layer-format: expected LAYER=FORMAT or (layer, format), got {it!r}") from None
            what = f"{layer}={fmt}"
        if fmt is None or (isinstance(fmt, str) and fmt.strip().lower() in (BASELINE, "none")):
            out.append((layer, None))
            continue
        try:
            out.append((layer, qformats.as_format(fmt.strip() if isinstance(fmt, str) else fmt)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"--layer-format {what}: {e}") from None
    return tuple(out)


def resolve_policies(policies) -> tuple:
    """``--policy`` values -> ((name, CommPolicy), ...). Each item: a policy file's path (named by
    its file stem), a :class:`tp.CommPolicy` (named ``policy<i>``) or a (name, policy or path) pair."""
    out = []
    for i, item in enumerate(policies or ()):
        name = None
        if isinstance(item, tuple):
            try:
                name, item = item
            except ValueError:
                raise ValueError(f"--policy: expected a file, a tp.CommPolicy or (name, policy), got {item!r}") from None
        if isinstance(item, (str, os.PathLike)):
            name = name or Path(item).stem
        try:
            pol = CommPolicy.load(item)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--policy: {e}") from None
        if pol.choose is not None:
            raise ValueError(f"--policy {name or i}: a policy with choose= cannot be recorded (no JSON form)")
        out.append((name or f"policy{i}", pol))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--policy: two policies are named {', '.join(dup)}; give them distinct names")
    return tuple(out)


def positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def validate(formats, tp, algorithms, tokens, window, skip_first, skip_last, sites, layer_formats,
              calib_tokens, uneven, calib_clip, device, threads, policies=()) -> Plan:
    """Check every argument (no model, no text needed); raise ValueError naming the option."""
    from ..comm.call import ALGORITHMS

    pols = resolve_policies(policies)
    if formats is None:  # the default sweep, or only the policies when some are given
        formats = (BASELINE,) if pols else DEFAULT_FORMATS
    resolved = resolve_formats(formats)
    compressed = tuple((n, f) for n, f in resolved if f is not None)
    clash = sorted({n for n, _ in compressed} & {n for n, _ in pols})
    if clash:
        raise ValueError(f"--policy: {', '.join(clash)} is also a --formats name; rename the policy file")
    if pols and not compressed and (skip_first or skip_last or sites != "all" or layer_formats):
        raise ValueError("--skip-first, --skip-last, --sites and --layer-format shape the --formats "
                         "configurations; a --policy file says its own rules")
    if not compressed and not pols:
        raise ValueError(
            f"--formats names no compressed format (got {list(as_list(formats, '--formats'))!r}); the baseline "
            f"({BASELINE}) always runs: add at least one format, e.g. --formats mxfp4"
        )
    tps = tuple(positive_int(t, "--tp: each TP degree") for t in as_list(tp, "--tp"))
    if not tps:
        raise ValueError("--tp names no TP degree, e.g. --tp 8")
    algos = tuple(as_list(algorithms, "--algorithms"))
    if not algos:
        raise ValueError("--algorithms names no algorithm, e.g. --algorithms gather")
    for a in algos:
        if a not in ALGORITHMS:
            raise ValueError(f"--algorithms: unknown algorithm {a!r}: valid are {', '.join(ALGORITHMS)}")
    positive_int(tokens, "--tokens")
    if positive_int(window, "--window") < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    if tokens < window:
        raise ValueError(f"--tokens {tokens} is less than one window of {window} tokens (the unit of scoring): pass "
                         f"--tokens {window} or more ({MIN_WINDOWS_FOR_CI * window} gives the {MIN_WINDOWS_FOR_CI} windows "
                         f"an interval needs), or a smaller --window")
    for what, v in (("--skip-first", skip_first), ("--skip-last", skip_last)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    if sites not in ("all", "attn", "mlp"):
        raise ValueError(f"--sites must be all, attn or mlp, got {sites!r}")
    if uneven not in ("balanced", "error"):
        raise ValueError(f"--uneven must be balanced or error, got {uneven!r}")
    positive_int(calib_tokens, "--calib-tokens")
    if calib_clip is not None and not (isinstance(calib_clip, (int, float)) and math.isfinite(calib_clip) and calib_clip > 0):
        raise ValueError(f"--calib-clip must be a positive number of RMS (0 on the command line: no clip), got {calib_clip!r}")
    if threads is not None:
        positive_int(threads, "--threads")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    knobs = dict(skip_first=skip_first, skip_last=skip_last, sites=sites,
                 layer_formats=parse_layer_formats(layer_formats))
    Policy(None, **knobs)  # the Policy's own checks (e.g. a layer named twice)
    return Plan(compressed, tps, algos, tokens, window, knobs, calib_tokens, calib_clip, uneven, dev, threads, pols)


def check_model(plan: Plan, model, tokenizer, emu) -> None:
    """The checks that need the model (before any forward pass)."""
    cfg = model.config
    maxpos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    bos = bos_id(tokenizer)
    if maxpos and plan.window + (bos is not None) > maxpos:
        raise ValueError(f"--window {plan.window} (+BOS) exceeds the model's {maxpos} positions")
    widths = sorted({s.out_features for s in emu.sites})
    named = [(f"--formats {n}", f.rest if isinstance(f, Calibrated) else f) for n, f in plan.formats]
    named = [(what, f) for what, f in named if f is not None]
    named += [(f"--layer-format {l}={f}", f) for l, f in plan.knobs["layer_formats"] if f is not None]
    named += [(f"--policy {n}", f) for n, pol in plan.policies for f in pol.formats()]
    for what, f in named:
        for w in widths:
            try:
                f.quantized_width(w)
            except ValueError as e:
                raise ValueError(f"{what}: {e} (this model's all-reduced rows are {w} wide, its hidden size)") from None
    try:
        Policy(None, **plan.knobs).check_layers(emu.num_layers)
    except ValueError as e:
        raise ValueError(f"--layer-format: {e}") from None
    for t in plan.tps:  # head / feature splits
        try:
            emu.configure(t, Policy(None, **plan.knobs), plan.algorithms[0], plan.uneven)
        except ValueError as e:
            raise ValueError(f"--tp {t}: {e}") from None
    for n, pol in plan.policies:  # its layer rules against this model
        try:
            emu.configure(plan.tps[0], pol, None, plan.uneven)
        except ValueError as e:
            raise ValueError(f"--policy {n}: {e}") from None
    emu.active = False


def csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def tp_list(s: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,4,8, got {s!r}") from None


def positive_floats(vals, what: str, noun: str) -> list:
    """Each of ``vals`` as a finite float > 0, in order; a clear ValueError naming ``what`` (the
    option) and ``noun`` (what its values are) for anything else."""
    out = []
    for x in vals:
        try:
            f = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {x!r} is not a number") from None
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"{what}: {noun} must be positive, got {x!r}")
        out.append(f)
    return out

