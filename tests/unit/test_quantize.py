"""Int8 weight-only quantization on the bundled model."""

from __future__ import annotations

from pathlib import Path

import torch

from inference_core.quantize import Int8Linear, quantize_int8, weight_bytes
from inference_core.tokenizer import TextTokenizer, corpus_text
from inference_core.weights import load_model


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
