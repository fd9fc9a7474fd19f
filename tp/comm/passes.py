"""A torch.compile graph pass that swaps a model's collectives for compressed ones, by policy.

Use it when a tensor-parallel model is written with ordinary functional collectives
(``torch.distributed._functional_collectives.all_reduce``, or ``dist.all_reduce``, which
dynamo turns into the functional op), as gpt-fast and torchtitan write them, and you want
compressed communication without editing the model. After AOT autograd the post-grad graph
holds ``_c10d_functional.all_reduce(x, "sum", group_name)`` followed by
``_c10d_functional.wait_tensor``; :class:`CollectivePass` replaces each such pair that its
:class:`tp.CommPolicy` gives a format with one call of a *replacement op*
``op(x, fmt: str, group_name: str, algorithm: str) -> Tensor`` (and optionally each
``all_gather_into_tensor`` + wait with ``op(x, fmt, group_size, group_name)``). The caller
names the ops (tests pass stand-ins); ``tp.compile`` passes ``torch.ops.qformats.all_reduce``
/ ``all_gather`` (the compressed collectives of ``tp.comm.collectives`` as custom ops) and is
the entry point most users want. It lives in ``tp.comm``, not ``lowering``: it has no kernel,
it rewrites collectives, and ``tp.compile`` is its only user.

Installing: never through a global assignment. :func:`compile_options` returns the
``options=`` dict for ``torch.compile`` (the pass applies to that one compiled object);
:func:`installed` is a context manager that sets ``torch._inductor.config.
post_grad_custom_post_pass`` for the duration of a ``with`` block and restores it on exit
(torch.compile is lazy: the first *call* must happen inside the block). Both chain with a
pass that is already installed: that pass runs first, then this one, on the same graph.

Caching: ``uuid()`` hashes the source of this file and of the policy module, the policy (a user callable by its source,
or None -- no caching -- if its source is unavailable), the replacement ops and the chained
pass's uuid. Inductor's FX-graph-cache key covers the post-grad graph's code, not its node
metadata, and module paths (``modules=``, and whatever ``choose`` reads) are metadata: two
models with one graph code can issue their collectives from different modules. So a policy
that reads modules (:attr:`tp.CommPolicy.reads_modules`) is cached only when the caller
states the graph's module attribution (:meth:`CollectivePass.attributed`, which ``tp.compile``
does for every graph dynamo hands it, from that graph's ``nn_module_stack``): the uuid then
includes its digest. Without it the uuid is None and inductor bypasses its caches, so a cache
hit is always the compile this graph would get. A hit skips *every* custom pass, including
the bookkeeping of :attr:`CollectivePass.report` (the compiled code is still the rewritten
one); compile with a fresh ``TORCHINDUCTOR_CACHE_DIR`` or ``fx_graph_cache=False`` when the
report must be filled.

Costs: the pass itself is one linear walk over the graph (microseconds per node). What the
rewritten graph costs at run time is the replacement op's: encode + collective of the
compressed bytes + decode, instead of the plain collective; the report counts the bytes.
Layers: a call site's layer (what layer rules and ``skip_first``/``skip_last`` select) is the
first integer in its module path (``layers.3.mlp.down_proj`` -> 3), the same as in the TP layers
and ``tp.hf``; in a graph whose all-reduces carry no such path it is the position among them, and a
graph break restarts that count, so compile with ``fullgraph=True`` when layer rules matter.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .policy import CommPolicy, Site

__all__ = [
    "CallSite",
    "CollectivePass",
    "Rewrite",
    "RewriteReport",
    "compile_options",
    "installed",
    "module_attribution",
]

_C10D = torch.ops._c10d_functional
# The functional collectives the pass knows, by overload packet (dynamo graphs) and .default
# (post-grad graphs); the pass accepts both.
_ALL_REDUCE = (_C10D.all_reduce, _C10D.all_reduce.default)
_ALL_GATHER = (_C10D.all_gather_into_tensor, _C10D.all_gather_into_tensor.default)
_WAIT = (_C10D.wait_tensor, _C10D.wait_tensor.default)
COMPRESSIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CallSite(Site):
    """One collective in a graph: a :class:`tp.Site` plus where it sits in the graph.

    ``module`` is the dotted path of the module whose forward (or forward hook) issued it and
    ``producer`` that of the module whose forward computed its input (both from the nodes'
    ``nn_module_stack``, e.g. ``"model.layers.3.mlp"`` and ``"model.layers.3.mlp.down_proj"``
    for ``all_reduce(self.down_proj(h))`` written in the MLP's forward; ``""`` for the root
    module or when unknown). ``layer`` is the first integer in those paths and ``kind`` is read
    off them (:meth:`tp.Site.of`); when no all-reduce of the graph has a layer number, an
    all-reduce's layer is its position ``index`` among the graph's ``count`` all-reduces
    (all-gathers get none). ``nbytes`` is this rank's uncompressed message (numel * itemsize).
    """

    index: int
    count: int
    shape: tuple
    dtype: torch.dtype
    group_name: str
    group_size: int = 0  # known for all_gather (an argument of the op); 0 for all_reduce

    def __str__(self) -> str:
        return f"{self.op} #{self.index} ({self.module or 'unknown module'})"

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rewrite:
    """One call site the pass saw: rewritten (``fmt`` set) or left alone (``fmt`` None)."""

    graph: int  # which compiled graph (0, 1, ... in the order the pass saw them)
    site: CallSite
    fmt: Optional[str]
    algorithm: Optional[str]
    bytes_before: int  # this rank's uncompressed message
    bytes_after: int  # its encoding in fmt (== bytes_before when left alone)
    reason: str = ""  # why it was left alone
    second_fmt: Optional[str] = None  # two_shot's second hop when it differs from fmt


@dataclass
class RewriteReport:
    """What a :class:`CollectivePass` did, across every graph it ran on (inspectable, printable)."""

    entries: list = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> list:
        return [e for e in self.entries if e.fmt is not None]

    @property
    def left_alone(self) -> list:
        return [e for e in self.entries if e.fmt is None]

    def count(self, op: Optional[str] = None) -> int:
        """Number of rewritten call sites (of ``op`` if given)."""
        return sum(1 for e in self.rewritten if op is None or e.site.op == op)

    def formats(self) -> dict:
        """{canonical format: number of call sites rewritten to it}."""
        out: dict = {}
        for e in self.rewritten:
            out[e.fmt] = out.get(e.fmt, 0) + 1
        return out

    @property
    def bytes_before(self) -> int:
        return sum(e.bytes_before for e in self.entries)

    @property
    def bytes_after(self) -> int:
        return sum(e.bytes_after for e in self.entries)

    def table(self) -> str:
        """One line per call site: op, issuing module (<- the module that computed its input),
        shape, format, message bytes before/after."""
        if not self.entries:
            return ("no graph went through the pass (not compiled yet, or every graph came from the "
                    "FX graph cache: use a fresh TORCHINDUCTOR_CACHE_DIR or fx_graph_cache=False)")
        rows = [("graph", "op", "#", "module", "shape", "dtype", "format", "bytes before", "bytes after")]
        for e in self.entries:
            s = e.site
            where = (s.module or "(root)") + (f" <- {s.producer}" if s.producer and s.producer != s.module else "")
            rows.append((str(e.graph), s.op, str(s.index), where, "x".join(map(str, s.shape)),
                         str(s.dtype).replace("torch.", ""),
                         f"{e.fmt} ({e.algorithm})" if e.fmt else f"plain ({e.reason})",
                         str(e.bytes_before), str(e.bytes_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        b, a = self.bytes_before, self.bytes_after
        lines.append(f"{self.count()} of {len(self.entries)} collectives rewritten; message bytes "
                     f"{b} -> {a} ({a / b:.3f}x)" if b else "no bytes")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------
def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost module whose forward produced ``node`` ("" if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _normalize_path(path)


def _normalize_path(path: str) -> str:
    # dynamo spells module paths as source expressions: L['self'].layers[0]._modules['mlp'],
    # getattr(L['self'].layers, '0'), L['fn'].layers.0 ...
    prev = None
    while prev != path:
        prev = path
        path = re.sub(r"getattr\(([^()]*), '([^']*)'\)", r"\1.\2", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"^L__[A-Za-z0-9]*__[._]?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def module_attribution(gm: torch.fx.GraphModule) -> str:
    """A digest of which module every node of ``gm`` came from (its ``nn_module_stack``).

    Computed on the dynamo graph handed to a backend, whose node metadata is what the post-grad
    graph's ``nn_module_stack`` entries are copied from; one linear walk (microseconds a node).
    """
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        h.update(repr((n.name, tuple(_normalize_path(v[0]) for v in stack.values()))).encode())
    return h.hexdigest()


def _waits(node: torch.fx.Node) -> Optional[list]:
    users = list(node.users)
    if users and all(u.op == "call_function" and u.target in _WAIT for u in users):
        return users
    return None


class CollectivePass(CustomGraphPass):
    """The post-grad pass: rewrites collectives into replacement ops as the policy says.

    Args:
        policy: a :class:`tp.CommPolicy`.
        all_reduce_op: ``op(x, fmt, group_name, algorithm[, second_fmt]) -> Tensor`` (x's
            shape and dtype; ``second_fmt``, two_shot's second hop, is passed only when the
            policy's differs from ``fmt``), e.g. ``torch.ops.qformats.all_reduce.default``
            (registered by ``tp.compile``).
        all_gather_op: ``op(x, fmt, group_size, group_name) -> Tensor`` ([W * x.shape[0], ...]);
            required only when the policy compresses all-gathers.
        chain: the pass (a CustomGraphPass, a callable, or a list/tuple of them) that was
            installed before; it runs first on every graph. Its uuid joins this one's.

    ``report`` accumulates a :class:`Rewrite` per call site of every graph the pass ran on.
    ``attribution`` is the :func:`module_attribution` of the graph being compiled, or None
    (see the module docstring, Caching); set it with :meth:`attributed`.
    """

    def __init__(self, policy: CommPolicy, all_reduce_op, all_gather_op=None, chain=None):
        if not isinstance(policy, CommPolicy):
            raise TypeError(f"policy must be a tp.CommPolicy, got {type(policy).__name__}")
        if all_reduce_op is None:
            raise ValueError("all_reduce_op is required (tp.compile passes torch.ops.qformats.all_reduce)")
        if policy.all_gather and all_gather_op is None:
            raise ValueError("the policy compresses all-gathers (all_gather=True) but no all_gather_op was given")
        if chain is self:
            raise ValueError("a pass cannot chain itself")
        self.policy = policy
        self.all_reduce_op = getattr(all_reduce_op, "default", all_reduce_op)
        self.all_gather_op = getattr(all_gather_op, "default", all_gather_op) if all_gather_op is not None else None
        self.chain = chain
        self.report = RewriteReport()
        self.attribution: Optional[str] = None

    @contextlib.contextmanager
    def attributed(self, gm: torch.fx.GraphModule):
        """Compile ``gm`` inside this block: the uuid (the cache key) then covers its module paths.

        For a backend that receives dynamo's graph and calls inductor on it (``tp.compile``'s).
        Graphs compiled outside the block (a lazily compiled backward) get no attribution.
        """
        prev, self.attribution = self.attribution, module_attribution(gm)
        try:
            yield self
        finally:
            self.attribution = prev

    # -- CustomGraphPass -----------------------------------------------------------------------
    def __call__(self, graph: torch.fx.Graph) -> None:
        chained = self.chain if isinstance(self.chain, (list, tuple)) else [self.chain]
        for p in chained:
            if p is not None:
                p(graph)
        self.rewrite(graph)

    def uuid(self) -> Optional[bytes]:
        pol = self.policy.fingerprint()
        if pol is None:
            return None
        parts = [_SOURCE_HASH, pol, str(self.all_reduce_op), str(self.all_gather_op)]
        if self.policy.reads_modules:
            if self.attribution is None:
                return None  # decisions read metadata the cache key cannot see: never cache
            parts.append(self.attribution)
        chained = self.chain if isinstance(self.chain, (list, tuple)) else [self.chain]
        for p in chained:
            if p is None:
                continue
            u = p.uuid() if isinstance(p, CustomGraphPass) else None
            if u is None:
                return None  # a chained pass without a stable identity: never cache
            parts.append(repr(u))
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest().encode()

    # -- the rewrite ---------------------------------------------------------------------------
    def rewrite(self, graph: torch.fx.Graph) -> int:
        """Rewrite ``graph`` in place; returns the number of collectives rewritten."""
        gi = self.report.graphs
        self.report.graphs += 1
        found = {"all_reduce": [], "all_gather": []}
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            if n.target in _ALL_REDUCE:
                found["all_reduce"].append(n)
            elif n.target in _ALL_GATHER:
                found["all_gather"].append(n)
        done = 0
        for op, nodes in found.items():
            paths = [(module_path(n), module_path(n.args[0]) if isinstance(n.args[0], torch.fx.Node) else "")
                     for n in nodes]
            layers = [Site.of(m).layer if Site.of(m).layer is not None else Site.of(pr).layer for m, pr in paths]
            if op == "all_gather":
                layers, num_layers = [None] * len(nodes), None
            elif any(layer is not None for layer in layers):
                num_layers = 1 + max(layer for layer in layers if layer is not None)
            else:  # a graph without layer numbers: positions stand in for layers
                layers, num_layers = list(range(len(nodes))), len(nodes)
            for i, (n, (path, producer), layer) in enumerate(zip(nodes, paths, layers)):
                done += self._one(graph, gi, op, i, len(nodes), n, path, producer, layer, num_layers)
        if done:
            graph.lint()
            try:
                from torch._dynamo.utils import counters

                counters["qformats"]["collectives_rewritten"] += done
            except Exception:  # counters are a convenience only
                pass
        return done

    def _one(self, graph, gi, op, index, count, n, path, producer, layer, num_layers) -> int:
        x = n.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if op == "all_reduce":
            reduce_op, group_name = str(n.args[1]).lower(), str(n.args[2])
            group_size = 0
        else:
            group_size, group_name, reduce_op = int(n.args[1]), str(n.args[2]), "sum"
        shape = tuple(val.shape) if val is not None else ()
        dtype = val.dtype if val is not None else torch.float32
        site = CallSite(module=path, producer=producer, layer=layer, num_layers=num_layers,
                        kind=Site.of(path).kind or Site.of(producer).kind, op=op, index=index, count=count,
                        shape=shape, dtype=dtype, group_name=group_name, group_size=group_size)
        before = site.nbytes if val is not None else 0

        def alone(reason):
            self.report.entries.append(Rewrite(gi, site, None, None, before, before, reason))
            return 0

        if val is None:
            return alone("no shape")
        waits = _waits(n)
        if waits is None:
            return alone("result not consumed by wait_tensor only")
        d = self.policy.decide(site, before)
        f = d.fmt
        if f is None:
            return alone(d.why)
        if reduce_op != "sum":
            return alone(f"reduce op {reduce_op}")
        if dtype not in COMPRESSIBLE_DTYPES:
            return alone(f"dtype {dtype}")
        if len(shape) == 0:
            return alone("scalar")
        fmt = str(f)
        second = d.second_fmt if op == "all_reduce" else f
        try:
            f.layout((1, shape[-1]))
            second.layout((1, shape[-1]))
            after = f.nbytes(shape)
        except ValueError as e:
            raise ValueError(f"{op} #{index} ({site.module or 'unknown module'}, shape {shape}): "
                             f"format {fmt} does not apply: {e}") from None
        with graph.inserting_before(n):
            if op == "all_reduce":
                args = (x, fmt, group_name, self.policy.algorithm)
                # the fifth argument only where it says something: a four-argument op serves every other policy
                new = graph.call_function(self.all_reduce_op, args if second == f else args + (str(second),))
            else:
                new = graph.call_function(self.all_gather_op, (x, fmt, group_size, group_name))
        new.meta["val"] = waits[0].meta["val"]  # copy only the value; other meta belongs to the old node
        if "nn_module_stack" in n.meta:
            new.meta["nn_module_stack"] = n.meta["nn_module_stack"]
        for w in waits:
            w.replace_all_uses_with(new)
            graph.erase_node(w)
        graph.erase_node(n)
        self.report.entries.append(Rewrite(gi, site, fmt, self.policy.algorithm if op == "all_reduce" else None,
                                           before, after, second_fmt=None if second == f else str(second)))
        return 1


def _hash_source() -> str:
    from . import policy

    h = hashlib.sha256()
    for path, code in ((__file__, CollectivePass.rewrite.__code__), (policy.__file__, policy.CommPolicy.decide.__code__)):
        try:
            with open(path, "rb") as fh:
                h.update(fh.read())
        except OSError:  # a zipped install: the compiled code is the next best identity
            h.update(repr(code.co_code).encode())
    return h.hexdigest()


_SOURCE_HASH = _hash_source()


# ---------------------------------------------------------------------------------------------
def _config():
    import torch._inductor.config as inductor_config

    return inductor_config


def compile_options(pass_: CollectivePass, options: Optional[dict] = None) -> dict:
    """``options=`` for ``torch.compile`` that run ``pass_`` after the pass already in effect.

    The pass already in effect is ``options["post_grad_custom_post_pass"]`` if given, else the
    global inductor config's; ``pass_.chain`` is set to it (so it keeps running). Nothing
    global changes; the returned dict is a copy.
    """
    opts = dict(options or {})
    prev = opts.get("post_grad_custom_post_pass", _config().post_grad_custom_post_pass)
    if prev is not None and pass_.chain is None and prev is not pass_:
        pass_.chain = prev
    opts["post_grad_custom_post_pass"] = pass_
    return opts


@contextlib.contextmanager
def installed(pass_: CollectivePass):
    """Run ``pass_`` (after the currently installed pass) for graphs compiled inside the block.

    Restores ``torch._inductor.config.post_grad_custom_post_pass`` on exit, also on error.
    Compilation happens at the first call of a compiled function, so call it inside the block.
    """
    cfg = _config()
    prev = cfg.post_grad_custom_post_pass
    if prev is not None and pass_.chain is None and prev is not pass_:
        pass_.chain = prev
    with cfg.patch(post_grad_custom_post_pass=pass_):
        yield pass_
