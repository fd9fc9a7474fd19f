"""The results folder stays findable: every committed result file is named by some Markdown file,
and every results path that the docs or the code quote exists.

A file counts as named when a Markdown file (README.md, RESULTS.md, a results folder's README, or
a report beside it) contains its path relative to the repository, to the results folder, or to the
Markdown file's own folder; a Markdown file in the results folder may also name the files below it
by a glob pattern (``*``) relative to its folder. A quoted ``benchmarks/results/...`` path may be a
glob (``*``, or ``<name>`` for one path component) and must match something; the one exception is a
run's own record of the folder it was written to (a Markdown file inside a folder of that name),
which stays as recorded when the folder moves.

Cost: reads the tracked and untracked Markdown and Python files once (well under a second).
"""
import re
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "/".join(RESULTS.relative_to(ROOT).parts) + "/"
# a path as quoted in prose or code: stops at spaces, quotes, backticks, brackets, commas, colons
_PATH = r"[\w.*<>/+-]+"
_QUOTED = re.compile(re.escape(PREFIX.rstrip("/")) + r"(?:/" + _PATH + r")?")


def _repo_files(*patterns) -> list:
    """Tracked and untracked (not ignored) files of the checkout matching the git pathspecs."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *patterns], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs a git checkout")
    return sorted(ROOT / p for p in out.splitlines() if (ROOT / p).is_file())


def _result_files() -> list:
    return _repo_files(PREFIX)


def _markdown() -> dict:
    return {p: p.read_text(errors="replace") for p in _repo_files("*.md")}


def _tokens(text: str) -> set:
    """The path-like tokens of ``text``, also without a sentence's final dot: ``rel`` in them means
    ``text`` names ``rel`` as a whole path, not as the tail of a longer one."""
    toks = set(re.findall(_PATH, text))
    return toks | {t.rstrip(".") for t in toks}


def _patterns(tokens: set) -> list:
    """The glob patterns among ``tokens`` (a ``*`` in a path, not Markdown's ``**`` bold)."""
    return [t for t in tokens if "*" in t and "**" not in t and ("/" in t or "." in t)]


def _is_named(f: Path, docs: dict, tokens: dict, patterns: dict) -> bool:
    for md, text in docs.items():
        if md == f:
            continue
        bases = [ROOT, RESULTS]
        if md.parent == RESULTS or RESULTS in md.parents:
            bases.append(md.parent)
        for base in bases:
            try:
                rel = f.relative_to(base).as_posix()
            except ValueError:
                continue
            if rel in tokens[md]:
                return True
        # a folder README may list a run's many files by pattern, relative to its own folder
        if md.parent == RESULTS or RESULTS in md.parents:
            try:
                rel = f.relative_to(md.parent).as_posix()
            except ValueError:
                continue
            if any(fnmatch(rel, p) for p in patterns[md]):
                return True
    return False


def test_every_result_file_is_named_by_a_markdown_file():
    files = _result_files()
    assert files, "no files under benchmarks/results"
    docs = _markdown()
    tokens = {md: _tokens(text) for md, text in docs.items()}
    patterns = {md: _patterns(tokens[md]) for md in docs}
    unnamed = [f.relative_to(ROOT).as_posix() for f in files if not _is_named(f, docs, tokens, patterns)]
    assert not unnamed, ("result files that no Markdown file names (add them to their folder's README.md): "
                         f"{unnamed}")


def _exists(quoted: str) -> bool:
    pattern = re.sub(r"<[^<>/]*>", "*", quoted.rstrip("/."))
    rel = pattern[len(PREFIX):] if pattern.startswith(PREFIX) else ""
    if not rel:
        return RESULTS.is_dir()
    if "*" not in rel:
        return (RESULTS / rel).exists()
    return any(True for _ in RESULTS.glob(rel))


def _own_record(md: Path, quoted: str) -> bool:
    """A run's record of its own output folder (``--out benchmarks/results/X`` inside folder X)."""
    name = quoted.rstrip("/").rsplit("/", 1)[-1]
    return RESULTS in md.parents and name in {p.name for p in md.parents}


def test_every_quoted_results_path_exists():
    missing = []
    for f in _repo_files("*.md", "*.py"):
        if f == Path(__file__).resolve():
            continue
        for q in _QUOTED.findall(f.read_text(errors="replace")):
            if not _exists(q) and not (f.suffix == ".md" and _own_record(f, q)):
                missing.append(f"{f.relative_to(ROOT).as_posix()}: {q}")
    assert not missing, f"quoted results paths that do not exist: {missing}"
