"""Safetensors loading (single file or sharded index), validated, built on the meta device.

Also makes the bundled tiny checkpoint: a Qwen2-architecture model with fixed-seed weights and a
locally trained byte-level BPE tokenizer, written in Hugging Face layout so the default path runs
exactly the real loading code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference_core.config import PRESETS, ModelConfig
from inference_core.integrity import write_manifest
from inference_core.model import CausalLM, rope_inv_freq
from inference_core.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bundled_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightsError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def validate_safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """Check the header (u64 length + JSON) and that tensor offsets tile the buffer exactly."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise WeightsError(f"{path}: truncated: no 8-byte header length")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8:
            raise WeightsError(f"{path}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and 0 <= offs[0] <= offs[1]):
            raise WeightsError(f"{path}: tensor {name}: bad data_offsets {offs!r}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            kind = "overlaps the previous tensor" if start < pos else f"leaves a hole at byte {pos}"
            raise WeightsError(f"{path}: tensor {name}: {kind}")
        pos = end
    if pos != size - 8 - n:
        raise WeightsError(f"{path}: tensors cover {pos} bytes but the buffer holds {size - 8 - n}")
    return header


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it (single file or index ``weight_map``)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise WeightsError(f"{index}: malformed index: {exc}") from exc
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise WeightsError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return {name: single for name in validate_safetensors_header(single)}


def load_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """Build on the meta device, then assign memory-mapped tensors: no second copy in RAM."""
    cfg = ModelConfig.from_file(model_dir / "config.json")
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files = checkpoint_files(model_dir)
    for f in set(files.values()):
        validate_safetensors_header(f)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise WeightsError(f"{model_dir}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(files.values())):
        with safe_open(str(fname), framework="pt", device=device) as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in expected:
                    continue
                t = fh.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name]):
                    raise WeightsError(
                        f"{fname}: tensor {name}: shape {tuple(t.shape)} != expected {tuple(expected[name])}"
                    )
                state[name] = t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers built on the meta device hold no data: recompute the RoPE frequencies for real.
    model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
    return model.eval()


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write the bundled model (fixed seed) in Hugging Face layout; idempotent for a given seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = PRESETS[preset]
    tok = train_bundled_tokenizer(base.vocab_size)
    eos = tok.token_to_id("<|endoftext|>")
    im_end = tok.token_to_id("<|im_end|>")
    cfg = ModelConfig(**{**base.to_dict(), "vocab_size": tok.get_vocab_size(), "eos_token_id": [eos, im_end],
                         "bos_token_id": None})
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.normal_(0.0, 0.08)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / SINGLE_FILE),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": DEFAULT_CHAT_TEMPLATE, "eos_token": "<|endoftext|>", "model_max_length":
        cfg.max_position_embeddings}, indent=2) + "\n")
    write_manifest(out_dir)
    return out_dir
