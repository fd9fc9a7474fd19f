"""Issue 22 point 5: the committed TP=8 tunes (benchmarks/results/tune/tune_tp8_cpu/) re-fronted against
modelled all-reduce time (tp.comm.cost) on H200, NVLink at TP=2/4/8 and the host-memory path, for
SmolLM2 at an 8k-token prefill, without measuring any KL again (qformats tune --reprice).

    PYTHONPATH=. python benchmarks/cost_fronts.py benchmarks/results/cost/cost_fronts_h200
"""
import json
import sys
from pathlib import Path

from tp.comm import cost
from tp.comm.policy import CommPolicy
from tp.study.costs import TimePlan
from tp.study.tune import reprice

EVALS = ("eval_default_tp8_cpu", "eval_rotation_tp8_cpu", "eval_outlier_tp8_cpu", "eval_16k_tp8_cpu")

TUNES = ("gather", "gather_ext", "two_shot")
LINKS = (("nvlink", "fused"), ("nvlink", "nccl"), ("host", "nccl"))
TPS = (2, 4, 8)


def main(out: str) -> None:
    root = Path(__file__).resolve().parent / "results" / "tune" / "tune_tp8_cpu"
    out = Path(out)
    summary = []
    for link, run_as in LINKS:
        for tp in TPS:
            for t in TUNES:
                plan = TimePlan("H200", link, 8192, run_as, ("0.5x", "0.333x"), (0.02, 0.05), extrapolate_world=True,
                                project="Llama-3-70B" if (link, run_as, tp) == ("nvlink", "fused", 8) else None)
                name = f"{t}_{link}_{run_as}_tp{tp}"
                res = reprice(root / t, plan, tp=tp, out=out / name)
                summary.append({"name": name, "tune": t, "link": link, "run_as": run_as, "tp": tp,
                                "nccl_us": res["nccl_us"], "extrapolated": res["plan"]["extrapolate_world"],
                                "min_ratio": min(p["us"] for p in res["predicted_front"]) / res["nccl_us"],
                                "picks": res["picks"], "unmet": res["unmet"], "left_out": sorted(res["left_out"])})
                print(name, "unmet:", res["unmet"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    uniform = price_uniform(Path(__file__).resolve().parent / "results" / "quality")
    (out / "uniform.json").write_text(json.dumps(uniform, indent=1) + "\n")
    (out / "README.md").write_text(report(summary, uniform))


def price_uniform(results: Path) -> list:
    """The uniform formats measured at TP=8 (gather) by the committed evals, with their KL
    intervals, at their modelled time on each link and TP (KL measured at TP=8 only)."""
    shape = cost.ModelShape.parse("SmolLM2-135M")
    rows = []
    for ev in EVALS:
        doc = json.loads((results / ev / "results.json").read_text())
        for r in doc["records"] if isinstance(doc, dict) else doc:
            if r.get("baseline") or r["tp"] != 8 or r["algorithm"] != "gather" or r.get("calibration") or r["format"] == "policy":
                continue
            row = {"eval": ev, "name": r["name"], "format": r["format"], "bits": r["bits_per_value"], "kl": r["kl"],
                   "kl_ci": r.get("kl_ci"), "tokens": r["tokens"], "times": {}}
            for link, run_as in LINKS:
                alg = "fused_gather" if run_as == "fused" else "gather"
                m = cost.CostModel("H200", link, extrapolate_world=True)
                for tp in TPS:
                    try:
                        t = cost.policy_time(m, CommPolicy(r["format"], "gather", 0), shape.sites, 8192, tp, algorithm=alg)
                        row["times"][f"{link}_{run_as}_tp{tp}"] = t["ratio"]
                    except (cost.CostTableError, ValueError) as e:
                        row["times"][f"{link}_{run_as}_tp{tp}"] = None
                        row["why"] = str(e).split(" (formats there")[0].split(" on H200 in")[0]
            rows.append(row)
    return rows


def _pick(s, budget):
    k = next((k for k in s["picks"] if k["budget"] == budget), None)
    if k is None:
        return "none"
    meas = f"; measured {k['confirmed_kl']:.3g} {k['confirmed_kl_ci']}" if k.get("confirmed_kl") is not None else ""
    return f"{k['predicted_kl']:.3g} ({k['modelled_ratio']:.2f}x, {k['bits']:.2f} b{meas})"


def report(summary, uniform) -> str:
    lines = ["# Issue 22 point 5: KL against MODELLED all-reduce time, SmolLM2 at an 8k-token prefill, H200", "",
             "`PYTHONPATH=. python benchmarks/cost_fronts.py benchmarks/results/cost/cost_fronts_h200` (`qformats tune --reprice`",
             "for each folder). No KL was measured again: each row re-fronts a committed TP=8 tune",
             "(`tune_tp8_cpu/<tune>/front.json`: the groups' marginal KLs on 1024 tokens) against the time of",
             "tp.comm.cost with the default kernel tables (kernels/codec_h200.jsonl + kernels/codec_h200_unrolled_recheck.jsonl, the",
             "2026-12-01 build). KL = predicted (sum of marginal KLs; the tunes measured additivity at 0.85-1.24x),",
             "at TP=8 (other TPs reuse it). Candidates without kernel rows are left out (per folder in reprice.md).",
             "NCCL at TP=8 (both links) and at TP=4 on the host path is EXTRAPOLATED from the nearest measured TP by bus",
             "bytes; the fused path at TP=4/8 uses TP=2's fixed cost and peer bandwidth. Budgets: lowest KL within",
             "1/2 and 1/3 of NCCL bf16's modelled time per forward (60 all-reduces of 8192 x 576 bf16 = 9 MiB each).", "",
             "| tune | link, run as | TP | NCCL bf16 us / forward | fastest reachable | KL within 0.5x | KL within 0.333x | fastest with KL <= 0.02 | fastest with KL <= 0.05 |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['tune']} | {s['link']}, {s['run_as']} | {s['tp']}{' (extrap.)' if s['extrapolated'] else ''} | "
                     f"{s['nccl_us']:.0f} | {s['min_ratio']:.2f}x | {_pick(s, 'lowest KL within 0.5x NCCL')} | "
                     f"{_pick(s, 'lowest KL within 0.333x NCCL')} | {_pick(s, 'fastest with KL <= 0.02')} | "
                     f"{_pick(s, 'fastest with KL <= 0.05')} |")
    keys = [f"{link}_{run_as}_tp{tp}" for link, run_as in LINKS for tp in TPS]
    lines += ["", "Uniform formats with MEASURED KL intervals (TP=8, gather, the committed evals) at their modelled time",
              "(x NCCL bf16; KL measured at TP=8 only):", "",
              "| eval | format | bits | KL [95% CI] | " + " | ".join(keys) + " |",
              "|---|---|---:|---|" + "---:|" * len(keys)]
    for u in uniform:
        ci = f" [{u['kl_ci'][0]:.3g}, {u['kl_ci'][1]:.3g}]" if u["kl_ci"] else " (no interval)"
        cells = [f"{u['times'][k]:.2f}x" if u["times"][k] is not None else "-" for k in keys]
        lines.append(f"| {u['eval']} | {u['name']} | {u['bits']:.3g} | {u['kl']:.3g}{ci} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cost_fronts_h200")
