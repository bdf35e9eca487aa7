"""Conformance with promtool: every file gets the same verdict from `sentinel rules test` and `promtool test
rules`, and every rule file the same accept/reject from `sentinel rules check` and `promtool check rules`.

The corpus (tests/fixtures/conformance/) was written here after reading what promtool's own rule tests in the
Prometheus repository and the public monitoring mixins exercise: recording rules read by later rules and by
expression tests, `ALERTS`, `for` and `keep_firing_for`, `eval_time` between evaluations, stale markers and
`absent`, `group_eval_order`, one alert name in two groups, external labels and `.Labels` in templates, the
series notation (`a+bxn`, `a-bxn`, `_xn`, exponents, negative numbers). Each passing file also yields
variants with one expectation altered (a label, an annotation, an alert dropped or added, a sample's value
changed, dropped or added), which both tools must fail.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sentinel.rules.check import check_file
from sentinel.rules.unittest import run_promtool, run_test_file
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="prometheus/promtool are not installed (apt-get install prometheus)")]

CORPUS = ROOT / "tests" / "fixtures" / "conformance"
TESTS = sorted(CORPUS.glob("*_test.yaml"))


def variants(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Copies of a test file, each with one expectation altered."""
    for ti, tg in enumerate(doc["tests"]):
        for ai, at in enumerate(tg.get("alert_rule_test", [])):
            where = f"tests[{ti}].alert_rule_test[{ai}] ({at['alertname']} at {at['eval_time']})"
            alerts = at.get("exp_alerts") or []
            if not alerts:
                d = copy.deepcopy(doc)
                d["tests"][ti]["alert_rule_test"][ai]["exp_alerts"] = [{"exp_labels": {"unexpected": "yes"}}]
                yield f"{where}: an alert added", d
            for j, alert in enumerate(alerts):
                for part in ("exp_labels", "exp_annotations"):
                    if alert.get(part):
                        d = copy.deepcopy(doc)
                        target = d["tests"][ti]["alert_rule_test"][ai]["exp_alerts"][j][part]
                        key = sorted(target)[0]
                        target[key] = f"{target[key]}-altered"
                        yield f"{where}: alert {j} {part}.{key} altered", d
                d = copy.deepcopy(doc)
                del d["tests"][ti]["alert_rule_test"][ai]["exp_alerts"][j]
                yield f"{where}: alert {j} dropped", d
        for ei, et in enumerate(tg.get("promql_expr_test", [])):
            where = f"tests[{ti}].promql_expr_test[{ei}] ({et['expr']} at {et['eval_time']})"
            for j, _ in enumerate(et.get("exp_samples") or []):
                d = copy.deepcopy(doc)
                d["tests"][ti]["promql_expr_test"][ei]["exp_samples"][j]["value"] += 1
                yield f"{where}: sample {j} value + 1", d
                d = copy.deepcopy(doc)
                del d["tests"][ti]["promql_expr_test"][ei]["exp_samples"][j]
                yield f"{where}: sample {j} dropped", d
            d = copy.deepcopy(doc)
            d["tests"][ti]["promql_expr_test"][ei].setdefault("exp_samples", []).append(
                {"labels": '{unexpected="yes"}', "value": 1})
            yield f"{where}: a sample added", d


def cases() -> list[tuple[str, Path, str, dict[str, Any] | None]]:
    out: list[tuple[str, Path, str, dict[str, Any] | None]] = []
    for f in TESTS:
        out.append((f"{f.name}: as written", f, "pass", None))
        for what, d in variants(yaml.safe_load(f.read_text())):
            out.append((f"{f.name}: {what}", f, "fail", d))
    return out


CASES = cases()


@pytest.mark.parametrize(("what", "src", "verdict", "doc"), CASES, ids=[c[0] for c in CASES])
def test_same_verdict_as_promtool(tmp_path: Path, what: str, src: Path, verdict: str,
                                  doc: dict[str, Any] | None) -> None:
    for rf in yaml.safe_load(src.read_text())["rule_files"]:
        shutil.copy(CORPUS / rf, tmp_path / rf)
    f = tmp_path / src.name
    f.write_text(src.read_text() if doc is None else yaml.safe_dump(doc, sort_keys=False))
    ok, text = run_promtool(f)
    ours = run_test_file(f)
    assert ok == (verdict == "pass"), f"the corpus is wrong: promtool says {text}"
    assert ours.ok == ok, (what, ours.failures, text)


def test_corpus_size() -> None:
    """docs/rules.md quotes these counts; a shrinking corpus must be a decision, not an accident."""
    assert len(TESTS) >= 3 and len(CASES) >= 50, (len(TESTS), len(CASES))


# `rules check` against `promtool check rules`: (name, file, promtool accepts)
CHECK = [
    ("a valid alert", "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up == 0\n    for: 5m\n", True),
    ("a recording rule", "groups:\n- name: g\n  rules:\n  - record: job:up:sum\n    expr: sum by (job) (up)\n", True),
    ("for on a recording rule", "groups:\n- name: g\n  rules:\n  - record: a:b\n    expr: up\n    for: 1m\n", False),
    ("annotations on a recording rule",
     "groups:\n- name: g\n  rules:\n  - record: a:b\n    expr: up\n    annotations: {x: y}\n", False),
    ("keep_firing_for on a recording rule",
     "groups:\n- name: g\n  rules:\n  - record: a:b\n    expr: up\n    keep_firing_for: 1m\n", False),
    ("keep_firing_for on an alert",
     "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    keep_firing_for: 1m\n", True),
    ("PromQL that does not parse", "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: sum(up\n", False),
    ("an invalid recording name", "groups:\n- name: g\n  rules:\n  - record: 'a b'\n    expr: up\n", False),
    ("a repeated group name", "groups:\n- name: g\n  rules: []\n- name: g\n  rules: []\n", False),
    ("both alert and record", "groups:\n- name: g\n  rules:\n  - alert: A\n    record: a:b\n    expr: up\n", False),
    ("no expr", "groups:\n- name: g\n  rules:\n  - alert: A\n", False),
    ("an unknown rule field", "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    severity: x\n", False),
    ("an invalid label name", "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    labels: {a-b: x}\n",
     False),
    ("{{ .Labels }} in a template",
     "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    annotations: {s: '{{ .Labels }}'}\n", True),
    ("$value and humanize", "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n"
     "    annotations: {s: '{{ $value | humanize }} {{ $labels.job }}'}\n", True),
    ("an unclosed template action",
     "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    annotations: {s: '{{ $labels.job '}\n", False),
    ("an unknown template function",
     "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up\n    annotations: {s: '{{ nosuch 1 }}'}\n", False),
    ("a YAML syntax error", "groups:\n- name: g\n rules: []\n", False),
    ("an empty file", "", True),
    ("duplicate rules (a lint, not an error)",
     "groups:\n- name: g\n  rules:\n  - record: a:b\n    expr: up\n  - record: a:b\n    expr: up\n", True),
]


@pytest.mark.parametrize(("name", "text", "accepted"), CHECK, ids=[c[0] for c in CHECK])
def test_same_accept_reject_as_promtool_check(tmp_path: Path, name: str, text: str, accepted: bool) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    p = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, check=False)
    assert (p.returncode == 0) == accepted, f"the corpus is wrong: promtool says {p.stdout}{p.stderr}"
    errors, _, _ = check_file(f)
    assert (not errors) == accepted, (name, errors)
