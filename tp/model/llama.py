"""A Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) built from TP layers.

Use it to run real Llama-architecture checkpoints (``tp.model.checkpoint``) or random weights of
real shapes (``LlamaConfig.preset("llama3-70b")``, for benchmarks) at any tensor-parallel size
that divides the heads, the KV heads and the FFN width, with the row-parallel all-reduces
compressed by a :class:`tp.CommPolicy`. Parameter names equal Hugging Face's
``LlamaForCausalLM`` state-dict keys, so checkpoints load by name.

Per decoder layer TP costs two all-reduces of [tokens, hidden] (after ``o_proj`` and
``down_proj``, the sites ``model.layers.{i}.self_attn.o_proj`` and ``model.layers.{i}.mlp.down_proj``),
plus one for the embedding and an all-gather of the logits.

The arithmetic follows transformers' Llama (fp32 RMSNorm statistics, fp32 RoPE tables cast to
the model dtype, ``rotate_half`` RoPE, SDPA attention), so logits agree with it to
floating-point noise.
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.policy import CommPolicy
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    shard_specs,
)

__all__ = ["KVCache", "LlamaConfig", "TPLlama", "generate", "init_random_", "load_full_state_", "valid_tp_sizes"]


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-architecture model (the fields of transformers' LlamaConfig we use)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must divide by num_attention_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (GQA)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama uses silu)")
        rs = self.rope_scaling
        if rs is not None and rs.get("rope_type", rs.get("type", "default")) not in ("default", "llama3"):
            raise ValueError(f"rope scaling {rs!r} is not supported: default and llama3 are")

    @staticmethod
    def from_hf(cfg) -> "LlamaConfig":
        """From a transformers config object or its dict (transformers 4 ``rope_scaling`` or 5 ``rope_parameters``)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "mistral"):
            raise ValueError(f"model_type {mt!r} is not a Llama-architecture model")
        rope = dict(d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        return LlamaConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
        )

    @staticmethod
    def preset(name: str) -> "LlamaConfig":
        """Shapes of known models: ``tiny`` (tests), ``smollm2-135m``, ``llama3-8b``, ``llama3-70b``."""
        if name not in PRESET_CONFIGS:
            raise ValueError(f"unknown model preset {name!r}: valid are {', '.join(PRESET_CONFIGS)}")
        return PRESET_CONFIGS[name]

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_parameters(self) -> int:
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
PRESET_CONFIGS = {
    "tiny": LlamaConfig(256, 64, 192, 2, 4, 4, rms_norm_eps=1e-6),  # TP 1, 2 or 4
    "smollm2-135m": LlamaConfig(49152, 576, 1536, 30, 9, 3, rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": LlamaConfig(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": LlamaConfig(128256, 8192, 28672, 80, 64, 8, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.1-8b": LlamaConfig(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                               max_position_embeddings=131072),
}


def valid_tp_sizes(cfg: LlamaConfig, up_to: int = 64) -> list[int]:
    """TP sizes this model shards at: divisors of heads, KV heads and FFN width."""
    g = math.gcd(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    return [w for w in range(1, up_to + 1) if g % w == 0]


def check_tp_size(cfg: LlamaConfig, world: int) -> None:
    """Raise a ValueError naming the constraint and the valid sizes when ``world`` cannot shard ``cfg``."""
    bad = [
        f"{name}={n}"
        for name, n in (
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_key_value_heads", cfg.num_key_value_heads),
            ("intermediate_size", cfg.intermediate_size),
        )
        if n % world
    ]
    if bad:
        raise ValueError(
            f"tensor-parallel size {world} does not divide {', '.join(bad)}: attention heads and the "
            f"FFN are split evenly across ranks; valid sizes for this model: "
            f"{', '.join(map(str, valid_tp_sizes(cfg)))}"
        )


# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (fp32), with Llama-3 long-context scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class KVCache:
    """Per-layer key/value tensors of the tokens seen so far (grown by concatenation).

    Simple rather than fast: fine for a prompt plus a few dozen generated tokens.
    """

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers
        self.v = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i, k, v):
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, ctx: TPContext, i: int, policy, dtype, device):
        super().__init__()
        w = ctx.world_size if ctx.sharded else 1
        self.nh, self.nkv, self.hd = cfg.num_attention_heads // w, cfg.num_key_value_heads // w, cfg.head_dim
        kw = dict(dtype=dtype, device=device)
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = ColumnParallelLinear(h, cfg.num_attention_heads * self.hd, ctx, b, name="q_proj", **kw)
        self.k_proj = ColumnParallelLinear(h, cfg.num_key_value_heads * self.hd, ctx, b, name="k_proj", **kw)
        self.v_proj = ColumnParallelLinear(h, cfg.num_key_value_heads * self.hd, ctx, b, name="v_proj", **kw)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.hd, h, ctx, b,
                                        site=f"model.layers.{i}.self_attn.o_proj", policy=policy,
                                        num_layers=cfg.num_hidden_layers, **kw)
        self.i = i

    def forward(self, x, cos, sin, cache: Optional[KVCache]):
        return self.o_proj(self.heads(x, cos, sin, cache))

    def heads(self, x, cos, sin, cache: Optional[KVCache]):
        """The attention output before ``o_proj`` (its local heads)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = 0 if cache.k[self.i] is None else cache.k[self.i].shape[2]
            k, v = cache.update(self.i, k, v)
        rep = self.nh // self.nkv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.hd**-0.5)
        else:
            s = k.shape[2]
            mask = torch.arange(s, device=x.device)[None, :] <= (past + torch.arange(t, device=x.device))[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd**-0.5)
        return o.transpose(1, 2).reshape(b, t, self.nh * self.hd)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, ctx: TPContext, i: int, policy, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        h, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = ColumnParallelLinear(h, f, ctx, b, name="gate_proj", **kw)
        self.up_proj = ColumnParallelLinear(h, f, ctx, b, name="up_proj", **kw)
        self.down_proj = RowParallelLinear(f, h, ctx, b, site=f"model.layers.{i}.mlp.down_proj", policy=policy,
                                           num_layers=cfg.num_hidden_layers, **kw)

    def forward(self, x):
        return self.down_proj(self.act(x))

    def act(self, x):
        """The input of ``down_proj``."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, ctx, i, policy, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, ctx, i, policy, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, ctx, i, policy, dtype, device)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, n, h, cos, sin, cache, next_norm):
        """(next_norm(h'), h') from this layer's normed input ``n`` and residual ``h``: each
        all-reduce ends in the residual add and the following norm
        (:meth:`RowParallelLinear.forward_add_norm`)."""
        n, h = self.self_attn.o_proj.forward_add_norm(self.self_attn.heads(n, cos, sin, cache), h,
                                                      self.post_attention_layernorm)
        return self.mlp.down_proj.forward_add_norm(self.mlp.act(n), h, next_norm)


class _Backbone(nn.Module):
    def __init__(self, cfg, ctx, policy, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, i, policy, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class TPLlama(nn.Module):
    """A Llama-architecture causal LM sharded over ``ctx`` (see the module docstring).

    Build it with zero weights, then fill them: :func:`init_random_` (benchmarks, tests) or
    :func:`tp.model.checkpoint.load_model` (a Hugging Face checkpoint). ``forward(ids)`` returns the
    logits [batch, tokens, vocab], identical on every rank.
    """

    def __init__(self, cfg: LlamaConfig, ctx: Optional[TPContext] = None, policy: Optional[CommPolicy] = None,
                 dtype=torch.float32, device=None, fuse_norm: bool = False):
        super().__init__()
        ctx = ctx or TPContext.from_group()
        # fuse_norm: each row-parallel all-reduce ends in the residual add and the next RMSNorm
        # (compressed sites, emulated or on real ranks: the fused op's arithmetic, bitwise the same;
        # elsewhere unchanged bits)
        self.fuse_norm = fuse_norm
        check_tp_size(cfg, ctx.world_size)
        self.cfg, self.ctx = cfg, ctx
        policy = policy or CommPolicy()
        self.model = _Backbone(cfg, ctx, policy, dtype, device)
        vpad = self.model.embed_tokens.padded
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, vpad, ctx, gather_output=True, name="vocab",
                                            dtype=dtype, device=device, checkpoint_out=cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        policy.warn_unmatched([m.call_site for m in self.row_parallel_layers()], "this TPLlama")

    # -- policy ------------------------------------------------------------------------------
    @property
    def policy(self) -> CommPolicy:
        return self.row_parallel_layers()[0].policy

    def set_policy(self, policy: CommPolicy) -> None:
        """Use ``policy`` for every row-parallel all-reduce from now on."""
        policy.warn_unmatched([m.call_site for m in self.row_parallel_layers()], "this TPLlama")
        for m in self.row_parallel_layers():
            m.policy = policy

    def row_parallel_layers(self) -> list[RowParallelLinear]:
        return [m for m in self.modules() if isinstance(m, RowParallelLinear)]

    @property
    def sites(self) -> list[str]:
        """The row-parallel all-reduce sites, in execution order."""
        return [m.site for m in self.row_parallel_layers()]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        start = cache.length if cache is not None else 0
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        # Recomputed per call (head_dim / 2 values) so that .to(dtype) can never round it.
        freqs = pos[:, None] * rope_inv_freq(self.cfg).to(pos.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if self.fuse_norm:
            layers = self.model.layers
            n = layers[0].input_layernorm(x)
            for i, layer in enumerate(layers):
                nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
                n, x = layer.forward_fused(n, x, cos, sin, cache, nxt)
            logits = self.lm_head(n)
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, cache)
            logits = self.lm_head(self.model.norm(x))
        return logits[..., : self.cfg.vocab_size]


# ---------------------------------------------------------------------------------------------
def load_full_state_(model: TPLlama, get, strict: bool = True) -> list[str]:
    """Fill ``model`` from full (unsharded) tensors: ``get(name, spec) -> tensor``.

    ``get`` returns the full checkpoint tensor when ``spec`` is None, else may return only
    ``spec.take(full)`` (checkpoint readers slice on disk); see :class:`tp.model.layers.ShardSpec`.
    Returns the names ``get`` had nothing for (raises instead when ``strict``).
    """
    missing = []
    for name, spec in shard_specs(model).items():
        p = model.get_parameter(name)
        t = get(name, spec)
        if t is None:
            missing.append(name)
            continue
        if spec is not None and t.shape != p.shape:
            t = spec.take(t)
        if t.shape != p.shape:
            raise ValueError(f"{name}: checkpoint gives {tuple(t.shape)}, this rank needs {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
    if missing and strict:
        raise KeyError(f"checkpoint has no tensors for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return missing


def init_random_(model: TPLlama, seed: int = 0, std: float = 0.02) -> TPLlama:
    """Random weights, identical for every TP size: each full tensor comes from a generator seeded by
    (seed, name), then this rank keeps its shard. Norm weights are 1 + noise.

    Costs one full tensor at a time per rank (2 GB for Llama-3-70B's embedding in bf16); run it
    on the GPU for large models (generation happens on the parameter's device).
    """

    def get(name, spec):
        p = model.get_parameter(name)
        shape = list(p.shape)
        if spec is not None:
            shape[spec.dim] = spec.full_len
        g = torch.Generator(device=p.device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        full = torch.randn(shape, generator=g, dtype=p.dtype, device=p.device)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return 1.0 + 0.1 * full
        return full * std

    load_full_state_(model, get)
    return model


@torch.no_grad()
def generate(model: TPLlama, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, sync=None):
    """Greedy decoding with a KV cache. Returns (all ids [1, T + n], time-to-first-token s, total s).

    Every rank computes the same logits (the all-reduces leave ranks bitwise equal), so every
    rank picks the same token without a broadcast. ``sync`` (e.g. ``torch.cuda.synchronize``)
    is called before reading the clock.
    """
    sync = sync or (lambda: None)
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    cache = KVCache(model.cfg.num_hidden_layers)
    sync()
    t0 = time.perf_counter()
    logits = model(ids, cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync()
    ttft = time.perf_counter() - t0
    out = [ids, nxt]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(nxt[0, 0]) == eos_token_id:
            break
        nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    sync()
    return torch.cat(out, dim=1), ttft, time.perf_counter() - t0
