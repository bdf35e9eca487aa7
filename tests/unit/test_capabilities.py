"""Each capability sentinel up runs (sentinel/capabilities/), alone: what its start provides and schedules on the
Clock, what its jobs do, and a stop that is safe twice. Real parts throughout: the state database on disk,
the local log store over a replica's log file, a receiver on 127.0.0.1 for notifications, rule files in a
temporary directory. The clock is the daemon's own, not started: a test runs the jobs it registered by
hand, so no timing decides the outcome. Replicas, the router endpoint and Prometheus (processes) are
exercised through sentinel up in tests/integration (test_end_to_end, test_drills, test_lifecycle)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sentinel.alerts.event import AlertEvent
from sentinel.capabilities import Clock
from sentinel.capabilities.leadership import Leadership
from sentinel.capabilities.logs import LogShipping
from sentinel.capabilities.notifications import Notifications
from sentinel.capabilities.rules import RuleEvaluation, file_signature, load_checked
from sentinel.capabilities.state import State
from sentinel.metrics import SentinelMetrics
from sentinel.rules.filters import LogFilter
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec
from tests.httpserver import LoopbackServer

RULES = """groups:
- name: inference
  interval: 10s
  rules:
  - alert: CudaError
    log: {filter: [{exists: cuda_error}], timeframe: 60s, query_key: replica}
- name: slow
  interval: 30s
  rules:
  - alert: Down
    expr: up == 0
"""

CUDA = LogFilter(exists="cuda_error")


def settings(tmp_path: Path, **kw: Any) -> Settings:
    rules, books = tmp_path / "rules", tmp_path / "runbooks"
    rules.mkdir(exist_ok=True)
    books.mkdir(exist_ok=True)
    if not any(rules.iterdir()):
        (rules / "r.yaml").write_text(RULES)
    return Settings(state_dir=tmp_path / "state", rules_dir=rules, runbooks_dir=books, **kw)


def test_state_opens_the_database_schedules_pruning_and_stops_twice(tmp_path: Path) -> None:
    s, clock = settings(tmp_path), Clock(2)
    state = State(s, tmp_path / "state")
    state.audit("before", "start")  # nothing to write to yet: dropped, not raised
    with pytest.raises(AssertionError, match="before it started"):
        _ = state.store
    state.start(clock)
    assert clock.jobs("prune") == {"prune-state": 3600.0}
    state.audit("control", "remediation", paused=True)
    assert [(e["kind"], e["paused"]) for e in state.store.audit_log()] == [("control", True)]
    state.prune()
    state.stop()
    state.stop()
    reopened = State(s, tmp_path / "state")
    reopened.start(Clock(2))
    assert [e["kind"] for e in reopened.store.audit_log()] == ["control"]  # on disk
    reopened.stop()


def test_alone_this_sentinel_leads_and_has_no_lease_to_report(tmp_path: Path) -> None:
    lead = Leadership(settings(tmp_path), None, lambda *a, **k: None)
    lead.start(Clock(2))
    assert lead.leading and lead.status() is None
    lead.stop()


def test_log_shipping_ships_a_replicas_lines_to_the_local_store_and_follows_a_scale_out(tmp_path: Path) -> None:
    s, clock = settings(tmp_path), Clock(2)
    (tmp_path / "state").mkdir()
    specs = [ReplicaSpec("replica-0", 8100, tmp_path, tmp_path / "r0")]
    logs = LogShipping(s, tmp_path / "state", SentinelMetrics(CollectorRegistry()), specs)
    logs.start(clock)
    assert set(clock.jobs()) == {"prune", "ship"}
    now = time.time()
    for i, spec in enumerate([*specs, ReplicaSpec("replica-1", 8101, tmp_path, tmp_path / "r1")]):
        spec.log_dir.mkdir()
        (spec.log_dir / "inference.log").write_text(json.dumps(
            {"ts": now - 5 + i, "level": "ERROR", "cuda_error": "Xid 79", "msg": "step failed"}) + "\n")
    logs.ship()
    local = logs.local
    assert local is not None

    def counted() -> dict[str, int]:
        return {labels["replica"]: n for labels, n in local.count([CUDA], now - 60, now + 1, ["replica"])}

    assert counted() == {"replica-0": 1}  # only what runs is shipped
    logs.add([specs[0], ReplicaSpec("replica-1", 8101, tmp_path, tmp_path / "r1")])  # after a scale-out
    logs.ship()
    assert counted() == {"replica-0": 1, "replica-1": 1}
    assert logs.rule_source() is not None and logs.visible_until() <= time.time()
    logs.stop()
    logs.stop()


def test_rule_evaluation_schedules_each_group_at_its_interval_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    s, clock = settings(tmp_path), Clock(2)
    state = State(s, tmp_path / "state")
    state.start(clock)
    (tmp_path / "state").mkdir(exist_ok=True)
    logs = LogShipping(s, tmp_path / "state", SentinelMetrics(CollectorRegistry()), [], ship=False)
    logs.start(clock)
    groups, books = load_checked(s)
    seen_books: list[int] = []
    audits: list[tuple[str, str, dict[str, Any]]] = []
    metrics = SentinelMetrics(CollectorRegistry())
    rules = RuleEvaluation(s, state.store, "http://127.0.0.1:9", logs.rule_source(), metrics, "http://127.0.0.1:9095",
                           lambda k, sub, **d: audits.append((k, sub, d)), groups, lambda b: seen_books.append(len(b)))
    rules.start(clock)
    assert sorted(clock.jobs("eval:").values()) == [10.0, 30.0]
    assert "reload" in clock.jobs()
    (tmp_path / "rules" / "r.yaml").write_text(RULES.replace("interval: 30s", "interval: oops"))
    problems = rules.reload()
    assert problems and "r.yaml" in problems[0]
    assert sorted(clock.jobs("eval:").values()) == [10.0, 30.0]  # the last good set keeps running
    assert audits[-1][0] == "reload" and audits[-1][2]["ok"] is False
    (tmp_path / "rules" / "r.yaml").write_text(RULES.replace("interval: 30s", "interval: 20s"))
    assert file_signature(s) != rules._signature
    rules.maybe_reload()
    assert sorted(clock.jobs("eval:").values()) == [10.0, 20.0] and seen_books == [0]
    rules.stop()
    logs.stop()
    state.stop()


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = LoopbackServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()


def test_notifications_deliver_as_the_leader_and_hold_as_a_follower(tmp_path: Path,
                                                                    receiver: tuple[str, list[Any]]) -> None:
    url, got = receiver
    s, clock = settings(tmp_path, alerting={"receivers": [{"name": "oncall", "url": url}]}), Clock(2)
    state = State(s, tmp_path / "state")
    state.start(clock)
    leading = [False]
    notes = Notifications(s, state.store, SentinelMetrics(CollectorRegistry()), "http://127.0.0.1:9095",
                          lambda: leading[0])
    notes.start(clock)
    assert clock.jobs("notify") == {"notify": 1.0}
    assert [sv.name for sv in notes.services()] == ["receiver:oncall"]
    event = AlertEvent({"alertname": "CudaError", "replica": "replica-0"}, {"summary": "Xid 79"}, time.time(),
                       flush=True)  # flushed at once (as a replayed evaluation is), not after group_wait
    state.store.log_alerts([event], time.time())
    notes.tick()
    assert got == [] and len(state.store.alert_log_after(0)) == 1  # a follower leaves it to the leader
    leading[0] = True
    deadline = time.monotonic() + 10.0
    while not got and time.monotonic() < deadline:
        notes.tick()
        time.sleep(0.05)
    assert [a["labels"]["alertname"] for a in got[0]["alerts"]] == ["CudaError"] and got[0]["receiver"] == "oncall"
    notes.stop()
    notes.stop()
    state.stop()
