"""The rules as they run (sentinel.rules.runtime): one class per kind behind one evaluate(now, ctx), and a
group that evaluates its rules with one timestamp. The context is the real Evaluator over the local log
store; PromQL rules have no Prometheus here, which is itself a case (a failed query changes no state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sentinel.alerts.state import State
from sentinel.alerts.store import Store
from sentinel.errors import DatasourceError
from sentinel.logstore.local import LocalLogStore
from sentinel.rules.evaluator import Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.runtime import AlertingRuntime, LogRule, PromQLRule, RecordingRule, RuleGroup, runtime_for
from sentinel.rules.sources import LogRuleSource

CUDA = {"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}], "timeframe": "60s", "query_key": "replica"}}


def group(*rules: dict[str, Any], name: str = "g") -> LoadedGroup:
    return LoadedGroup(file="r.yaml", group=Group(name=name, rules=[Rule.model_validate(r) for r in rules]))


def setup(tmp_path: Path, *rules: dict[str, Any]) -> tuple[Evaluator, LocalLogStore, list[float], LoadedGroup]:
    logs = LocalLogStore(tmp_path / "logs.db")
    now = [1_000.0]
    ev = Evaluator(Store(tmp_path / "s.db"), None, LogRuleSource(logs), clock=lambda: now[0])
    g = group(*rules)
    ev.load([g])
    return ev, logs, now, g


def test_each_kind_of_rule_is_its_own_class() -> None:
    g = group(CUDA, {"alert": "Down", "expr": "up == 0"}, {"record": "job:up:sum", "expr": "sum(up)"})
    kinds = [type(runtime_for(g, r)) for r in g.group.rules]
    assert kinds == [LogRule, PromQLRule, RecordingRule]
    assert [runtime_for(g, r).datasource for r in g.group.rules] == ["logs", "prometheus", "prometheus"]


def test_a_group_evaluates_every_rule_at_one_time_and_a_failure_is_that_rules_alone(tmp_path: Path) -> None:
    healed = {**CUDA, "sentinel": {"remediation": "restart"}}
    ev, logs, now, g = setup(tmp_path, {"alert": "Down", "expr": "up == 0"}, healed,
                             {"record": "job:up:sum", "expr": "sum(up)"})
    logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"})])
    ev.eval_group(g.key)
    promql, log_rule, recording = ev.all_runtimes()
    assert (promql.health, recording.health, log_rule.health) == ("err", "err", "ok")
    assert "no Prometheus is configured" in (promql.last_error or "")
    assert {rt.last_eval for rt in ev.all_runtimes()} == {1_000.0}
    fired = [(row.rule, row.alert.labels["replica"]) for row in ev.store.firing_after(0)]
    assert fired == [(log_rule.key, "r0")]  # handed to healing through the firing log
    assert recording.alerts() == [] and [a.state for a in log_rule.alerts()] == [State.FIRING]


def test_internal_alerts_take_their_samples_from_their_owner(tmp_path: Path) -> None:
    ev, _, _, _ = setup(tmp_path, CUDA)
    rt = next(iter(ev.internal.values()))
    assert type(rt) is AlertingRuntime
    with pytest.raises(DatasourceError, match="its owner hands over its samples"):
        rt.query(0.0, ev)


def test_a_log_rule_holds_its_notifications_for_the_aggregation_period(tmp_path: Path) -> None:
    rule = {**CUDA, "log": {**CUDA["log"], "aggregation": "120s"}}  # type: ignore[dict-item]
    ev, logs, now, g = setup(tmp_path, rule)
    [rt] = ev.all_runtimes()
    assert isinstance(rt, LogRule) and rt.hold_s == 120.0
    logs.add([(995.0, {"cuda_error": "x", "replica": "r0"}), (1_055.0, {"cuda_error": "x", "replica": "r1"})])
    ev.eval_group(g.key)
    assert rt.held is not None and rt.held["since"] == 1_000.0 and len(rt.held["fingerprints"]) == 1
    assert ev.store.get(f"held:{rt.key}") == rt.held  # saved with the state: a restart neither loses nor repeats
    for t in range(1_015, 1_120, 15):  # the group's interval (15 s)
        now[0] = float(t)
        ev.eval_group(g.key)
    assert rt.held is not None and len(rt.held["fingerprints"]) == 2 and ev.store.alert_log_after(0) == []
    now[0] = 1_120.0  # the period is over: both go out together
    ev.eval_group(g.key)
    assert rt.held is None and ev.store.get(f"held:{rt.key}") is None
    assert sorted(e.labels["replica"] for _, _, e in ev.store.alert_log_after(0)) == ["r0", "r1"]
    restarted = Evaluator(ev.store, None, ev.logs)
    restarted.load([g])
    [again] = restarted.all_runtimes()
    assert isinstance(again, LogRule) and again.last_ok == 1_120.0 and again.held is None


def test_a_removed_recording_rule_is_forgotten_without_alerts(tmp_path: Path) -> None:
    ev, _, _, g = setup(tmp_path, {"record": "job:up:sum", "expr": "sum(up)"}, CUDA)
    ev.load([group(CUDA)])
    assert [rt.rule.name for rt in ev.all_runtimes()] == ["CudaError"]
    assert isinstance(ev.groups[group(CUDA).key], RuleGroup)
