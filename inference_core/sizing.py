"""What a replica needs, as arithmetic only (no torch): the KV cache a CPU host gets by default, and the
footprint of one replica of a checkpoint, from its ``config.json`` and file sizes, before it is started.

The engine sizes its own cache with ``default_cpu_kv_bytes``; sentinel's host plan (``sentinel/hostplan.py``)
uses ``replica_footprint`` to decide how many replicas a host holds without starting one, so it must not
import torch (the daemon never loads it).

On a CPU host the KV cache is not a share of the host's memory: the host also runs other replicas,
Prometheus, Elasticsearch and sentinel. It is what ``max_num_seqs`` sequences of a realistic length need,
capped as vLLM's CPU backend caps it (``VLLM_CPU_KVCACHE_SPACE``, 4 GiB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
CPU_KV_CACHE_CAP = 4 * GiB      # vLLM's CPU backend default
REALISTIC_SEQ_LEN = 2048        # tokens (prompt + output) a sequence is sized for by default on a CPU host
RUNTIME_BYTES = int(0.75 * GiB)  # the interpreter, torch, tokenizer and server before any weight (measured: 0.73)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def parse_bytes(text: str) -> int:
    """``4GiB``, ``512MiB``, ``2GB`` or a plain number of bytes."""
    units = {"GiB": GiB, "MiB": 2**20, "KiB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    return num_layers * 2 * num_kv_heads * head_dim * itemsize


def default_cpu_kv_bytes(bytes_per_token: int, max_num_seqs: int, max_len: int) -> int:
    """The default KV cache of a CPU replica: ``max_num_seqs`` sequences of ``min(max_len, 2048)`` tokens,
    at most 4 GiB. ``bytes_per_token`` includes what a decode step reserves per cached token."""
    return min(CPU_KV_CACHE_CAP, max_num_seqs * min(max_len, REALISTIC_SEQ_LEN) * bytes_per_token)


def activation_estimate(num_tokens: int, hidden: int, intermediate: int, heads: int, vocab: int) -> int:
    """An upper bound of one prefill's transient memory in float32 (the engine measures it where it can)."""
    return num_tokens * 4 * (3 * intermediate + 6 * hidden) + 4 * heads * num_tokens * num_tokens + 4 * vocab


@dataclass(frozen=True)
class Footprint:
    """One replica's memory, in bytes: what the plan reserves for it."""

    weights: int
    kv_cache: int
    activation: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activation + self.runtime


def flag_value(args: list[str] | tuple[str, ...], name: str) -> str | None:
    """The value of ``name`` in an argument list (``--flag VALUE`` or ``--flag=VALUE``), or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def replica_footprint(model_dir: Path, engine_args: list[str] | tuple[str, ...] = ()) -> Footprint:
    """What one CPU replica of ``model_dir`` started with ``engine_args`` holds at most: the weights (the
    safetensors files; int8 halves the linear layers), the default KV cache (or ``--kv-cache-memory``), a
    prefill's activation peak and the runtime. Raises OSError / ValueError on an unreadable checkpoint."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    if flag_value(engine_args, "--quantization") == "int8":
        weights = weights * 6 // 10  # the linear layers at one byte (plus scales); embeddings stay bf16
    bpt = kv_bytes_per_token(layers, kv_heads, head_dim, 2)
    reserve = -(-2 * bpt // layers)  # a decode step's gather of one layer (as the engine reserves)
    seqs = int(flag_value(engine_args, "--max-num-seqs") or 32)
    tokens = int(flag_value(engine_args, "--max-num-batched-tokens") or 512)
    max_len = int(flag_value(engine_args, "--max-model-len") or cfg.get("max_position_embeddings") or 4096)
    explicit = flag_value(engine_args, "--kv-cache-memory")
    kv = parse_bytes(explicit) if explicit else default_cpu_kv_bytes(bpt + reserve, seqs, max_len)
    act = activation_estimate(min(tokens, max_len), hidden, int(cfg["intermediate_size"]), heads,
                              int(cfg["vocab_size"]))
    return Footprint(weights, kv, act, RUNTIME_BYTES)
