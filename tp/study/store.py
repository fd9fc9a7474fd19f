"""What a run of ``qformats eval`` (or a stage of ``qformats tune``) keeps in its output folder
between runs: the per-window scores in ``progress.jsonl`` (so that a stopped run resumes where it
stopped), the folder's lock (one writer at a time), and what identifies the code that made the
scores (its source digest, commit and version).

Every scored window is appended to ``progress.jsonl`` as it finishes; its first line is the
run's identity, and a folder started with other settings (or by other code) is refused, never
mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import subprocess
from pathlib import Path

from .stats import WindowScore

__all__ = [
    "PROGRESS_FILE",
    "BASELINE_KEY",
    "RESUME_RTOL",
    "Progress",
    "window_scores",
    "folder_lock",
    "source_digest",
    "git_commit",
    "package_version",
]

PROGRESS_FILE = "progress.jsonl"
BASELINE_KEY = "baseline"  # the baseline's key in progress.jsonl (a configuration's: its JSON identity)
# A resumed run recomputes the baseline of each group of windows it still needs; it must
# reproduce the stopped run's scores (same model, text, software) to this relative tolerance.
RESUME_RTOL = 1e-6


class Progress:
    """Per-window scores of one run, appended to ``progress.jsonl`` as they are
    computed, so that a stopped run resumes where it stopped. The first line
    is the run's identity; a folder holding another run is refused. Without a
    path it only keeps the scores in memory."""

    def __init__(self, path: Path | None, identity: dict):
        self.path, self.identity = path, identity
        self.scores: dict[str, dict[int, WindowScore]] = {}
        self.seconds: dict[str, float] = {}
        self.resumed = 0
        if path is None:
            return
        if path.exists():
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run": identity}, sort_keys=True) + "\n")

    def _read(self) -> None:
        raw = self.path.read_text()
        if raw and not raw.endswith("\n"):  # a line cut short by a kill: drop it
            raw = raw[: raw.rfind("\n") + 1]
            self.path.write_text(raw)
        lines = raw.splitlines()
        try:
            head = json.loads(lines[0])["run"]
        except (IndexError, ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path}: not a qformats eval progress file; pass another --out") from None
        if head != self.identity:
            diff = ", ".join(f"{k}: {head.get(k)!r} there, {self.identity.get(k)!r} now"
                             for k in sorted(set(head) | set(self.identity)) if head.get(k) != self.identity.get(k))
            raise ValueError(f"{self.path.parent} holds a run with other settings ({diff}); pass another --out to start afresh")
        for no, ln in enumerate(lines[1:], start=2):
            try:
                d = json.loads(ln)
                score = WindowScore(d["nll"], d["kl"], d["agree"], d["tokens"])
                key, window, seconds = d["key"], d["window"], float(d["seconds"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}, line {no}: not a progress line ({type(e).__name__}: {e}): "
                                 f"{ln[:80]!r}; delete that line to resume, or pass another --out") from None
            self.scores.setdefault(key, {})[window] = score
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            self.resumed += 1

    def get(self, key: str, window: int) -> WindowScore | None:
        return self.scores.get(key, {}).get(window)

    def complete(self, key: str, n: int) -> bool:
        return len(self.scores.get(key, ())) == n

    def add(self, key: str, window: int, score: WindowScore, seconds: float) -> None:
        self.scores.setdefault(key, {})[window] = score
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        if self.path is not None:
            line = {"key": key, "window": window, **dataclasses.asdict(score), "seconds": round(seconds, 3)}
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def windows(self, key: str, n: int) -> list[WindowScore]:
        return [self.scores[key][i] for i in range(n)]


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (with "-dirty" when edited), if any."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def folder_lock(out):
    """Hold ``out``'s lock file for the run: a second eval on the same folder is refused at once
    (two would append to one progress file and replace each other's results)."""
    if out is None or (Path(out).exists() and not Path(out).is_dir()):
        yield  # no folder (or a file: the job refuses it)
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"--out {out}: another qformats eval is writing to this folder now; wait for it "
                             f"to finish (then run again to add to it) or pass another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (first 16 hex digits) of the qformats, lowering and tp sources that compute an
    eval's scores: results of different code never share a folder (resuming is refused)."""
    import hashlib

    import lowering
    import qformats

    h = hashlib.sha256()
    tp_dir = Path(__file__).resolve().parents[1]  # tp/ (this file is tp/study/store.py)
    for pkg in (Path(qformats.__file__).parent, Path(lowering.__file__).parent, tp_dir):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f"{pkg.name}/{f.relative_to(pkg).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("qformats")
    except metadata.PackageNotFoundError:  # run from a source tree without `pip install`
        return None



def window_scores(folder: str | os.PathLike, name: str, tp: int) -> list:
    """The per-window scores (:class:`tp.study.stats.WindowScore`, in window order) of the
    configuration ``name`` at ``tp`` in an eval (or tune stage) folder's progress file."""
    path = Path(folder) / PROGRESS_FILE
    scores = {}
    with open(path) as f:
        next(f)  # the run's identity
        for line in f:
            d = json.loads(line)
            key = json.loads(d["key"]) if d["key"] != BASELINE_KEY else None
            if key is not None and key[0] == name and key[2] == tp:
                scores[d["window"]] = WindowScore(d["nll"], d["kl"], d["agree"], d["tokens"])
    if not scores:
        raise ValueError(f"{path}: no configuration {name!r} at TP={tp}")
    if sorted(scores) != list(range(len(scores))):
        raise ValueError(f"{path}: {name!r} at TP={tp} is missing windows (an unfinished run)")
    return [scores[i] for i in range(len(scores))]
