"""What ``qformats tune`` writes beside its stages' eval folders, and reads back: ``front.md``
(the confirmed policies sorted by KL with their intervals, the joint search, the additivity
check; under ``--gpu/--link`` the modelled times), ``front.png`` (the fronts), and
:func:`reprice`, which re-fronts a finished tune's ``front.json`` against modelled time
without measuring any KL again (``reprice.json`` / ``reprice.md``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..comm.policy import CommPolicy
from .args import resolve_formats
from .costs import PLAIN, TimePlan, budget_name, check_time_plan, group_times, nccl_forward_us, pick_budgets, project, usable_seconds
from .hf import wire_bits
from .search import SAME, SiteGroup, additive_front, assemble, prune

__all__ = [
    "FRONT_JSON",
    "FRONT_MD",
    "FRONT_PNG",
    "POLICY_DIR",
    "format_front",
    "plot_front",
    "reprice",
    "format_reprice",
]

FRONT_JSON, FRONT_MD, FRONT_PNG, POLICY_DIR = "front.json", "front.md", "front.png", "policies"


def _ci(v, fmt: str) -> str:
    return f"[{format(v[0], fmt)}, {format(v[1], fmt)}]" if v else "-"


def _kl(v) -> str:
    """A KL with 3 significant digits (tiny on fine formats, ~0.1 on 4-bit ones)."""
    return format(v, ".3g") if v is not None else "-"


def _assignment_text(a: dict) -> str:
    return "; ".join(f"{g}: {f}" for g, f in a.items())


def _quality_cells(c: dict) -> str:
    """A confirmed policy's KL, perplexity change and top-1 agreement cells, each with its interval."""
    return (f"{_kl(c['kl'])} {_ci(c['kl_ci'], '.3g')} | {c['ppl_change_pct']:+.2f}% {_ci(c['ppl_change_ci'], '+.2f')} | "
            f"{c['top1_agreement']:.4f} {_ci(c['top1_ci'], '.4f')}")


def _assignment_cell(p: dict, run: dict) -> str:
    """A policy's assignment, with two_shot's second hop."""
    return _assignment_text(p["assignment"]) + (f"; 2nd hop {p['second']}" if run["algorithm"] == "two_shot" else "")


def format_front(doc: dict) -> str:
    """The markdown report: confirmed policies sorted by KL with intervals, the joint search, additivity."""
    r = doc["run"]
    lines = [f"# qformats tune: {r['model']}, TP={r['tp']} {r['algorithm']}", "",
             f"Command: `{r['command']}`  ", f"torch {r['torch']}, transformers {r['transformers']}, Python {r['python']}; "
             f"text: {r['text']}; search on {r['tokens']} tokens, confirmation on {r['confirm_tokens']} tokens "
             f"(windows of {r['window']}); {r['confidence']:.0%} paired bootstrap intervals over windows; "
             f"groups: {', '.join(doc['groups'])}; candidates: {', '.join(doc['candidates'])}"
             + (f"; second hop: {', '.join(doc['second_formats'])}" if doc["second_formats"] else "") + ".", ""]
    tm = doc.get("time")
    if tm:
        return _format_time_front(doc, lines)
    if doc["confirmed"]:
        lines += [f"## Confirmed ({r['confirm_tokens']} tokens), sorted by KL", "",
                  "| policy | TP | bits | KL [95% CI] | ppl change [95% CI] | top-1 [95% CI] | search KL (predicted) | front | assignment |",
                  "|---|---:|---:|---|---|---|---|---|---|"]
        for c in doc["confirmed"]:
            lines.append(f"| {c['name']} | {c['tp']} | {c['bits_per_value']:.3f} | {_quality_cells(c)} | "
                         f"{_kl(c['search_kl'])} ({_kl(c['predicted_kl'])}) | {'yes' if c.get('on_front') else ''} | "
                         f"{_assignment_cell(c, r)} |")
        lines.append("")
    lines += [f"## Joint search ({r['tokens']} tokens), sorted by KL", "",
              "| policy | bits | KL | predicted KL (sum of marginals) | measured / predicted | ppl change | front | assignment |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for j in sorted(doc["joint"], key=lambda j: j["kl"]):
        ratio = f"{j['additivity']:.2f}" if j["additivity"] is not None else "-"
        lines.append(f"| {j['name']} | {j['bits']:.3f} | {_kl(j['kl'])} | {_kl(j['predicted_kl'])} | {ratio} | "
                     f"{j['ppl_change_pct']:+.2f}% | {'yes' if j['on_front'] else ''} | {_assignment_cell(j, r)} |")
    a = doc["additivity"]
    if a:
        lines += ["", f"Additivity: the joint KL is {a['min']:.2f}x to {a['max']:.2f}x (mean {a['mean']:.2f}x) the sum "
                      "of the groups' marginal KLs measured alone."]
    return "\n".join(lines) + "\n"


def _us(v) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _time_header(tm: dict) -> list:
    p = tm["plan"]
    out = [f"Time axis: **modelled** (tp.comm.cost, not measured) all-reduce time per forward of {p['tokens_per_step']} "
           f"tokens on {p['device']} over {p['link']} at TP={p['tp']}, compressed sites run as {p['comm_algorithm']}; "
           f"NCCL bf16 on every site: {_us(tm['nccl_us'])} us (modelled). Kernel tables: {', '.join(p['kernel_tables'])}; "
           f"link tables: {', '.join(p['link_tables'])}" + ("; world size EXTRAPOLATED (--extrapolate-world)" if p.get("extrapolate_world") else "") + ".", ""]
    if tm.get("left_out"):
        out += ["Left out (no kernel time in the table): " + "; ".join(f"{n}" for n in tm["left_out"]) + ".", ""]
    if tm.get("unmet"):
        out += ["No assignment meets: " + "; ".join(tm["unmet"]) + " (predicted front).", ""]
    return out


def _format_time_front(doc: dict, lines: list) -> str:
    r, tm = doc["run"], doc["time"]
    lines += _time_header(tm)
    nccl = tm["nccl_us"]
    if doc["confirmed"]:
        lines += [f"## Confirmed ({r['confirm_tokens']} tokens), sorted by KL", "",
                  "| policy | budget | TP | modelled us (x NCCL) | bits | KL [95% CI] | ppl change [95% CI] | top-1 [95% CI] | front | assignment |",
                  "|---|---|---:|---:|---:|---|---|---|---|---|"]
        for c in doc["confirmed"]:
            lines.append(f"| {c['name']} | {'; '.join(c.get('budgets') or [])} | {c['tp']} | {_us(c['modelled_us'])} "
                         f"({c['modelled_ratio']:.2f}x) | {c['bits_per_value']:.3f} | {_quality_cells(c)} | "
                         f"{'yes' if c.get('on_front') else ''} | {_assignment_cell(c, r)} |")
        lines.append("")
    lines += [f"## Joint search ({r['tokens']} tokens), sorted by modelled time", "",
              "| policy | chosen for | modelled us (x NCCL) | bits | KL | predicted KL | ppl change | front | assignment |",
              "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for j in sorted(doc["joint"], key=lambda j: j["modelled_us"]):
        lines.append(f"| {j['name']} | {'; '.join(j.get('budgets') or [])} | {_us(j['modelled_us'])} ({j['modelled_us'] / nccl:.2f}x) | "
                     f"{j['bits']:.3f} | {_kl(j['kl'])} | {_kl(j['predicted_kl'])} | {j['ppl_change_pct']:+.2f}% | "
                     f"{'yes' if j['on_front'] else ''} | {_assignment_cell(j, r)} |")
    proj = [j for j in doc["joint"] if j.get("projection")]
    if proj:
        p0 = proj[0]["projection"]
        lines += ["", f"## Projected onto {p0['model']} (hidden {p0['hidden']}, {p0['layers']} layers, TP={p0['tp']}, "
                      f"{p0['tokens_per_step']} tokens): modelled all-reduce time; the KL was measured on {r['model'].split(' (')[0]}, "
                      f"not on {p0['model']}", "",
                  "| policy | modelled all-reduce ms (x NCCL) | NCCL ms | compute ms | comm share of TTFT (NCCL's) |", "|---|---:|---:|---:|---|"]
        for j in proj:
            p = j["projection"]
            share = (f"{p['comm_share']:.1%} ({p['nccl_comm_share']:.1%})" if p.get("compute_ms") is not None else "unknown")
            comp = f"{p['compute_ms']:.1f}" if p.get("compute_ms") is not None else "-"
            lines.append(f"| {j['name']} | {p['modelled_us'] / 1e3:.2f} ({p['ratio']:.2f}x) | {p['nccl_us'] / 1e3:.2f} | {comp} | {share} |")
        lines += ["", f"Compute: {p0['compute_source']}."]
    a = doc["additivity"]
    if a:
        lines += ["", f"Additivity: the joint KL is {a['min']:.2f}x to {a['max']:.2f}x (mean {a['mean']:.2f}x) the sum "
                      "of the groups' marginal KLs measured alone. Times add exactly (one forward's all-reduces run one after another)."]
    return "\n".join(lines) + "\n"


def plot_front(doc: dict, path: Path) -> None:
    """front.png: the predicted, joint and confirmed fronts (modelled time instead of bits under --gpu/--link)."""
    if doc.get("time"):
        return _plot_time(doc, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = doc["run"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    pf = doc["predicted_front"]
    ax.step([p["bits"] for p in pf], [max(p["kl"], 1e-6) for p in pf], where="post", color="grey", lw=1, ls="--",
            label=f"predicted front (sum of marginal KLs, {r['tokens']} tokens)")
    js = doc["joint"]
    ax.plot([j["bits"] for j in js], [j["kl"] for j in js], "o", mfc="none", color="tab:blue",
            label=f"assembled policies, measured jointly ({r['tokens']} tokens)")
    colors = plt.get_cmap("tab10")
    for i, t in enumerate(sorted({c["tp"] for c in doc["confirmed"]})):
        cs = sorted((c for c in doc["confirmed"] if c["tp"] == t), key=lambda c: c["bits_per_value"])
        xs, ys = [c["bits_per_value"] for c in cs], [c["kl"] for c in cs]
        err = [[y - (c["kl_ci"] or (y, y))[0] for c, y in zip(cs, ys)], [(c["kl_ci"] or (y, y))[1] - y for c, y in zip(cs, ys)]]
        ax.errorbar(xs, ys, yerr=err, fmt="s-", ms=5, capsize=3, lw=1, color=colors(i + 1),
                    label=f"confirmed, TP={t} ({r['confirm_tokens']} tokens, {r['confidence']:.0%} CI)")
    ax.set_yscale("log")
    ax.set_xlabel("mean wire bits per value sent (this model's rows; two_shot: both hops)")
    ax.set_ylabel("mean KL(baseline || compressed), nats/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{r['model'][:90]}\nqformats tune, TP={r['tp']} {r['algorithm']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _parse_group(label: str, num_layers: int) -> SiteGroup:
    kind, _, rng = label.partition(" L")
    a, _, b = rng.partition("-")
    return SiteGroup(kind, int(a), (int(b) if b else int(a)) + 1)


def reprice(folder, time_plan: TimePlan, *, tp: int | None = None, shape: str | None = None,
            out=None) -> dict:
    """Re-front a finished ``qformats tune`` (its ``front.json``) against modelled time, without
    measuring any KL again: the groups' measured marginal KLs (sensitivity stage) give the
    additive front over (modelled all-reduce time per forward, predicted KL), every group may
    stay plain; the budget picks are reported with their predicted KL, and with the measured
    joint / confirmed KL (and interval) where the tune measured that very assignment. Every
    joint and confirmed policy of the tune is priced too (or says why it cannot be).

    ``tp``: the TP degree to price (default: the tune's; another one reuses the tune's KLs,
    measured at its TP, and says so). ``shape``: the tuned model's shape (:class:`tp.comm.cost.
    ModelShape` syntax) when its name is not a known one. Writes ``reprice.json`` and
    ``reprice.md`` to ``out`` when given; returns the document."""
    from ..comm import cost

    folder = Path(folder)
    doc = json.loads((folder / FRONT_JSON).read_text())
    run = doc["run"]
    time_plan = check_time_plan(time_plan)
    model = time_plan.model()
    tp = tp or run["tp"]
    algorithm = run["algorithm"]
    comm_alg = time_plan.comm_algorithm(algorithm, model.link)
    if shape is None:
        known = {"smollm2": "SmolLM2-135M"}
        key = next((k for k in known if str(run["model"]).lower().startswith(k)), None)
        if key is None:
            raise ValueError(f"{folder}: model {run['model']!r} has no known shape: pass shape='NAME:hidden=H,layers=L'")
        shape = known[key]
    mshape = cost.ModelShape.parse(shape)
    sites = mshape.sites
    groups = [_parse_group(g, mshape.layers) for g in doc["groups"]]
    cands = tuple(resolve_formats(doc["candidates"]))
    if algorithm == "two_shot":
        seconds = tuple((n, None) if n == SAME else (n, resolve_formats([n])[0][1]) for n in doc["second_formats"])
    else:
        seconds = ((SAME, None),)
    T = time_plan.tokens_per_step
    times, missing = group_times(groups, sites, cands + ((PLAIN, None),), seconds, model, T, tp, comm_alg)
    if PLAIN in missing:
        raise ValueError(missing[PLAIN])
    kept = [(n, f) for n, f in cands if n not in missing] + [(PLAIN, None)]
    seconds = usable_seconds(seconds, missing)
    kl_of = {(d["second"], d["group"], d["format"]): d["kl"] for d in doc["sensitivity"]}
    width = mshape.hidden
    total_width = float(len(sites) * width)

    def gbits(g, f, second):
        return sum(wire_bits(f, second if f is not None else None, algorithm, width) * width
                   for s in sites if s.kind == g.kind and g.start <= s.layer < g.stop) / total_width

    predicted = []
    for sname, second in seconds:
        options = [[(times[(sname, g.label, n)], kl_of[(sname, g.label, n)] if f is not None else 0.0, (n, f))
                    for n, f in kept] for g in groups]
        predicted += [(t, k, (sname, ch)) for t, k, ch in additive_front(options)]
    predicted = prune(predicted)
    nccl_us = nccl_forward_us(model, sites, T, tp)

    def assignment(ch):
        return {g.label: n for g, (n, _) in zip(groups, ch)}

    measured = {}
    for j in doc["joint"]:
        measured.setdefault((j["second"], json.dumps(j["assignment"], sort_keys=True)), {})["joint"] = j
    for c in doc["confirmed"]:
        if c["tp"] == run["tp"]:
            measured.setdefault((c["second"], json.dumps(c["assignment"], sort_keys=True)), {})["confirmed"] = c
    picks = []
    for kind, label, (t, k, (sname, ch)) in pick_budgets(predicted, nccl_us, time_plan, lambda p: p[0], lambda p: p[1]):
        a = assignment(ch)
        m = measured.get((sname, json.dumps(a, sort_keys=True)), {})
        picks.append({"budget": budget_name(kind, label), "modelled_us": t, "modelled_ratio": t / nccl_us,
                      "bits": sum(gbits(g, f, dict(seconds)[sname]) for g, (_, f) in zip(groups, ch)),
                      "predicted_kl": k, "second": sname, "assignment": a,
                      "joint_kl": m.get("joint", {}).get("kl"), "confirmed_kl": m.get("confirmed", {}).get("kl"),
                      "confirmed_kl_ci": m.get("confirmed", {}).get("kl_ci"),
                      "confirmed_name": m.get("confirmed", {}).get("name")})
    if time_plan.project:
        by_name = dict(kept)
        for k in picks:
            choice = tuple(by_name[k["assignment"][g.label]] for g in groups)
            pol = assemble(groups, choice, algorithm, dict(seconds)[k["second"]])
            k["projection"] = project(pol, time_plan.project, model, T, tp, comm_alg, mshape.layers)
    met = {p["budget"] for p in picks}
    unmet = [b for b in [budget_name("time", lbl) for lbl, _, _ in time_plan.time_budgets]
             + [budget_name("kl", f"{k:g}") for k in time_plan.kl_budgets] if b not in met]
    priced = []
    for stage, recs in (("confirmed", [c for c in doc["confirmed"] if c["tp"] == run["tp"]]), ("joint", doc["joint"])):
        for rec in recs:
            pol = CommPolicy.from_dict(rec["policy"]) if "policy" in rec else CommPolicy.load(folder / rec["policy_file"])
            try:
                r = cost.policy_time(model, pol, sites, T, tp, algorithm=comm_alg)
                priced.append({"stage": stage, "name": rec["name"], "bits": rec.get("bits", rec.get("bits_per_value")),
                               "kl": rec["kl"], "kl_ci": rec.get("kl_ci"), "modelled_us": r["us"], "modelled_ratio": r["ratio"]})
            except cost.CostTableError as e:
                priced.append({"stage": stage, "name": rec["name"], "bits": rec.get("bits", rec.get("bits_per_value")),
                               "kl": rec["kl"], "kl_ci": rec.get("kl_ci"), "modelled_us": None, "why": str(e).split(" (formats there")[0]})
    res = {"source": str(folder.name), "tuned": {k: run[k] for k in ("model", "tp", "algorithm", "tokens", "confirm_tokens", "command")},
           "plan": time_plan.describe(model, algorithm, tp), "nccl_us": nccl_us, "left_out": missing, "shape": dataclasses.asdict(mshape),
           "kl_note": (f"KLs measured at TP={run['tp']}; priced at TP={tp}" if tp != run["tp"] else f"KLs measured at TP={tp}"),
           "picks": picks, "unmet": unmet, "priced": priced,
           "predicted_front": [{"us": t, "kl": k, "second": s, "assignment": assignment(ch)} for t, k, (s, ch) in predicted]}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reprice.json").write_text(json.dumps(res) + "\n")
        (out / "reprice.md").write_text(format_reprice(res))
    return res


def format_reprice(res: dict) -> str:
    p, t = res["plan"], res["tuned"]
    lines = [f"# Re-fronted against modelled time: {res['source']} ({t['algorithm']}, tuned at TP={t['tp']})", "",
             f"Times are **modelled** (tp.comm.cost), not measured: {p['device']} over {p['link']}, TP={p['tp']}, "
             f"{p['tokens_per_step']} tokens per forward, compressed sites as {p['comm_algorithm']}; NCCL bf16 on every "
             f"site {_us(res['nccl_us'])} us; kernel tables {', '.join(p['kernel_tables'])}; link tables "
             f"{', '.join(p['link_tables'])}" + ("; world size EXTRAPOLATED" if p.get("extrapolate_world") else "") + ". "
             f"{res['kl_note']}; predicted KL = sum of the groups' measured marginal KLs ({t['tokens']} tokens), "
             f"not measured jointly unless a joint/confirmed KL is given.", ""]
    if res["left_out"]:
        lines += ["Candidates left out (no kernel time in the table): " + ", ".join(res["left_out"]) + ".", ""]
    lines += ["| budget | modelled us (x NCCL) | bits | predicted KL | measured KL (joint; confirmed [95% CI]) | assignment |",
              "|---|---:|---:|---:|---|---|"]
    for k in res["picks"]:
        meas = "-"
        if k["joint_kl"] is not None or k["confirmed_kl"] is not None:
            meas = f"{_kl(k['joint_kl'])}; " + (f"{_kl(k['confirmed_kl'])} {_ci(k['confirmed_kl_ci'], '.3g')}" if k["confirmed_kl"] is not None else "-")
        lines.append(f"| {k['budget']} | {_us(k['modelled_us'])} ({k['modelled_ratio']:.2f}x) | {k['bits']:.3f} | "
                     f"{_kl(k['predicted_kl'])} | {meas} | {_assignment_text(k['assignment'])} |")
    if res["unmet"]:
        lines += ["", "No assignment of these candidates meets: " + "; ".join(res["unmet"]) + "."]
    proj = [k for k in res["picks"] if k.get("projection")]
    if proj:
        p0 = proj[0]["projection"]
        lines += ["", f"Projected onto {p0['model']} (hidden {p0['hidden']}, {p0['layers']} layers, TP={p0['tp']}, "
                      f"{p0['tokens_per_step']} tokens; layers mapped onto the tuned model's; the KL is the tuned model's, "
                      f"not measured on {p0['model']}):", "",
                  "| budget (on the tuned model) | modelled all-reduce ms (x NCCL) | NCCL ms | compute ms | comm share of TTFT (NCCL's) |",
                  "|---|---:|---:|---:|---|"]
        for k in proj:
            q = k["projection"]
            share = f"{q['comm_share']:.1%} ({q['nccl_comm_share']:.1%})" if q.get("compute_ms") is not None else "unknown"
            comp = f"{q['compute_ms']:.0f}" if q.get("compute_ms") is not None else "-"
            lines.append(f"| {k['budget']} | {q['modelled_us'] / 1e3:.2f} ({q['ratio']:.2f}x) | {q['nccl_us'] / 1e3:.2f} | {comp} | {share} |")
        lines += ["", f"Compute: {p0['compute_source']}."]
    lines += ["", "The tune's own policies at their modelled time:", "",
              "| stage | policy | bits | KL [95% CI] | modelled us (x NCCL) |", "|---|---|---:|---|---|"]
    for r in res["priced"]:
        tm = f"{_us(r['modelled_us'])} ({r['modelled_ratio']:.2f}x)" if r["modelled_us"] is not None else f"not priced: {r['why']}"
        lines.append(f"| {r['stage']} | {r['name']} | {r['bits']:.3f} | {_kl(r['kl'])} {_ci(r.get('kl_ci'), '.3g')} | {tm} |")
    return "\n".join(lines) + "\n"


def _plot_time(doc: dict, path: Path) -> None:
    """Two panels: KL against modelled all-reduce time per forward (left), against bits (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, tm = doc["run"], doc["time"]
    p = tm["plan"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    floor = 1e-5  # plain (bf16) points have KL 0 (or rounding noise): drawn at this floor
    pf = doc["predicted_front"]
    js = doc["joint"]
    for ax, key, jkey, label in ((axes[0], "x", "modelled_us", "MODELLED all-reduce time per forward, us"),
                                 (axes[1], "bits", "bits", "mean wire bits per value sent")):
        if key == "x":
            ax.step([q["us"] for q in pf], [max(q["kl"], floor) for q in pf], where="post", color="grey", lw=1, ls="--",
                    label=f"predicted front (modelled time, sum of marginal KLs, {r['tokens']} tokens)")
            ax.axvline(tm["nccl_us"], color="k", lw=0.8, ls=":", label=f"NCCL bf16, modelled ({tm['nccl_us']:.0f} us)")
        ax.plot([j[jkey] for j in js], [max(j["kl"], floor) for j in js], "o", mfc="none", color="tab:blue",
                label=f"chosen policies, KL measured jointly ({r['tokens']} tokens)")
        cs = sorted((c for c in doc["confirmed"] if c["tp"] == r["tp"]), key=lambda c: c[jkey if jkey != "bits" else "bits_per_value"])
        if cs:
            xs = [c["modelled_us"] if key == "x" else c["bits_per_value"] for c in cs]
            ys = [max(c["kl"], floor) for c in cs]
            ci = [[max(v, floor) for v in (c["kl_ci"] or (c["kl"], c["kl"]))] for c in cs]
            err = [[max(0.0, y - lo) for (lo, _), y in zip(ci, ys)], [max(0.0, hi - y) for (_, hi), y in zip(ci, ys)]]
            ax.errorbar(xs, ys, yerr=err, fmt="s", ms=5, capsize=3, color="tab:red",
                        label=f"confirmed ({r['confirm_tokens']} tokens, {r['confidence']:.0%} CI)")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"mean KL, nats/token (< {floor:g} drawn at {floor:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{r['model'][:80]}\nqformats tune, TP={r['tp']} {r['algorithm']}; times MODELLED for {p['device']} "
                 f"{p['link']}, {p['tokens_per_step']} tokens per step ({p['comm_algorithm']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
