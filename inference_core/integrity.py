"""Integrity manifest of a model directory: size, MD5 (as the deployment guide asks) and SHA-256.

``python -m inference_core.integrity write DIR`` writes ``DIR/integrity.json``;
``python -m inference_core.integrity verify DIR`` checks it (exit 1 on any problem).

A restart is the floor of every recovery, and hashing a 1 GB checkpoint costs two seconds of one core.
``verify_cached`` therefore remembers a verification that passed, with each file's identity (device, inode,
size, modification and status-change times, as git's index does), and skips the hashes when nothing
changed since. Any write to a file changes its status-change time, which user space cannot set back, so a
file damaged or replaced in place is hashed again. Bit rot underneath an unchanged inode is not seen by a
restart; ``sentinel diagnose model-load-failure`` (and ``--no-integrity-cache``) always hash in full.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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


def _identity(model_dir: Path) -> dict[str, list[int]]:
    out = {}
    for p in [model_dir / MANIFEST, *manifest_files(model_dir)]:
        st = p.stat()
        out[p.name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inference_core" / "integrity"


def verify_cached(model_dir: Path, cache_dir: Path | None) -> tuple[list[str], bool]:
    """``verify_manifest``, skipped when every file (and the manifest) is the one a previous verification
    passed on. Returns (problems, whether the hashes were skipped). ``cache_dir`` None: always hash."""
    if cache_dir is None:
        return verify_manifest(model_dir), False
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:32]
    stamp = cache_dir / f"{key}.json"
    try:
        before: dict[str, list[int]] | None = _identity(model_dir)
    except OSError:
        before = None  # a file vanished: the full check says which
    try:
        if before is not None and json.loads(stamp.read_text()) == {"dir": str(model_dir.resolve()),
                                                                     "files": before}:
            return [], True
    except (OSError, ValueError):
        pass
    problems = verify_manifest(model_dir)
    if before is not None and not [p for p in problems if not p.endswith("not in the manifest")]:
        try:  # only a verification that passed is remembered, and only if nothing changed while it ran
            if _identity(model_dir) == before:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"dir": str(model_dir.resolve()), "files": before}))
                tmp.replace(stamp)
        except OSError:
            pass  # no cache: the next start hashes again
    return problems, False


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
