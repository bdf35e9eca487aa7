"""ONNX export: onnxruntime's logits match PyTorch's, at other batch sizes and lengths than traced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference_core.model.weights import load_model
from inference_core.onnx_export import export_onnx

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency (scripts/setup.sh)")


def test_onnxruntime_matches_pytorch(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir)
    path = export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (2, 13)):
        ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=shape, dtype=np.int64)
        got = session.run(None, {"input_ids": ids})[0]
        with torch.no_grad():
            want = model(torch.tensor(ids), torch.arange(shape[1]).expand(*shape)).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
