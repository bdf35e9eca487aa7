"""`sentinel plan` (the seed's section 2): exact parameter counts from the DeepSeek-R1 distills' config.json
(their published values, in tests/fixtures/configs), checked against transformers building the same model on
the meta device; the seed's table; and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.plan import ArchConfig, geometry_for, load_config, make_plan, parameter_count, parse_params
from tests.conftest import ROOT

CONFIGS = ROOT / "tests" / "fixtures" / "configs"
# the model cards' sizes (Hugging Face rounds to three digits)
PUBLISHED = {"DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9, "DeepSeek-R1-Distill-Qwen-7B": 7.62e9,
             "DeepSeek-R1-Distill-Llama-8B": 8.03e9, "DeepSeek-R1-Distill-Qwen-14B": 14.8e9,
             "DeepSeek-R1-Distill-Qwen-32B": 32.8e9, "DeepSeek-R1-Distill-Llama-70B": 70.6e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_exact(name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = CONFIGS / f"{name}.json"
    ours = parameter_count(load_config(path))
    cfg = AutoConfig.for_model(**json.loads(path.read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert ours == sum(p.numel() for p in model.parameters())  # exactly what transformers builds
    assert abs(ours - PUBLISHED[name]) / PUBLISHED[name] < 0.005


def _row(params: str, gpu: str) -> tuple[int, bool, str]:
    n = parse_params(params)
    plan = make_plan(geometry_for(n), params, params=int(n))
    [o] = [o for o in plan.options if o.gpu == gpu]
    return o.gpus, o.fits, o.interconnect


def test_the_seeds_table() -> None:
    gpus, fits, _ = _row("7B", "A100 80GB")
    assert (gpus, fits) == (1, True)  # 7B: one A100 80 GB
    n = parse_params("7B")
    assert make_plan(geometry_for(n), "7B", params=int(n)).recommended.gpu == "A100 80GB"  # type: ignore[union-attr]
    gpus, fits, link = _row("67B", "A100 80GB")
    assert (gpus, fits) == (4, True) and "NVLink" in link  # 67B: four A100 with NVLink
    gpus, fits, link = _row("175B", "H100 80GB")
    assert (gpus, fits) == (8, True) and "InfiniBand" in link  # 175B+: eight H100, InfiniBand


def test_a_real_config_and_quantization() -> None:
    cfg = load_config(CONFIGS / "DeepSeek-R1-Distill-Llama-70B.json")
    bf16 = make_plan(cfg, "70B", context=8192, sequences=8)
    int8 = make_plan(cfg, "70B", dtype="int8", context=8192, sequences=8)
    assert int8.weights_bytes * 2 == bf16.weights_bytes
    # 80 layers x 8 KV heads x 128 x K and V x 2 bytes
    assert bf16.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert bf16.recommended is not None and int8.recommended is not None
    assert int8.recommended.gpus <= bf16.recommended.gpus
    assert all(o.tensor_parallel in (1, 2, 4, 8) for o in bf16.options)  # 64 heads split evenly


def test_the_cli(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["plan", "--params", "7B", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["recommended"]["gpu"] == "A100 80GB" and len(doc["options"]) == 6
    r = CliRunner().invoke(app, ["plan", "-m", str(CONFIGS / "DeepSeek-R1-Distill-Qwen-14B.json")])
    assert r.exit_code == 0 and "recommended" in r.output and "14.77B" in r.output, r.output
    assert CliRunner().invoke(app, ["plan", "--params", "seven"]).exit_code == 2
    assert CliRunner().invoke(app, ["plan"]).exit_code == 2
    assert CliRunner().invoke(app, ["plan", "--params", "7B", "--dtype", "fp8"]).exit_code == 2
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 0}')
    r = CliRunner().invoke(app, ["plan", "-m", str(tmp_path)])
    assert r.exit_code == 2 and "hidden_size" in r.output


def test_geometry_for_a_bare_count_is_close() -> None:
    for p in ("1.5B", "7B", "67B", "175B"):
        n = parse_params(p)
        assert abs(parameter_count(geometry_for(n)) - n) / n < 0.03
    assert isinstance(geometry_for(7e9), ArchConfig)
