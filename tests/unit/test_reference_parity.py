"""Our transformer against transformers' Qwen2ForCausalLM / LlamaForCausalLM on small random configs
saved as safetensors (transformers is a test dependency only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from inference_core.model.transformer import KVCache
from inference_core.model.weights import load_model

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (scripts/setup.sh)")

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 320, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False},
    "qwen2-tied": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 300,
                   "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6,
                   "num_key_value_heads": 1, "max_position_embeddings": 256, "tie_word_embeddings": True},
    "llama3": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
               "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
               "max_position_embeddings": 512, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
}


def save_reference(name: str, out: Path) -> Any:
    cfg = transformers.AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the default init so the comparison is not trivially near zero
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.save_pretrained(out, safe_serialization=True)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(name: str, tmp_path: Path) -> None:
    ref = save_reference(name, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids, torch.arange(40).expand(2, 40))
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generations_match_with_and_without_cache(name: str, tmp_path: Path) -> None:
    ref = save_reference(name, tmp_path)
    ours = load_model(tmp_path)
    prompt = torch.randint(0, CONFIGS[name]["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                            pad_token_id=0)[0, 7:].tolist()
        # without a cache: the whole sequence each step
        seq = prompt[0].tolist()
        for _ in range(32):
            logits = ours(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1]
            seq.append(int(logits.argmax()))
        no_cache = seq[7:]
        # with the KV cache: prefill once, then one token per step
        cache = KVCache.empty(ours.config.num_hidden_layers)
        logits = ours(prompt, torch.arange(7)[None], cache)[0, -1]
        with_cache = []
        for _ in range(32):
            tok = int(logits.argmax())
            with_cache.append(tok)
            logits = ours(torch.tensor([[tok]]), torch.tensor([[cache.length]]), cache)[0, -1]
    assert no_cache == want and with_cache == want


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    cfg = transformers.AutoConfig.for_model(**CONFIGS["qwen2"])
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (ours(ids, torch.arange(4)[None]) - ref(ids).logits).abs().max() <= 1e-4
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    from inference_core.model.checkpoint import WeightsError

    with pytest.raises(WeightsError, match=f"shard {shard.name} is missing"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(dtype: torch.dtype, tmp_path: Path) -> None:
    ref = save_reference("llama3", tmp_path)
    ours = load_model(tmp_path, dtype=dtype)
    assert next(ours.parameters()).dtype == dtype
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got = ours(ids, torch.arange(5)[None]).float()
        want = ref(ids).logits
    assert (got - want).abs().max() <= 0.05  # half precision, same model
