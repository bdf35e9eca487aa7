"""The transformer, checkpoint loading and the tokenizer, on the bundled tiny model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from inference_core.model.config import ModelConfig, ModelConfigError
from inference_core.model.transformer import CausalLM, KVCache
from inference_core.model.weights import WeightsError, load_model, make_tiny_checkpoint, validate_safetensors_header
from inference_core.tokenizer import TextTokenizer


def test_bundled_checkpoint_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_kv_cache_decode_equals_full_forward(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        full = model(ids, pos)
        cache = KVCache.empty(model.config.num_hidden_layers)
        steps = [model(ids[:, :8], pos[:, :8], cache)]
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], pos[:, t:t + 1], cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("cfg", [
    ModelConfig(model_type="llama", attention_bias=False, num_key_value_heads=4, tie_word_embeddings=True,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ModelConfig(model_type="qwen2", num_key_value_heads=1),
])
def test_architectures_run_and_are_causal(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        a = model(ids, torch.arange(6)[None])
        ids2 = ids.clone()
        ids2[0, 5] = (ids2[0, 5] + 1) % cfg.vocab_size
        b = model(ids2, torch.arange(6)[None])
    assert a.shape == (1, 6, cfg.vocab_size)
    assert torch.allclose(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5], b[:, 5])  # no peeking ahead
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (cfg.model_type == "qwen2")


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": 64}))
    with pytest.raises(ModelConfigError, match="'deepseek_v3' is not supported; supported: qwen2, llama"):
        ModelConfig.from_file(tmp_path / "config.json")


def corrupt(src: Path, dst: Path, how: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    path = dst / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if how == "truncated":
        path.write_bytes(raw[:-10])
    elif how == "length":
        path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    elif how == "json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif how == "overlap":
        name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] > 0)
        header[name]["data_offsets"][0] -= 4
        body = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        path.write_bytes(raw[:8] + body + raw[8 + n:])
    elif how == "missing":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["num_hidden_layers"] += 1
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", "tensors cover"), ("length", "exceeds file size"), ("json", "not valid JSON"),
    ("overlap", "overlaps the previous tensor"), ("missing", "missing tensors ['model.layers.2."),
])
def test_corrupt_checkpoints_name_file_and_tensor(tmp_path: Path, tiny_model_dir: Path, how: str, message: str) -> None:
    bad = corrupt(tiny_model_dir, tmp_path / how, how)
    with pytest.raises(WeightsError) as info:
        load_model(bad)
    assert message in str(info.value) and str(bad) in str(info.value)


def test_header_validation_accepts_the_real_file(tiny_model_dir: Path) -> None:
    header = validate_safetensors_header(tiny_model_dir / "model.safetensors")
    assert "model.embed_tokens.weight" in header


def test_tokenizer_round_trip_and_chat_template(tiny_model_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_model_dir)
    text = "GPU utilization is 85% on 2026-11-29; ünïcödé ok"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.token_id("<|im_end|>") is not None


def test_weights_are_views_of_the_memory_map(tiny_model_dir: Path) -> None:
    """Loading does not need twice the model in RAM: parameters point into the file's mapping."""
    model = load_model(tiny_model_dir)
    [mm] = model.mmaps
    base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    size = len(mm)
    for name, p in model.named_parameters():
        ptr = p.untyped_storage().data_ptr()
        assert base <= ptr < base + size, f"{name} was copied out of the mapping"
    with torch.no_grad():  # copy-on-write: changing a weight never touches the file
        model.lm_head.weight.zero_()
    assert load_model(tiny_model_dir).lm_head.weight.abs().sum() > 0
