"""The cost model (tp.comm.cost) against the committed 2xH200 all-reduce runs: every graph-mode
point, modelled vs measured, with the kernel table of the build that made each run.

    PYTHONPATH=. python benchmarks/cost_validation.py benchmarks/results/cost/cost_validation_h200x2.md
"""
import statistics
import sys
from collections import defaultdict

from tp.comm import cost


def main(out: str) -> None:
    rows = cost.validate_runs()
    lines = ["# Cost model vs the committed 2xH200 all-reduce runs", "",
             "Produced by `python benchmarks/cost_validation.py` (tp.comm.cost.validate_runs / validate_breakdowns).",
             "Error = modelled / measured - 1. Graph mode (CUDA graphs). Kernel tables: the 2026-11-22 runs use",
             "`allreduce/fused_breakdown_h200x2.jsonl` (the same build's kernels, timed at 128 MiB, scaled by bytes to other",
             "sizes); their NCCL path had no wire headers (modelled without). NCCL-path two_shot needs requant and",
             "decode times that build never timed alone: those rows use the default (later, faster) kernel table and",
             "are not a validation of that build.", "",
             "## Summary at >= 4 MiB (min / median / max error, points)", "",
             "| run | algorithm | format | min | median | max | points |", "|---|---|---|---:|---:|---:|---:|"]
    groups = defaultdict(list)
    for r in rows:
        if r["modelled_us"] is not None and r["size_mib"] >= 4:
            groups[(r["run"], r["algo"], r["fmt"])].append(r["error"])
    for (run, algo, fmt), e in sorted(groups.items()):
        lines.append(f"| {run} | {algo} | {fmt} | {min(e):+.1%} | {statistics.median(e):+.1%} | {max(e):+.1%} | {len(e)} |")
    lines += ["", "## Every point", "", "| run | algorithm | format | MiB | measured us | modelled us | error | kernel table | measured row |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["modelled_us"] is None:
            lines.append(f"| {r['run']} | {r['algo']} | {r['fmt']} | {r['size_mib']:g} | {r['measured_us']:.1f} | refused | | "
                         f"{r['kernel_table']} | {r['source']} |")
            continue
        lines.append(f"| {r['run']} | {r['algo']} | {r['fmt']} | {r['size_mib']:g} | {r['measured_us']:.1f} | "
                     f"{r['modelled_us']:.1f} | {r['error']:+.1%} | {r['kernel_table']} | {r['source']} |")
    lines += ["", "## Eager breakdowns (128 MiB): fused total and remote dequant-sum from each run's own parts", "",
              "Model: quantise + max(local dequant-sum of 2, peer reads of B at the peer copy bandwidth) + 2 x the",
              "run's eager barrier; remote dequant-sum = max(local, peer reads). Eager timings include Triton's host",
              "launch cost, of the order of the kernels at this size (RESULTS.md, issue 6): they are noisy.", "",
              "| file | run | format | fused total us | modelled | error | remote dsum us | modelled | error |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in cost.validate_breakdowns():
        lines.append(f"| {b['file']} | {b['run']} | {b['fmt']} | {b['measured_total_us']:.0f} | {b['modelled_total_us']:.0f} | "
                     f"{b['error_total']:+.0%} | {b['measured_remote_us']:.0f} | {b['modelled_remote_us']:.0f} | {b['error_remote']:+.0%} |")
    open(out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cost_validation_h200x2.md")
