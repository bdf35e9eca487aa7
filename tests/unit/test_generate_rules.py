"""Exported Prometheus rule files: in step with rules/, accepted by the real promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.rules.export import export_files, render
from sentinel.rules.model import load_rule_file, rule_files
from tests.conftest import ROOT

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (apt-get install prometheus)")


def test_checked_in_export_is_in_step_with_rules(tmp_path: Path) -> None:
    export_files({p: load_rule_file(p) for p in rule_files(ROOT / "rules")}, tmp_path)
    checked_in = ROOT / "deploy" / "prometheus" / "rules"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in checked_in.iterdir())
    for p in tmp_path.iterdir():
        assert p.read_text() == (checked_in / p.name).read_text(), (
            f"{checked_in / p.name} is stale: run `sentinel rules export`")


@needs_promtool
def test_promtool_accepts_the_export() -> None:
    files = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yaml"))
    out = subprocess.run(["promtool", "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_export_strips_extensions_and_maps_semantics(tmp_path: Path) -> None:
    src = tmp_path / "r.yaml"
    src.write_text("""groups:
  - name: g
    interval: 15s
    labels: {team: ml}
    rules:
      - alert: Hot
        expr: gpu_utilization > 90
        labels: {severity: warning}
        sentinel: {consecutive_samples: 3, remediation: scale_out, signal: {expr: gpu_utilization, threshold: 90}}
      - alert: Cuda
        log: {filter: [{exists: cuda_error}]}
      - record: job:up:sum
        expr: sum by (job) (up)
  - name: logs-only
    rules:
      - alert: Cuda2
        log: {filter: [{exists: cuda_error}]}
""")
    doc = yaml.safe_load(render(load_rule_file(src), "r.yaml"))
    assert doc == {"groups": [{"name": "g", "interval": "15s", "rules": [
        {"alert": "Hot", "expr": "gpu_utilization > 90", "for": "30s", "labels": {"team": "ml", "severity": "warning"}},
        {"record": "job:up:sum", "expr": "sum by (job) (up)", "labels": {"team": "ml"}}]}]}


@needs_promtool
def test_rules_check_maps_promtool_errors_to_our_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: L\n        log: {filter: [{exists: x}]}\n"
                   "      - alert: A\n        expr: sum(\n      - alert: A\n        expr: up\n"
                   "      - alert: A\n        expr: up\n")
    res = CliRunner().invoke(app, ["rules", "check", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:7: groups.0.rules.1.expr: could not parse expression" in res.output
    lint = tmp_path / "lint.yaml"
    lint.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n      - alert: A\n"
                    "        expr: up == 0\n")
    res = CliRunner().invoke(app, ["rules", "check", str(lint)])  # as promtool: a lint alone exits 0 ...
    assert res.exit_code == 0 and "duplicate rule A" in res.output and "FAILED (lint)" in res.output
    assert "SUCCESS" not in res.output
    res = CliRunner().invoke(app, ["rules", "check", "--lint-fatal", str(lint)])  # ... and 3 with --lint-fatal
    assert res.exit_code == 3


def test_rules_export_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["rules", "export", "--out", str(tmp_path), "--rules-dir", str(ROOT / "rules")])
    assert res.exit_code == 0 and (tmp_path / "inference.yaml").exists()
    bad = CliRunner().invoke(app, ["rules", "export", "--format", "grafana", "--out", str(tmp_path)])
    assert bad.exit_code == 2
