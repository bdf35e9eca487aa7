"""Rule files: the default pack loads; bad files fail with file:line: field: problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.errors import RuleFileError
from sentinel.rules.model import load_rule_file, load_rules
from tests.conftest import ROOT


def test_default_pack_loads() -> None:
    groups = load_rules(ROOT / "rules")
    names = {r.name for g in groups for r in g.group.rules}
    assert {"InferenceLatencyP99High", "CudaError"} <= names
    cuda = next(r for g in groups for r in g.group.rules if r.name == "CudaError")
    assert cuda.kind == "log" and cuda.sentinel.remediation == "restart"
    assert cuda.log is not None and cuda.log.query_key == ["replica"]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "expected"), [
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        for: 5 minutes\n",
     "r.yaml:6: groups.0.rules.0.for: Value error, not a duration: '5 minutes'"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        lables: {}\n",
     "r.yaml:6: groups.0.rules.0.lables: Extra inputs are not permitted"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n",
     "r.yaml:4: groups.0.rules.0: Value error, a rule needs exactly one of: expr (PromQL), log (log query)"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        log:\n          filter:\n"
     "            - exists: 'a b'\n",
     "r.yaml:7: groups.0.rules.0.log.filter.0: Value error, invalid field name 'a b'"),
    # one class per log rule type (a discriminated union on type): the path names no union member
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        log:\n          type: frequency\n"
     "          num_events: 0\n",
     "r.yaml:7: groups.0.rules.0.log.num_events: Input should be greater than or equal to 1"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        log:\n          type: frequence\n",
     "r.yaml:5: groups.0.rules.0.log: type: not a log rule type; one of: any, frequency, flatline"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        log:\n          threshold: 3\n",
     "r.yaml:5: groups.0.rules.0.log: Value error, threshold: only for type flatline"),
    ("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        labels:\n          bad-name: x\n",
     "r.yaml:6: groups.0.rules.0.labels: Value error, invalid label name 'bad-name'"),
    ("groups:\n  - name: g\n   rules: []\n", "r.yaml:3: YAML syntax error"),
    ("groups:\n  - name: g\n  - name: g\n", "r.yaml:3: groups.1.name: duplicate group name 'g' (first at line 2)"),
    # recording rules take no annotations, for or keep_firing_for (promtool's rulefmt)
    ("groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: up\n        for: 1m\n",
     "r.yaml:4: groups.0.rules.0: Value error, invalid field 'for' in recording rule"),
    ("groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: up\n        annotations: {x: y}\n",
     "invalid field 'annotations' in recording rule"),
    ("groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: up\n        keep_firing_for: 1m\n",
     "invalid field 'keep_firing_for' in recording rule"),
])
def test_bad_rule_files_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(RuleFileError) as info:
        load_rule_file(write(tmp_path, text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_rules_check_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["rules", "check", str(ROOT / "rules" / "inference.yaml")])
    assert ok.exit_code == 0 and "SUCCESS: 5 rules found" in ok.output
    bad = runner.invoke(app, ["rules", "check", str(write(tmp_path, "groups:\n  - name: g\n    rules:\n      - {}\n"))])
    assert bad.exit_code == 1
    assert "r.yaml:4: groups.0.rules.0:" in bad.output


def test_log_filters_are_validated() -> None:
    from pydantic import ValidationError

    from sentinel.rules.filters import LogFilter

    assert LogFilter(range={"inference_time": {"gt": 500}}).range is not None
    assert LogFilter(terms={"finish_reason": ["stop", "length"]}).terms is not None
    assert LogFilter(wildcard={"message": "*CUDA*"}).wildcard is not None
    for bad, msg in [({"term": {"a": 1}, "exists": "b"}, "exactly one of"), ({"range": {"x": {}}}, "at least one of"),
                     ({"terms": {"x": []}}, "at least one value"), ({"wildcard": {"m": "[ab]*"}}, "not allowed"),
                     ({"term": {"bad field": 1}}, "invalid field name"),
                     ({"range": {"x": {"gt": 1, "gtx": 2}}}, "gtx")]:
        with pytest.raises(ValidationError, match=msg):
            LogFilter(**bad)


def test_metric_aggregation_rules_are_validated() -> None:
    from pydantic import ValidationError

    from sentinel.rules.logtypes import log_query

    ok = log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                  percentile_range=99, max_threshold=500, query_key="replica")
    assert ok.query_key == ["replica"]
    for bad, msg in [({"type": "metric_aggregation", "metric_agg_type": "avg", "max_threshold": 1}, "metric_agg_key"),
                     ({"type": "metric_aggregation", "metric_agg_key": "x", "max_threshold": 1}, "metric_agg_type"),
                     ({"type": "metric_aggregation", "metric_agg_key": "x", "metric_agg_type": "percentiles",
                       "max_threshold": 1}, "percentile_range"),
                     ({"type": "metric_aggregation", "metric_agg_key": "x", "metric_agg_type": "max"}, "threshold"),
                     ({"type": "any", "max_threshold": 5}, "only for type metric_aggregation"),
                     ({"type": "metric_aggregation", "metric_agg_key": "x", "metric_agg_type": "median",
                       "max_threshold": 1}, "metric_agg_type")]:
        with pytest.raises(ValidationError, match=msg):
            log_query(**bad)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9))


@pytest.mark.parametrize(("content", "expected"), [
    (BOMB.encode(), "r.yaml:7: YAML aliases expand to more than 2,000,000 nodes here"),
    (b"groups:\n  - name: g\n    rules: \xff\xfe\n", "r.yaml:3: not UTF-8 text (byte 0xff"),
    (b"\x7fELF\x02\x01\x01\x00\x00", "r.yaml:1: control character U+007F"),
    (b"groups:\n  - name: g\x00\n", "r.yaml:2: control character U+0000"),
    (b"#" * (33 * 1024 * 1024), "r.yaml: larger than 32 MiB"),
])
def test_hostile_files_are_refused_quickly_with_the_line(tmp_path: Path, content: bytes, expected: str) -> None:
    import time

    p = tmp_path / "r.yaml"
    p.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(RuleFileError) as info:
        load_rule_file(p)
    assert time.perf_counter() - t0 < 1.0  # a billion laughs is refused, not expanded (promtool: 0.04 s)
    assert any(expected in p for p in info.value.problems), info.value.problems
