"""Compressed collectives for an unmodified TP model, by compiling it: ``tp.compile(model, policy)``.

Use it when the model is written with plain collectives -- functional ones
(``torch.distributed._functional_collectives.all_reduce``, as gpt-fast and torchtitan do) or
``dist.all_reduce``, which dynamo turns into the functional op -- and you want the all-reduce
after each row-parallel layer compressed without editing the model::

    policy = tp.CollectivePolicy("mxfp8_e4m3", modules=("*.o_proj", "*.down_proj"))
    model = tp.compile(model, policy)          # torch.compile + the rewrite pass
    y = model(x); tp.print_collectives(model)  # which collectives, which formats, bytes

What it does: ``torch.compile(model, fullgraph=True)`` with inductor and the graph pass of
:mod:`tp.comm.passes`, which replaces every ``_c10d_functional.all_reduce`` + ``wait_tensor``
that the policy gives a format with ``torch.ops.qformats.all_reduce(x, fmt, group_name,
algorithm[, second_fmt])`` (and, with ``all_gather=True``, ``all_gather_into_tensor`` with
``torch.ops.qformats.all_gather``; with ``fuse_norm=True``, an all-reduce followed by the
residual add and an RMSNorm with ``torch.ops.qformats.all_reduce_rmsnorm``, which equals
:func:`tp.all_reduce_rmsnorm`, not the model's own norm, bit for bit: see
:mod:`tp.comm.passes`, Fusing the norm). These custom ops (:mod:`tp.comm.ops`) run
:func:`tp.all_reduce` / :func:`tp.all_gather` with the installed codec, so the compiled model
equals the eager model calling the compressed collectives explicitly, bit for bit (same codec,
same rank-order fp32 sums). The pass is installed as an inductor option of this one compiled
object and chains with any ``post_grad_custom_post_pass`` already in effect (it runs first);
global inductor config is never changed.

Which module a ``modules=`` glob is matched against: the module whose forward (or forward
hook) issues the collective, *and* the module whose forward computed its input. With
``modules=("*.down_proj",)`` all of these are compressed: the all-reduce written inside
``down_proj``'s forward; ``all_reduce(self.down_proj(h))`` in the block's forward (gpt-fast,
torchtitan); a forward hook on the MLP whose output is ``down_proj``'s (gpt-fast's ``tp.py``).
``print_collectives`` shows both paths of every site. Paths are relative to the compiled module
(``layers.0.mlp.down_proj``); ``""`` is the module itself.

What it costs: a compile (seconds to a minute: inductor); at run time each rewritten
collective costs an encode, the collective of the compressed bytes and W decodes (``gather``)
instead of the plain all-reduce -- worth it only where the link, not the GPU, is the
bottleneck, and only above the policy's ``min_bytes``. The ops run as opaque custom ops, so
inductor does not fuse the encode into the producing matmul.

CUDA graphs (``cudagraphs=True``, inductor's ``triton.cudagraphs``, what
``mode="reduce-overhead"`` turns on): the custom ops allocate their wire buffers with the
caching allocator, and CUDA-graph trees run every graph once (warm-up) before capturing it,
so the buffers exist before capture and are replayed from the graph's private pool. For a
manual ``torch.cuda.graph`` capture, run the compiled model once on the capture stream first
for the same reason. Inside capture nothing may synchronise with the host: leave
``TP_VALIDATE_COLLECTIVES`` unset (validation copies a signature to the CPU), and use NCCL
(gloo cannot be captured).

Caching: inductor's cache key covers the graph's code, not which module each node came
from, so this backend hands the pass a digest of the module attribution of every graph
dynamo traces (:meth:`tp.comm.passes.CollectivePass.attributed`); the key includes it when
the policy reads modules. A cache hit is therefore always the compile this model would get.
Reports: a cache hit skips custom passes, including the report's bookkeeping (the cached
code is the rewritten one). Pass ``cache=False`` (or use a fresh ``TORCHINDUCTOR_CACHE_DIR``)
when you need :func:`report` filled.

Autograd: the compressed ops are straight-through (the gradient of ``tp.all_reduce`` for any
format is that of the plain all-reduce: each rank's input gets the output's gradient), except
``all_reduce_rmsnorm``, which refuses inputs that require grad: ``fuse_norm`` is for inference.
"""
from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from .passes import CallSite, CollectivePass, RewriteReport, compile_options, installed
from .policy import CollectivePolicy, CommPolicy

from .collectives import wire_bytes
from .ops import ALL_REDUCE_RMSNORM
from .ops import ALL_GATHER, ALL_REDUCE, all_gather_op, all_reduce_op, group_by_name  # noqa: F401 (old home)

__all__ = [
    "CallSite", "CollectivePolicy", "collective_rows", "compile", "compile_pass", "installed", "print_collectives", "report",
]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
_passes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compile_pass(policy, *, fuse_norm: bool = False) -> CollectivePass:
    """The graph pass for ``policy`` (a :class:`tp.CommPolicy` or a policy file's path) with the
    ops of :mod:`tp.comm.ops` (for a custom ``torch.compile`` call or :func:`installed`); the
    policy's format and algorithm are checked here, not at first call. ``fuse_norm``: see
    :func:`compile`."""
    policy = CommPolicy.load(policy)
    return CollectivePass(policy, ALL_REDUCE, ALL_GATHER,
                          all_reduce_rmsnorm_op=ALL_REDUCE_RMSNORM if fuse_norm else None)


def compile(model, policy: CommPolicy, *, fullgraph: bool = True, cudagraphs: bool = False,
            cache: bool = True, fuse_norm: bool = False, options: Optional[dict] = None, **compile_kwargs):
    """``torch.compile(model)`` with its collectives compressed as ``policy`` says.

    Args:
        model: an nn.Module or function whose collectives are functional (or ``dist.*``) ones.
        policy: a :class:`tp.CommPolicy` (format, algorithm, size floor, rules), or the path of
            a policy file (:meth:`tp.CommPolicy.to_file`, ``qformats tune``).
        fullgraph: passed to torch.compile (default True: a graph break would split the call
            sites and restart the positions ``skip_first``/``skip_last`` count).
        cudagraphs: capture the compiled graphs in CUDA graphs (inductor ``triton.cudagraphs``;
            GPU and NCCL only; see the module docstring).
        cache: False disables the FX graph cache for this model so the pass, and its report,
            run on every compile.
        fuse_norm: also fold the residual add and RMSNorm that follow a compressed all-reduce
            into it (``torch.ops.qformats.all_reduce_rmsnorm``; module docstring, Fusing the
            norm). Inference only; the norm's bits become the fused op's, not the model's.
        options: more inductor options; a ``post_grad_custom_post_pass`` there is chained.
        compile_kwargs: other ``torch.compile`` arguments (``dynamic``, ``backend``...). ``mode``
            cannot be combined with the options this needs: use ``cudagraphs=True`` instead of
            ``mode="reduce-overhead"``.

    Returns the compiled object; :func:`report` and :func:`print_collectives` take it.
    """
    if "mode" in compile_kwargs:
        raise ValueError("tp.compile passes inductor options, which torch.compile cannot combine with mode=; "
                         "use cudagraphs=True for mode='reduce-overhead'")
    if compile_kwargs.get("backend", "inductor") != "inductor":
        raise ValueError(f"tp.compile rewrites collectives in an inductor pass; backend="
                         f"{compile_kwargs['backend']!r} would never run it")
    compile_kwargs.pop("backend", None)
    pass_ = compile_pass(policy, fuse_norm=fuse_norm)
    opts = compile_options(pass_, options)
    if cudagraphs:
        opts["triton.cudagraphs"] = True
    if not cache:
        opts["fx_graph_cache"] = False
    compiled = torch.compile(model, fullgraph=fullgraph, backend=_AttributingInductor(pass_, opts), **compile_kwargs)
    _passes[compiled] = pass_
    return compiled


class _AttributingInductor:
    """Inductor with ``options``, each dynamo graph compiled inside ``pass_.attributed(gm)`` so
    that the cache key covers the graph's module paths (module docstring, Caching)."""

    compiler_name = "inductor"

    def __init__(self, pass_: CollectivePass, options: dict):
        self.pass_, self.options = pass_, options

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        with self.pass_.attributed(gm):
            return compile_fx(gm, example_inputs, config_patches=self.options)


def report(compiled) -> RewriteReport:
    """The :class:`tp.comm.passes.RewriteReport` of a model returned by :func:`compile`."""
    try:
        return _passes[compiled].report
    except (KeyError, TypeError):
        raise ValueError("not a model returned by tp.compile (or it was garbage-collected)") from None


def _group_size(site: CallSite) -> int:
    if site.group_size:
        return site.group_size
    try:
        return dist.get_world_size(group_by_name(site.group_name))
    except Exception:  # noqa: BLE001 - a report must print even after teardown
        return 0


def collective_rows(rep: RewriteReport) -> list[dict]:
    """One dict per call site: op, module, shape, dtype, fmt, algorithm, norm (the add + RMSNorm
    fused in), world, message bytes and bytes this rank sends before/after (``tp.wire_bytes``;
    ring all-reduce for plain)."""
    rows = []
    for e in rep.entries:
        s, w = e.site, _group_size(e.site)
        if s.op == "all_reduce" and w:
            plain = wire_bytes(s.shape, s.dtype, None, "gather", w).sent_bytes
            sent = (wire_bytes(s.shape, s.dtype, e.fmt, e.algorithm or "gather", w, e.second_fmt).sent_bytes
                    if e.fmt else plain)
        else:  # all-gather: my buffer reaches W-1 peers
            plain, sent = (w - 1) * e.bytes_before, (w - 1) * e.bytes_after
        rows.append(dict(graph=e.graph, op=s.op, index=s.index, module=s.module, producer=s.producer,
                         shape=s.shape, dtype=s.dtype,
                         fmt=e.fmt, second_fmt=e.second_fmt, algorithm=e.algorithm, norm=e.norm, reason=e.reason,
                         world=w,
                         message_before=e.bytes_before, message_after=e.bytes_after,
                         sent_before=plain, sent_after=sent))
    return rows


def print_collectives(compiled, file=None) -> str:
    """Print (and return) the rewritten graph's collectives: op, format, bytes sent per rank before/after."""
    rep = report(compiled)
    if not rep.entries:
        text = rep.table()
    else:
        rows = collective_rows(rep)
        head = ("op", "#", "module", "shape", "format", "sent before", "sent after")
        lines = [head]
        for r in rows:
            hops = r["fmt"] + (f" -> {r['second_fmt']}" if r["second_fmt"] else "") if r["fmt"] else ""
            norm = " + rmsnorm" if r["norm"] else ""
            fmt = f"{hops} ({r['algorithm']}){norm}" if r["fmt"] else f"plain ({r['reason']})"
            where = r["module"] or "(root)"
            if r["producer"] and r["producer"] != r["module"]:
                where += f" <- {r['producer']}"  # issued in module, input computed by producer
            lines.append((r["op"], str(r["index"]), where,
                          "x".join(map(str, r["shape"])) + " " + str(r["dtype"]).replace("torch.", ""),
                          fmt, str(r["sent_before"]), str(r["sent_after"])))
        widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
        out = ["  ".join(c.ljust(wd) for c, wd in zip(l, widths)).rstrip() for l in lines]
        b, a = sum(r["sent_before"] for r in rows), sum(r["sent_after"] for r in rows)
        fused = f", {rep.norms} with the add + RMSNorm fused" if rep.norms else ""
        out.append(f"{rep.count()} of {len(rows)} collectives rewritten ({rep.formats()}{fused}); bytes sent per rank "
                   f"per forward {b} -> {a}" + (f" ({a / b:.3f}x)" if b else ""))
        text = "\n".join(out)
    print(text, file=file or sys.stdout)
    return text
