"""A compact decoder-only transformer covering Qwen2 and Llama (RMSNorm, RoPE, GQA, SwiGLU).

Parameter names follow transformers' so a Hugging Face checkpoint loads without renaming. Two ways in:
``forward`` takes a padded [B, S] batch with an optional growing ``KVCache`` (reference, training,
export); ``forward_flat`` takes the serving engine's packed batch — the tokens of every scheduled
sequence in one row, no padding — and reads and writes keys/values through a paged KV cache.
Shapes: B batch, S new tokens, T total (cached + new) tokens, N packed tokens, H heads, K kv heads,
D head dim.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inference_core.kv_cache import FlatBatch, PagedKVCache
from inference_core.model.config import ModelConfig


class RMSNorm(nn.Module):
    fused_kernel: Any = None  # the CPU kernels' module, for bf16 on a CPU (inference_core.kernels.accelerate)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # In float32, then back to the input's dtype before the weight, as transformers' Qwen2/Llama RMSNorm.
        if self.fused_kernel is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return self.fused_kernel.rms_norm_bf16(x, self.weight, self.eps)  # the same, in one pass
        x32 = x.float()
        if torch.onnx.is_in_onnx_export():  # opset 17 has no RMSNormalization: spell it out
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            normed = F.rms_norm(x32, (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies, with Llama-3 ``rope_scaling`` (rope_type llama3) applied when asked."""
    d = cfg.head_dim
    # on the CPU even when the model is built on the meta device: meta arithmetic would import torch._refs
    # and torch._dynamo, ~1 s of every start-up
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
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


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights live (parameters, or buffers for quantized layers)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    raise ValueError(f"{type(module).__name__} holds no tensors")


def fuse_linears(group: list[nn.Module]) -> nn.Linear | None:
    """One linear layer computing every layer of ``group`` at once (vLLM's QKVParallelLinear and
    MergedColumnParallelLinear), as views of their weights and biases where those already lie back to back
    in memory (``weights.move_to_hugepages`` lays them out so): no copy, the state dict unchanged. None where
    they do not (other dtypes or inputs, a bias on some only, or not adjacent)."""
    if not group or not all(isinstance(m, nn.Linear) for m in group):
        return None
    lins: list[nn.Linear] = group  # type: ignore[assignment]
    first = lins[0].weight
    if any(m.weight.dim() != 2 or m.in_features != lins[0].in_features or m.weight.dtype != first.dtype
           or m.weight.device != first.device or not m.weight.is_contiguous() for m in lins):
        return None

    def adjacent(ts: list[Tensor]) -> Tensor | None:
        for a, b in itertools.pairwise(ts):
            if a.data_ptr() + a.nbytes != b.data_ptr() or a.untyped_storage().data_ptr() != \
                    b.untyped_storage().data_ptr():
                return None
        base = ts[0]
        rows = sum(t.shape[0] for t in ts)
        return base.new_empty(0).set_(base.untyped_storage(), base.storage_offset(), (rows, *base.shape[1:]),
                                      base.stride())

    weight = adjacent([m.weight.detach() for m in lins])
    biases = [m.bias for m in lins]
    if weight is None or any((b is None) != (biases[0] is None) for b in biases):
        return None
    bias = None
    if biases[0] is not None:
        bias = adjacent([b.detach() for b in biases if b is not None])
        if bias is None:
            return None
    fused = nn.Linear(lins[0].in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _weights(m: nn.Module | None) -> Tensor | None:
    w = getattr(m, "weight", None)
    w = w if isinstance(w, Tensor) else getattr(m, "qweight", None)  # quantize.Int8Linear
    return w if isinstance(w, Tensor) else None


def _fused(module: nn.Module, name: str, first: nn.Module) -> nn.Module | None:
    """The fused layer ``name`` (``fuse_linears``, ``quantize.Int8Linear.stacked``) when it still views
    ``first``'s weights (nothing replaced or moved them since)."""
    lin: nn.Module | None = vars(module).get(name)
    a, b = _weights(lin), _weights(first)
    if a is None or b is None or a.data_ptr() != b.data_ptr() or a.device != b.device:
        return None
    return lin


class Attention(nn.Module):
    # the CPU kernels' module (inference_core.kernels.accelerate sets it): decode attention through the slots
    decode_kernel: Any = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.h, self.k, self.d = h, k, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, k * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, k * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def fusion_groups(self) -> dict[str, list[nn.Module]]:
        """Layers that read the same input, fused into one call where their weights lie back to back."""
        return {"fused_qkv": [self.q_proj, self.k_proj, self.v_proj]}

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None, layer: int
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


    def forward_flat(self, x: Tensor, cos: Tensor, sin: Tensor, batch: FlatBatch, kv: tuple[Tensor, Tensor]) -> Tensor:
        # x: [N, hidden]; cos/sin: [N, 1, D]; kv: this layer's key/value pools, [slots, K, D] each
        n = x.shape[0]
        qkv = _fused(self, "fused_qkv", self.q_proj)
        if qkv is not None:  # one call: q, k, v side by side in each row
            qw, kw = self.h * self.d, self.k * self.d
            out = qkv(x)
            q = out[:, :qw].contiguous().view(n, self.h, self.d)  # copies: RoPE runs in place on contiguous
            k = out[:, qw:qw + kw].contiguous().view(n, self.k, self.d)  # q and k
            v = out[:, qw + kw:].view(n, self.k, self.d)
        else:
            q = self.q_proj(x).view(n, self.h, self.d)
            k = self.k_proj(x).view(n, self.k, self.d)
            v = self.v_proj(x).view(n, self.k, self.d)
        kernel = self.decode_kernel
        if kernel is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            kernel.rope_bf16_(q, k, cos, sin)  # in place, in one pass, rounding as the line below does
        else:
            q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        k_pool, v_pool = kv
        m = batch.on(x.device)
        k_pool.index_copy_(0, m.slot_mapping, k)
        v_pool.index_copy_(0, m.slot_mapping, v)
        parts: list[Tensor] = []
        if m.num_decodes and kernel is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # one query each, reading each sequence's keys and values in place through its slots (no copy)
            parts.append(kernel.paged_decode_attention(q[:m.num_decodes], k_pool, v_pool, m.decode_slots,
                                                       m.decode_lens, self.d ** -0.5))  # [Bd, H, D]
        elif m.num_decodes:  # one query each: gather each sequence's keys through its block table
            qd = q[:m.num_decodes, :, None]  # [Bd, H, 1, D]
            kd = k_pool[m.decode_slots].transpose(1, 2)  # [Bd, K, T, D]
            vd = v_pool[m.decode_slots].transpose(1, 2)
            parts.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=m.decode_mask,
                                                        enable_gqa=True)[:, :, 0])  # [Bd, H, D]
        for a, b, ctx, mask in m.prefills:  # a prefill chunk: causal over its own tokens and its cached past
            qp = q[a:b].transpose(0, 1)[None]  # [1, H, S, D]
            if ctx is None:  # nothing cached before it: attend to its own keys, no gather
                kp, vp = k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                kp, vp = k_pool[ctx].transpose(0, 1)[None], v_pool[ctx].transpose(0, 1)[None]  # [1, K, T, D]
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
            parts.append(o[0].transpose(0, 1))  # [S, H, D]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(out.reshape(n, self.h * self.d))


def _rotate(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MLP(nn.Module):
    fused_kernel: Any = None  # the CPU kernels' module, for bf16 on a CPU (inference_core.kernels.accelerate)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fusion_groups(self) -> dict[str, list[nn.Module]]:
        return {"fused_gate_up": [self.gate_proj, self.up_proj]}

    def forward(self, x: Tensor) -> Tensor:
        gate_up = _fused(self, "fused_gate_up", self.gate_proj)
        if gate_up is not None:  # one call: gate and up side by side in each row
            gu = gate_up(x)
            if self.fused_kernel is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
                return self.down_proj(self.fused_kernel.silu_mul_halves_bf16(gu))
            g, u = gu.chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        if self.fused_kernel is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return self.down_proj(self.fused_kernel.silu_mul_bf16(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        dev = self.input_layernorm.weight.device
        if x.device != dev:  # a device map placed this layer elsewhere: bring the activations along
            x, cos, sin, mask = x.to(dev), cos.to(dev), sin.to(dev), mask.to(dev)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


    def forward_flat(self, x: Tensor, cos: Tensor, sin: Tensor, batch: FlatBatch, kv: tuple[Tensor, Tensor]) -> Tensor:
        dev = self.input_layernorm.weight.device
        if x.device != dev:
            x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
        x = x + self.self_attn.forward_flat(self.input_layernorm(x), cos, sin, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


    def decode_entry(self) -> tuple[list[Tensor | None], int] | None:
        """This layer as ``decode_layers`` (the CPU kernels' whole-step call) takes it, with the most decodes it
        holds for; None where its forward would take another path for a decode (no kernels, weights not
        fused, not on the CPU in bf16)."""
        from inference_core import kernels  # the kernels' module knows the layer types it switched

        attn, mlp = self.self_attn, self.mlp
        if attn.decode_kernel is None or self.input_layernorm.fused_kernel is None \
                or self.post_attention_layernorm.fused_kernel is None or mlp.fused_kernel is None:
            return None
        lins = [kernels.linear_spec(m) for m in (_fused(attn, "fused_qkv", attn.q_proj), attn.o_proj,
                                                  _fused(mlp, "fused_gate_up", mlp.gate_proj), mlp.down_proj)]
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        if any(spec is None for spec in lins) or any(w.dtype != torch.bfloat16 or w.device.type != "cpu"
                                                     for w in norms):
            return None
        (qkv, r1), (o, r2), (gu, r3), (down, r4) = lins  # type: ignore[misc]
        return [norms[0], *qkv, *o, norms[1], *gu, *down], min(r1, r2, r3, r4)


@dataclass
class DecodePlan:
    """Every layer's entry for ``decode_layers``: a decode-only step runs the whole stack in one native call.
    Built on the first decode step and dropped (``CausalLM.drop_decode_plan``) when the weights move."""
    entries: list[list[Tensor | None]]
    max_rows: int
    kernel: Any


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # _weight: no random init (on the meta device, normal_ would import torch._refs: ~1 s of start-up)
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:  # a model built for real (tests, generated checkpoints): nn.Embedding's init
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
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
        self.mmaps: list[Any] = []  # memory maps of files the loaded weights are views of
        self.arenas: list[Any] = []  # anonymous maps they moved into (weights.HugePageMove)
        self.mmap_paths: dict[int, Any] = {}  # id(map) -> the file it maps (read straight into huge pages)
        self.placement: Any = None  # set by inference_core.model.placement.apply
        self.decode_plan: DecodePlan | None | Literal[False] = None  # None: not built yet; False: no plan here

    def drop_decode_plan(self) -> None:
        """The weights moved (into huge pages, or their layers were fused again): the plan is built anew."""
        self.decode_plan = None

    def _plan(self) -> DecodePlan | None:
        if self.decode_plan is None:
            entries = [layer.decode_entry() for layer in self.model.layers]  # type: ignore[operator]
            kernel = getattr(self.model.layers[0].self_attn, "decode_kernel", None) if entries else None
            self.decode_plan = False if kernel is None or any(e is None for e in entries) else \
                DecodePlan([e[0] for e in entries if e is not None], min(e[1] for e in entries if e is not None),
                           kernel)
        return self.decode_plan if isinstance(self.decode_plan, DecodePlan) else None

    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache | None = None,
                pad_mask: Tensor | None = None) -> Tensor:
        """input_ids, positions: [B, S]; pad_mask: [B, T] True where a key is real. Returns [B, S, V]."""
        for hook in self.forward_hooks:
            hook()
        b, s = input_ids.shape
        assert positions.shape == (b, s), f"positions {tuple(positions.shape)} != input_ids {(b, s)}"
        past = cache.length if cache is not None else 0
        t = past + s
        causal = torch.ones(s, t, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)  # [S, T]
        mask = causal[None, None].expand(b, 1, s, t)
        if pad_mask is not None:
            assert pad_mask.shape == (b, t), f"pad_mask {tuple(pad_mask.shape)} != {(b, t)}"
            mask = mask & pad_mask[:, None, None, :]
        return self._run(input_ids, positions, cache, mask)

    def forward_flat(self, batch: FlatBatch, cache: PagedKVCache) -> Tensor:
        """The packed tokens of every scheduled sequence → logits at ``batch.sample_idx`` only: [M, V]."""
        for hook in self.forward_hooks:
            hook()
        inv_freq: Tensor = self.inv_freq  # type: ignore[assignment]
        m = batch.on(inv_freq.device)
        freqs = m.positions.to(inv_freq.dtype)[:, None] * inv_freq  # [N, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [N, 1, D]
        x = self.model.embed_tokens(m.input_ids)  # [N, hidden]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        plan = self._plan() if m.num_decodes == x.shape[0] and not m.prefills and x.dtype == torch.bfloat16 \
            and x.device.type == "cpu" else None
        if plan is not None and x.shape[0] <= plan.max_rows:  # a decode step: the whole stack in one call
            attn = self.model.layers[0].self_attn
            assert isinstance(attn, Attention)
            x = plan.kernel.decode_layers(
                x, cos, sin, [[*e, cache.keys[i], cache.values[i]] for i, e in enumerate(plan.entries)],
                m.slot_mapping, m.decode_slots, m.decode_lens, self.config.rms_norm_eps, attn.d ** -0.5, attn.h,
                attn.k, attn.d)
        else:
            for i, layer in enumerate(self.model.layers):
                assert isinstance(layer, DecoderLayer)
                x = layer.forward_flat(x, cos, sin, batch, (cache.keys[i], cache.values[i]))
        x = x[batch.on(x.device).sample_idx]  # the output projection only where a token is sampled
        return self.lm_head(self.model.norm(x.to(self.model.norm.weight.device)))

    def _run(self, input_ids: Tensor, positions: Tensor, cache: KVCache | None, mask: Tensor) -> Tensor:
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
