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


def test_learned_threshold_against_real_prometheus_history(tmp_path: Path) -> None:
    """Two hours of history in a real Prometheus; replica-a shifts level in the last 10 minutes."""
    from sentinel.alerts.state import State
    from sentinel.alerts.store import Store
    from sentinel.rules.evaluator import Evaluator
    from sentinel.rules.model import Group, LoadedGroup, Rule
    from sentinel.rules.unittest import InputSeries, TemporaryTsdb, TestGroup, input_series

    normal = " ".join(f"{0.12 + 0.005 * ((i * 7) % 5 - 2):.3f}" for i in range(120))
    shifted = normal.rsplit(" ", 10)[0] + " 0.4" * 10
    tg = TestGroup(input_series=[InputSeries(series='latency{replica="a"}', values=shifted),
                                 InputSeries(series='latency{replica="b"}', values=normal)])
    rule = Rule.model_validate({"alert": "LatencyAnomaly", "expr": "latency", "sentinel": {
        "learned": {"history": "2h", "step": "1m", "k": 4, "min_points": 30}}})
    group = LoadedGroup(file="f", group=Group(name="g", rules=[rule]))
    with TemporaryTsdb(tmp_path / "tsdb", "prometheus") as (src, writer):
        writer.write(input_series(tg, 60.0))
        ev = Evaluator(Store(tmp_path / "s.db"), src, None, clock=lambda: 119 * 60.0)
        ev.load([group])
        [rt] = ev.all_runtimes()
        assert ev.refit(rt) == 2
        band = ev.learned.band(rt.key, {"replica": "b"})
        assert band is not None and band.upper < 0.4  # the shift is outside the band learned mostly before it
        ev.eval_rule(rt, 119 * 60.0)
    assert [(a.labels["replica"], a.state) for a in rt.machine.active.values()] == [("a", State.FIRING)]
