"""The bus between rule evaluation and self-healing (sentinel.alerts.firinglog): the evaluator appends the
firing alerts of rules with a runbook or a remedy in the transaction that saves their state; healing
(sentinel.capabilities.healing) reads the log by its own cursor on a thread of its own, acts as the leader
only, and skips what a previous run left. The evaluator, the store and the reader are the real ones over a
state file on disk; the actuator is an in-test seam (the real one, the supervisor, is exercised end to end
by the drills in tests/integration)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sentinel.alerts.state import State
from sentinel.alerts.store import Store
from sentinel.capabilities.healing import SelfHealing
from sentinel.logstore.local import LocalLogStore
from sentinel.metrics import SentinelMetrics
from sentinel.rules.evaluator import AlertingRuntime, Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.sources import LogRuleSource
from sentinel.runbooks.base import Context
from sentinel.settings import Settings

CUDA = {"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}], "timeframe": "60s", "query_key": "replica"},
        "sentinel": {"remediation": "restart"}}
PLAIN = {"alert": "Noted", "log": {"filter": [{"exists": "cuda_error"}], "timeframe": "60s", "query_key": "replica"}}


class Actuator:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.done = threading.Event()

    def targets(self) -> set[str]:
        return {"r0", "r1"}

    def act(self, action: str, target: str) -> str:
        self.calls.append((action, target))
        return f"{action} {target}"

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        self.done.set()
        return True


def evaluator(tmp_path: Path, *rules: dict[str, Any]) -> tuple[Evaluator, LocalLogStore, list[float], LoadedGroup]:
    logs = LocalLogStore(tmp_path / "logs.db")
    now = [1_000.0]
    ev = Evaluator(Store(tmp_path / "s.db"), None, LogRuleSource(logs), clock=lambda: now[0])
    g = LoadedGroup(file="r.yaml", group=Group(name="g", rules=[Rule.model_validate(r) for r in rules]))
    ev.load([g])
    return ev, logs, now, g


def healing(tmp_path: Path, ev: Evaluator, leading: list[bool] | None = None,
            audits: list[tuple[Any, ...]] | None = None) -> tuple[SelfHealing, Actuator]:
    act = Actuator()
    audited = audits if audits is not None else []
    s = Settings(state_dir=tmp_path, remediation={"cooldown": "0s", "verify_timeout": "1s"})
    lead = leading if leading is not None else [True]
    h = SelfHealing(s, ev.store, act, SentinelMetrics(CollectorRegistry()), {}, lambda labels: Context(labels=labels),
                    lambda rt, a, findings: None, lambda rt, a, since: None,
                    lambda kind, subject, **detail: audited.append((kind, subject, detail)), ev, lambda: lead[0])
    return h, act


def test_a_healing_rules_firing_alerts_are_logged_at_every_live_evaluation_and_others_never(tmp_path: Path) -> None:
    ev, logs, now, g = evaluator(tmp_path, CUDA, PLAIN)
    cuda, plain = ev.all_runtimes()
    assert isinstance(cuda, AlertingRuntime) and cuda.heals and isinstance(plain, AlertingRuntime) and not plain.heals
    logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"}), (991.0, {"cuda_error": "Xid 79", "replica": "r1"})])
    ev.eval_group(g.key)
    now[0] = 1_015.0
    ev.eval_group(g.key)  # still firing: a level, logged again (the state itself is not rewritten)
    rows = ev.store.firing_after(0)
    assert [(r.rule, r.alert.labels["replica"], r.at) for r in rows] == [
        (cuda.key, "r0", 1_000.0), (cuda.key, "r1", 1_000.0), (cuda.key, "r0", 1_015.0), (cuda.key, "r1", 1_015.0)]
    assert {r.alert.state for r in rows} == {State.FIRING} and {r.alert.active_at for r in rows} == {1_000.0}
    assert [a.state for a in plain.alerts()] == [State.FIRING] * 2  # it fires, and heals nothing
    reopened = Store(tmp_path / "s.db")  # on disk with the state: a kill -9 loses neither
    assert [r.id for r in reopened.firing_after(0)] == [r.id for r in rows]
    assert len(reopened.load_rule_state(cuda.key)) == 2


def test_healing_reads_the_log_by_its_cursor_acts_once_per_alert_and_deletes_what_it_read(tmp_path: Path) -> None:
    ev, logs, now, g = evaluator(tmp_path, CUDA)
    logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"})])
    h, act = healing(tmp_path, ev)
    seen: list[tuple[str, list[str]]] = []
    act_on = h.on_firing
    h.on_firing = lambda rt, alerts: (seen.append((rt.rule.name, [a.labels["replica"] for a in alerts])),  # type: ignore[method-assign]
                                      act_on(rt, alerts))[-1]
    ev.eval_group(g.key)
    now[0] = 1_015.0
    ev.eval_group(g.key)
    assert h.drain() == 2
    assert seen == [("CudaError", ["r0"])]  # the reader fell behind one evaluation: the newest row is the level
    assert act.done.wait(10.0) and act.calls == [("restart", "r0")]
    assert ev.store.firing_after(0) == [] and ev.store.firing_cursor() == 2
    assert h.drain() == 0


def test_the_reader_thread_wakes_on_the_bell_and_a_follower_acts_on_nothing(tmp_path: Path) -> None:
    ev, logs, now, g = evaluator(tmp_path, CUDA)
    leading = [False]
    h, act = healing(tmp_path, ev, leading)
    h.start(clock=None)  # type: ignore[arg-type]  # healing adds no clock job: its reader is a thread
    try:
        logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"})])
        ev.eval_group(g.key)
        deadline = time.monotonic() + 5.0
        while ev.store.firing_after(0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ev.store.firing_after(0) == [] and act.calls == []  # consumed by the follower, not acted on
        leading[0] = True
        now[0] = 1_015.0
        t0 = time.monotonic()
        ev.eval_group(g.key)
        assert act.done.wait(10.0) and act.calls == [("restart", "r0")]
        assert time.monotonic() - t0 < 0.9  # woken by the write, not by the reader's 1 s safety poll
    finally:
        h.stop()


def test_rows_a_previous_run_left_are_skipped_at_start_and_a_removed_rules_rows_dropped(tmp_path: Path) -> None:
    ev, logs, now, g = evaluator(tmp_path, CUDA)
    logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"})])
    ev.eval_group(g.key)  # written by a run that was killed before healing read it
    audits: list[tuple[Any, ...]] = []
    h, act = healing(tmp_path, ev, audits=audits)
    h.start(clock=None)  # type: ignore[arg-type]
    try:
        assert ev.store.firing_after(0) == [] and ev.store.firing_cursor() == 1 and act.calls == []
        assert [(k, s, d["rows"]) for k, s, d in audits] == [("recovery", "firing-log", 1)]
    finally:
        h.stop()
    ev.store.log_firing("file.yaml/gone/Removed", [ev.all_runtimes()[0].alerts()[0]], now[0])  # type: ignore[attr-defined]
    assert h.drain() == 1 and act.calls == []  # its rule is not loaded: dropped


def test_a_batch_that_fails_to_act_is_logged_consumed_and_does_not_hold_the_others(tmp_path: Path,
                                                                                   caplog: pytest.LogCaptureFixture
                                                                                   ) -> None:
    ev, logs, now, g = evaluator(tmp_path, CUDA, {**CUDA, "alert": "CudaErrorToo"})
    logs.add([(990.0, {"cuda_error": "Xid 79", "replica": "r0"})])
    h, _ = healing(tmp_path, ev)
    acted: list[str] = []

    def on_firing(rt: AlertingRuntime, alerts: list[Any]) -> None:
        if rt.rule.name == "CudaError":
            raise RuntimeError("the remediator's store is gone")
        acted.append(rt.rule.name)

    h.on_firing = on_firing  # type: ignore[method-assign]
    ev.eval_group(g.key)
    assert h.drain() == 2
    assert acted == ["CudaErrorToo"] and ev.store.firing_after(0) == []
    assert "healing failed to act on CudaError" in caplog.text
