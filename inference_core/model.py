"""A compact decoder-only transformer covering Qwen2 and Llama (RMSNorm, RoPE, GQA, SwiGLU).

Parameter names follow transformers' so a Hugging Face checkpoint loads without renaming.
Shapes: B batch, S new tokens, T total (cached + new) tokens, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inference_core.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies, with Llama-3 ``rope_scaling`` (rope_type llama3) applied when asked."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D]; cos/sin: [B, 1, S, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Per-layer key/value tensors for one batch: [B, K, T, D] each, grown by concatenation."""

    keys: list[Tensor | None]
    values: list[Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else int(k.shape[2])

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass
class SlotCache:
    """Preallocated key/value buffers, one slot per running sequence: [slots, K, max_len, D] per layer."""

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 devices: list[torch.device], num_kv_heads: int | None = None) -> SlotCache:
        """One buffer pair per layer, on that layer's device (a device map may spread them)."""
        shape = (num_slots, num_kv_heads or cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=d) for d in devices],
                   [torch.zeros(shape, dtype=dtype, device=d) for d in devices])


@dataclass
class SlotBatch:
    """Which slot each row of a batch uses, where its new tokens start, and how many are real."""

    cache: SlotCache
    slots: list[int]
    starts: list[int]
    lens: list[int]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: [B, K, S, D] for the new tokens (rows padded to S) → all keys so far: [B, K, T, D]
        kb, vb = self.cache.keys[layer], self.cache.values[layer]
        idx = torch.tensor(self.slots, device=kb.device)
        if all(n == 1 for n in self.lens):  # all decodes: one scatter for the whole batch
            pos = torch.tensor(self.starts, device=kb.device)
            kb[idx, :, pos] = k[:, :, 0]
            vb[idx, :, pos] = v[:, :, 0]
        else:
            for b, (slot, s0, n) in enumerate(zip(self.slots, self.starts, self.lens, strict=True)):
                kb[slot, :, s0:s0 + n] = k[b, :, :n]
                vb[slot, :, s0:s0 + n] = v[b, :, :n]
        t = max(s + n for s, n in zip(self.starts, self.lens, strict=True))
        return kb[idx, :, :t], vb[idx, :, :t]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.h, self.k, self.d = h, k, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, k * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, k * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | SlotBatch | None, layer: int
    ) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.d).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(b, s, self.k, self.d).transpose(1, 2)  # [B, K, S, D]
        v = self.v_proj(x).view(b, s, self.k, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, T, D]
        rep = self.h // self.k
        k = k.repeat_interleave(rep, dim=1)  # [B, H, T, D]
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | SlotBatch | None, layer: int
    ) -> Tensor:
        dev = self.input_layernorm.weight.device
        if x.device != dev:  # a device map placed this layer elsewhere: bring the activations along
            x, cos, sin, mask = x.to(dev), cos.to(dev), sin.to(dev), mask.to(dev)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# A hook run at the start of every forward pass; fault drills use it to raise inside the model.
ForwardHook = Callable[[], None]


class CausalLM(nn.Module):
    """``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` equivalent: tokens in, next-token logits out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.forward_hooks: list[ForwardHook] = []
        self.mmaps: list[Any] = []  # memory maps the loaded weights are views of
        self.placement: Any = None  # set by inference_core.placement.apply

    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache | SlotBatch | None = None,
                pad_mask: Tensor | None = None) -> Tensor:
        """input_ids, positions: [B, S]; pad_mask: [B, T] True where a key is real. Returns [B, S, V].

        With a SlotBatch, rows are different sequences at different positions (continuous batching):
        a query attends to the keys at or before its own position in its own slot.
        """
        for hook in self.forward_hooks:
            hook()
        b, s = input_ids.shape
        assert positions.shape == (b, s), f"positions {tuple(positions.shape)} != input_ids {(b, s)}"
        if isinstance(cache, SlotBatch):
            t = max(st + n for st, n in zip(cache.starts, cache.lens, strict=True))
            keys = torch.arange(t, device=input_ids.device)
            slot_mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, S, T]
            return self._run(input_ids, positions, cache, slot_mask)
        past = cache.length if cache is not None else 0
        t = past + s
        causal = torch.ones(s, t, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)  # [S, T]
        mask = causal[None, None].expand(b, 1, s, t)
        if pad_mask is not None:
            assert pad_mask.shape == (b, t), f"pad_mask {tuple(pad_mask.shape)} != {(b, t)}"
            mask = mask & pad_mask[:, None, None, :]
        return self._run(input_ids, positions, cache, mask)

    def _run(self, input_ids: Tensor, positions: Tensor, cache: KVCache | SlotBatch | None, mask: Tensor) -> Tensor:
        inv_freq: Tensor = self.inv_freq  # type: ignore[assignment]
        dev = inv_freq.device  # the embedding's device: inputs may arrive on the CPU
        input_ids, positions, mask = input_ids.to(dev), positions.to(dev), mask.to(dev)
        freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, D]
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.lm_head(self.model.norm(x.to(self.model.norm.weight.device)))
