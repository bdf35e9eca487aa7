"""Greedy outputs of the served path equal transformers' for Qwen2 and Llama checkpoints written by
transformers itself — through the HTTP API with concurrent requests (packed batches, paged KV cache),
not only the model. Also: a chat template read from ``chat_template.jinja`` (transformers 5's layout)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from inference_core.tokenizer import synthetic_tokenizer
from sentinel.netutil import free_port, wait_http_ok

pytestmark = pytest.mark.integration
VOCAB = 512
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"

ARCHS = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "llama": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def write_checkpoint(out: Path, arch: str) -> Path:
    import transformers

    cfg = transformers.AutoConfig.for_model(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=VOCAB - 3,
        eos_token_id=VOCAB - 3, **ARCHS[arch])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    synthetic_tokenizer(VOCAB).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


@pytest.fixture(scope="module", params=sorted(ARCHS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    model_dir = write_checkpoint(tmp_path_factory.mktemp("ckpt") / request.param, request.param)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(model_dir),
                             "--port", str(port), "--max-num-seqs", "4", "--max-num-batched-tokens", "40"],
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http_ok(f"{url}/ready", 60, alive=lambda: proc.poll() is None)
        yield model_dir, url
    finally:
        proc.terminate()
        proc.wait(30)


def test_greedy_tokens_equal_transformers(served: tuple[Path, str]) -> None:
    import transformers

    model_dir, url = served
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB - 3, (n,), generator=gen).tolist() for n in (5, 17, 48, 9)]
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                           do_sample=False, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def together() -> list[list[int]]:  # all four at once: packed batches with chunked prefill
        rs = await asyncio.gather(*(client.completions.create(
            model=model_dir.name, prompt=p, max_tokens=24, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True}) for p in prompts))
        return [r.choices[0].model_extra["token_ids"] for r in rs]  # type: ignore[index]

    assert asyncio.run(together()) == want


def test_chat_template_from_chat_template_jinja(served: tuple[Path, str]) -> None:
    model_dir, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={"return_token_ids": True})
    tok = synthetic_tokenizer(VOCAB)
    want = tok.encode("[user] hi\n[assistant]", add_special_tokens=False).ids
    assert r.choices[0].model_extra["prompt_token_ids"] == want  # type: ignore[index]
    assert r.usage is not None and r.usage.prompt_tokens == len(want)
