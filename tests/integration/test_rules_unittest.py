"""`sentinel rules test` against `promtool test rules`: the same files, the same verdicts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.rules.unittest import run_promtool, run_test_file
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="prometheus/promtool are not installed (apt-get install prometheus)")]

RULES = """groups:
  - name: g
    rules:
      - alert: Flappy
        expr: errors > 5
        for: 1m
        keep_firing_for: 2m
        labels: {severity: page}
        annotations: {summary: "{{ $labels.job }} at {{ $value }}"}
      - alert: Cuda
        log: {filter: [{exists: cuda_error}]}
"""

TEST = """rule_files: [rules.yaml]
evaluation_interval: 30s
tests:
  - interval: 30s
    input_series:
      - series: 'errors{job="api"}'
        values: '0 10 10 10 10 _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _'
    alert_rule_test:
      - eval_time: 1m
        alertname: Flappy
        exp_alerts: []
      - eval_time: 2m
        alertname: Flappy
        exp_alerts:
          - exp_labels: {job: api, severity: page}
            exp_annotations: {summary: "api at 10"}
      - eval_time: 10m
        alertname: Flappy
        exp_alerts: []
    promql_expr_test:
      - expr: errors * 2
        eval_time: 1m
        exp_samples:
          - labels: '{job="api"}'
            value: 20
"""


def test_default_pack_tests_pass_under_both() -> None:
    for f in sorted((ROOT / "rules" / "tests").glob("*.yaml")):
        assert run_test_file(f).failures == []
        ok, text = run_promtool(f)
        assert ok, text


@pytest.mark.parametrize(("wrong", "right"), [("", ""), ("api at 10", "api at 11"),
                                               ("eval_time: 10m", "eval_time: 8m")])
def test_same_verdict_as_promtool(tmp_path: Path, wrong: str, right: str) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    f = tmp_path / "t.yaml"
    f.write_text(TEST.replace(wrong, right) if wrong else TEST)
    ours = run_test_file(f)
    ok, text = run_promtool(f)
    assert ours.ok == ok, (ours.failures, text)
    assert ours.ok == (wrong == "")  # the unchanged file passes; each altered expectation fails


def test_cli_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "t.yaml").write_text(TEST.replace("api at 10", "api at 12"))
    res = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "t.yaml")])
    assert res.exit_code == 1 and "alertname: Flappy, time: 2m" in res.output
