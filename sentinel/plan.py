"""Capacity planning (the seed's section 2): from a model (its ``config.json``, or a parameter count), the
weight precision, the context length and the concurrent sequences, how many GPUs of each common type it
needs, the tensor-parallel degree, and the interconnect.

For each GPU type the plan takes the smallest tensor-parallel degree (1, 2, 4, 8, then whole 8-GPU nodes)
at which both hold:
- memory: weights / TP + KV cache / TP + activation peak + CUDA runtime fit in ``utilization`` of one GPU's
  memory (vLLM's ``gpu_memory_utilization``, 0.9);
- latency: prefilling one prompt of ``prompt_tokens`` (2,048) takes at most the seed's P99 target (500 ms)
  at ``mfu`` (50 %) of the GPUs' dense BF16 (or INT8) throughput: 2 x parameters x tokens FLOPs.
Every type's row is shown; the recommendation is the type that needs the fewest GPUs, the older generation
first on a tie. With the defaults the rows of the seed's types give the seed's table: 7B on one A100 80 GB,
67B on four A100 80 GB with NVLink, 175B+ on eight H100 with InfiniBand (an H200, which the seed does not
name, needs fewer for the larger two, and is then the recommendation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GiB = 1 << 30
GB = 10**9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bandwidth_gbs: float  # HBM / GDDR bandwidth
    bf16_tflops: float    # dense
    int8_tops: float      # dense
    nvlink: bool          # NVLink (or NVSwitch) between the GPUs of a node


# In the order the plan prefers on a tie (older, cheaper generations first). Datasheet figures, dense.
GPUS = (
    Gpu("T4 16GB", 16 * GB, 320, 65, 130, False),
    Gpu("L4 24GB", 24 * GB, 300, 121, 242, False),
    Gpu("A100 40GB", 40 * GB, 1555, 312, 624, True),
    Gpu("A100 80GB", 80 * GB, 2039, 312, 624, True),
    Gpu("H100 80GB", 80 * GB, 3350, 989, 1979, True),
    Gpu("H200 141GB", 141 * GB, 4800, 989, 1979, True),
)
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
NODE = 8  # GPUs per node


class ArchConfig(BaseModel):
    """The ``config.json`` fields the plan needs (Llama, Qwen2 and the other decoder-only layouts)."""

    model_config = ConfigDict(extra="ignore")
    architectures: list[str] = Field(default_factory=list)
    model_type: str = ""
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(4096, gt=0)
    attention_bias: bool | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        if self.attention_bias is not None:
            return self.attention_bias
        return self.model_type == "qwen2" or any(a.startswith("Qwen2") for a in self.architectures)


def parameter_count(c: ArchConfig) -> int:
    """Exactly the parameters of the model the config describes (embeddings, attention with its biases,
    gated MLP, RMSNorm weights, and the output projection unless tied)."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.dim, c.kv_heads * c.dim
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if c.qkv_bias else 0)
    mlp = 3 * h * c.intermediate_size
    layer = attn + mlp + 2 * h
    embed = c.vocab_size * h
    return embed + c.num_hidden_layers * layer + h + (0 if c.tie_word_embeddings else embed)


def geometry_for(params: float) -> ArchConfig:
    """A decoder geometry for a bare parameter count, as DeepSeek LLM and Llama 2 are laid out: head_dim 128,
    multi-head attention below 30B parameters and 8 KV heads above, a gated MLP of about 2.7x hidden (8/3,
    rounded), a 102,400-token vocabulary, about as many layers as heads. The KV cache and activations are
    sized from it when no config.json is given."""
    kv = None if params < 30e9 else 8
    best: tuple[float, ArchConfig] | None = None
    for heads in range(8, 161, 8):
        h = heads * 128
        inter = -(-h * 8 // 3 // 256) * 256
        kv_dim = (kv or heads) * 128
        per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h
        embed = 2 * 102400 * h
        layers = round((params - embed) / per_layer)
        if layers < 1:
            continue
        cfg = ArchConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=102400)
        score = abs(math.log(layers / heads)) + 10 * abs(parameter_count(cfg) - params) / params
        if best is None or score < best[0]:
            best = (score, cfg)
    if best is None:
        raise ValueError(f"{params:.0f} parameters: too few for a decoder model")
    return best[1]


def parse_params(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*", text)
    if m is None:
        raise ValueError(f"{text!r}: a parameter count is a number with an optional K, M, B or T (7B, 1.5B, 175B)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]


@dataclass
class Option:
    gpu: str
    gpus: int
    tensor_parallel: int
    nodes: int
    per_gpu_bytes: int
    gpu_memory_bytes: int
    prefill_ms: float
    decode_tokens_per_s: float
    fits: bool
    why_not: str = ""
    interconnect: str = ""


@dataclass
class Plan:
    model: str
    parameters: int
    dtype: str
    context_tokens: int
    concurrent_sequences: int
    weights_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    runtime_bytes: int
    options: list[Option]
    recommended: Option | None
    interconnect: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _degrees() -> list[int]:
    return [1, 2, 4, 8, 16, 24, 32, 48, 64]


def make_plan(cfg: ArchConfig, name: str, *, dtype: str = "bf16", kv_dtype: str = "bf16", context: int = 4096,
              sequences: int = 16, prompt_tokens: int = 2048, ttft_target_s: float = 0.5, mfu: float = 0.5,
              utilization: float = 0.9, params: int | None = None) -> Plan:
    if dtype not in BYTES or kv_dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}")
    n = params if params is not None else parameter_count(cfg)
    weights = int(n * BYTES[dtype])
    kv_per_token = int(2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.dim * BYTES[kv_dtype])
    kv = kv_per_token * context * sequences
    # one prefill chunk of prompt_tokens in flight: hidden states, the MLP's widest activations, fp32 logits
    # of the sampled rows, and attention scores of the chunk (vLLM profiles the same way)
    scores = 4 * cfg.num_attention_heads * prompt_tokens * min(prompt_tokens, 512)
    activation = int(prompt_tokens * 2 * (3 * cfg.intermediate_size + 6 * cfg.hidden_size)
                     + 4 * sequences * cfg.vocab_size + scores)
    runtime = 1 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers
    flops = 2.0 * n * prompt_tokens
    options: list[Option] = []
    for g in GPUS:
        rate = (g.int8_tops if dtype in ("int8", "int4") else g.bf16_tflops) * 1e12 * mfu
        chosen: Option | None = None
        for tp in _degrees():
            if cfg.num_attention_heads % min(tp, cfg.num_attention_heads) and tp <= NODE:
                continue  # tensor parallelism splits the heads evenly
            per_gpu = weights // tp + kv // tp + activation + runtime
            prefill = flops / (rate * tp)
            step = (weights + kv) / tp / (g.bandwidth_gbs * 1e9)
            opt = Option(g.name, tp, min(tp, NODE), math.ceil(tp / NODE), per_gpu, g.memory_bytes, prefill * 1000,
                         1.0 / step if step else 0.0, False)
            if per_gpu > utilization * g.memory_bytes:
                opt.why_not = f"needs {per_gpu / GB:.1f} GB per GPU of {utilization * g.memory_bytes / GB:.1f} usable"
            elif prefill > ttft_target_s:
                opt.why_not = (f"prefill of {prompt_tokens} tokens takes {prefill * 1000:.0f} ms "
                               f"(> {ttft_target_s * 1000:.0f} ms)")
            else:
                opt.fits = True
                chosen = opt
                break
            chosen = opt
        assert chosen is not None
        options.append(chosen)
    for o in options:
        o.interconnect = _interconnect(o)
    fitting = [o for o in options if o.fits]
    best = min(fitting, key=lambda o: (o.gpus, [g.name for g in GPUS].index(o.gpu))) if fitting else None
    notes: list[str] = []
    interconnect = best.interconnect if best is not None else (
        "no configuration up to 64 GPUs fits: quantize, shorten the context or serve fewer sequences")
    if context > cfg.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's {cfg.max_position_embeddings} positions")
    return Plan(name, n, dtype, context, sequences, weights, kv, kv_per_token, activation, runtime, options, best,
                interconnect, notes)


def _interconnect(o: Option) -> str:
    if o.gpus == 1:
        return "one GPU: no interconnect needed (PCIe Gen4+ and NVMe to load within the seed's 90 s)"
    gpu = next(g for g in GPUS if g.name == o.gpu)
    inside = ("NVLink/NVSwitch within the node: tensor parallelism all-reduces twice per layer" if gpu.nvlink
              else "PCIe only (this GPU has no NVLink): tensor-parallel all-reduces will dominate; prefer an "
              "NVLink GPU")
    if o.nodes > 1:
        return f"{inside}; {o.nodes} nodes: InfiniBand or RoCE (RDMA) between them, pipeline parallel across nodes"
    if o.gpus >= NODE:
        return f"{inside}; a full node: InfiniBand (RDMA) between nodes to add replicas"
    return inside


def load_config(path: Path) -> ArchConfig:
    p = path / "config.json" if path.is_dir() else path
    return ArchConfig.model_validate(json.loads(p.read_text()))
