"""What ``qformats eval`` shows and writes: the plain-text table (sorted by KL, with its legend
and notes), results.json / results.csv (replaced atomically) and plot.png (perplexity change and
KL against wire bits, with the Pareto front and the quality targets)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Iterable

from .stats import CONFIDENCE, FEW_WINDOWS, MIN_WINDOWS_FOR_CI, TARGETS_PCT, pareto_front

__all__ = [
    "BASELINE_DESCRIPTION",
    "BASELINE_LABEL",
    "COLUMNS",
    "LEGEND",
    "by_kl",
    "format_table",
    "head_split_notes",
    "plot_records",
    "write_outputs",
]

# What the baseline row is: the unmodified model in one process (no TP split, no compression),
# computing in fp32; "bf16" is its --formats name (the uncompressed all-reduce).
BASELINE_DESCRIPTION = "the model without TP or compression, fp32"
BASELINE_LABEL = "baseline (fp32, no TP)"


def _finite(v):
    return v if isinstance(v, (int, str)) or v is None or math.isfinite(v) else None


# results.csv's first columns (the table's), in order
COLUMNS = ("format", "tp", "algorithm", "bits_per_value", "nominal_bits_per_value", "compression_ratio", "perplexity",
           "ppl_change_pct", "ppl_change_ci", "kl", "kl_ci", "top1_agreement", "verdict", "tokens", "seconds")
LEGEND = (
    "gather: each rank's partial is quantized once, all-gathered and summed in fp32; two_shot: quantized chunks are "
    "all-to-all'ed, summed, re-quantized and all-gathered. dppl%: perplexity change vs. the baseline; KL: mean "
    "KL(baseline || compressed) of the next-token distribution, nats per token; top1: share of positions whose argmax "
    "is the baseline's; [CI]: {level:.0%} paired bootstrap over windows. verdict: where the dppl% interval lies against "
    "the +{t0:g}% / +{t1:g}% targets: 'within {t0:g}%' (all of it below +{t0:g}%), 'within {t1:g}%, not {t0:g}%' (between "
    "them), 'within {t1:g}%, unresolved vs {t0:g}%' (below +{t1:g}%, straddling +{t0:g}%), 'over {t0:g}%, unresolved vs "
    "{t1:g}%' (above +{t0:g}%, straddling +{t1:g}%), 'over {t1:g}%' (all of it above +{t1:g}%), 'unresolved vs {t0:g}% and "
    "{t1:g}%' (straddling both); more tokens narrow the interval. The baseline is the same model without TP and without "
    "compression (fp32); ratio: bits vs. a bf16 all-reduce (16 bits). Rows sorted by KL; a policy's bits are its sites' "
    "mean (two_shot: both hops')."
)


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "nan"


def _ci(v, fmt: str) -> str:
    return f"[{_num(v[0], fmt)}, {_num(v[1], fmt)}]" if v else "-"


def by_kl(records: Iterable[dict]) -> list[dict]:
    """The records in table order: the baseline first, then by mean KL (unknown KL last)."""
    def key(r):
        kl = r.get("kl")
        return (not r.get("baseline"), not (isinstance(kl, (int, float)) and math.isfinite(kl)),
                kl if isinstance(kl, (int, float)) and math.isfinite(kl) else 0.0)
    return sorted(records, key=key)


def format_table(records: Iterable[dict]) -> str:
    """A plain-text table of the records (what ``qformats eval`` prints), sorted by KL, with a
    header line (model, text, tokens), a footnote on padded rows and a legend."""
    records = by_kl(records)
    if not records:
        return "(no results)"
    r0 = records[0]
    base = next((r for r in records if r.get("baseline")), None)
    head = (f"{'format':<22} {'tp':>3} {'algorithm':<9} {'bits':>7} {'ratio':>5} {'ppl':>8} {'dppl%':>7} "
            f"{'[95% CI]':<17} {'KL':>7} {'[95% CI]':<17} {'top1':>6} {'[95% CI]':<17}  verdict")
    lines = [f"{r0['model']}\non {r0['text']}: {r0['tokens']} tokens in {r0['windows']} windows of {r0['window']}"
             + (f", baseline perplexity {base['perplexity']:.3f} ({BASELINE_DESCRIPTION})" if base else "")]
    if r0["windows"] < MIN_WINDOWS_FOR_CI:
        lines.append(f"! {r0['windows']} window{'s' if r0['windows'] != 1 else ''}: "
                     + ("no interval and no verdict" if r0["windows"] < 2 else
                        f"too few for a reliable {CONFIDENCE:.0%} interval, verdicts marked ({FEW_WINDOWS})")
                     + f"; pass --tokens {MIN_WINDOWS_FOR_CI * r0['window']} or more")
    lines += ["", head, "-" * len(head)]
    padded = []
    for r in records:
        name = BASELINE_LABEL if r.get("baseline") else r["name"]
        bits = "-" if r.get("baseline") else _num(r["bits_per_value"], "6.3f")
        nominal = r.get("nominal_bits_per_value")
        if nominal is not None and not math.isclose(nominal, r["bits_per_value"], rel_tol=1e-9):
            bits += "*"
            padded.append(f"{r['name']} {nominal:g}")
        else:
            bits += " "
        kl = "0" if r.get("baseline") else _num(r["kl"], "7.4f")
        dppl = "0" if r.get("baseline") else _num(r["ppl_change_pct"], "+7.2f")
        lines.append(
            f"{name[:22]:<22} {r['tp'] if not r.get('baseline') else '-':>3} {r['algorithm'] if not r.get('baseline') else '-':<9} "
            f"{bits:>7} {'-' if r.get('baseline') else _num(r['compression_ratio'], '5.2f'):>5} {_num(r['perplexity'], '8.3f')} {dppl:>7} "
            f"{_ci(r.get('ppl_change_ci'), '+.2f'):<17} {kl:>7} {_ci(r.get('kl_ci'), '.4f'):<17} "
            f"{_num(r['top1_agreement'], '6.4f')} {_ci(r.get('top1_ci'), '.4f'):<17}  {r.get('verdict', '-')}"
        )
    lines.append("")
    if padded:
        lines.append("* bits on this model's rows (zero-padded to whole blocks, per-site outliers); `qformats formats` "
                     "lists the nominal figure: " + ", ".join(padded))
    for note in head_split_notes(records):
        lines.append(note)
    lines.append(LEGEND.format(level=CONFIDENCE, t0=TARGETS_PCT[0], t1=TARGETS_PCT[1]))
    return "\n".join(lines)


def head_split_notes(records: Iterable[dict]) -> list[str]:
    """One line per TP degree whose attention heads do not divide evenly over the ranks."""
    notes = {}
    for r in records:
        heads = r.get("heads_per_rank")
        if heads and len(set(heads)) > 1 and r["tp"] not in notes:
            notes[r["tp"]] = (f"TP={r['tp']}: the model's {sum(heads)} attention heads do not divide by {r['tp']}; the "
                              f"emulation gives the ranks {heads} heads (--uneven balanced; --uneven error refuses). "
                              "Real TP frameworks need the heads to divide (transformers, vLLM): take this degree as "
                              "a stress test of the codec, not a deployable split.")
    return [notes[t] for t in sorted(notes)]


def _label_offsets(rs, xs, ys):
    """(offset in points, record, x, y) per point. Among points within 0.6 bits of each other
    (e.g. mxfp4, outlier_int4 and nvfp4 at 4.2-4.5 bits) the highest is named above, the lowest
    below and the others to the right, so that their names do not print over each other."""
    out = []
    for i, r in enumerate(rs):
        near = [ys[j] for j in range(len(rs)) if j != i and abs(xs[j] - xs[i]) < 0.6]
        if not near or ys[i] >= max(near):
            off = (4, 3)
        elif ys[i] <= min(near):
            off = (4, -10)
        else:
            off = (8, -3)
        out.append((off, r, xs[i], ys[i]))
    return out


def plot_records(records: list[dict], path: Path) -> None:
    """plot.png: perplexity change (symlog) and KL against wire bits, per (TP, algorithm), with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = [r for r in records if not r.get("baseline")]
    groups = sorted({(r["tp"], r["algorithm"]) for r in comp})
    cmap = plt.get_cmap("viridis")
    markers = "osD^v<>P"
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, key, ci_key, ylabel in ((axes[0], "ppl_change_pct", "ppl_change_ci",
                                     "perplexity change vs. baseline (%)\nsymlog axis: linear within +-1%, log beyond"),
                                    (axes[1], "kl", "kl_ci", "mean KL(baseline || compressed), nats/token")):
        for gi, (t, a) in enumerate(groups):
            color = cmap(gi / max(1, len(groups) - 1) * 0.85)
            rs = [r for r in comp if (r["tp"], r["algorithm"]) == (t, a) and r[key] is not None and math.isfinite(r[key])]
            if not rs:
                continue
            xs, ys = [r["bits_per_value"] for r in rs], [r[key] for r in rs]
            err = [[max(0.0, y - (r[ci_key] or (y, y))[0]) for r, y in zip(rs, ys)],
                   [max(0.0, (r[ci_key] or (y, y))[1] - y) for r, y in zip(rs, ys)]]
            ax.errorbar(xs, ys, yerr=err, fmt=markers[gi % len(markers)], color=color, ms=5, capsize=3, lw=1,
                        label=f"TP={t} {a}", zorder=3)
            for off, r, x, y in _label_offsets(rs, xs, ys):
                ax.annotate(r["name"], (x, y), fontsize=7, xytext=off, textcoords="offset points")
            if key == "ppl_change_pct":
                front = pareto_front(list(zip(xs, ys)))
                if len(front) > 1:
                    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color=color, lw=1, ls="--",
                            alpha=0.7, label=f"Pareto front, TP={t} {a} (fewest bits for the loss)", zorder=2)
        if key == "ppl_change_pct":
            ax.set_yscale("symlog", linthresh=1.0)
            for lvl, ls in zip(TARGETS_PCT, (":", "-.")):
                ax.axhline(lvl, color="grey", lw=0.8, ls=ls, label=f"target +{lvl:g}%")
            ax.axhline(0.0, color="black", lw=0.6, label=BASELINE_LABEL)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("bits per value on the wire (incl. scales, this model's rows)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(f"{r0['model'][:100]}\non {r0['text'][:80]}: {r0['tokens']} tokens ({r0['windows']} windows of "
                 f"{r0['window']}); error bars: {CONFIDENCE:.0%} bootstrap over windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(records: list[dict], out: str | os.PathLike, run: dict | None = None, plot: bool = True) -> Path:
    """Write results.json ({"run": ..., "records": [...]}), results.csv and (``plot``)
    plot.png into ``out`` (created). Files are replaced atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: (_finite(v) if isinstance(v, float) else [_finite(x) for x in v] if isinstance(v, (list, tuple)) else v)
              for k, v in r.items()} for r in records]
    import uuid

    tag = f"{os.getpid()}.{uuid.uuid4().hex[:12]}.part"  # each writer its own temporary file
    tmp = out / f".results.json.{tag}"
    tmp.write_text(json.dumps({"run": run, "records": clean}, indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    keys = list(COLUMNS) + ["top1_ci", "name", "baseline_perplexity", "windows", "window", "heads_per_rank", "policy", "model", "text"]
    tmp = out / f".results.csv.{tag}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in clean:
            w.writerow([json.dumps(r.get(k), sort_keys=True) if isinstance(r.get(k), (dict, list)) else r.get(k) for k in keys])
    os.replace(tmp, out / "results.csv")
    if plot and records:
        plot_records(records, out / "plot.png")
    return out
