"""The documentation site: its reference pages are what the code generates today, `mkdocs build --strict`
passes (every page in the nav, every link and anchor resolves), and the README stays short with its two
commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sentinel.cli.reference_docs import pages
from tests.conftest import ROOT


def test_reference_pages_are_in_step_with_the_code() -> None:
    stale = [rel for rel, text in pages().items() if (ROOT / "docs" / rel).read_text() != text]
    assert stale == [], f"regenerate with `sentinel deploy docs`: {stale}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "getting-started/index.html", "reference/metrics/index.html"} <= built


def test_the_readme_is_short_and_keeps_its_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    assert "./scripts/run.sh" in text and "./scripts/test.sh" in text


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
               if p.relative_to(ROOT / "docs").as_posix() not in nav]
    assert missing == []
