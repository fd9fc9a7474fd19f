"""Modelled all-reduce time for ``qformats tune`` and ``qformats eval`` (``--gpu/--link``, issue 22).

What the tuner and the eval price a policy with: the step size, the budgets (``0.5x`` of NCCL
bf16's time per forward, ``300us``; KL budgets), the per-group times of a search, the picks
under each budget, policy files that record what they were tuned for, the projection onto a
larger model's shape, and the eval's time column. The time itself is :mod:`tp.comm.cost`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

from ..comm.policy import CommPolicy
from .args import POLICY_LABEL, positive_floats, positive_int
from .hf import find_sites


def _as_list(v, what: str) -> list:
    if isinstance(v, str):
        return [p for p in (x.strip() for x in v.split(",")) if p]
    try:
        return list(v)
    except TypeError:
        raise ValueError(f"{what}: expected a list or comma-separated text, got {v!r}") from None


def _us(v) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


# --------------------------------------------------------------------------- time: KL against modelled all-reduce time (issue 22)

RUN_AS = ("fused", "nccl")
DEFAULT_TIME_BUDGETS = ("1x", "0.75x", "0.5x", "0.333x")
DEFAULT_KL_BUDGETS = (0.01, 0.02, 0.05, 0.1)
DEFAULT_TOKENS_PER_STEP = 8192
PLAIN = "bf16"  # the uncompressed option every group gets in time mode (KL 0, NCCL's time)


@dataclasses.dataclass(frozen=True)
class TimePlan:
    """What the time axis is priced on: ``gpu``/``link`` (tables of :mod:`tp.comm.cost`), the
    step size (tokens per forward), how compressed sites run (``fused``: the symmetric-memory
    kernels on NVLink, else the NCCL path), the budgets, and a model shape to project onto."""

    gpu: str
    link: str
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP
    run_as: str | None = None
    time_budgets: tuple = DEFAULT_TIME_BUDGETS
    kl_budgets: tuple = DEFAULT_KL_BUDGETS
    kernel_tables: tuple | None = None
    link_tables: tuple | None = None
    extrapolate_world: bool = False
    project: str | None = None

    def model(self):
        from ..comm import cost

        return cost.CostModel(self.gpu, self.link, kernel_tables=self.kernel_tables, link_tables=self.link_tables,
                              extrapolate_world=self.extrapolate_world)

    def comm_algorithm(self, algorithm: str, link: str) -> str:
        """The cost model's algorithm for the policy's ``algorithm`` run as ``run_as``."""
        run_as = self.run_as or ("fused" if link == "nvlink" else "nccl")
        return f"fused_{algorithm}" if run_as == "fused" else algorithm

    def describe(self, model, algorithm: str, tp: int) -> dict:
        return {"device": model.device, "link": model.link, "tp": tp, "tokens_per_step": self.tokens_per_step,
                "comm_algorithm": self.comm_algorithm(algorithm, model.link), "kernel_tables": model.describe()["kernel_tables"],
                "link_tables": model.describe()["link_tables"],
                "extrapolate_world": self.extrapolate_world and tp not in model.links.worlds(),
                "times_are": "modelled (tp.comm.cost), not measured"}


def parse_time_budget(v) -> tuple:
    """'0.5x' (of NCCL bf16's time per forward), '300us' or '1.2ms' -> (label, fraction or None, us or None)."""
    s = str(v).strip().lower()
    try:
        if s.endswith("x"):
            f = float(s[:-1])
            if f > 0 and math.isfinite(f):
                return (f"{f:g}x", f, None)
        elif s.endswith("us"):
            u = float(s[:-2])
            if u > 0 and math.isfinite(u):
                return (f"{u:g}us", None, u)
        elif s.endswith("ms"):
            u = float(s[:-2]) * 1e3
            if u > 0 and math.isfinite(u):
                return (f"{u / 1e3:g}ms", None, u)
    except ValueError:
        pass
    raise ValueError(f"--time-budgets: {v!r} is not a time budget: write 0.5x (of NCCL bf16's all-reduce time per "
                     f"forward), 300us or 1.2ms")


def _kl_budgets(v) -> tuple:
    vals = _as_list(v, "--kl-budgets") if not isinstance(v, (int, float)) else [v]
    return tuple(sorted(set(positive_floats(vals, "--kl-budgets", "KL budgets"))))


def check_time_plan(tp_: TimePlan) -> TimePlan:
    """Parse the budgets and check names before anything is loaded (ValueError naming the option)."""
    from ..comm import cost

    cost.link_key(tp_.link)
    if tp_.run_as is not None and tp_.run_as not in RUN_AS:
        raise ValueError(f"--run-as must be one of {', '.join(RUN_AS)}, got {tp_.run_as!r}")
    positive_int(tp_.tokens_per_step, "--tokens-per-step")
    tb = tuple(parse_time_budget(b) if not isinstance(b, tuple) else b for b in
               (_as_list(tp_.time_budgets, "--time-budgets") if tp_.time_budgets else ()))
    kb = _kl_budgets(tp_.kl_budgets) if tp_.kl_budgets else ()
    if not tb and not kb:
        raise ValueError("give at least one --time-budgets or --kl-budgets value")
    if tp_.project is not None:
        cost.ModelShape.parse(tp_.project)
    return dataclasses.replace(tp_, time_budgets=tb, kl_budgets=kb)


def budget_name(kind: str, label: str) -> str:
    """The human name of a budget pick: 'fastest with KL <= 0.02', 'lowest KL within 0.5x NCCL'."""
    if kind == "kl":
        return f"fastest with KL <= {label}"
    return f"lowest KL within {label} NCCL" if label.endswith("x") else f"lowest KL within {label}"


def _file_tag(kind: str, label: str) -> str:
    return f"kl{label}_fastest" if kind == "kl" else f"t{label}_lowest_kl"


def group_times(groups, sites, named_formats, seconds, model, tokens: int, tp: int, algorithm: str) -> tuple:
    """({(second name, group label, format name): modelled us of that group's all-reduces per
    forward}, {format name: why it has no time}). ``named_formats``: ((name, Format or None), ...);
    None is the plain bf16 all-reduce. ``algorithm``: the cost model's (gather, fused_gather, ...)."""
    from ..comm import cost

    out, missing = {}, {}
    by_site = {}
    usable = []
    for sname, second in seconds:  # a second-hop format without kernel times is no choice here
        if second is not None and not all(model.kernels.has(st, second, n) for st, n in
                                           (("quantize", 1), ("dequantize", 1))):
            missing[f"second hop {sname}"] = f"no kernel times for {second} on {model.device}"
        else:
            usable.append((sname, second))
    for sname, second in usable:
        for g in groups:
            members = [s for s in sites if s.kind == g.kind and g.start <= s.layer < g.stop]
            for fname, f in named_formats:
                if fname in missing:
                    continue
                total = 0.0
                try:
                    for s in members:
                        shape = (int(tokens), int(s.out_features))
                        key = (str(f), str(second), shape)
                        if key not in by_site:
                            if f is None:
                                by_site[key] = model.nccl(tp, shape).us
                            else:
                                two = algorithm in ("two_shot", "fused_two_shot")
                                by_site[key] = model.allreduce(f, algorithm, tp, shape,
                                                               second_fmt=second if two else None).us
                        total += by_site[key]
                except cost.CostTableError as e:
                    missing[fname] = str(e)
                    continue
                out[(sname, g.label, fname)] = total
    return out, missing


def usable_seconds(seconds, missing) -> tuple:
    """The second-hop choices :func:`group_times` could price."""
    return tuple((n, f) for n, f in seconds if f"second hop {n}" not in missing)


def nccl_forward_us(model, sites, tokens: int, tp: int) -> float:
    return sum(model.nccl(tp, (int(tokens), int(s.out_features))).us for s in sites)


def pick_budgets(points, nccl_us: float, plan: TimePlan, t_of, kl_of) -> list:
    """[(kind, label, point)] for every budget that some point meets: ``time`` budgets take the
    lowest KL within the time (ties: the faster), ``kl`` budgets the fastest within the KL."""
    picks = []
    for label, frac, us in plan.time_budgets:
        limit = frac * nccl_us if frac is not None else us
        fits = [p for p in points if t_of(p) <= limit * (1 + 1e-12)]
        if fits:
            picks.append(("time", label, min(fits, key=lambda p: (kl_of(p), t_of(p)))))
    for k in plan.kl_budgets:
        fits = [p for p in points if kl_of(p) <= k]
        if fits:
            picks.append(("kl", f"{k:g}", min(fits, key=lambda p: (t_of(p), kl_of(p)))))
    return picks


def write_policy(policy: CommPolicy, path, tuned_for: dict) -> None:
    """:meth:`tp.CommPolicy.to_file` plus a ``tuned_for`` field (device, link, TP, step size,
    modelled times, budget): the policy loader passes it through; :func:`read_tuned_for` reads it."""
    d = policy.to_dict()
    d["tuned_for"] = tuned_for
    Path(path).write_text(json.dumps(d, indent=1) + "\n")


def read_tuned_for(path) -> dict | None:
    """The ``tuned_for`` record of a policy file written by the tuner (None: none recorded)."""
    with open(path) as f:
        return json.load(f).get("tuned_for")


def _project_layer(l_new: int, n_new: int, n_old: int) -> int:
    """The tuned model's layer whose format a projected model's layer takes: the first 3 and last 3
    layers keep their offset from the end they sit at, the middle maps proportionally."""
    if l_new < 3 or n_new <= 6 or n_old <= 6:
        return min(l_new, n_old - 1)
    if l_new >= n_new - 3:
        return n_old - (n_new - l_new)
    return min(n_old - 4, max(3, 3 + round((l_new - 3) * (n_old - 7) / max(1, n_new - 7))))


def project(policy: CommPolicy, shape_text: str, model, tokens: int, tp: int, algorithm: str, n_layers_tuned: int) -> dict:
    """The predicted all-reduce time per forward of ``policy`` on a larger model's shape (its layers
    mapped onto the tuned model's by :func:`_project_layer`), and its share of TTFT where a
    committed TTFT run measured that model's compute (benchmarks/results/ttft/ttft_*: the no-communication
    prefill per layer, scaled by TP); says that the KL was measured on another model."""
    from ..comm import cost
    from ..comm.policy import Site

    shape = cost.ModelShape.parse(shape_text)
    tp = shape.tp or tp

    class _P:  # the policy seen through the layer map
        second_fmt = policy.second_fmt

        @staticmethod
        def decide(site, nbytes=None):
            old = Site(layer=_project_layer(site.layer, shape.layers, n_layers_tuned), num_layers=n_layers_tuned,
                       kind=site.kind)
            return policy.decide(old, nbytes)

    _P.algorithm = algorithm
    r = cost.policy_time(model, _P, shape.sites, tokens, tp, algorithm=algorithm)
    out = {"model": shape.name, "hidden": shape.hidden, "layers": shape.layers, "tp": tp, "tokens_per_step": tokens,
           "modelled_us": r["us"], "nccl_us": r["nccl_us"], "ratio": r["ratio"], "notes": r["notes"],
           "kl": f"not measured on {shape.name}: the KL is the tuned model's"}
    comp = _compute_ms(shape, tokens, tp, model.device)
    if comp is not None:
        ms, src = comp
        out.update(compute_ms=ms, compute_source=src, ttft_ms=ms + r["us"] / 1e3, nccl_ttft_ms=ms + r["nccl_us"] / 1e3,
                   comm_share=(r["us"] / 1e3) / (ms + r["us"] / 1e3), nccl_comm_share=(r["nccl_us"] / 1e3) / (ms + r["nccl_us"] / 1e3))
    else:
        out["compute_ms"] = None
        out["compute_source"] = f"no committed TTFT run of {shape.name}'s layers on {model.device}: TTFT share unknown"
    return out


_TTFT_MODELS = {"llama-3-70b": "llama3-70b-slice", "llama-3-8b": "llama3-8b"}


def _compute_ms(shape, tokens: int, tp: int, device: str):
    """(ms of one prefill's compute, source) from benchmarks/results/ttft/ttft_<device>x*_nvlink.jsonl's
    ``no_comm`` rows of the same model (per layer, batch 1, interpolated in tokens), times layers,
    times (measured TP / tp): the row- and column-parallel layers split their work by TP."""
    from ..comm import cost

    name = _TTFT_MODELS.get(shape.name.lower())
    if name is None:
        return None
    d = cost.results_dir()
    rows = []
    for f in sorted(d.glob(f"ttft/ttft_{device.lower()}x*_nvlink.jsonl")):
        world = None
        for i, rec in cost._read_jsonl(f):
            if rec.get("kind") == "header":
                world = rec.get("world")
            elif (rec.get("kind") == "prefill" and rec.get("model") == name and rec.get("variant") == "no_comm"
                  and rec.get("batch") == 1):
                rows.append((rec["tokens"], rec["ms_per_layer"], world, f"{f.name}:{i}"))
    if not rows:
        return None
    rows.sort()
    xs = [r[0] for r in rows]
    if tokens <= xs[0]:
        per, used = rows[0][1] * tokens / xs[0], [rows[0]]
    elif tokens >= xs[-1]:
        per, used = rows[-1][1] * tokens / xs[-1], [rows[-1]]
    else:
        i = next(i for i, x in enumerate(xs) if x >= tokens)
        a, b = rows[i - 1], rows[i]
        per = a[1] + (b[1] - a[1]) * (tokens - a[0]) / (b[0] - a[0]) if b[0] != a[0] else b[1]
        used = [a, b]
    world = used[0][2]
    return per * shape.layers * world / tp, (f"no-communication prefill per layer of {name} at TP={world} "
                                             f"({', '.join(u[3] for u in used)}), x {shape.layers} layers x {world}/{tp}")


# --------------------------------------------------------------------------- qformats eval --gpu/--link (issue 22, point 4)


def add_time_arguments(parser: argparse.ArgumentParser) -> None:
    """``qformats eval``'s options for the modelled all-reduce time per forward of each configuration."""
    t = parser.add_argument_group("modelled time (tp.comm.cost)")
    t.add_argument("--gpu", default=None, help="also give each configuration's MODELLED all-reduce time per forward on "
                                                 "this GPU's measured tables (e.g. H200; needs --link)")
    t.add_argument("--link", default=None, help="with --gpu: nvlink, or host (NCCL_P2P_DISABLE=1 path)")
    t.add_argument("--tokens-per-step", type=int, default=DEFAULT_TOKENS_PER_STEP,
                   help=f"tokens per forward the time is priced at (default {DEFAULT_TOKENS_PER_STEP})")
    t.add_argument("--run-as", choices=RUN_AS, default=None, help="fused (default on nvlink) or nccl (the NCCL path)")
    t.add_argument("--extrapolate-world", action="store_true",
                   help="price a TP degree with no NCCL measurement from the nearest smaller one (says so)")
    t.add_argument("--kernel-table", default=None, metavar="F1,F2",
                   help="kernel tables (benchmarks/codec_gpu.py JSONL; default: the newest committed for --gpu)")
    t.add_argument("--link-table", default=None, metavar="F1,F2", help="link tables (default: the committed ones)")


def eval_times(records: Sequence[dict], model, gpu: str, link: str, tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
               run_as: str | None = None, extrapolate_world: bool = False, kernel_tables=None, link_tables=None) -> list:
    """The modelled all-reduce time per forward of each eval record's configuration (format or
    policy, algorithm, TP) over ``model``'s sites: [{"name", "tp", "algorithm", "modelled_us",
    "nccl_us", "ratio"} or "why" where no table covers it]."""
    from ..comm import cost

    tplan = check_time_plan(TimePlan(gpu, link, tokens_per_step, run_as, (), (0.1,), kernel_tables=kernel_tables,
                                     link_tables=link_tables, extrapolate_world=extrapolate_world))
    cm = tplan.model()
    sites = find_sites(model)
    out = []
    for r in records:
        row = {"name": r["name"], "tp": r["tp"], "algorithm": r["algorithm"]}
        try:
            if r.get("baseline"):
                row["tp"] = None
                out.append({**row, "why": "no all-reduce (one process)"})
                continue
            if r.get("calibration") is not None:
                raise cost.CostTableError("calibrated outlier formats have no kernel times")
            pol = CommPolicy.from_dict(r["policy"])
            if r["format"] != POLICY_LABEL:
                pol = pol.replace(fmt=r["format"], algorithm=r["algorithm"])
            alg = tplan.comm_algorithm(r["algorithm"], cm.link)
            res = cost.policy_time(cm, pol, sites, tokens_per_step, r["tp"], algorithm=alg)
            out.append({**row, "comm_algorithm": alg, "modelled_us": res["us"], "nccl_us": res["nccl_us"],
                        "ratio": res["ratio"], "notes": res["notes"]})
        except (cost.CostTableError, ValueError) as e:
            out.append({**row, "why": str(e).split(" (formats there")[0]})
    return out


def format_eval_times(rows: Sequence[dict], gpu: str, link: str, tokens: int) -> str:
    lines = [f"MODELLED all-reduce time per forward of {tokens} tokens on {gpu} over {link} (tp.comm.cost; not measured):", "",
             "| configuration | TP | algorithm | modelled us | NCCL bf16 us | x NCCL |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r.get("tp") is None:
            continue
        if "why" in r:
            lines.append(f"| {r['name']} | {r['tp']} | {r['algorithm']} | - | - | {r['why']} |")
        else:
            lines.append(f"| {r['name']} | {r['tp']} | {r['comm_algorithm']} | {_us(r['modelled_us'])} | {_us(r['nccl_us'])} | "
                         f"{r['ratio']:.2f}x |")
    notes = sorted({n for r in rows for n in r.get("notes", ())})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def eval_time_report(records, args, out) -> None:
    """``qformats eval --gpu/--link``: print and write (``time.json``, ``time.md``) the modelled times."""
    if getattr(args, "gpu", None) is None:
        if getattr(args, "link", None) is not None:
            raise ValueError("--link prices time: give --gpu too (e.g. --gpu H200 --link nvlink)")
        return
    if args.link is None:
        raise ValueError("--gpu needs --link (nvlink, or host)")
    from . import assets

    model, _, _ = assets.load_model(args.model)
    rows = eval_times(records, model, args.gpu, args.link, args.tokens_per_step, args.run_as, args.extrapolate_world,
                      args.kernel_table, args.link_table)
    text = format_eval_times(rows, args.gpu, args.link, args.tokens_per_step)
    Path(out, "time.json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(out, "time.md").write_text(text)
    print("\n" + text)


def eval_time_check(args) -> None:
    """Check ``qformats eval``'s --gpu/--link before anything runs (ValueError)."""
    if getattr(args, "gpu", None) is None:
        if getattr(args, "link", None) is not None:
            raise ValueError("--link prices time: give --gpu too (e.g. --gpu H200 --link nvlink)")
        return
    if args.link is None:
        raise ValueError("--gpu needs --link (nvlink, or host)")
    check_time_plan(TimePlan(args.gpu, args.link, args.tokens_per_step, args.run_as, (), (0.1,),
                             kernel_tables=args.kernel_table, link_tables=args.link_table,
                             extrapolate_world=args.extrapolate_world)).model()
