"""Model files: integrity manifest (MD5 and SHA-256), safetensors headers, shards and sizes."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from inference_core.integrity import ManifestError, verify_manifest
from inference_core.model.checkpoint import INDEX_FILE, SINGLE_FILE, WeightsError, validate_safetensors_header
from sentinel.runbooks.base import Context, Finding, Params, Status, check

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelFilesParams(Params):
    model_dir: Path | None = Field(None, description="default: the configured model directory")
    require_manifest: bool = Field(False, description="a missing manifest fails instead of warning")


def _tensor_bytes(header: dict[str, dict[str, object]]) -> int:
    total = 0
    for info in header.values():
        n = 1
        for d in info["shape"]:  # type: ignore[attr-defined]
            n *= int(d)
        total += n * DTYPE_BYTES.get(str(info["dtype"]), 0)
    return total


@check("model_files", ModelFilesParams)
def model_files_check(p: ModelFilesParams, ctx: Context) -> Finding:
    """Manifest sums, every safetensors header, missing shards, sizes against the index."""
    d = p.model_dir or ctx.model_dir
    if d is None:
        return Finding(Status.SKIPPED, "no model directory configured")
    if not d.is_dir():
        return Finding(Status.FAIL, f"{d}: not a directory", remedy="check the model path and the mount")
    problems: list[str] = []
    warnings: list[str] = []
    ev: dict[str, object] = {"model_dir": str(d)}
    index = d / INDEX_FILE
    if index.exists():
        try:
            doc = json.loads(index.read_text())
            shards = sorted(set(doc["weight_map"].values()))
            expected_total = doc.get("metadata", {}).get("total_size")
        except (ValueError, KeyError) as exc:
            return Finding(Status.FAIL, f"{index}: unreadable index: {exc}", ev, "re-copy the checkpoint")
    elif (d / SINGLE_FILE).exists():
        shards, expected_total = [SINGLE_FILE], None
    else:
        return Finding(Status.FAIL, f"{d}: neither {SINGLE_FILE} nor {INDEX_FILE}", ev, "re-copy the checkpoint")
    total = 0
    for name in shards:
        f = d / name
        if not f.exists():
            problems.append(f"{name}: missing shard")
            continue
        try:
            total += _tensor_bytes(validate_safetensors_header(f))
        except WeightsError as exc:
            problems.append(str(exc))
    ev.update(shards=len(shards), tensor_bytes=total)
    if expected_total is not None and not problems and int(expected_total) != total:
        problems.append(f"{INDEX_FILE}: metadata.total_size {expected_total} != tensors' {total} bytes")
    try:
        bad = verify_manifest(d)
        ev["manifest"] = "verified" if not bad else bad
        problems += [f"manifest: {b}" for b in bad]
    except ManifestError as exc:
        ev["manifest"] = "missing"
        (problems if p.require_manifest else warnings).append(str(exc))
    if problems:
        return Finding(Status.FAIL, f"{len(problems)} problem(s): {problems[0]}", {**ev, "problems": problems},
                       "re-copy the damaged files from the source and verify again (MD5/SHA-256)")
    if warnings:
        return Finding(Status.WARN, warnings[0], ev, "write a manifest once the files are known good")
    return Finding(Status.OK, f"{len(shards)} shard(s), {total} tensor bytes, headers valid, manifest verified", ev)
