"""Paired differences between two configurations of one finished ``qformats eval`` run.

The eval's intervals compare each configuration with the baseline; to say whether format A
beats format B, compare them window by window: this reads the run's ``progress.jsonl`` and
prints, for each pair A B, the difference of mean KL (A - B) and the perplexity ratio
(A / B - 1, in %), each with a percentile bootstrap over windows that draws the same windows
for both (the eval's protocol: ``tp.study.eval.bootstrap_ci``). Costs well under a second.

    python benchmarks/eval_paired.py RUN_DIR outlier_int4_dyn_h32 int4_b32_bf16_h32 [A B ...]

A name is a configuration's name as the run's table prints it; with several TP degrees or
algorithms add ``--tp`` / ``--algorithm``.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tp.study.eval import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, PROGRESS_FILE  # noqa: E402


def windows(run: Path, name: str, tp: int | None, algorithm: str | None) -> dict:
    """{window: (nll, kl, tokens)} of the configuration ``name`` in ``run``'s progress file."""
    found = {}
    for line in (run / PROGRESS_FILE).read_text().splitlines():
        d = json.loads(line)
        if "key" not in d or d["key"] == "baseline":
            continue
        key = json.loads(d["key"])
        if key[0] == name and (tp is None or key[2] == tp) and (algorithm is None or key[3] == algorithm):
            found.setdefault(d["key"], {})[d["window"]] = (d["nll"], d["kl"], d["tokens"])
    if len(found) != 1:
        raise SystemExit(f"{name}: {len(found)} configurations match in {run} (give --tp / --algorithm)")
    return next(iter(found.values()))


def paired(a: dict, b: dict) -> dict:
    """Point estimates and intervals of KL(A) - KL(B) and ppl(A)/ppl(B) - 1 (%)."""
    if sorted(a) != sorted(b):
        raise SystemExit("the two configurations were scored on different windows")
    w = sorted(a)
    na, ka, t = (np.array([a[i][j] for i in w], dtype=np.float64) for j in range(3))
    nb, kb = (np.array([b[i][j] for i in w], dtype=np.float64) for j in range(2))
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(w), size=(BOOTSTRAP_RESAMPLES, len(w)))
    tt = t[idx].sum(1)
    dkl = (ka[idx].sum(1) - kb[idx].sum(1)) / tt
    dppl = 100.0 * np.expm1((na[idx].sum(1) - nb[idx].sum(1)) / tt)
    q = ((1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2)
    return {"windows": len(w), "dkl": (ka.sum() - kb.sum()) / t.sum(), "dkl_ci": tuple(np.quantile(dkl, q)),
            "dppl_pct": 100.0 * np.expm1((na.sum() - nb.sum()) / t.sum()), "dppl_ci": tuple(np.quantile(dppl, q))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the eval's output folder")
    p.add_argument("names", nargs="+", help="pairs A B of configuration names")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--algorithm", default=None)
    a = p.parse_args(argv)
    if len(a.names) % 2:
        p.error("names come in pairs A B")
    print(f"{'A':<24} {'B':<24} {'KL(A)-KL(B)':>11} {'[95% CI]':<19} {'ppl A/B-1':>9} {'[95% CI]':<17}")
    for x, y in zip(a.names[::2], a.names[1::2]):
        r = paired(windows(a.run, x, a.tp, a.algorithm), windows(a.run, y, a.tp, a.algorithm))
        print(f"{x:<24} {y:<24} {r['dkl']:+11.4f} [{r['dkl_ci'][0]:+.4f}, {r['dkl_ci'][1]:+.4f}]  "
              f"{r['dppl_pct']:+8.2f}% [{r['dppl_ci'][0]:+.2f}, {r['dppl_ci'][1]:+.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
