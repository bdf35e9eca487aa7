"""Integrity manifest of a model directory: size, MD5 (as the deployment guide asks) and SHA-256.

``python -m inference_core.integrity write DIR`` writes ``DIR/integrity.json``;
``python -m inference_core.integrity verify DIR`` checks it (exit 1 on any problem).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "integrity.json"
CHUNK = 8 * 2**20
# What a manifest covers: weights, configs and tokenizer files.
PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt")


@dataclass(frozen=True)
class FileSum:
    size: int
    md5: str
    sha256: str


def hash_file(path: Path) -> FileSum:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return FileSum(size, md5.hexdigest(), sha.hexdigest())


def manifest_files(model_dir: Path) -> list[Path]:
    files = {p for pat in PATTERNS for p in model_dir.glob(pat) if p.is_file() and p.name != MANIFEST}
    return sorted(files)


def write_manifest(model_dir: Path) -> dict[str, FileSum]:
    sums = {p.name: hash_file(p) for p in manifest_files(model_dir)}
    doc = {"version": 1, "files": {name: vars(s) for name, s in sums.items()}}
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(model_dir / MANIFEST)
    return sums


class ManifestError(ValueError):
    """The manifest is missing or unreadable."""


def read_manifest(model_dir: Path) -> dict[str, FileSum]:
    path = model_dir / MANIFEST
    try:
        doc = json.loads(path.read_text())
        return {name: FileSum(int(v["size"]), str(v["md5"]), str(v["sha256"])) for name, v in doc["files"].items()}
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no integrity manifest (write one with "
                            f"`python -m inference_core.integrity write {model_dir}`)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc


def verify_manifest(model_dir: Path) -> list[str]:
    """Problems found, one line each naming the file; empty when every file matches."""
    expected = read_manifest(model_dir)
    problems = []
    for name, want in sorted(expected.items()):
        path = model_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        got = hash_file(path)
        if got.size != want.size:
            problems.append(f"{name}: size {got.size} != manifest {want.size}")
        elif got.md5 != want.md5:
            problems.append(f"{name}: MD5 {got.md5} != manifest {want.md5}")
        elif got.sha256 != want.sha256:
            problems.append(f"{name}: SHA-256 {got.sha256} != manifest {want.sha256}")
    extra = sorted({p.name for p in manifest_files(model_dir)} - set(expected))
    problems += [f"{name}: not in the manifest" for name in extra]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inference_core.integrity", description=__doc__)
    p.add_argument("action", choices=["write", "verify"])
    p.add_argument("model_dir", type=Path)
    args = p.parse_args(argv)
    if args.action == "write":
        sums = write_manifest(args.model_dir)
        print(f"{args.model_dir / MANIFEST}: {len(sums)} files")
        return 0
    try:
        problems = verify_manifest(args.model_dir)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    for line in problems:
        print(line, file=sys.stderr)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
