"""Device maps: planning by budget (pure) and placement with CPU and disk offload (run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_core.model.config import PRESETS
from inference_core.model.placement import (
    DISK,
    PlacementError,
    apply,
    embed_bytes,
    head_bytes,
    layer_bytes,
    parse_budgets,
    plan,
)
from inference_core.model.transformer import CausalLM
from inference_core.model.weights import load_model

DS = PRESETS["deepseek-r1-distill-qwen-1.5b"]


def test_layer_bytes_add_up_to_the_model() -> None:
    cfg = DS
    with torch.device("meta"):
        m = CausalLM(cfg)
    total = sum(p.numel() for p in m.parameters()) * 2
    assert embed_bytes(cfg, 2) + cfg.num_hidden_layers * layer_bytes(cfg, 2) + head_bytes(cfg, 2) == total


def test_plan_fills_gpus_then_cpu_then_disk() -> None:
    lb = layer_bytes(DS, 2)
    budgets = {"cuda:0": embed_bytes(DS, 2) + 10 * lb, "cuda:1": 10 * lb, "cpu": 4 * lb}
    p = plan(DS, budgets, itemsize=2, offload=True)
    assert p.embed == "cuda:0"
    assert p.layers == ("cuda:0",) * 10 + ("cuda:1",) * 10 + ("cpu",) * 4 + (DISK,) * 4
    assert p.head == "cpu"
    assert "layers 0-9 -> cuda:0" in p.describe() and "layers 24-27 -> disk" in p.describe()
    with pytest.raises(PlacementError, match="raise a budget or give an offload folder"):
        plan(DS, budgets, itemsize=2, offload=False)


def test_parse_budgets() -> None:
    assert parse_budgets("cuda:0=20GiB, cpu=512MiB") == {"cuda:0": 20 * 2**30, "cpu": 512 * 2**20}
    with pytest.raises(PlacementError, match="cannot read budget"):
        parse_budgets("cuda:0=lots")


def test_cpu_and_disk_offload_give_the_same_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref = load_model(tiny_model_dir)
    cfg = ref.config
    budget = embed_bytes(cfg, 4) + layer_bytes(cfg, 4)  # room for the embedding and one layer only
    p = plan(cfg, {"cpu": budget}, itemsize=4, offload=True)
    assert p.layers == ("cpu", DISK)
    placed = apply(load_model(tiny_model_dir), p, tmp_path / "offload")
    assert (tmp_path / "offload" / "layer-001.safetensors").exists()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    pos = torch.arange(6)[None]
    with torch.no_grad():
        assert torch.allclose(placed(ids, pos), ref(ids, pos), atol=1e-6)
