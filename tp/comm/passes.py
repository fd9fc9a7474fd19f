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

Fusing the norm (opt-in: pass ``all_reduce_rmsnorm_op``, which ``tp.compile(..., fuse_norm=True)``
does): where a compressed all-reduce's waited result has one user, ``h = sum + residual``
(``aten.add.Tensor``, either operand order, the residual of the sum's shape and dtype), and a
user of h starts an RMSNorm over h's last dim, all-reduce + wait + add + norm become one
``op(x, residual, weight, eps, fmt, group_name, algorithm[, second_fmt]) -> (normed, h)``
(``torch.ops.qformats.all_reduce_rmsnorm``): the add's users get h, the norm's users normed.
The norm is what ``F.rms_norm`` and the hand-written module (HF's LlamaRMSNorm, with or without
its ``.float()`` / ``.to(dtype)`` casts) decompose into in the post-grad graph: x = h or h cast to
fp32; ``x * rsqrt(mean(x.pow(2) or x * x, dim=-1, keepdim=True) + eps)``; an optional cast to
h's dtype; ``* weight``; an optional cast to h's dtype. Matched strictly, else the all-reduce
gets the plain rewrite: eps a constant number, weight a [h.shape[-1]] float tensor computed
before the add, the result in h's shape and dtype, and every intermediate node read only by the
next (h itself may have other users). The fused op promises ``tp.all_reduce_rmsnorm`` and
:func:`tp.comm.emulate.emulate_all_reduce_rmsnorm` bit for bit, not the model's own norm: h is
the fp32 sum plus the residual rounded once, and the norm follows
:func:`lowering.ops.reference_rms_norm` (fp32, a fixed reduction order) whatever casts the
module wrote, so the compiled model differs from the eager one in the last bits of every fused
site; hence opt-in. Inference only (the op has no gradient). The fused call sits where the add
was (the residual may be computed after the all-reduce), so the collective starts no earlier
than the add would have run. Cost: a walk along a few users of each candidate; at run time the
last decode also writes normed (one kernel on GPU) instead of the decode, the add and
inductor's norm kernel.

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
import operator
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
_ATEN = torch.ops.aten
# What an RMSNorm decomposes into in a post-grad graph (module docstring, Fusing the norm)
_ADD = (_ATEN.add.Tensor, _ATEN.add.Scalar)
_MUL = (_ATEN.mul.Tensor,)
_CAST = (torch.ops.prims.convert_element_type.default,)


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
    norm: bool = False  # the residual add and RMSNorm after it were fused in (qformats.all_reduce_rmsnorm)


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

    @property
    def norms(self) -> int:
        """Number of rewritten all-reduces whose residual add and RMSNorm were fused in (each
        one call of ``torch.ops.qformats.all_reduce_rmsnorm``)."""
        return sum(1 for e in self.rewritten if e.norm)

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
                         (f"{e.fmt} ({e.algorithm})" + (" + rmsnorm" if e.norm else "")) if e.fmt
                         else f"plain ({e.reason})",
                         str(e.bytes_before), str(e.bytes_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        b, a = self.bytes_before, self.bytes_after
        fused = f" ({self.norms} with the add + RMSNorm fused)" if self.norms else ""
        lines.append(f"{self.count()} of {len(self.entries)} collectives rewritten{fused}; message bytes "
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


def _is(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _tensor_val(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _sole_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _plain_add(node) -> bool:
    # aten.add without alpha (or alpha 1): a + b
    return (_is(node, _ADD) and len(node.args) == 2
            and set(node.kwargs) <= {"alpha"} and node.kwargs.get("alpha", 1) == 1)


def _other(node, one):
    # the operand of a binary op that is not ``one`` (None unless ``one`` is exactly one of two)
    a, b = node.args[:2]
    if a is one and b is not one:
        return b
    if b is one and a is not one:
        return a
    return None


def _cast_to(node, dtype) -> bool:
    return _is(node, _CAST) and len(node.args) == 2 and node.args[1] == dtype and not node.kwargs


@dataclass(frozen=True)
class _NormMatch:
    """An all-reduce's ``wait + residual`` feeding an RMSNorm (:func:`_match_norm`)."""

    add: torch.fx.Node  # h = sum + residual
    residual: torch.fx.Node
    weight: torch.fx.Node
    eps: float
    out: torch.fx.Node  # normed = RMSNorm(h) * weight, in h's dtype
    nodes: tuple  # every node the fused op replaces, in graph order (wait first, out last)


def _match_norm(wait: torch.fx.Node, order: dict) -> Optional[_NormMatch]:
    """``wait``'s one user h = wait + residual (same shape and dtype, either order) feeding the
    decomposition of an RMSNorm over h's last dim with a constant eps and a 1-D weight of that
    dim, or None (module docstring, Fusing the norm). ``order``: node -> position in the graph
    (the weight must come before the add, where the fused op goes)."""
    add = _sole_user(wait)
    if add is None or not _plain_add(add) or add.target is not _ATEN.add.Tensor:
        return None
    residual = _other(add, wait)
    hv, sv, rv = _tensor_val(add), _tensor_val(wait), _tensor_val(residual)
    if hv is None or sv is None or rv is None or hv.dim() == 0:
        return None
    if not (hv.shape == sv.shape == rv.shape and hv.dtype == sv.dtype == rv.dtype):
        return None  # a broadcast residual or a type promotion: the fused op's h would differ
    for start in list(add.users):
        m = _match_norm_from(add, start, hv, order)
        if m is not None:
            return _NormMatch(add, residual, m[0], m[1], m[2], (wait, add) + m[3])
    return None


def _match_norm_from(h, start, hv, order):
    """(weight, eps, out, nodes) when ``start`` (a user of ``h``) begins an RMSNorm of ``h``:
    x = h or h widened to fp32; x * rsqrt(mean(x ** 2 (or x * x), last dim, keepdim) + eps); an
    optional cast to h's dtype; * weight; an optional cast to h's dtype. Every node but the
    last has exactly the users the pattern gives it (h may have others: they get h)."""
    x = start if _cast_to(start, torch.float32) and hv.dtype != torch.float32 else h
    for sq in ([start] if x is h else list(x.users)):
        if ((_is(sq, (_ATEN.pow.Tensor_Scalar,)) and len(sq.args) == 2 and sq.args[0] is x
             and _number(sq.args[1]) and sq.args[1] == 2) or (_is(sq, _MUL) and tuple(sq.args) == (x, x))):
            break
    else:
        return None
    mean = _sole_user(sq)
    if not _is(mean, (_ATEN.mean.dim,)) or mean.args[0] is not sq or set(mean.kwargs) - {"keepdim"}:
        return None
    dims = mean.args[1] if len(mean.args) > 1 else None
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, hv.dim() - 1)
            and keepdim is True):
        return None  # the norm is over another dim (or several)
    var = _sole_user(mean)
    if not _plain_add(var) or var.args[0] is not mean or not _number(var.args[1]):
        return None  # eps must be a constant
    rs = _sole_user(var)
    if not _is(rs, (_ATEN.rsqrt.default,)):
        return None
    xn = _sole_user(rs)
    if not _is(xn, _MUL) or _other(xn, rs) is not x:
        return None
    if x is not h and set(x.users) != {sq, xn}:
        return None  # the widened h is read elsewhere
    nodes = ((x,) if x is not h else ()) + (sq, mean, var, rs, xn)
    cur, weight = xn, None
    while True:  # [cast to h's dtype] * weight [cast to h's dtype]; each node before the last has one user
        nxt = _sole_user(cur)
        if nxt is None:
            break
        if _cast_to(nxt, hv.dtype) and _tensor_val(cur) is not None and _tensor_val(cur).dtype != hv.dtype:
            cur = nxt
        elif weight is None and _is(nxt, _MUL) and _other(nxt, cur) is not None:
            weight, cur = _other(nxt, cur), nxt
        else:
            break
        nodes += (cur,)
    wv, out = _tensor_val(weight), _tensor_val(cur)
    if wv is None or out is None or weight not in order or order[weight] >= order[h]:
        return None  # no weight, or one computed after the add (the fused op goes before it)
    if tuple(wv.shape) != (hv.shape[-1],) or wv.dtype not in COMPRESSIBLE_DTYPES:
        return None  # not one weight per feature (a scalar or a broadcast tensor scales otherwise)
    if out.shape != hv.shape or out.dtype != hv.dtype:
        return None  # e.g. an fp32 weight times the norm in bf16: the result is fp32
    return weight, float(var.args[1]), cur, nodes


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
        all_reduce_rmsnorm_op: ``op(x, residual, weight, eps, fmt, group_name, algorithm[,
            second_fmt]) -> (normed, h)``, e.g. ``torch.ops.qformats.all_reduce_rmsnorm.default``;
            when given, a compressed all-reduce that ends in a residual add and an RMSNorm is
            rewritten, with them, into one call of it (module docstring, Fusing the norm).
            None (the default): no fusion.

    ``report`` accumulates a :class:`Rewrite` per call site of every graph the pass ran on.
    ``attribution`` is the :func:`module_attribution` of the graph being compiled, or None
    (see the module docstring, Caching); set it with :meth:`attributed`.
    """

    def __init__(self, policy: CommPolicy, all_reduce_op, all_gather_op=None, chain=None, *,
                 all_reduce_rmsnorm_op=None):
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
        self.all_reduce_rmsnorm_op = (getattr(all_reduce_rmsnorm_op, "default", all_reduce_rmsnorm_op)
                                      if all_reduce_rmsnorm_op is not None else None)
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
        parts = [_SOURCE_HASH, pol, str(self.all_reduce_op), str(self.all_gather_op), str(self.all_reduce_rmsnorm_op)]
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
        order = {}  # the graph's nodes before the rewrite -> position (where a fused norm may go)
        for n in graph.nodes:
            order[n] = len(order)
            if n.op != "call_function":
                continue
            if n.target in _ALL_REDUCE:
                found["all_reduce"].append(n)
            elif n.target in _ALL_GATHER:
                found["all_gather"].append(n)
        done, norms = 0, self.report.norms
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
                done += self._one(graph, gi, op, i, len(nodes), n, path, producer, layer, num_layers, order)
        if done:
            graph.lint()
            try:
                from torch._dynamo.utils import counters

                counters["qformats"]["collectives_rewritten"] += done
                counters["qformats"]["norms_fused"] += self.report.norms - norms
            except Exception:  # counters are a convenience only
                pass
        return done

    def _one(self, graph, gi, op, index, count, n, path, producer, layer, num_layers, order) -> int:
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
        norm = (_match_norm(waits[0], order) if op == "all_reduce" and len(waits) == 1
                and self.all_reduce_rmsnorm_op is not None else None)
        if norm is not None:
            self._fuse_norm(graph, n, norm, (x, norm.residual, norm.weight, norm.eps, fmt, group_name,
                                             self.policy.algorithm) + (() if second == f else (str(second),)))
            self.report.entries.append(Rewrite(gi, site, fmt, self.policy.algorithm, before, after,
                                               second_fmt=None if second == f else str(second), norm=True))
            return 1
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

    def _fuse_norm(self, graph, n, norm: _NormMatch, args: tuple) -> None:
        # one call where the add was (x, the residual and the weight all come before it); the
        # add's users get h, the norm's users normed; the matched nodes go
        with graph.inserting_before(norm.add):
            new = graph.call_function(self.all_reduce_rmsnorm_op, args)
            normed = graph.call_function(operator.getitem, (new, 0))
            h = graph.call_function(operator.getitem, (new, 1))
        new.meta["val"] = (norm.out.meta["val"], norm.add.meta["val"])
        normed.meta["val"], h.meta["val"] = norm.out.meta["val"], norm.add.meta["val"]
        for node, old in ((new, n), (normed, norm.out), (h, norm.add)):
            if "nn_module_stack" in old.meta:
                node.meta["nn_module_stack"] = old.meta["nn_module_stack"]
        matched = set(norm.nodes)
        norm.out.replace_all_uses_with(normed)
        norm.add.replace_all_uses_with(h, delete_user_cb=lambda u: u not in matched)
        for node in reversed(norm.nodes):
            graph.erase_node(node)
        graph.erase_node(n)


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
