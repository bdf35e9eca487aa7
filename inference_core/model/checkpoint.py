"""Checkpoint layout and safetensors header validation, without torch (diagnostics import this)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise WeightsError(f"{index}: shard {shard.name} is missing (needed for "
                                   f"{next(n for n, f in files.items() if f == shard)} and others)")
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise WeightsError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return {name: single for name in validate_safetensors_header(single)}
