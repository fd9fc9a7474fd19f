"""Turn pytest-benchmark JSON of ``benchmarks/test_bench_codec.py`` into a markdown table.

Usage: ``python benchmarks/report_codec.py codec.json [more.json ...] > table.md``

For each (format, op, size): the median time, the achieved bytes/s (input read once + output
written once, as stored by the benchmark), that as a fraction of the HBM copy bandwidth
measured in the same run (the copy case of the same size, and the best copy over sizes >= 64
MiB, which is the reference for the >= 80% target), and the speedup over torch.compile of
the reference codec where that was timed (or why it was not).
"""
import json
import sys
from collections import defaultdict


def load(paths):
    rows, meta = [], {}
    for p in paths:
        d = json.load(open(p))
        meta = d.get("machine_info", {}) | {"datetime": d.get("datetime")}
        for b in d["benchmarks"]:
            rows.append((b["extra_info"], b["stats"]["median"] if b.get("stats") else None))
    return rows, meta


def main(paths):
    rows, meta = load(paths)
    copy = {}
    kern = {}
    ref = defaultdict(dict)
    info0 = None
    for info, med in rows:
        if med is None:
            continue
        info0 = info0 or info
        if info["case"] == "copy":
            copy[info["mib"]] = info["bytes"] / med
        elif info.get("impl") == "triton":
            kern[(info["fmt"], info["case"], info["mib"])] = (med, info["bytes"] / med)
        elif info.get("impl") == "compiled_reference":
            ref[(info["fmt"], info["case"])][info["mib"]] = (med, info.get("matches_kernel"))
    big = [bw for mib, bw in copy.items() if mib >= 64]
    hbm = max(big) if big else max(copy.values())
    out = []
    out.append(f"Device: {info0.get('device')}; torch {info0.get('torch')}, triton {info0.get('triton')}; "
               f"run {meta.get('datetime')}.")
    out.append("")
    out.append("HBM copy bandwidth (read + write) measured in this run: " +
               ", ".join(f"{m} MiB {bw / 1e9:.0f} GB/s" for m, bw in sorted(copy.items())) +
               f". Reference for fractions: {hbm / 1e9:.0f} GB/s (best at >= 64 MiB).")
    out.append("")
    out.append("| format | op | MiB (bf16 in/out) | median us | GB/s | / HBM copy | / copy same size | vs compiled ref |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for (fmt, case, mib), (med, bw) in sorted(kern.items(), key=lambda k: (k[0][0], k[0][1], k[0][2])):
        r = ref.get((fmt, case), {}).get(mib)
        sp = f"{r[0] / med:.1f}x" + ("" if r[1] else " (ref differs!)") if r else ""
        same = copy.get(mib)
        out.append(f"| {fmt} | {case} | {mib:g} | {med * 1e6:.1f} | {bw / 1e9:.0f} | {bw / hbm:.0%} | "
                   f"{(bw / same) if same else float('nan'):.0%} | {sp} |")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
