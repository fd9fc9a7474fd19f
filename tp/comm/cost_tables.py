"""The measured tables the cost model (:mod:`tp.comm.cost`) reads, and how it reads them.

Use :func:`load_kernel_table` / :func:`load_link_table` (or let :class:`tp.comm.cost.CostModel`
load the defaults). Kernel tables are the JSONL of ``benchmarks/codec_gpu.py`` (or the breakdown
records of ``benchmarks/allreduce_gpu.py --breakdown-mib``); link tables the ``nccl_bf16`` and
fused records of ``benchmarks/allreduce_gpu.py`` and ``links_<device>.jsonl``.

Which tables: ``benchmarks/results/cost_tables.json`` names the defaults per device and link (paths
relative to that folder; ``$QFORMATS_RESULTS`` names another folder); a ``codec_<device>*.jsonl``
beside its kernel tables committed after all of them (git history) is put first automatically,
so a new kernel table needs no code change. Earlier files win where two give the same row. Rows
are interpolated in size (log-log between measured sizes, a floor below the smallest); a
device, link, world size, format or step that no table has raises :class:`CostTableError`
naming what is missing and what is there. Cost: reading a table parses its JSONL once (cached
per process); a git call per file for its build.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import qformats

__all__ = [
    "CostTableError",
    "KernelTable",
    "LinkTable",
    "MANIFEST",
    "RESULTS_ENV",
    "device_key",
    "link_key",
    "load_kernel_table",
    "load_link_table",
    "results_dir",
]

RESULTS_ENV = "QFORMATS_RESULTS"  # a folder of measured tables other than the checkout's benchmarks/results
MANIFEST = "cost_tables.json"
MIB = 1 << 20
STEPS = ("quantize", "dequantize", "dequant_sum", "dequant_sum_requant")
# the breakdown records of benchmarks/allreduce_gpu.py: part -> (step, n) of a kernel table
_BREAKDOWN_STEPS = {"quantize": ("quantize", 1), "dequant_sum_local": ("dequant_sum", 2)}
_LINK_ALIASES = {"nvlink": "nvlink", "host": "host", "p2p_off": "host", "pcie": "host", "host_memory": "host"}


class CostTableError(ValueError):
    """A device, link, world size, format or kernel step that no committed table covers."""


# --------------------------------------------------------------------------- names


def device_key(name: str) -> str:
    """'NVIDIA H200' / 'h200' / 'H200' -> 'H200' (the table's device name without the vendor)."""
    s = str(name).strip()
    for p in ("NVIDIA ", "nvidia "):
        if s.startswith(p):
            s = s[len(p):]
    return s.upper().replace(" ", "_")


def link_key(name: str) -> str:
    k = str(name).strip().lower()
    if k not in _LINK_ALIASES:
        raise CostTableError(f"unknown link {name!r}: known are nvlink and host (the host-memory path, "
                             f"NCCL_P2P_DISABLE=1; aliases p2p_off, pcie)")
    return _LINK_ALIASES[k]


def results_dir() -> Path:
    """The folder of measured tables: ``$QFORMATS_RESULTS`` or the checkout's benchmarks/results."""
    env = os.environ.get(RESULTS_ENV)
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if not (d / MANIFEST).is_file():
        raise CostTableError(f"no measured tables at {d} ({MANIFEST} missing): run from a qformats checkout "
                             f"or set {RESULTS_ENV} to a folder holding benchmarks/results' files")
    return d


def _canon(fmt) -> str:
    return str(qformats.as_format(fmt))


@functools.lru_cache(maxsize=256)
def _git_info(path: str) -> tuple:
    """(commit, unix time) of the last commit that changed ``path``'s content, or (None, None)
    without git (renames are followed and not counted: moving a table keeps its build)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--follow", "--diff-filter=r", "--format=%h %ct", "--",
                              os.path.basename(path)],
                             cwd=os.path.dirname(path) or ".", capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    parts = out.stdout.split()
    return (parts[0], int(parts[1])) if out.returncode == 0 and len(parts) == 2 else (None, None)


# --------------------------------------------------------------------------- rows and interpolation


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured figure: x (bytes) -> us, and where it comes from."""

    x: float
    us: float
    source: str  # file:line
    build: str


def _interp(rows: Sequence[Row], x: float, what: str, floor: Optional[Row] = None,
            below: str = "proportional") -> tuple:
    """(us, how, rows used) at x from rows sorted by x: piecewise linear inside; above the largest
    proportional to x; below the smallest ``below``: "proportional" (a kernel's byte rate),
    "clamp" (a latency-bound floor), or linear from ``floor`` at x=0 when given."""
    if not rows:
        raise CostTableError(f"no rows for {what}")
    if x <= 0:
        raise ValueError(f"{what}: size must be positive, got {x}")
    for r in rows:
        if math.isclose(r.x, x, rel_tol=1e-9):
            return r.us, "exact", [r]
    if x > rows[-1].x:
        r = rows[-1]
        return r.us * x / r.x, f"extrapolated above {r.x / MIB:g} MiB (proportional)", [r]
    if x < rows[0].x:
        r = rows[0]
        if floor is not None:
            return floor.us + (r.us - floor.us) * x / r.x, f"interpolated between the floor and {r.x / MIB:g} MiB", [floor, r]
        if below == "clamp":
            return r.us, f"clamped to the smallest size {r.x / MIB:g} MiB", [r]
        return r.us * x / r.x, f"extrapolated below {r.x / MIB:g} MiB (proportional)", [r]
    for a, b in zip(rows, rows[1:]):
        if a.x < x < b.x:
            t = (x - a.x) / (b.x - a.x)
            return a.us + t * (b.us - a.us), "interpolated", [a, b]
    raise AssertionError("unreachable")


def _read_jsonl(path: Path):
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield i, json.loads(line)


# --------------------------------------------------------------------------- kernel tables


class KernelTable:
    """Kernel times of one device by (step, format, n buffers), over bf16 input size."""

    def __init__(self, device: str):
        self.device = device_key(device)
        self.rows: dict = {}  # (step, fmt, n) -> [Row] sorted by x
        self.copy: list = []  # [Row]: x = bytes copied, us
        self.files: list = []  # [(file, build)]
        self.skipped: dict = {}  # format name -> why (a format this build of qformats cannot parse)

    def add_file(self, path: Path) -> "KernelTable":
        path = Path(path)
        build, device, seen = None, None, {}
        copy = []
        for i, d in _read_jsonl(path):
            src = f"{path.name}:{i}"
            if d.get("case") == "env" or d.get("kind") == "header":
                device = d.get("device")
                commit, _ = _git_info(str(path.resolve()))
                build = (d.get("build") or d.get("commit") or "") + " ".join(
                    x for x in (f"`{d.get('command', '?')}`", f"triton {d.get('triton', '?')}",
                                f"tile {d['tile']}" if d.get("tile") else "",
                                f"committed in {commit}" if commit else "") if x)
                if device is not None and device_key(device) != self.device:
                    raise CostTableError(f"{path.name}: a table of {device}, not {self.device}")
                continue
            if build is None:
                raise CostTableError(f"{path.name}:{i}: a record before the run's env/header record")
            if d.get("case") == "copy":
                copy.append(Row(d["mib"] * MIB, d["us"], src, build))
            elif d.get("case") in STEPS and d.get("via", "kernel") == "kernel":
                try:
                    key = (d["case"], _canon(d["fmt"]), int(d.get("n", 1)))
                except ValueError as e:  # a format newer than this checkout: left out, said
                    self.skipped.setdefault(str(d["fmt"]), f"{src}: {e}")
                    continue
                seen.setdefault(key, {})[float(d["mib"]) * MIB] = Row(float(d["mib"]) * MIB, float(d["us"]), src, build)
            elif d.get("kind") == "breakdown":
                x = float(d["size_mib"]) * MIB
                if d["part"] == "hbm_copy":
                    copy.append(Row(x, d["ms"] * 1e3, src, build))
                elif d["part"] in _BREAKDOWN_STEPS and d.get("fmt"):
                    step, n = _BREAKDOWN_STEPS[d["part"]]
                    try:
                        _canon(d["fmt"])
                    except ValueError as e:
                        self.skipped.setdefault(str(d["fmt"]), f"{src}: {e}")
                        continue
                    # a file with several runs (tile configs): the first run's row is kept
                    seen.setdefault((step, _canon(d["fmt"]), n), {}).setdefault(x, Row(x, d["ms"] * 1e3, src, build))
        if build is None:
            raise CostTableError(f"{path.name}: no env/header record (not a codec_gpu.py or allreduce_gpu.py table)")
        for key, by_x in seen.items():
            have = {r.x for r in self.rows.get(key, [])}
            self.rows[key] = sorted(self.rows.get(key, []) + [r for x, r in by_x.items() if x not in have], key=lambda r: r.x)
        have = {r.x for r in self.copy}
        self.copy = sorted(self.copy + [r for r in copy if r.x not in have], key=lambda r: r.x)
        self.files.append((path.name, build))
        return self

    def formats(self) -> list:
        return sorted({k[1] for k in self.rows})

    def has(self, step: str, fmt, n: int = 1) -> bool:
        return (step, _canon(fmt), n) in self.rows

    def time(self, step: str, fmt, n: int, nbytes: float) -> tuple:
        """(us, how, rows) of ``step`` of ``fmt`` over ``n`` buffers each encoding ``nbytes`` of bf16.
        An ``n`` between two measured ones: linear in n (noted)."""
        f = _canon(fmt)
        key = (step, f, n)
        if key in self.rows:
            return _interp(self.rows[key], nbytes, f"{step} {f} n={n}")
        ns = sorted(k[2] for k in self.rows if k[0] == step and k[1] == f)
        lo = [m for m in ns if m < n]
        hi = [m for m in ns if m > n]
        if not ns:
            fmts = ", ".join(self.formats()) or "none"
            raise CostTableError(f"no {step} time for {f} on {self.device} in {', '.join(n for n, _ in self.files)} "
                                 f"(formats there: {fmts})")
        if not lo or not hi:
            raise CostTableError(f"no {step} time for {f} with n={n} on {self.device}: measured n = {ns}")
        a, b = lo[-1], hi[0]
        ta, how_a, ra = self.time(step, f, a, nbytes)
        tb, how_b, rb = self.time(step, f, b, nbytes)
        t = ta + (tb - ta) * (n - a) / (b - a)
        return t, f"{how_a}; linear in n between {a} and {b}", ra + rb

    def copy_gbs(self, nbytes: float) -> tuple:
        """(bytes read + written per second / 1e9, rows): the HBM copy rate near ``nbytes``
        (the largest measured size at or below it, else the smallest)."""
        if not self.copy:
            raise CostTableError(f"no HBM copy rate in {', '.join(n for n, _ in self.files)}")
        below = [r for r in self.copy if r.x <= nbytes]
        r = below[-1] if below else self.copy[0]
        return 2 * r.x / (r.us * 1e-6) / 1e9, [r]


# --------------------------------------------------------------------------- link tables


class LinkTable:
    """NCCL bf16 all-reduce times by world size and size, peer bandwidth, floors, fused floor rows."""

    def __init__(self, device: str, link: str):
        self.device, self.link = device_key(device), link_key(link)
        self.nccl: dict = {}  # world -> [Row]
        self.floor: dict = {}  # world -> Row (x = 0)
        self.peer: dict = {}  # world -> (GB/s, source)
        self.fused_small: dict = {}  # world -> [(fmt, Row)] fused_gather_pull at the smallest size, graph
        self.measured: list = []  # every timed allreduce_gpu.py record: dicts (validation)
        self.files: list = []

    def add_file(self, path: Path, mode: str = "graph") -> "LinkTable":
        path = Path(path)
        header, nccl, fused = None, {}, {}
        for i, d in _read_jsonl(path):
            src = f"{path.name}:{i}"
            kind = d.get("kind")
            if kind == "header":
                header = d
                if device_key(d.get("device", self.device)) != self.device:
                    raise CostTableError(f"{path.name}: a table of {d.get('device')}, not {self.device}")
                continue
            if header is None:
                raise CostTableError(f"{path.name}:{i}: a record before the header")
            commit, _ = _git_info(str(path.resolve()))
            build = " ".join(x for x in (f"`{header.get('command', header.get('source', '?'))}`",
                                         header.get("time", ""), f"committed in {commit}" if commit else "") if x)
            if kind == "time":
                if link_key(d.get("regime", "nvlink")) != self.link:
                    continue
                world = int(d.get("world", header.get("world", 0)))
                rec = dict(d, world=world, source=src, file=path.name)
                self.measured.append(rec)
                if d["mode"] != mode:
                    continue
                x = float(d["size_mib"]) * MIB
                if d["algo"] == "nccl_bf16":
                    nccl.setdefault(world, {})[x] = Row(x, d["ms"] * 1e3, src, build)
                elif d["algo"] == "fused_gather_pull" and d.get("fmt"):
                    fused.setdefault(world, []).append((d["fmt"], Row(x, d["ms"] * 1e3, src, build)))
            elif kind in ("nccl_bf16", "peer_copy", "floor"):
                if link_key(d["link"]) != self.link:
                    continue
                world = int(d["world"])
                if kind == "nccl_bf16":
                    x = float(d["size_mib"]) * MIB
                    nccl.setdefault(world, {})[x] = Row(x, float(d["us"]), src, d.get("source", build))
                elif kind == "peer_copy":
                    self.peer.setdefault(world, (float(d["gbs"]), src))
                else:
                    self.floor.setdefault(world, Row(0.0, float(d["us"]), src, d.get("source", build)))
        if header is None:
            raise CostTableError(f"{path.name}: no header record")
        for w, by_x in nccl.items():
            have = {r.x for r in self.nccl.get(w, [])}
            self.nccl[w] = sorted(self.nccl.get(w, []) + [r for x, r in by_x.items() if x not in have], key=lambda r: r.x)
        for w, rows in fused.items():
            if w not in self.fused_small:
                xmin = min(r.x for _, r in rows)
                self.fused_small[w] = [(f, r) for f, r in rows if r.x == xmin]
        self.files.append(path.name)
        return self

    def worlds(self) -> list:
        return sorted(self.nccl)

    def allreduce(self, nbytes: float, world: int, extrapolate_world: bool = False) -> tuple:
        """(us, how, rows) of NCCL's bf16 all-reduce of ``nbytes`` at ``world``."""
        if world < 2:
            return 0.0, "world size 1: no transfer", []
        if world in self.nccl:
            floor, fnote = self._floor(world)
            t, how, rows = _interp(self.nccl[world], nbytes, f"NCCL bf16 W={world}", floor=floor, below="clamp")
            return t, how + (fnote if floor is not None and nbytes < self.nccl[world][0].x else ""), rows
        measured = self.worlds()
        smaller = [w for w in measured if w < world]
        if not extrapolate_world or not smaller:
            raise CostTableError(
                f"no NCCL all-reduce times for W={world} on {self.device} {self.link} (measured W: {measured}; "
                f"tables {', '.join(self.files)})" + ("" if extrapolate_world else
                                                       "; extrapolate_world=True (--extrapolate-world) scales the nearest smaller W by bus bytes"))
        w0 = smaller[-1]
        x0 = nbytes * (world - 1) / world * w0 / (w0 - 1)
        floor, fnote = self._floor(w0)
        t, how, rows = _interp(self.nccl[w0], x0, f"NCCL bf16 W={w0}", floor=floor, below="clamp")
        how += fnote if floor is not None and x0 < self.nccl[w0][0].x else ""
        return t, f"EXTRAPOLATED from W={w0} at equal bus bytes ({x0 / MIB:.3g} MiB there; {how})", rows

    def _floor(self, world: int) -> tuple:
        """(the small-message floor Row for ``world`` or None, a note when another W's is used)."""
        if world in self.floor:
            return self.floor[world], ""
        if not self.floor:
            return None, ""
        w = min(self.floor, key=lambda v: (abs(v - world), v))
        return self.floor[w], f" (the W={w} small-message floor: none measured at W={world})"

    def peer_gbs(self, world: int) -> tuple:
        if world in self.peer:
            return self.peer[world][0], self.peer[world][1], ""
        if not self.peer:
            raise CostTableError(f"no peer copy bandwidth for {self.device} {self.link} (tables {', '.join(self.files)})")
        w = min(self.peer, key=lambda v: abs(v - world))
        return self.peer[w][0], self.peer[w][1], f"peer bandwidth of W={w} used at W={world} (one GPU's links shared by its peers)"


def _table_paths(kind: str, device: str, link: Optional[str], paths) -> list:
    """The files to read: ``paths`` (names in the results folder or paths), else the manifest's
    defaults with any newer committed codec_<device>*.jsonl first."""
    d = results_dir()
    if paths:
        if isinstance(paths, (str, os.PathLike)):
            paths = [p for p in str(paths).split(",") if p.strip()]
        out = []
        for p in paths:
            p = Path(str(p).strip())
            q = p if p.is_file() else d / p
            if not q.is_file():
                raise CostTableError(f"{kind} table {p}: no such file (here or in {d.name}/)")
            out.append(q)
        return out
    man = json.loads((d / MANIFEST).read_text())
    dev = device_key(device)
    if kind == "kernel":
        names = man.get("kernel", {}).get(dev)
        if not names:
            raise CostTableError(f"no kernel table for device {dev}: known devices {sorted(man.get('kernel', {}))} "
                                 f"(or pass --kernel-table)")
        files = [d / n for n in names]
        newest = max((_git_info(str(f))[1] or 0) for f in files)
        extra = []
        # newer tables are looked for beside the manifest's (its names are relative to the results folder)
        for f in sorted(f for folder in {f.parent for f in files} for f in folder.glob(f"codec_{dev.lower()}*.jsonl")):
            t = _git_info(str(f))[1]
            if f not in files and t and newest and t > newest and _has_timed_kernels(f):
                extra.append((t, f))
        return [f for _, f in sorted(extra, reverse=True)] + files
    links = man.get("link", {}).get(dev)
    if not links:
        raise CostTableError(f"no link tables for device {dev}: known devices {sorted(man.get('link', {}))}")
    lk = link_key(link)
    if lk not in links:
        raise CostTableError(f"no link table for {dev} over {lk}: known links {sorted(links)}")
    return [d / n for n in links[lk]]


def _has_timed_kernels(path: Path) -> bool:
    try:
        for _, d in _read_jsonl(path):
            if d.get("case") == "env" and d.get("tile", "table") != "table":
                return False  # a tile sweep, not the default build's table
            if d.get("case") in STEPS and d.get("via", "kernel") == "kernel":
                return True
    except (OSError, ValueError):
        return False
    return False


def load_kernel_table(device: str, paths=None) -> KernelTable:
    """The kernel table of ``device`` from ``paths`` (default: :func:`_table_paths`' rule)."""
    t = KernelTable(device)
    for p in _table_paths("kernel", device, None, paths):
        t.add_file(p)
    return t


def load_link_table(device: str, link: str, paths=None, mode: str = "graph") -> LinkTable:
    t = LinkTable(device, link)
    for p in _table_paths("link", device, link, paths):
        t.add_file(p, mode)
    return t
