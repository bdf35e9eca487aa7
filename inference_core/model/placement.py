"""Device maps: whole decoder layers placed across devices by memory budget, spilling to the CPU and
then to an offload folder on disk (the deployment guide's ``device_map="auto"`` + ``offload_folder``).

``plan`` is pure arithmetic on the config; ``apply`` moves a loaded model accordingly. Layers
offloaded to disk are written as safetensors files and memory-mapped back, so their pages are read
from disk when a forward pass touches them and can be dropped under memory pressure.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from inference_core.model.config import ModelConfig
from inference_core.model.transformer import CausalLM, DecoderLayer

DISK = "disk"


class PlacementError(ValueError):
    """The model does not fit the budgets (and there is no offload folder)."""


def layer_bytes(cfg: ModelConfig, itemsize: int) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    q = h * cfg.num_attention_heads * d
    kv = 2 * h * cfg.num_key_value_heads * d
    bias = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d if cfg.attention_bias else 0
    o = cfg.num_attention_heads * d * h
    mlp = 3 * h * cfg.intermediate_size
    return (q + kv + bias + o + mlp + 2 * h) * itemsize


def embed_bytes(cfg: ModelConfig, itemsize: int) -> int:
    return cfg.vocab_size * cfg.hidden_size * itemsize


def head_bytes(cfg: ModelConfig, itemsize: int) -> int:
    return (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * itemsize) + cfg.hidden_size * itemsize


@dataclass(frozen=True)
class Placement:
    embed: str
    layers: tuple[str, ...]
    head: str
    used: dict[str, int]

    def describe(self) -> str:
        """The plan as people read it: contiguous runs of layers per device, with bytes."""
        lines = [f"embed_tokens -> {self.embed}"]
        start = 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
                lines.append(f"{span} -> {self.layers[start]}")
                start = i
        lines.append(f"norm + lm_head -> {self.head}")
        lines.append("memory: " + ", ".join(f"{dev} {n / 2**20:.1f} MiB" for dev, n in self.used.items()))
        return "\n".join(lines)


def plan(cfg: ModelConfig, budgets: dict[str, int], itemsize: int = 4, offload: bool = False) -> Placement:
    """Fill devices in the order given (accelerators first, then ``cpu``) with whole layers; whatever is
    left goes to disk when ``offload`` is allowed, else PlacementError says by how much it misses."""
    devices = list(budgets)
    free = dict(budgets)
    used = dict.fromkeys(devices, 0)

    def take(nbytes: int, start: int) -> tuple[str, int]:
        for j in range(start, len(devices)):
            if free[devices[j]] >= nbytes:
                free[devices[j]] -= nbytes
                used[devices[j]] += nbytes
                return devices[j], j
        if offload:
            used[DISK] = used.get(DISK, 0) + nbytes
            return DISK, len(devices)
        need = embed_bytes(cfg, itemsize) + cfg.num_hidden_layers * layer_bytes(cfg, itemsize) + \
            head_bytes(cfg, itemsize)
        have = ", ".join(f"{d}={b / 2**20:.1f} MiB" for d, b in budgets.items())
        raise PlacementError(f"the model needs {need / 2**20:.1f} MiB; budgets {have} do not hold it: raise a "
                             "budget or give an offload folder")

    embed, cursor = take(embed_bytes(cfg, itemsize), 0)
    layers = []
    cursor = 0
    for _ in range(cfg.num_hidden_layers):
        dev, cursor = take(layer_bytes(cfg, itemsize), cursor)
        layers.append(dev)
    head_dev = "cpu" if layers and layers[-1] == DISK else (layers[-1] if layers else embed)
    if head_dev in free:
        free[head_dev] -= head_bytes(cfg, itemsize)
        used[head_dev] += head_bytes(cfg, itemsize)
    return Placement(embed, tuple(layers), head_dev, used)


def _offload_layer(layer: DecoderLayer, path: Path, owner: CausalLM) -> None:
    from inference_core.model.weights import mmap_tensors

    state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
    save_file(state, str(path))
    maps: list[mmap.mmap] = []
    layer.load_state_dict(mmap_tensors(path, maps), assign=True)
    owner.mmaps.extend(maps)  # keep the mapping alive with the model


def apply(model: CausalLM, placement: Placement, offload_folder: Path | None = None) -> CausalLM:
    """Move a loaded model onto its devices; disk layers are written to ``offload_folder`` and mapped."""
    model.model.embed_tokens.to(placement.embed if placement.embed != DISK else "cpu")
    for i, (layer, dev) in enumerate(zip(model.model.layers, placement.layers, strict=True)):
        assert isinstance(layer, DecoderLayer)
        if dev == DISK:
            if offload_folder is None:
                raise PlacementError("layers are placed on disk but no offload folder was given")
            offload_folder.mkdir(parents=True, exist_ok=True)
            layer.to("cpu")
            _offload_layer(layer, offload_folder / f"layer-{i:03d}.safetensors", model)
        else:
            layer.to(dev)
    model.model.norm.to(placement.head)
    model.lm_head.to(placement.head)
    inv_freq: torch.Tensor = model.inv_freq  # type: ignore[assignment]
    model.register_buffer("inv_freq", inv_freq.to(placement.embed if placement.embed != DISK else "cpu"),
                          persistent=False)
    model.placement = placement
    return model


def parse_budgets(text: str) -> dict[str, int]:
    """``cuda:0=20GiB,cpu=30GiB`` → bytes per device, in the order given."""
    units = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 10**9, "MB": 10**6, "B": 1}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dev, _, amount = part.partition("=")
        unit = next((u for u in units if amount.endswith(u)), None)
        if not dev or unit is None:
            raise PlacementError(f"cannot read budget {part!r} (expected e.g. cuda:0=20GiB)")
        out[dev.strip()] = int(float(amount[: -len(unit)]) * units[unit])
    return out
