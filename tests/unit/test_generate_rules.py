"""Exported Prometheus rule files: in step with rules/, accepted by the real promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.rules.export import export_files, render
from sentinel.rules.model import Rule, load_rule_file, load_rules, rule_files
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
        sentinel: {consecutive_samples: 3, remediation: scale_out, threshold: 90}
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


def test_checked_in_dashboard_is_in_step_with_rules() -> None:
    from sentinel.generate.dashboards import render as render_dashboard
    from sentinel.rules.model import load_rules

    path = ROOT / "dashboards" / "sentinel-inference.json"
    assert path.read_text() == render_dashboard(load_rules(ROOT / "rules")), (
        f"{path} is stale: run `sentinel dashboards generate`")


def test_dashboard_panels_draw_signals_and_thresholds() -> None:
    import json

    from sentinel.generate.dashboards import signal_of

    doc = json.loads((ROOT / "dashboards" / "sentinel-inference.json").read_text())
    panels = {p["title"]: p for p in doc["panels"] if p["type"] != "row"}
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    p99 = panels["InferenceLatencyP99High"]
    assert p99["fieldConfig"]["defaults"]["unit"] == "s"
    assert p99["fieldConfig"]["defaults"]["thresholds"]["steps"][-1] == {"color": "red", "value": 0.5}
    assert not p99["targets"][0]["expr"].rstrip().endswith("0.5")  # the signal, not the boolean filter
    assert any("sentinel_learned_threshold_upper" in t["expr"] for t in panels["InferenceLatencyAnomaly"]["targets"])
    assert panels["GpuSaturatedScaleOut"]["type"] == "gauge"
    rule = Rule.model_validate({"alert": "A", "expr": "x > 5", "sentinel": {"threshold": 6}})
    assert signal_of(rule) == "x > 5"  # a comparison against another number is kept


def test_dashboards_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["dashboards", "generate", "--rules-dir", str(ROOT / "rules"), "--out",
                                   str(tmp_path / "d.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "d.json").read_text())
    titles = " ".join(p.get("title", "") for p in doc["panels"])
    alerts = [r.alert for g in load_rules(ROOT / "rules") for r in g.group.rules if r.alert]
    assert doc["title"] and alerts and all(a in titles for a in alerts), (alerts, titles)  # one panel per rule
    assert doc == json.loads((ROOT / "dashboards" / "sentinel-inference.json").read_text())  # the checked-in file
