"""``qformats tune``: per-site communication policies on the Pareto front of (wire bits, KL).

Use it to find which format each all-reduce of a model should use: the sites that hurt the
model most get finer formats, the rest coarser ones, for the fewest bits at a given quality.
It searches on the exact emulator, as ``qformats eval`` runs it (:func:`tp.study.eval.run_eval`),
over site groups -- each site kind (attention output, MLP output) times each layer range
(default: layer 0, layers 1-2, the middle, the last 3) -- and, for ``two_shot``, the format
of the second hop (the reduced sum; one per policy, :attr:`tp.CommPolicy.second_fmt`):

1. sensitivity: for every (second hop, group, candidate format), the mean KL from the
   uncompressed model with only that group compressed (``--tokens``, default 1024);
2. prediction: the KL of a whole assignment is taken as the sum of its groups' marginal KLs
   (close to additive for small errors: the joint stage measures how close, and reports it);
   the wire bits are exact (each site's bits per value on this model's rows, block padding
   included, two_shot's two hops averaged: :func:`tp.study.hf.wire_bits`). The exact Pareto
   front of the additive model is built by merging the groups' options one at a time;
3. joint: the predicted-best assignment under each ``--budgets`` bit budget is assembled into a
   :class:`tp.CommPolicy` and measured as a whole on the same tokens; the measured Pareto front
   is kept;
4. confirm: the measured front's best point under each ``--confirm-budgets`` budget is measured
   again on ``--confirm-tokens`` (default 16384; other windows, mostly) at each ``--confirm-tp``,
   with 95% paired bootstrap intervals over windows.

Outputs in ``--out``: ``front.json`` (settings, every stage's figures), ``front.md`` (the
confirmed policies sorted by KL with their intervals, the joint search, the additivity check),
``front.png`` (the fronts), ``policies/<name>.json`` (:meth:`tp.CommPolicy.to_file`: what
``qformats eval --policy``, ``tp.compile``, the TP styles and ``python -m tp --policy`` take),
and each stage's eval folder (``sensitivity/``, ``joint/``, ``confirm/``: results.json, plot,
resumable like ``qformats eval``: a stopped tune continues when run again with the same --out).

Cost: groups x candidates x second-hop choices forward passes over ``--tokens`` (each cheaper
than a fully compressed one: only one group's sites run the codec), one per budget, then one
per confirmed policy and TP degree over ``--confirm-tokens``. The policies written compress
every message (``min_bytes=0``, as measured); raise ``min_bytes`` in the file to keep small
decode-step messages plain (quality is unchanged by that, speed may gain).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..comm.policy import CommPolicy
from . import eval as ev
from .args import Calibrated, as_list, csv_list, positive_floats, positive_int, resolve_formats, tp_list
from .costs import (DEFAULT_KL_BUDGETS, DEFAULT_TIME_BUDGETS, DEFAULT_TOKENS_PER_STEP, PLAIN, RUN_AS, TimePlan,  # noqa: F401
                    _file_tag, budget_name, check_time_plan, group_times, nccl_forward_us, parse_time_budget,
                    pick_budgets, project, read_tuned_for, usable_seconds, write_policy)
from .front import (FRONT_JSON, FRONT_MD, FRONT_PNG, POLICY_DIR, format_front, format_reprice, plot_front,
                    reprice)
from .hf import find_sites, format_label, wire_bits
from .names import BASELINE, OUTLIER_FORMAT
from .report import by_kl
from .search import (BITS_EPS, SAME, SiteGroup, additive_front, assemble, default_layer_bounds,  # noqa: F401
                     describe, make_groups, prune)
from .stats import BOOTSTRAP_RESAMPLES, CONFIDENCE, kl_ratio_ci, pareto_front  # noqa: F401
from .store import git_commit, package_version, window_scores  # noqa: F401

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_BUDGETS",
    "DEFAULT_CONFIRM_BUDGETS",
    "DEFAULT_TOKENS",
    "DEFAULT_CONFIRM_TOKENS",
    "SiteGroup",
    "additive_front",
    "default_layer_bounds",
    "run_tune",
    "kl_ratio_ci",
    "window_scores",
    "add_tune_arguments",
    "main_tune",
]

# Rotated 4-bit formats (Hadamard over 32 / 16 features), NVFP4, 5/6/8-bit integers with bf16
# block scales and MXFP8: from 4.25 to 8.5 bits per value on 576-wide rows.
DEFAULT_CANDIDATES = (
    "mxfp4_h32",
    "int4_b32_bf16_h32",
    "nvfp4",
    "int4/b16/e4m3+h16",
    "int5/b32/bf16+h32",
    "int6/b32/bf16",
    "mxfp8_e4m3",
    "int8/b32/bf16",
)
DEFAULT_SECOND_FORMATS = (SAME, "int5/b32/bf16+h32", "int6/b32/bf16")
DEFAULT_TP = 8
DEFAULT_TOKENS = 1024
DEFAULT_CONFIRM_TOKENS = 16384
DEFAULT_BUDGETS = (4.25, 4.5, 4.75, 5.0, 5.25, 5.5, 6.0, 6.5, 7.0)
DEFAULT_CONFIRM_BUDGETS = (4.5, 5.0, 5.5)


# --------------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class _TunePlan:
    tp: int
    algorithm: str
    candidates: tuple  # ((name, Format or None), ...)
    seconds: tuple  # two_shot: ((name, Format or None = the first hop's), ...); gather: ((SAME, None),)
    layer_bounds: tuple | None
    tokens: int
    window: int
    budgets: tuple
    confirm_tokens: int
    confirm_budgets: tuple
    confirm_tps: tuple


def _floats(v, what: str) -> tuple:
    vals = as_list(v, what) if not isinstance(v, (int, float)) else [v]
    out = positive_floats(vals, what, "bit budgets")
    if not out:
        raise ValueError(f"{what}: give at least one bit budget, e.g. 4.5,5")
    return tuple(sorted(set(out)))


def _calibrated(f) -> bool:
    """Whether a resolved eval format needs the per-TP outlier calibration (not tunable here)."""
    return isinstance(f, Calibrated) or f == OUTLIER_FORMAT


def _validate(tp, algorithm, candidates, second_formats, layer_bounds, tokens, window, budgets, confirm_tokens,
              confirm_budgets, confirm_tp) -> _TunePlan:
    """Check every argument before anything is loaded; ValueError naming the option."""
    tp = positive_int(tp, "--tp")
    if algorithm not in ("gather", "two_shot"):
        raise ValueError(f"--algorithm must be gather or two_shot (fused computes one of them: tune that), "
                         f"got {algorithm!r}")
    cands = tuple(resolve_formats(candidates))
    if not cands:
        raise ValueError("--candidates names no format, e.g. --candidates nvfp4,int8/b32/bf16")
    if any(_calibrated(f) for _, f in cands):
        raise ValueError(f"--candidates: the outlier formats ({OUTLIER_FORMAT}, ...) are calibrated per TP degree; "
                         "tune over dynamic formats")
    if algorithm == "gather":
        if second_formats:
            raise ValueError("--second-formats applies to two_shot only: gather sends each partial once")
        seconds = ((SAME, None),)
    else:
        names = as_list(DEFAULT_SECOND_FORMATS if second_formats is None else second_formats, "--second-formats")
        if not names:
            raise ValueError(f"--second-formats names nothing, e.g. {SAME},int8/b32/bf16")
        same = [n for n in names if str(n).strip().lower() == SAME]
        rest = tuple(resolve_formats([n for n in names if str(n).strip().lower() != SAME])) if len(same) < len(names) else ()
        if any(f is None or _calibrated(f) for _, f in rest):
            raise ValueError(f"--second-formats: the reduced sum travels compressed: name formats or {SAME}")
        seconds = ((SAME, None),) * bool(same) + rest
    if layer_bounds is not None:
        layer_bounds = tuple(as_list(layer_bounds, "--layer-groups"))
        try:
            layer_bounds = tuple(int(b) for b in layer_bounds)
        except (TypeError, ValueError):
            raise ValueError(f"--layer-groups: expected comma-separated layer indices, got {list(layer_bounds)}") from None
    positive_int(tokens, "--tokens")
    if positive_int(window, "--window") < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    if isinstance(confirm_tokens, bool) or not isinstance(confirm_tokens, int) or confirm_tokens < 0:
        raise ValueError(f"--confirm-tokens must be an integer >= 0 (0: no confirmation), got {confirm_tokens!r}")
    budgets = _floats(budgets, "--budgets")
    confirm_budgets = _floats(confirm_budgets, "--confirm-budgets")
    tps = tuple(positive_int(t, "--confirm-tp: each TP degree") for t in as_list(confirm_tp or [tp], "--confirm-tp"))
    if tp not in tps:
        tps = (tp,) + tps  # the confirmed front is the search degree's
    return _TunePlan(tp, algorithm, cands, seconds, layer_bounds, tokens, window, budgets, confirm_tokens,
                     confirm_budgets, tuple(dict.fromkeys(tps)))


# --------------------------------------------------------------------------- the job


def run_tune(
    model=None,
    text=None,
    *,
    tp: int = DEFAULT_TP,
    algorithm: str = "gather",
    candidates: Sequence[str] | str = DEFAULT_CANDIDATES,
    second_formats: Sequence[str] | str | None = None,
    layer_bounds: Sequence[int] | str | None = None,
    tokens: int = DEFAULT_TOKENS,
    window: int = ev.DEFAULT_WINDOW,
    budgets: Sequence[float] | str = DEFAULT_BUDGETS,
    confirm_tokens: int = DEFAULT_CONFIRM_TOKENS,
    confirm_budgets: Sequence[float] | str = DEFAULT_CONFIRM_BUDGETS,
    confirm_tp: Sequence[int] | str | None = None,
    out: str | os.PathLike = "out/tune",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    tokenizer=None,
    command: str | None = None,
    on_start=None,
    time_plan: "TimePlan | None" = None,
) -> dict:
    """Run the search (module docstring) and return the document written to ``out/front.json``.

    ``model``/``text``/``tokenizer``/``device``/``threads``/``window``: as :func:`tp.study.eval.run_eval`.
    ``candidates``: formats each group may take (``"bf16"``: left uncompressed). ``second_formats``
    (two_shot only; default :data:`DEFAULT_SECOND_FORMATS`): the reduced sum's format choices,
    ``"same"`` = the first hop's. ``layer_bounds``: the layer indices where groups split (default
    :func:`default_layer_bounds`). ``budgets``: the bit budgets whose predicted-best policies are
    measured jointly; ``confirm_budgets``: those whose measured-best are confirmed on
    ``confirm_tokens`` (0: none) at every ``confirm_tp`` degree (default: ``tp``).

    ``time_plan`` (:class:`TimePlan`; ``--gpu/--link``): the front is (modelled all-reduce time per
    forward at ``tokens_per_step`` tokens, KL) instead of (bits, KL); bits stay a column. Every group
    may also stay plain (bf16: KL 0, NCCL's time). Candidates with no kernel time in the device's
    table are left out (listed in the output). The predicted-best assignment under each time budget
    (lowest KL) and each KL budget (fastest) is measured jointly, the measured front's picks under
    the same budgets confirmed; policies are named by their budget and their files record what
    they were tuned for (:func:`read_tuned_for`)."""
    t_start = time.time()
    plan = _validate(tp, algorithm, candidates, second_formats, layer_bounds, tokens, window, budgets,
                     confirm_tokens, confirm_budgets, confirm_tp)
    s = _prepare(plan, model, text, tokenizer, out, dict(device=device, threads=threads, progress=progress),
                 command, on_start, time_plan)
    stamp = {}
    t0 = time.time()
    sensitivity = _sensitivity(s)
    stamp["sensitivity"] = round(time.time() - t0, 1)
    predicted, chosen, tags = _predict(s, sensitivity)
    t0 = time.time()
    joint = _joint(s, chosen, tags)
    stamp["joint"] = round(time.time() - t0, 1)
    picks, on_front = _picks(s, joint)
    confirmed = []
    if s.plan.confirm_tokens and picks:
        t0 = time.time()
        confirmed = _confirm(s, picks)
        stamp["confirm"] = round(time.time() - t0, 1)
    _write_policies(s, picks if s.plan.confirm_tokens else on_front, joint)
    doc = _document(s, t_start, stamp, sensitivity, predicted, joint, confirmed)
    tmp = s.out / (FRONT_JSON + ".part")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, s.out / FRONT_JSON)
    (s.out / FRONT_MD).write_text(format_front(doc))
    plot_front(doc, s.out / FRONT_PNG)
    return doc


# --------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class _Search:
    """What every stage of one search reads: the checked plan, the model's sites and groups, the
    output folder, the arguments each stage's eval takes and, under --gpu/--link, the time model."""

    plan: _TunePlan
    sites: list
    groups: list
    out: Path
    common: dict  # run_eval's arguments shared by the stages
    command: str | None
    model_desc: str
    textdata: object
    time_plan: "TimePlan | None" = None
    cmodel: object = None  # the cost model (--gpu/--link)
    comm_alg: str | None = None
    timing: dict | None = None  # front.json's "time" (None: the front is over bits)
    times: dict | None = None  # {(second, group label, format name): modelled us per forward}
    nccl_us: float | None = None  # NCCL bf16 on every site, per forward
    names: dict = dataclasses.field(default_factory=dict)  # {Format or None: the candidate's name as given}

    @property
    def num_layers(self) -> int:
        return self.sites[0].num_layers

    def group_bits(self, g: SiteGroup, f, second) -> float:
        """This group's share of the model's mean wire bits with format ``f`` (second hop ``second``)."""
        total_width = float(sum(s.out_features for s in self.sites))
        return sum(wire_bits(f, second if f is not None else None, self.plan.algorithm, s.out_features) * s.out_features
                   for s in self.sites if s.kind == g.kind and g.start <= s.layer < g.stop) / total_width

    def choice_bits(self, sname, choice) -> float:
        second = dict(self.plan.seconds)[sname]
        return sum(self.group_bits(g, f, second) for g, f in zip(self.groups, choice))

    def policy(self, rules, second) -> CommPolicy:
        return CommPolicy(None, self.plan.algorithm, 0, tuple(rules), second)


def _prepare(plan: _TunePlan, model, text, tokenizer, out, run_kw: dict, command, on_start, time_plan) -> _Search:
    """The time model checked, then (``on_start``) the model and the text loaded, the candidates
    checked against the model's rows, the groups made and, under --gpu/--link, the groups priced."""
    from . import assets

    cmodel = comm_alg = None
    if time_plan is not None:
        time_plan = check_time_plan(time_plan)
        cmodel = time_plan.model()  # refuses an unknown device or link before anything is loaded
        comm_alg = time_plan.comm_algorithm(plan.algorithm, cmodel.link)
    if on_start is not None:  # every argument checked, nothing loaded yet
        on_start()
    textdata = text if isinstance(text, assets.TextData) else assets.load_text(text)
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, model_desc = assets.load_model(model)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an already loaded model")
        model_desc = type(model).__name__
    sites = find_sites(model)
    num_layers = sites[0].num_layers
    for what, named in (("--candidates", plan.candidates), ("--second-formats", plan.seconds)):
        for n, f in named:
            for w in sorted({s.out_features for s in sites}):
                try:
                    f is not None and f.quantized_width(w)
                except ValueError as e:
                    raise ValueError(f"{what} {n}: {e} (this model's all-reduced rows are {w} wide)") from None
    bounds = plan.layer_bounds if plan.layer_bounds is not None else default_layer_bounds(num_layers)
    groups = make_groups(num_layers, bounds)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    common = dict(model=model, tokenizer=tokenizer, text=textdata, **run_kw, window=plan.window,
                  model_desc=model_desc, formats=[BASELINE])
    s = _Search(plan, sites, groups, out, common, command, model_desc, textdata, time_plan, cmodel, comm_alg)
    if time_plan is not None:
        _price_groups(s)
    s.names = {f: n for n, f in s.plan.candidates}
    return s


def _price_groups(s: _Search) -> None:
    """--gpu/--link: every (second hop, group, candidate)'s modelled time; candidates without kernel
    times are left out of the plan (and listed)."""
    plan, T = s.plan, s.time_plan.tokens_per_step
    times, missing = group_times(s.groups, s.sites, plan.candidates + ((PLAIN, None),), plan.seconds, s.cmodel, T,
                                 plan.tp, s.comm_alg)
    if PLAIN in missing:
        raise ValueError(f"--gpu/--link: {missing[PLAIN]}")
    kept = tuple((n, f) for n, f in plan.candidates if n not in missing)
    if not usable_seconds(plan.seconds, missing):
        raise ValueError("--second-formats: no second-hop choice has kernel times: "
                         + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    if not [n for n, f in kept if f is not None]:
        raise ValueError("--candidates: no candidate has kernel times in the device's table: "
                         + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    s.plan = plan = dataclasses.replace(plan, candidates=kept, seconds=usable_seconds(plan.seconds, missing))
    s.times, s.nccl_us = times, nccl_forward_us(s.cmodel, s.sites, T, plan.tp)
    s.timing = {"plan": s.time_plan.describe(s.cmodel, plan.algorithm, plan.tp), "nccl_us": s.nccl_us,
                "left_out": missing, "time_budgets": [lbl for lbl, _, _ in s.time_plan.time_budgets],
                "kl_budgets": list(s.time_plan.kl_budgets),
                "group_times": [{"second": k[0], "group": k[1], "format": k[2], "us": v} for k, v in times.items()]}


def _sensitivity(s: _Search) -> list:
    """Stage 1: for every (second hop, group, candidate), the KL with only that group compressed."""
    plan = s.plan
    sens_pols = {}
    for sname, second in plan.seconds:
        for g in s.groups:
            for fname, f in plan.candidates:
                hop = f"2nd {sname} | " if plan.algorithm == "two_shot" else ""
                sens_pols[(sname, g, fname)] = (f"{hop}{g.label} {fname}", s.policy([g.rule(f)], second if f is not None else None))
    recs = ev.run_eval(tp=[plan.tp], tokens=plan.tokens, out=s.out / "sensitivity", policies=list(sens_pols.values()),
                       command=s.command, label="qformats tune 1/3 sensitivity", **s.common)
    by_name = {r["name"]: r for r in recs if not r.get("baseline")}
    sensitivity = []
    for (sname, g, fname), (name, _) in sens_pols.items():
        f = dict(plan.candidates)[fname]
        second = dict(plan.seconds)[sname]
        sensitivity.append({"second": sname, "group": g.label, "format": fname, "kl": by_name[name]["kl"],
                            "bits_share": s.group_bits(g, f, second), "name": name})
    return sensitivity


def _predict(s: _Search, sensitivity: list) -> tuple:
    """Stage 2: the additive model's front, per second-hop choice, merged, and its best point under
    each budget: (predicted front, {(second, choice): point}, {(second, choice): [(kind, budget)]})."""
    plan = s.plan
    predicted = []
    kl_of = {(d["second"], d["group"], d["format"]): d["kl"] for d in sensitivity}
    chosen, tags = {}, {}
    if s.timing is None:
        for sname, second in plan.seconds:
            options = [[(s.group_bits(g, f, second), kl_of[(sname, g.label, fname)], f) for fname, f in plan.candidates]
                       for g in s.groups]
            predicted += [(b, k, (sname, ch)) for b, k, ch in additive_front(options)]
        predicted = prune(predicted)
        for b in plan.budgets:
            fits = [p for p in predicted if p[0] <= b + BITS_EPS]
            if fits:
                best = min(fits, key=lambda p: p[1])
                chosen.setdefault(best[2], best)
        if not chosen:
            raise ValueError(f"--budgets {list(plan.budgets)}: no assignment fits; the cheapest costs "
                             f"{predicted[0][0]:.3f} bits per value with these candidates")
    else:
        for sname, second in plan.seconds:
            options = [[(s.times[(sname, g.label, fname)], kl_of[(sname, g.label, fname)] if f is not None else 0.0, f)
                        for fname, f in plan.candidates + ((PLAIN, None),)] for g in s.groups]
            predicted += [(t, k, (sname, ch)) for t, k, ch in additive_front(options)]
        predicted = prune(predicted)
        for kind, label, p in pick_budgets(predicted, s.nccl_us, s.time_plan, lambda p: p[0], lambda p: p[1]):
            chosen.setdefault(p[2], p)
            tags.setdefault(p[2], []).append((kind, label))
        met = {budget_name(*t) for ts in tags.values() for t in ts}
        s.timing["unmet"] = [budget_name(*t) for t in [("time", lbl) for lbl, _, _ in s.time_plan.time_budgets]
                             + [("kl", f"{k:g}") for k in s.time_plan.kl_budgets] if budget_name(*t) not in met]
        if not chosen:
            raise ValueError(f"no assignment meets any budget (time {s.timing['time_budgets']} of NCCL's "
                             f"{s.nccl_us:.0f} us, KL {s.timing['kl_budgets']})")
        s.names.setdefault(None, PLAIN)
    return predicted, chosen, tags


def _joint(s: _Search, chosen: dict, tags: dict) -> list:
    """Stage 3: each predicted-best assignment assembled into a policy and measured as a whole;
    the measured front marked (``on_front``)."""
    plan, seconds = s.plan, dict(s.plan.seconds)
    joint_pols, used = {}, set()
    for i, (key, (x, k, _)) in enumerate(sorted(chosen.items(), key=lambda kv: kv[1][0])):
        sname, choice = key
        b = s.choice_bits(sname, choice)
        if s.timing is None:
            name = f"{plan.algorithm}_tp{plan.tp}_{b:.2f}b"
        else:
            name = f"{plan.algorithm}_tp{plan.tp}_" + "_".join(_file_tag(*t) for t in tags[key])
        name = name if name not in used else f"{name}_{i}"  # two points that round to the same bits
        used.add(name)
        joint_pols[key] = (name, assemble(s.groups, choice, plan.algorithm, seconds[sname]), b, k)
    recs = ev.run_eval(tp=[plan.tp], tokens=plan.tokens, out=s.out / "joint", command=s.command,
                       policies=[(n, p) for n, p, _, _ in joint_pols.values()], label="qformats tune 2/3 joint", **s.common)
    by_name = {r["name"]: r for r in recs if not r.get("baseline")}
    joint = []
    for (sname, choice), (name, pol, b, k) in joint_pols.items():
        r = by_name[name]
        if abs(r["bits_per_value"] - b) > 1e-6:
            raise RuntimeError(f"{name}: the emulator counts {r['bits_per_value']} bits per value, the tuner "
                               f"predicted {b}: the two bit counts disagree")
        joint.append({"name": name, "bits": r["bits_per_value"], "predicted_kl": k, "kl": r["kl"],
                      "additivity": r["kl"] / k if k > 0 else None, "ppl_change_pct": r["ppl_change_pct"],
                      "second": sname, "assignment": describe(s.groups, choice, s.names), "policy": pol.to_dict()})
        if s.timing is not None:
            us = sum(s.times[(sname, g.label, s.names.get(f, format_label(f)) if f is not None else PLAIN)]
                     for g, f in zip(s.groups, choice))
            joint[-1].update(modelled_us=us, modelled_ratio=us / s.nccl_us,
                             budgets=[budget_name(*t) for t in tags[(sname, choice)]])
    xkey = "bits" if s.timing is None else "modelled_us"
    front_idx = pareto_front([(j[xkey], j["kl"]) for j in joint])
    for i, j in enumerate(joint):
        j["on_front"] = i in front_idx
    return joint


def _picks(s: _Search, joint: list) -> tuple:
    """The measured front's best point under each confirmation budget: (picks, the measured front)."""
    on_front = [j for j in joint if j["on_front"]]
    picks = []
    if s.timing is None:
        for b in s.plan.confirm_budgets:
            fits = [j for j in on_front if j["bits"] <= b + BITS_EPS]
            if fits:
                best = min(fits, key=lambda j: j["kl"])
                if best not in picks:
                    picks.append(best)
    else:
        for j in joint:
            j["confirmed_as"] = []
        for kind, label, j in pick_budgets(on_front, s.nccl_us, s.time_plan, lambda j: j["modelled_us"], lambda j: j["kl"]):
            j["confirmed_as"].append(budget_name(kind, label))
            if j not in picks:
                picks.append(j)
    return picks, on_front


def _confirm(s: _Search, picks: list) -> list:
    """Stage 4: the picks measured again on ``--confirm-tokens`` at each ``--confirm-tp``, with intervals."""
    plan, timing = s.plan, s.timing
    recs = ev.run_eval(tp=list(plan.confirm_tps), tokens=plan.confirm_tokens, out=s.out / "confirm", command=s.command,
                       policies=[(j["name"], CommPolicy.from_dict(j["policy"])) for j in picks],
                       label="qformats tune 3/3 confirm", **s.common)
    by_name = {j["name"]: j for j in picks}
    confirmed = []
    for r in recs:
        if r.get("baseline"):
            continue
        j = by_name[r["name"]]
        confirmed.append({**{k: r.get(k) for k in ("name", "tp", "algorithm", "bits_per_value", "kl", "kl_ci",
                                                   "ppl_change_pct", "ppl_change_ci", "perplexity",
                                                   "baseline_perplexity", "top1_agreement", "top1_ci",
                                                   "tokens", "windows", "verdict", "seconds")},
                          "search_kl": j["kl"], "predicted_kl": j["predicted_kl"], "second": j["second"],
                          "assignment": j["assignment"], "policy_file": f"{POLICY_DIR}/{j['name']}.json",
                          **({k: j[k] for k in ("modelled_us", "modelled_ratio")} if timing else {}),
                          **({"budgets": j["confirmed_as"]} if timing else {})})
    at_tp = [c for c in confirmed if c["tp"] == plan.tp]
    front_c = {at_tp[i]["name"] for i in pareto_front([(c["bits_per_value"] if timing is None else c["modelled_us"],
                                                        c["kl"]) for c in at_tp])}
    for c in confirmed:
        c["on_front"] = c["name"] in front_c
    return confirmed


def _write_policies(s: _Search, kept: list, joint: list) -> None:
    """policies/<name>.json of the kept points (the confirmed picks, else the measured front); under
    --gpu/--link each records what it was tuned for, and --project prices every joint policy."""
    (s.out / POLICY_DIR).mkdir(parents=True, exist_ok=True)
    for j in kept:
        pol = CommPolicy.from_dict(j["policy"])
        if s.timing is None:
            pol.to_file(s.out / POLICY_DIR / f"{j['name']}.json")
        else:
            write_policy(pol, s.out / POLICY_DIR / f"{j['name']}.json",
                         {**s.timing["plan"], "modelled_us": j["modelled_us"], "nccl_us": s.nccl_us,
                          "budgets": j.get("confirmed_as") or j.get("budgets"), "bits": j["bits"], "search_kl": j["kl"]})
    if s.timing is not None and s.time_plan.project:
        for j in joint:
            j["projection"] = project(CommPolicy.from_dict(j["policy"]), s.time_plan.project, s.cmodel,
                                      s.time_plan.tokens_per_step, s.plan.tp, s.comm_alg, s.num_layers)
        s.timing["project"] = s.time_plan.project


def _document(s: _Search, t_start: float, stamp: dict, sensitivity, predicted, joint, confirmed) -> dict:
    """front.json: the settings and every stage's figures."""
    import transformers

    plan, groups, names = s.plan, s.groups, s.names
    ratios = [j["additivity"] for j in joint if j["additivity"] is not None]
    return {
        "run": {"command": s.command, "version": package_version(), "commit": git_commit(),
                "started": _dt.datetime.fromtimestamp(t_start).isoformat(timespec="seconds"),
                "seconds_total": round(time.time() - t_start, 1), "seconds": stamp,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "model": s.model_desc, "text": s.textdata.source,
                "tp": plan.tp, "algorithm": plan.algorithm, "tokens": plan.tokens, "window": plan.window,
                "confirm_tokens": plan.confirm_tokens, "confirm_tp": list(plan.confirm_tps),
                "budgets": list(plan.budgets), "confirm_budgets": list(plan.confirm_budgets),
                "confidence": CONFIDENCE, "bootstrap_resamples": BOOTSTRAP_RESAMPLES},
        "groups": [g.label for g in groups],
        "candidates": [n for n, _ in plan.candidates],
        "second_formats": [n for n, _ in plan.seconds] if plan.algorithm == "two_shot" else None,
        "sensitivity": sensitivity,
        "predicted_front": [{"bits": b, "kl": k, "second": sn, "assignment": describe(groups, ch, names)}
                            for b, k, (sn, ch) in predicted] if s.timing is None else
                           [{"us": t, "bits": s.choice_bits(sn, ch), "kl": k, "second": sn,
                             "assignment": describe(groups, ch, names)}
                            for t, k, (sn, ch) in predicted],
        "joint": joint,
        "additivity": {"min": min(ratios), "max": max(ratios), "mean": sum(ratios) / len(ratios)} if ratios else None,
        "confirmed": by_kl(confirmed),
        "time": s.timing,
    }


# --------------------------------------------------------------------------- CLI


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``qformats tune`` options to ``parser``."""
    parser.description = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, help="as qformats eval (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--text", default=None, help="as qformats eval (default: the Brown Corpus)")
    parser.add_argument("--tp", type=int, default=DEFAULT_TP, help=f"TP degree of the search (default {DEFAULT_TP})")
    parser.add_argument("--algorithm", default="gather", help="gather or two_shot (default gather)")
    parser.add_argument("--candidates", type=csv_list, default=list(DEFAULT_CANDIDATES),
                        help=f"formats a site group may take; bf16 = uncompressed (default: {','.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--second-formats", type=csv_list, default=None,
                        help=f"two_shot: the reduced sum's format choices, {SAME} = the first hop's "
                             f"(default: {','.join(DEFAULT_SECOND_FORMATS)})")
    parser.add_argument("--layer-groups", type=csv_list, default=None, metavar="B1,B2,...",
                        help="layer indices where the groups split (default: 1,3,L-3: layer 0, layers 1-2, the middle, the last 3)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"search tokens (default {DEFAULT_TOKENS})")
    parser.add_argument("--window", type=int, default=ev.DEFAULT_WINDOW, help=f"tokens per window (default {ev.DEFAULT_WINDOW})")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                        help=f"bit budgets whose predicted-best policies are measured jointly (default {','.join(map(str, DEFAULT_BUDGETS))})")
    parser.add_argument("--confirm-tokens", type=int, default=DEFAULT_CONFIRM_TOKENS,
                        help=f"tokens of the confirmation (default {DEFAULT_CONFIRM_TOKENS}; 0: none)")
    parser.add_argument("--confirm-budgets", default=",".join(map(str, DEFAULT_CONFIRM_BUDGETS)),
                        help=f"bit budgets whose measured-best front points are confirmed (default {','.join(map(str, DEFAULT_CONFIRM_BUDGETS))})")
    parser.add_argument("--confirm-tp", type=tp_list, default=None, help="TP degrees of the confirmation (default: --tp)")
    parser.add_argument("--threads", type=int, default=None, help=f"torch CPU threads (default on CPU: {ev.CPU_THREADS})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: out/tune-<timestamp>); a stopped run there resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    t = parser.add_argument_group("time (KL against modelled all-reduce time; tp.comm.cost)")
    t.add_argument("--gpu", default=None, help="price the front on this GPU's measured tables (e.g. H200): the front "
                                                 "becomes (modelled all-reduce time per forward, KL), bits a column")
    t.add_argument("--link", default=None, help="with --gpu: nvlink, or host (the host-memory path, NCCL_P2P_DISABLE=1)")
    t.add_argument("--tokens-per-step", type=int, default=DEFAULT_TOKENS_PER_STEP,
                   help=f"tokens per forward the time is priced at (default {DEFAULT_TOKENS_PER_STEP}: an 8k prefill)")
    t.add_argument("--time-budgets", type=csv_list, default=list(DEFAULT_TIME_BUDGETS),
                   help=f"lowest KL within each: 0.5x (of NCCL bf16's time), 300us, 1.2ms (default {','.join(DEFAULT_TIME_BUDGETS)})")
    t.add_argument("--kl-budgets", type=csv_list, default=[str(k) for k in DEFAULT_KL_BUDGETS],
                   help=f"fastest within each KL (default {','.join(map(str, DEFAULT_KL_BUDGETS))})")
    t.add_argument("--run-as", choices=RUN_AS, default=None,
                   help="how compressed sites run: fused (symmetric-memory kernels; default on nvlink) or nccl (the NCCL path)")
    t.add_argument("--kernel-table", type=csv_list, default=None, metavar="F1,F2",
                   help="kernel tables (benchmarks/codec_gpu.py JSONL; default: the newest committed for --gpu)")
    t.add_argument("--link-table", type=csv_list, default=None, metavar="F1,F2", help="link tables (default: the committed ones)")
    t.add_argument("--extrapolate-world", action="store_true",
                   help="price a TP degree with no NCCL measurement from the nearest smaller one (bus bytes; says so)")
    t.add_argument("--project", default=None, metavar="MODEL",
                   help="also give each policy's modelled all-reduce time and TTFT share on a larger model: Llama-3-70B, "
                        "Llama-3-8B, Llama-3-405B or NAME:hidden=H,layers=L (the KL stays the tuned model's)")
    t.add_argument("--reprice", default=None, metavar="TUNE_DIR",
                   help="measure nothing: re-front a finished tune's front.json against modelled time (with --gpu/--link)")
    return parser


def time_plan_from_args(args) -> "TimePlan | None":
    if args.gpu is None:
        if args.link is not None or args.reprice is not None or args.project is not None:
            raise ValueError("--link, --project and --reprice price time: give --gpu (e.g. --gpu H200 --link nvlink)")
        return None
    if args.link is None:
        raise ValueError("--gpu needs --link (nvlink, or host)")
    return check_time_plan(TimePlan(args.gpu, args.link, args.tokens_per_step, args.run_as, tuple(args.time_budgets),
                                    tuple(args.kl_budgets), tuple(args.kernel_table) if args.kernel_table else None,
                                    tuple(args.link_table) if args.link_table else None, args.extrapolate_world, args.project))


def main_tune(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``qformats tune`` from parsed arguments; prints the confirmed front and the output folder."""
    from .assets import AssetError

    out = Path(args.out) if args.out else Path("out") / _dt.datetime.now().strftime("tune-%Y%m%d-%H%M%S")
    command = shlex.join(["qformats", "tune", *argv]) if argv is not None else shlex.join(sys.argv)
    def announce() -> None:
        print(f"[qformats] writing to {out}/ (if stopped, the same command with --out {out} resumes)", file=sys.stderr)

    try:
        time_plan = time_plan_from_args(args)
        if args.reprice:
            res = reprice(args.reprice, time_plan, tp=args.tp if any(a == "--tp" or a.startswith("--tp=") for a in (argv or sys.argv)) else None, out=out)
            print(format_reprice(res))
            print(f"written to {out.resolve()}/ (reprice.json, reprice.md)")
            return 0
        doc = run_tune(args.model, args.text, tp=args.tp, algorithm=args.algorithm, candidates=args.candidates,
                       second_formats=args.second_formats, layer_bounds=args.layer_groups, tokens=args.tokens,
                       window=args.window, budgets=args.budgets, confirm_tokens=args.confirm_tokens,
                       confirm_budgets=args.confirm_budgets, confirm_tp=args.confirm_tp, out=out, device=args.device,
                       threads=args.threads, progress=not args.no_progress, command=command, on_start=announce,
                       time_plan=time_plan)
    except (AssetError, ValueError) as e:
        print(f"qformats tune: {e}", file=sys.stderr)
        return 2
    print(format_front(doc))
    print(f"results written to {out.resolve()}/ ({FRONT_JSON}, {FRONT_MD}, {FRONT_PNG}, {POLICY_DIR}/)")
    return 0
