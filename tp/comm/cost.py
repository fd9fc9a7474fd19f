"""A cost model of one all-reduce: predicted time per device, link, world size, format and algorithm.

Use it to compare the compressed all-reduce's algorithms with NCCL's bf16 all-reduce before
running anything on GPUs, and to price a :class:`tp.CommPolicy` over a model's sites at a step
size (``qformats tune --gpu/--link``, ``qformats eval --gpu/--link``). Every figure it uses is
read from committed, measured tables in ``benchmarks/results/`` (nothing is typed in here):

* kernel tables (:class:`KernelTable`): the JSONL of ``benchmarks/codec_gpu.py`` (one GPU; each
  timed record: step ``quantize`` / ``dequantize`` / ``dequant_sum`` / ``dequant_sum_requant``,
  format, number of buffers ``n``, bf16 input size ``mib``, ``us``; plus the HBM ``copy`` rate of
  the same run), or the ``kind: breakdown`` records of ``benchmarks/allreduce_gpu.py
  --breakdown-mib`` (quantize, local dequant-sum of 2, HBM copy of that build);
* link tables (:class:`LinkTable`): NCCL's bf16 all-reduce time by size and world size
  (``nccl_bf16`` records of ``benchmarks/allreduce_gpu.py``; ``links_<device>.jsonl`` for figures
  kept only in the toolchain notes), the peer copy bandwidth and the small-message floor, and the
  fused gather's measured time at the table's smallest size (its fixed cost per call).

Which tables: :mod:`tp.comm.cost_tables` (the defaults are named by
``benchmarks/results/cost_tables.json``); ``kernel_tables=`` / ``link_tables=``
(``--kernel-table`` / ``--link-table``) select others. Every :class:`Estimate` lists the table
rows it used (file:line, and the build: the run's command, and its git commit where git knows the
file) and how it got from them to the size asked (``exact`` / ``interpolated`` /
``extrapolated``).

Notation: S = message bytes (bf16 activations, rows x width x 2); B = wire bytes of S in the
format (``fmt.nbytes``; block padding counted); W = world size; q(S), d(S), ds_n(S), dsr_n(S) =
kernel times of quantise, dequantise, dequant-sum of n buffers, dequant-sum-requant of n buffers
(each buffer encoding S); g = the HBM copy rate of the kernel table's run (bytes read + written
per second), so moving X bytes through memory costs X/g; AR(S, W) = NCCL bf16 all-reduce;
P = peer read bandwidth of one GPU over its links; F = the fused path's fixed cost per call.

Collectives other than the all-reduce are priced by their per-rank link bytes against the
measured all-reduce with the same bus bytes (the nccl-tests convention: an all-reduce of S
moves 2(W-1)/W x S per rank): all-gather of b bytes per rank AG(b, W) = AR(W b / 2, W);
all-to-all of b bytes per rank A2A(b, W) = AR(b / 2, W); one send/recv pair of b bytes at
W = 2 = AR(b, 2).

Algorithms (the formulas; ``Estimate.parts`` holds each term):

``nccl``
    AR(S, W), interpolated in S (piecewise linear; below the smallest size: linear between the
    measured small-message floor at 0 bytes -- that W's, else the nearest W's, noted -- and the
    smallest size, or that size's time where no floor is known; above the largest: proportional
    to S).
``gather`` (NCCL path, :func:`tp.comm.collectives.all_reduce`), all on one stream, no overlap:
    q(S) + 2B/g [wire header copy; ``wire_headers=False``: 0] + AG(B, W) + 2WB/g [torch.stack of
    the W wire buffers] + ds_W(S) + 3S/g [fp32 sum cast to bf16: read 2S, write S].
``two_shot`` (NCCL path): q(S) [W chunk encodes] + 2B/g [into the send buffer] + A2A(B, W) +
    2B/g [stack] + dsr_W(S/W) + 2B/(W g) [header copy, with headers] + AG(B2/W, W) + d(S)
    [W chunk decodes] + 4S/g [stack of the fp32 decodes] + 3S/g [cast]; with a second-hop
    format f2 != f: dsr_W(S/W) becomes ds_W(S/W) + q2(S/W) and B2 is the sum's wire bytes in f2.
``p2p_gather`` (W = 2 only; the benchmark's send/recv gather): q(S) + 2B/g + AR(B, 2) + ds_2(S).
``fused_gather`` (:mod:`tp.comm.fused`, pull): F + q(S) + max(ds_W(S), (W-1)B/P). The
    dequant-sum reads the W-1 peers' buffers over the links while it decodes: it takes the
    longer of its own time and the link transfer (full overlap); the quantise cannot overlap
    anything (the barrier waits for it).
``fused_two_shot`` (push): F + max(q(S), (W-1)B/(W P)) [the chunks are quantised straight into
    the peers' memory: remote stores overlap the encode] + dsr_W(S/W) + max(d(S), (W-1)B2/(W P))
    [the pull of the peers' reduced chunks overlaps their decode].

F is measured, not modelled: the fused gather's time at the link table's smallest measured size
(graph mode) less the modelled kernel and link terms there, median over the formats measured.
Without such a row for that (link, W) the nearest measured world size's F is used (noted);
two_shot has three barriers to gather's two and was not timed: gather's F is used (noted).

World sizes: AR(S, W) is read at W; a W with no NCCL rows raises, unless
``extrapolate_world=True``: then AR at the nearest smaller measured W' with the same bus bytes,
AR(S, W) ~ AR(S (W-1) W' / (W (W'-1)), W') (a ring's bandwidth term; its latency term, which
grows with W, is not modelled), noted as an extrapolation. P at W > 2: the W=2 figure, taken as
the GPU's link bandwidth shared by its W-1 peers (a switched NVLink fabric: NV18 to every peer).
Kernel tables are measured on rows 8192 wide: other widths are priced by bytes (noted in the
estimate's ``assumptions``). Decode kernels that write fp32 in the NCCL path are priced as the
measured bf16-output kernels (the extra write is in the formulas' copy terms only where the
code makes a separate pass).

What the model cannot know from these tables: contention between the codec kernels and the
peer traffic for HBM at W > 2, NCCL's latency growth with W, how fused barriers scale with W,
and anything about links other than those measured; see :data:`UNKNOWNS`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import qformats

from .cost_tables import (MANIFEST, MIB, RESULTS_ENV, CostTableError, KernelTable, LinkTable, Row, _read_jsonl,
                          device_key, link_key, load_kernel_table, load_link_table, results_dir)

__all__ = [
    "ALGORITHMS",
    "CostModel",
    "CostTableError",
    "Estimate",
    "KernelTable",
    "LinkTable",
    "MANIFEST",
    "RESULTS_ENV",
    "UNKNOWNS",
    "device_key",
    "link_key",
    "load_kernel_table",
    "load_link_table",
    "policy_time",
    "results_dir",
]
ALGORITHMS = ("nccl", "gather", "two_shot", "p2p_gather", "fused_gather", "fused_two_shot")
# the allreduce_gpu.py record names of the algorithms this model prices (validation)
BENCH_ALGOS = {"nccl_bf16": "nccl", "nccl_gather": "gather", "nccl_two_shot": "two_shot",
               "nccl_p2p_gather": "p2p_gather", "fused_gather_pull": "fused_gather"}
UNKNOWNS = (
    "NCCL bf16 all-reduce at W=8 on H200 (no 8-GPU run is committed): extrapolated from W=4 by bus bytes",
    "the fused path at W > 2 (its barriers, peer reads from W-1 GPUs at once, HBM contention with the codec)",
    "fused two_shot's fixed cost (never timed: the gather's is used)",
    "the host-memory path (NCCL_P2P_DISABLE=1) at W > 2",
    "kernel times on rows narrower than 8192 (priced by bytes)",
)


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Estimate:
    """A predicted time: ``us`` = sum of ``parts``; ``rows``: the table rows used (source, build,
    how they were read at this size); ``notes``: assumptions and extrapolations made."""

    us: float
    algorithm: str
    world: int
    nbytes: int
    fmt: Optional[str]
    parts: dict
    rows: list
    notes: list

    @property
    def extrapolated(self) -> bool:
        return any("EXTRAPOLATED" in n for n in self.notes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CostModel:
    """The predicted time of one all-reduce on ``device`` over ``link`` (module docstring)."""

    def __init__(self, device: str, link: str, *, kernel_tables=None, link_tables=None, mode: str = "graph",
                 extrapolate_world: bool = False, wire_headers: bool = True, kernels: Optional[KernelTable] = None,
                 links: Optional[LinkTable] = None):
        self.device, self.link = device_key(device), link_key(link)
        self.kernels = kernels if kernels is not None else load_kernel_table(self.device, kernel_tables)
        self.links = links if links is not None else load_link_table(self.device, self.link, link_tables, mode)
        self.extrapolate_world = extrapolate_world
        self.wire_headers = wire_headers
        self._floor_cache: dict = {}

    # -- pieces
    def _k(self, acc, name, step, fmt, n, nbytes):
        t, how, rows = self.kernels.time(step, fmt, n, nbytes)
        acc.add(name, t, rows, how)
        return t

    def _ar(self, acc, name, nbytes, world):
        t, how, rows = self.links.allreduce(nbytes, world, self.extrapolate_world)
        acc.add(name, t, rows, how)
        return t

    def _mem(self, acc, name, nbytes_moved, ref_bytes):
        gbs, rows = self.kernels.copy_gbs(ref_bytes)
        t = nbytes_moved / (gbs * 1e9) * 1e6
        acc.add(name, t, rows, f"{nbytes_moved / MIB:.3g} MiB through HBM at the copy rate {gbs:.0f} GB/s")
        return t

    def fused_floor(self, world: int) -> tuple:
        """(F us, rows, note): the fused gather's fixed cost per call (module docstring)."""
        if world in self._floor_cache:
            return self._floor_cache[world]
        have = self.links.fused_small
        if not have:
            raise CostTableError(f"no fused-path measurement on {self.device} {self.link}: the fused algorithms "
                                 f"run only where peers share memory (tables {', '.join(self.links.files)})")
        w = world if world in have else min(have, key=lambda v: (abs(v - world), v))
        note = "" if w == world else f"fused fixed cost of W={w} used at W={world} (not measured there)"
        vals, rows = [], []
        for fmt, r in have[w]:
            try:
                q = self.kernels.time("quantize", fmt, 1, r.x)[0]
                B = _wire_bytes(fmt, r.x)
                p = self.links.peer_gbs(w)[0]
                ds = self.kernels.time("dequant_sum", fmt, w, r.x)[0]
                vals.append(r.us - q - max(ds, (w - 1) * B / (p * 1e9) * 1e6))
                rows.append(r)
            except CostTableError:
                continue
        if not vals:
            raise CostTableError(f"the fused measurements at W={w} name no format of the kernel table")
        vals.sort()
        m = len(vals)
        F = vals[m // 2] if m % 2 else 0.5 * (vals[m // 2 - 1] + vals[m // 2])
        F = max(F, 0.0)
        out = (F, rows, note)
        self._floor_cache[world] = out
        return out

    # -- the entry point
    def allreduce(self, fmt, algorithm: str, world: int, shape=None, *, nbytes: Optional[int] = None,
                  second_fmt=None) -> Estimate:
        """Predicted time of one all-reduce of a bf16 tensor ``shape`` (or ``nbytes`` with rows
        8192 wide) over ``world`` ranks with ``fmt`` (None: plain NCCL) by ``algorithm``."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}: valid are {', '.join(ALGORITHMS)}")
        world = int(world)
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        if shape is None:
            if nbytes is None:
                raise ValueError("give shape or nbytes")
            shape = (max(1, int(nbytes) // (2 * 8192)), 8192)
        shape = tuple(int(s) for s in shape)
        rows_, width = math.prod(shape[:-1]), shape[-1]
        S = rows_ * width * 2
        acc = _Acc()
        f = qformats.as_format(fmt) if fmt is not None else None
        if width != 8192:
            acc.notes.append(f"rows {width} wide: kernel times of 8192-wide rows priced by bytes")
        if f is None or algorithm == "nccl":
            if f is not None:
                acc.notes.append("algorithm nccl: the plain bf16 all-reduce (the format is not used)")
            self._ar(acc, "nccl_allreduce", S, world)
            return acc.estimate("nccl", world, S, None)
        f2 = qformats.as_format(second_fmt) if second_fmt is not None else f
        B = f.nbytes((rows_, width))
        if algorithm == "gather":
            self._k(acc, "quantize", "quantize", f, 1, S)
            if self.wire_headers:
                self._mem(acc, "header_copy", 2 * B, S)
            self._ar(acc, "all_gather", world * B / 2, world)
            self._mem(acc, "stack", 2 * world * B, S)
            self._k(acc, "dequant_sum", "dequant_sum", f, world, S)
            self._mem(acc, "cast_fp32_bf16", 3 * S, S)
        elif algorithm == "p2p_gather":
            if world != 2:
                raise ValueError("p2p_gather is the W=2 send/recv gather of benchmarks/allreduce_gpu.py")
            self._k(acc, "quantize", "quantize", f, 1, S)
            self._mem(acc, "copy_own", 2 * B, S)
            self._ar(acc, "send_recv", B, 2)
            self._k(acc, "dequant_sum", "dequant_sum", f, 2, S)
        elif algorithm == "two_shot":
            c = S / world
            B2 = f2.nbytes((rows_, width))
            self._k(acc, "quantize", "quantize", f, 1, S)
            self._mem(acc, "send_copy", 2 * B, S)
            self._ar(acc, "all_to_all", B / 2, world)
            self._mem(acc, "stack", 2 * B, S)
            self._reduce(acc, f, f2, world, c)
            if self.wire_headers:
                self._mem(acc, "header_copy", 2 * B2 / world, S)
            self._ar(acc, "all_gather", world * (B2 / world) / 2, world)
            self._k(acc, "dequantize", "dequantize", f2, 1, S)
            self._mem(acc, "stack_fp32", 4 * S, S)
            self._mem(acc, "cast_fp32_bf16", 3 * S, S)
        elif algorithm in ("fused_gather", "fused_two_shot"):
            if self.link != "nvlink":
                raise CostTableError(f"the fused algorithms need peer-accessible memory (nvlink), not {self.link}")
            F, frows, fnote = self.fused_floor(world)
            acc.add("fixed", F, frows, "the fused gather's measured time at the smallest size less its modelled terms (median over formats)")
            if fnote:
                acc.notes.append(fnote)
            P, psrc, pnote = self.links.peer_gbs(world)
            if pnote:
                acc.notes.append(pnote)
            prow = [Row(0, 0, psrc, f"peer bandwidth {P:g} GB/s")]
            if algorithm == "fused_gather":
                self._k(acc, "quantize", "quantize", f, 1, S)
                sub = _Acc()
                ds = self._k(sub, "dequant_sum", "dequant_sum", f, world, S)
                link_t = (world - 1) * B / (P * 1e9) * 1e6
                acc.add("dequant_sum_pull", max(ds, link_t), sub.rows + prow,
                        f"max(dequant-sum {ds:.1f} us, peer reads {link_t:.1f} us)")
            else:
                acc.notes.append("fused two_shot was never timed: the gather's fixed cost is used")
                B2 = f2.nbytes((rows_, width))
                sub = _Acc()
                q = self._k(sub, "q", "quantize", f, 1, S)
                push = (world - 1) * B / world / (P * 1e9) * 1e6
                acc.add("quantize_push", max(q, push), sub.rows + prow, f"max(quantise {q:.1f} us, remote stores {push:.1f} us)")
                self._reduce(acc, f, f2, world, S / world)
                sub = _Acc()
                dq = self._k(sub, "d", "dequantize", f2, 1, S)
                pull = (world - 1) * B2 / world / (P * 1e9) * 1e6
                acc.add("dequantize_pull", max(dq, pull), sub.rows + prow, f"max(decode {dq:.1f} us, peer reads {pull:.1f} us)")
        return acc.estimate(algorithm, world, S, str(f) if f2 == f else f"{f}->{f2}")

    def _reduce(self, acc, f, f2, world, c):
        if f2 == f:
            self._k(acc, "dequant_sum_requant", "dequant_sum_requant", f, world, c)
        else:
            self._k(acc, "dequant_sum", "dequant_sum", f, world, c)
            self._k(acc, "requant_second", "quantize", f2, 1, c)
            acc.notes.append("second-hop format: the fp32 sum priced as the bf16-output dequant-sum")

    def nccl(self, world: int, shape=None, *, nbytes: Optional[int] = None) -> Estimate:
        return self.allreduce(None, "nccl", world, shape, nbytes=nbytes)

    def describe(self) -> dict:
        """The tables in use (for reports and policy files)."""
        return {"device": self.device, "link": self.link, "kernel_tables": [n for n, _ in self.kernels.files],
                "kernel_builds": {n: b for n, b in self.kernels.files}, "link_tables": list(self.links.files),
                "extrapolate_world": self.extrapolate_world}


class _Acc:
    def __init__(self):
        self.parts, self.rows, self.notes = {}, [], []

    def add(self, name, us, rows, how):
        self.parts[name] = self.parts.get(name, 0.0) + float(us)
        for r in rows:  # Rows, or the lines of a sub-accumulator
            self.rows.append(r if isinstance(r, str) else f"{name}: {r.source} ({how}) [{r.build}]")
        if "EXTRAPOLATED" in how:
            self.notes.append(f"{name}: {how}")

    def estimate(self, algorithm, world, S, fmt) -> Estimate:
        return Estimate(sum(self.parts.values()), algorithm, world, int(S), fmt, dict(self.parts),
                        list(dict.fromkeys(self.rows)), list(dict.fromkeys(self.notes)))


def _wire_bytes(fmt, nbytes: float) -> int:
    f = qformats.as_format(fmt)
    rows = max(1, int(nbytes) // (2 * 8192))
    return f.nbytes((rows, 8192))


# --------------------------------------------------------------------------- a policy over a model


def policy_time(model: CostModel, policy, sites: Iterable, tokens: int, world: int, *,
                algorithm: Optional[str] = None) -> dict:
    """The predicted all-reduce time of one forward of ``tokens`` tokens (one step) under
    ``policy`` (a :class:`tp.CommPolicy`, None: plain NCCL everywhere) over ``sites`` (objects
    with ``kind``, ``layer``, ``out_features``: :func:`tp.study.hf.find_sites`, or
    :class:`ModelShape.sites`). Each site's message is tokens x out_features bf16. ``algorithm``:
    how the compressed sites run (default: the policy's, "gather"/"two_shot" -> the NCCL path;
    pass "fused_gather"/"fused_two_shot" for the fused kernels). Returns {"us", "nccl_us",
    "ratio", "per_site": [...], "notes": [...], "rows": [...]}."""
    from .policy import Site

    total, base, per, notes, rows = 0.0, 0.0, [], [], []
    cache = {}
    for s in sites:
        width = int(s.out_features)
        shape = (int(tokens), width)
        S = tokens * width * 2
        if policy is not None:
            site = Site(module="", layer=s.layer, num_layers=getattr(s, "num_layers", None), kind=s.kind)
            f, _ = policy.decide(site, S)
            second = policy.second_fmt
            alg = algorithm or policy.algorithm
        else:
            f, second, alg = None, None, "nccl"
        key = (str(f) if f is not None else None, str(second) if second is not None else None, alg, shape)
        if key not in cache:
            est = model.allreduce(f, alg if f is not None else "nccl", world, shape,
                                  second_fmt=second if (f is not None and alg in ("two_shot", "fused_two_shot")) else None)
            cache[key] = est
            notes += est.notes
            rows += est.rows
        nkey = ("nccl", shape)
        if nkey not in cache:
            cache[nkey] = model.nccl(world, shape)
            notes += cache[nkey].notes
            rows += cache[nkey].rows
        est, nc = cache[key], cache[nkey]
        total += est.us
        base += nc.us
        per.append({"kind": s.kind, "layer": s.layer, "fmt": key[0], "us": est.us, "nccl_us": nc.us})
    return {"us": total, "nccl_us": base, "ratio": total / base if base else None, "per_site": per,
            "notes": list(dict.fromkeys(notes)), "rows": list(dict.fromkeys(rows))}


@dataclasses.dataclass(frozen=True)
class _ShapeSite:
    kind: str
    layer: int
    out_features: int
    num_layers: int


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's all-reduce sites by shape only (``--project``): ``layers`` decoder layers, each
    with an attention-output and an MLP-output all-reduce of ``hidden``-wide rows."""

    name: str
    hidden: int
    layers: int
    tp: Optional[int] = None  # the TP degree to price it at (None: the caller's)

    @property
    def sites(self) -> list:
        return [_ShapeSite(k, i, self.hidden, self.layers) for i in range(self.layers) for k in ("attn", "mlp")]

    @staticmethod
    def parse(text: str) -> "ModelShape":
        """'Llama-3-70B' (a known name), 'Llama-3-70B:tp=8', or 'NAME:hidden=8192,layers=80[,tp=8]'."""
        t = str(text).strip()
        known = _known_shapes()
        if t.lower() in known:
            return known[t.lower()]
        head, _, rest = t.partition(":")
        if head.lower() in known and rest.replace(" ", "").lower().startswith("tp="):
            try:
                return dataclasses.replace(known[head.lower()], tp=int(rest.split("=", 1)[1]))
            except ValueError:
                raise ValueError(f"--project {text!r}: tp= needs an integer") from None
        name, _, spec = t.rpartition(":") if ":" in t else ("custom", "", t)
        kv = {}
        for part in spec.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"--project {text!r}: expected a known model ({', '.join(sorted(known))}) or "
                                 f"NAME:hidden=H,layers=L")
            kv[k.strip().lower()] = v.strip()
        try:
            return ModelShape(name or "custom", int(kv["hidden"]), int(kv["layers"]),
                              int(kv["tp"]) if "tp" in kv else None)
        except (KeyError, ValueError):
            raise ValueError(f"--project {text!r}: needs integer hidden= and layers=") from None


def _known_shapes() -> dict:
    """Published shapes (config.json of the Hugging Face releases): hidden size and decoder layers."""
    shapes = [ModelShape("Llama-3-8B", 4096, 32), ModelShape("Llama-3-70B", 8192, 80),
              ModelShape("Llama-3-405B", 16384, 126), ModelShape("SmolLM2-135M", 576, 30)]
    return {s.name.lower(): s for s in shapes}


# --------------------------------------------------------------------------- validation


# The committed multi-GPU runs and the kernel tables of the builds that made them (point 2 of
# issue 22): the all-reduce sweeps and their breakdown came from one build (2026-11-22, its
# kernels timed by the breakdown at 128 MiB); the decode-table breakdown from the next build (its own
# parts). The NCCL path of that build had no wire headers. Paths are relative to the results folder.
VALIDATION_RUNS = (
    {"name": "allreduce_h200x2_nvlink", "measured": "allreduce/allreduce_h200x2_nvlink.jsonl", "link": "nvlink",
     "kernels": ["allreduce/fused_breakdown_h200x2.jsonl"], "links": ["allreduce/allreduce_h200x2_nvlink.jsonl", "cost/links_h200.jsonl"]},
    {"name": "allreduce_h200x2_nvlink_auto", "measured": "allreduce/allreduce_h200x2_nvlink_auto.jsonl", "link": "nvlink",
     "kernels": ["allreduce/fused_breakdown_h200x2.jsonl"], "links": ["allreduce/allreduce_h200x2_nvlink_auto.jsonl", "cost/links_h200.jsonl"]},
    {"name": "allreduce_h200x2_p2p_off", "measured": "allreduce/allreduce_h200x2_p2p_off.jsonl", "link": "host",
     "kernels": ["allreduce/fused_breakdown_h200x2.jsonl"], "links": ["allreduce/allreduce_h200x2_p2p_off.jsonl", "cost/links_h200.jsonl"]},
)


def validate_runs(runs=VALIDATION_RUNS, mode: str = "graph", algos=("nccl_gather", "nccl_p2p_gather",
                                                                     "fused_gather_pull", "nccl_two_shot")) -> list:
    """Modelled vs measured for every timed point of ``runs`` (graph mode): a list of dicts with
    run, algo, fmt, size_mib, measured_us, modelled_us, error (modelled / measured - 1), and the
    kernel table used. two_shot needs requant and decode times, which the 2026-11-22 build never
    timed alone: those points use the default (later) kernel table, and say so."""
    d = results_dir()
    out = []
    for run in runs:
        kt = KernelTable("H200")
        for n in run["kernels"]:
            kt.add_file(d / n)
        lt = LinkTable("H200", run["link"])
        for n in run["links"]:
            lt.add_file(d / n, mode)
        model = CostModel("H200", run["link"], kernels=kt, links=lt, wire_headers=False)
        later = None
        for rec in lt.measured:
            if rec["mode"] != mode or rec["algo"] not in algos or not rec.get("fmt") or rec["world"] != 2:
                continue
            alg = BENCH_ALGOS[rec["algo"]]
            m, table = model, ", ".join(run["kernels"])
            if alg == "two_shot":
                if later is None:
                    later = CostModel("H200", run["link"], links=lt, wire_headers=False)
                m, table = later, ", ".join(n for n, _ in later.kernels.files) + " (a later build)"
            try:
                est = m.allreduce(rec["fmt"], alg, 2, (rec["tokens"], 8192))
            except CostTableError as e:
                out.append({"run": run["name"], "algo": rec["algo"], "fmt": rec["fmt"], "size_mib": rec["size_mib"],
                            "measured_us": rec["ms"] * 1e3, "modelled_us": None, "error": None, "why": str(e),
                            "kernel_table": table, "source": rec["source"]})
                continue
            meas = rec["ms"] * 1e3
            out.append({"run": run["name"], "algo": rec["algo"], "fmt": rec["fmt"], "size_mib": rec["size_mib"],
                        "measured_us": meas, "modelled_us": est.us, "error": est.us / meas - 1,
                        "kernel_table": table, "source": rec["source"], "parts": est.parts})
    return out


def validate_breakdowns(files=("allreduce/fused_breakdown_h200x2.jsonl",
                               "allreduce/fused_breakdown_h200x2_decode_tables.jsonl")) -> list:
    """Each breakdown run's fused_total (eager) against the model from that run's own parts:
    quantise + max(local dequant-sum of 2, peer reads) + 2 x its eager barrier; and its remote
    dequant-sum against max(local, peer reads)."""
    d = results_dir()
    lt = load_link_table("H200", "nvlink")
    P = lt.peer_gbs(2)[0]
    out = []
    for name in files:
        runs, cur = [], None
        for i, rec in _read_jsonl(d / name):
            if rec.get("kind") == "header":
                cur = {"header": rec, "line": i, "parts": {}}
                runs.append(cur)
            elif rec.get("kind") == "breakdown":
                cur["parts"][(rec["part"], rec["fmt"])] = (rec["ms"] * 1e3, f"{name}:{i}", rec["size_mib"])
        for k, run in enumerate(runs):
            p = run["parts"]
            bar = p[("barrier", None)][0]
            for (part, fmt), (tot, src, mib) in p.items():
                if part != "fused_total":
                    continue
                S = mib * MIB
                B = _wire_bytes(fmt, S)
                link_t = B / (P * 1e9) * 1e6
                q, dl, dr = p[("quantize", fmt)][0], p[("dequant_sum_local", fmt)][0], p[("dequant_sum_remote", fmt)][0]
                model_remote = max(dl, link_t)
                model_total = q + model_remote + 2 * bar
                out.append({"file": name, "run": k, "command": run["header"].get("command"), "fmt": fmt, "size_mib": mib,
                            "measured_total_us": tot, "modelled_total_us": model_total, "error_total": model_total / tot - 1,
                            "measured_remote_us": dr, "modelled_remote_us": model_remote,
                            "error_remote": model_remote / dr - 1, "source": src})
    return out
