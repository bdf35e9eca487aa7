"""Int8 weight-only quantization on the bundled model."""

from __future__ import annotations

from pathlib import Path

import torch

from inference_core.model.quantize import Int8Linear, quantize_int8, weight_bytes
from inference_core.model.weights import load_model
from inference_core.tokenizer import TextTokenizer, corpus_text


def test_int8_linear_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear(lin)
    x = torch.randn(5, 96)
    err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 0.02 and q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float16


def test_quantized_model_size_and_agreement(tiny_model_dir: Path) -> None:
    fp32 = load_model(tiny_model_dir)
    int8 = quantize_int8(load_model(tiny_model_dir))
    assert weight_bytes(int8) / weight_bytes(fp32) < 0.27  # norms stay fp32: ~25 % at real widths
    tok = TextTokenizer.from_dir(tiny_model_dir)
    same = total = 0
    with torch.no_grad():
        for line in filter(str.strip, corpus_text().splitlines()):  # the fixed prompt set
            x = torch.tensor([tok.encode(line)])
            pos = torch.arange(x.shape[1])[None]
            same += int((fp32(x, pos).argmax(-1) == int8(x, pos).argmax(-1)).sum())
            total += x.shape[1]
    assert same / total >= 0.988


def test_block_by_block_quantization_is_the_whole_matrix_at_once(monkeypatch: object) -> None:
    """The fp32 temporaries are bounded by quantizing rows in blocks; the result is bit for bit the
    one-shot formula's."""
    import inference_core.model.quantize as qz

    torch.manual_seed(1)
    w = (torch.randn(1000, 96) * torch.rand(1000, 1) * 3).bfloat16()
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-6).half()
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    monkeypatch.setattr(qz, "CHUNK_ELEMENTS", 96 * 7)  # type: ignore[attr-defined]  # 7-row blocks, a ragged last
    got_q, got_scale = qz._quantize_rows(w)
    assert torch.equal(got_q, q) and torch.equal(got_scale, scale)


def test_a_tied_head_and_embedding_are_quantized_once_and_shared(tiny_model_dir: Path) -> None:
    import json

    from inference_core.model.quantize import Int8Embedding

    model = load_model(tiny_model_dir)
    if not json.loads((tiny_model_dir / "config.json").read_text()).get("tie_word_embeddings"):
        model.lm_head.weight = model.model.embed_tokens.weight  # tie them, as Qwen2's small checkpoints do
    reference = Int8Linear(model.lm_head)
    int8 = quantize_int8(model)
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.model.embed_tokens, Int8Embedding)
    assert int8.model.embed_tokens.qweight.data_ptr() == int8.lm_head.qweight.data_ptr()
    assert torch.equal(int8.lm_head.qweight, reference.qweight) and torch.equal(int8.lm_head.scale, reference.scale)
