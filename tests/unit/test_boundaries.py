"""The boundaries DESIGN.md draws: inference_core never imports sentinel; the pure cores do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PURE = {
    "inference_core/scheduler.py": set(),
    "sentinel/alerts/state.py": {"sentinel.alerts.fingerprint", "sentinel.errors"},
    "sentinel/remediation/policy.py": set(),
}
STDLIB_OK = {"__future__", "enum", "collections", "collections.abc", "dataclasses", "typing"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_inference_core_never_imports_sentinel() -> None:
    for path in (ROOT / "inference_core").rglob("*.py"):
        bad = {m for m in imports(path) if m == "sentinel" or m.startswith("sentinel.")}
        assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize(("module", "allowed"), list(PURE.items()))
def test_pure_cores_import_no_io(module: str, allowed: set[str]) -> None:
    extra = imports(ROOT / module) - STDLIB_OK - allowed
    assert not extra, f"{module} is a pure core but imports {extra}"
