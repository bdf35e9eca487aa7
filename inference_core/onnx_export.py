"""ONNX export of the model (input_ids → logits, no cache), for onnxruntime and TensorRT users.

``python -m inference_core.onnx_export MODEL_DIR OUT.onnx``. Batch and sequence length are dynamic.
Uses torch's TorchScript-based exporter (opset 17), which needs no extra packages; onnxruntime is only
needed to run the result (a dev dependency here, used by the test that checks the logits).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from inference_core.model.transformer import CausalLM
from inference_core.model.weights import load_model


class LogitsModel(nn.Module):
    """The exported graph: positions are derived from the input so the only input is input_ids."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        return self.model(input_ids, positions)


def export_onnx(model: CausalLM, out: Path, opset: int = 17) -> Path:
    wrapper = LogitsModel(model).eval()
    example = torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the test checks the result
        torch.onnx.export(wrapper, (example,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch", 1: "sequence"}},
                          opset_version=opset, dynamo=False)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="inference_core.onnx_export", description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    path = export_onnx(load_model(args.model_dir, dtype=torch.float32), args.out, args.opset)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
