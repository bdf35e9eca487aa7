"""Realistically sized checkpoints for the benchmarks, written locally (nothing is downloaded).

``qwen2_0_5b_shape()`` is a random bf16 checkpoint with Qwen2.5-0.5B's geometry (494 M parameters,
24 layers, GQA 14/2, vocab 151,936, 32,768-token context, tied embeddings), written by transformers
itself with a fixed seed, plus a byte-level BPE tokenizer that covers every id of the vocabulary (each id
decodes to one to three ASCII letters, so every generated token streams as text; benchmarks send
token ids). ``r1_distill_qwen_1_5b_shape()`` is DeepSeek-R1-Distill-Qwen-1.5B's geometry the same way
(``python bench/checkpoints.py 1.5b``). Cached under ``var/bench-models/`` (ignored by
git): the first call takes about a minute, later ones return at once.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference_core.integrity import write_manifest  # noqa: E402
from inference_core.tokenizer import DEFAULT_CHAT_TEMPLATE, synthetic_tokenizer  # noqa: E402

CACHE = ROOT / "var" / "bench-models"

QWEN2_0_5B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "use_sliding_window": False,
}


# DeepSeek-R1-Distill-Qwen-1.5B's geometry (1.78 B parameters, untied lm_head, 128k context)
R1_DISTILL_QWEN_1_5B = {
    **QWEN2_0_5B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 151646, "eos_token_id": 151643,
}


def qwen2_0_5b_shape(seed: int = 0) -> Path:
    return _write("qwen2.5-0.5b-shape-bf16", QWEN2_0_5B, seed)


def r1_distill_qwen_1_5b_shape(seed: int = 0) -> Path:
    return _write("r1-distill-qwen-1.5b-shape-bf16", R1_DISTILL_QWEN_1_5B, seed)


SHAPES = {"0.5b": qwen2_0_5b_shape, "1.5b": r1_distill_qwen_1_5b_shape}


def _write(name: str, config: dict[str, object], seed: int) -> Path:
    out = CACHE / name
    if (out / "integrity.json").exists():
        return out
    import torch
    import transformers

    tmp = CACHE / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    synthetic_tokenizer(int(config["vocab_size"])).save(str(tmp / "tokenizer.json"))  # type: ignore[call-overload]
    (tmp / "tokenizer_config.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}, indent=2) + "\n")
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(SHAPES[sys.argv[1] if len(sys.argv) > 1 else "0.5b"]())
