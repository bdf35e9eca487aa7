"""The integrity check a restart does: full hashes the first time, none while the files are unchanged, full
again after any write (a damaged file is always caught), and a failed verification is never remembered."""

from __future__ import annotations

import shutil
from pathlib import Path

from inference_core.integrity import verify_cached, write_manifest


def model(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (d / "config.json").write_text("{}")
    write_manifest(d)
    return d


def test_unchanged_files_skip_the_hashes_and_any_write_brings_them_back(tmp_path: Path) -> None:
    d, cache = model(tmp_path), tmp_path / "cache"
    assert verify_cached(d, cache) == ([], False)  # first start: hashed
    assert verify_cached(d, cache) == ([], True)   # a restart: unchanged, skipped
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])  # same size, in place (the drill's damage)
    weights.write_bytes(bytes(data))
    problems, skipped = verify_cached(d, cache)
    assert not skipped and problems and problems[0].startswith("model.safetensors: MD5 ")
    problems, skipped = verify_cached(d, cache)  # a failure is never remembered: hashed again, refused again
    assert not skipped and problems


def test_a_replaced_file_is_hashed_again_and_no_cache_always_hashes(tmp_path: Path) -> None:
    d, cache = model(tmp_path), tmp_path / "cache"
    assert verify_cached(d, cache) == ([], False)
    shutil.copy(d / "config.json", tmp_path / "c.json")
    (tmp_path / "c.json").replace(d / "config.json")  # the same bytes, another inode
    assert verify_cached(d, cache) == ([], False)
    assert verify_cached(d, cache) == ([], True)
    assert verify_cached(d, None) == ([], False)
