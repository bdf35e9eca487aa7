"""The SQLite store survives reopening; the dispatcher delivers v4 payloads to a real HTTP server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.notification import Notification, group_payload
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.state import AlertingRule, Sample, ends_at
from sentinel.alerts.store import Store
from tests.conftest import Receiver


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def webhook(receiver: str, rule: AlertingRule, due: list, now: float) -> dict:  # type: ignore[type-arg]
    events = [AlertEvent(a.labels, a.annotations, a.fired_at or a.active_at, ends_at(a), "http://gen", a.fingerprint)
              for a in due]
    return Notification("webhook", tuple(events), now, '{}:{alertname="CudaError"}', {"alertname": "CudaError"}
                        ).to_json()


def firing_payload(receiver: str, url: str, now: float) -> tuple[str, str, str, dict]:  # type: ignore[type-arg]
    rule = AlertingRule("CudaError", labels={"severity": "page"}, annotations={"summary": "boom"})
    rule.eval(now, [Sample({"replica": "replica-0"}, 1)])
    payload = webhook(receiver, rule, rule.to_send(now, 60, 5), now)
    return f"k-{receiver}-{now}", receiver, url, payload


def test_state_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    rule = AlertingRule("X", for_s=30, keep_firing_for_s=60)
    rule.eval(100, [Sample({"a": "1"}, 2.5)])
    rule.eval(130, [Sample({"a": "1"}, 2.5)])
    rule.eval(140, [])  # firing, kept by keep_firing_for
    store.save_rule_state("f;g;X", list(rule.active.values()), [], 140)
    store.close()
    again = Store(tmp_path / "s.db").load_rule_state("f;g;X")
    assert again == list(rule.active.values())
    assert again[0].keep_firing_since == 140 and again[0].fired_at == 130


def test_audit_log_is_append_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.audit(1.0, "decision", "incident", act=True)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.tx().__enter__().execute("DELETE FROM audit")
    assert store.audit_log()[0]["act"] is True


def test_retention_prunes_what_is_old_and_nothing_that_is_live(tmp_path: Path) -> None:
    """Delivered and failed notifications, findings, finished remediations, resolved alerts and audit rows
    older than their retention go; pending notifications, firing alerts and recent rows stay. The audit
    trigger still refuses to delete anything younger than the audit retention."""
    from sentinel.alerts.state import Alert, State
    from sentinel.state.remediation import Remediation

    day = 86400.0
    now = 100 * day
    store = Store(tmp_path / "s.db")
    firing = Alert({"alertname": "A"}, {}, 1.0, State.FIRING, 1.0, fired_at=1.0)
    resolved = Alert({"alertname": "B"}, {}, 1.0, State.INACTIVE, 1.0, resolved_at=2.0)
    store.save_rule_state("r", [firing, resolved], [], now=10.0)
    store.enqueue([("k-old-sent", "oncall", "u", {}), ("k-old-pending", "oncall", "u", {})], now=10.0)
    store.enqueue([("k-new", "oncall", "u", {})], now=now - day)
    for item in store.due(now):
        if item.key in ("k-old-sent", "k-new"):
            store.mark_sent(item.id, now)
    assert store.claim_findings("r", firing.fingerprint, 1.0, 3.0)
    store.save_findings("r", firing.fingerprint, 1.0, "ok", {"x": 1})
    store.start_remediation(Remediation("i1", "f", "r", "restart", "r0", 5.0, 6.0, "succeeded"))
    store.start_remediation(Remediation("i2", "f", "r", "restart", "r0", 7.0, None, None))  # still running
    store.audit(50.0, "decision", "old")
    store.audit(now - day, "decision", "recent")
    n = store.prune(now, retention_s=7 * day, audit_retention_s=90 * day)
    assert n == {"notifications": 1, "findings": 1, "remediations": 1, "alerts": 1, "audit": 1}, n
    assert {a.labels["alertname"] for a in store.load_rule_state("r")} == {"A"}
    assert sorted(store.outbox_counts().items()) == [("pending", 1), ("sent", 1)]
    assert [r.incident for r in store.remediations()] == ["i2"]
    assert [e["subject"] for e in store.audit_log()] == ["recent"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        with store.tx() as db:
            db.execute("DELETE FROM audit")


def test_webhook_payload_is_alertmanager_v4() -> None:
    _, _, _, queued = firing_payload("oncall", "", 1_000_000.0)
    p = Notification.from_json(queued).render("oncall", "http://sentinel")  # the outbox renders at send time
    assert p["externalURL"] == "http://sentinel" and p["truncatedAlerts"] == 0
    assert p["version"] == "4" and p["status"] == "firing" and p["receiver"] == "oncall"
    assert p["groupKey"] == '{}:{alertname="CudaError"}'
    assert p["commonLabels"] == {"alertname": "CudaError", "replica": "replica-0", "severity": "page"}
    [a] = p["alerts"]
    # a firing alert's endsAt is the zero time, as Alertmanager sends it: no receiver takes it as over
    assert a["startsAt"] == "1970-01-12T13:46:40.000Z" and a["endsAt"] == "0001-01-01T00:00:00Z"
    assert len(a["fingerprint"]) == 16 and a["generatorURL"] == "http://gen"


def test_dispatcher_retries_5xx_and_keeps_the_idempotency_key(tmp_path: Path, receiver: Receiver) -> None:
    clock = Clock()
    store = Store(tmp_path / "s.db")
    entry = firing_payload("oncall", receiver.url, clock.t)
    store.enqueue([entry], clock.t)
    store.enqueue([entry], clock.t)  # the same key twice is one notification
    receiver.status_codes = [503, 500]
    with httpx.Client() as client:
        d = Dispatcher(store, client, clock)
        assert d.run_once() == 0
        assert d.run_once() == 0  # backoff: not due yet
        clock.t += 1.5
        assert d.run_once() == 0  # second 5xx
        clock.t += 2.5
        assert d.run_once() == 1
    assert len(receiver.received) == 3
    assert len({h["Idempotency-Key"] for h in receiver.headers}) == 1
    assert store.outbox_counts() == {"sent": 1}


def test_dispatcher_does_not_retry_4xx(tmp_path: Path, receiver: Receiver) -> None:
    store = Store(tmp_path / "s.db")
    clock = Clock()
    store.enqueue([firing_payload("oncall", receiver.url, clock.t)], clock.t)
    receiver.status_codes = [400]
    with httpx.Client() as client:
        d = Dispatcher(store, client, clock)
        d.run_once()
        clock.t += 1000
        d.run_once()
    assert len(receiver.received) == 1 and store.outbox_counts() == {"failed": 1}


KILLED_DISPATCHER = """
import os, signal, sys
from pathlib import Path
import httpx
sys.path.insert(0, sys.argv[2])
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.store import Store
from tests.unit.test_store_notify import Clock, firing_payload
clock = Clock()
store = Store(Path(sys.argv[1]))
store.enqueue([firing_payload("oncall", sys.argv[3], clock.t)], clock.t)
Dispatcher(store, httpx.Client(), clock).run_once()   # 503: retry scheduled
os.kill(os.getpid(), signal.SIGKILL)                    # no close, no flush: as a crash
"""


def test_dispatcher_retries_network_errors_and_survives_kill_9(tmp_path: Path, receiver: Receiver) -> None:
    """A process queues a page, fails to deliver it (the receiver answers 503) and is killed with SIGKILL; a
    new process finds the page pending with its attempt counted, and delivers it, with the same
    Idempotency-Key, once the receiver answers."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    receiver.status_codes = [503]
    p = subprocess.run([sys.executable, "-c", KILLED_DISPATCHER, str(tmp_path / "s.db"), str(ROOT), receiver.url],
                       capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    clock = Clock()
    store = Store(tmp_path / "s.db")
    assert store.outbox_counts() == {"pending": 1}
    [item] = store.due(clock.t + 10)
    assert item.attempts == 1
    clock.t += 10
    with httpx.Client() as client:
        assert Dispatcher(store, client, clock).run_once() == 1
    assert store.outbox_counts() == {"sent": 1}
    first, second = receiver.headers
    assert first["Idempotency-Key"] == second["Idempotency-Key"] == item.key
    assert receiver.snapshot()[1]["alerts"][0]["labels"]["alertname"] == "CudaError"


def _payload(receiver: str, url: str, now: float, status: str, replicas: list[str]) -> tuple[str, str, str, dict]:  # type: ignore[type-arg]
    """A webhook notification of CudaError alerts for ``replicas``, firing or resolved at ``now``."""
    rule = AlertingRule("CudaError", labels={"severity": "page"})
    rule.eval(now - 10, [Sample({"replica": r}, 1) for r in replicas])
    if status == "resolved":
        rule.eval(now, [])
    due = [a for a in rule.to_send(now, 60, 5) if (a.state.value == "inactive") == (status == "resolved")]
    payload = webhook(receiver, rule, due, now)
    return f"k-{receiver}-{now}-{status}-{replicas}", receiver, url, payload


def test_a_slow_receiver_delays_only_itself(tmp_path: Path, receiver: Receiver) -> None:
    """One receiver answers after 3 s per request; the other gets all its pages at once, and the slow one
    still gets all of its own, in order."""
    import threading
    import time as _time
    from http.server import BaseHTTPRequestHandler

    from tests.httpserver import LoopbackServer

    got: list[str] = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            _time.sleep(3)
            got.append(json.loads(body)["alerts"][0]["labels"]["replica"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    slow = LoopbackServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    slow_url = f"http://127.0.0.1:{slow.server_address[1]}/hook"
    store = Store(tmp_path / "s.db")
    now = _time.time()
    for i in range(3):
        store.enqueue([_payload("slow", slow_url, now, "firing", [f"s{i}"]),
                       _payload("fast", receiver.url, now, "firing", [f"f{i}"])], now)
    with httpx.Client(timeout=30) as client:
        d = Dispatcher(store, client)
        t0 = _time.monotonic()
        d.run_once(wait=False)
        while len(receiver.snapshot()) < 3 and _time.monotonic() - t0 < 10:
            _time.sleep(0.05)
        fast_s = _time.monotonic() - t0
        assert [p["alerts"][0]["labels"]["replica"] for p in receiver.snapshot()] == ["f0", "f1", "f2"]
        assert fast_s < 2.0, fast_s  # serially, behind the slow receiver, this took 9 s and more
        d.run_once(wait=False)  # a new round while the slow one is still busy: nothing sent twice
        while len(got) < 3 and _time.monotonic() - t0 < 20:
            _time.sleep(0.1)
    assert got == ["s0", "s1", "s2"]
    assert store.outbox_counts() == {"sent": 6}
    slow.shutdown()


def test_after_an_outage_only_the_newest_state_is_sent_in_order(tmp_path: Path, receiver: Receiver) -> None:
    """A firing page fails (503) and backs off; its resolution is queued behind it. The queue waits for its
    head (the resolution never overtakes the firing), and when the receiver is back the firing is dropped
    as superseded: one notification, resolved. An alert of the same payload that did not resolve stays."""
    clock = Clock()
    store = Store(tmp_path / "s.db")
    receiver.status_codes = [503]
    store.enqueue([_payload("oncall", receiver.url, clock.t, "firing", ["a", "b"])], clock.t)
    with httpx.Client() as client:
        d = Dispatcher(store, client, clock)
        assert d.run_once() == 0  # 503: backing off
        clock.t += 0.5
        store.enqueue([_payload("oncall", receiver.url, clock.t, "resolved", ["a"])], clock.t)
        assert d.run_once() == 0  # the head is still backing off: nothing overtakes it
        assert len(receiver.snapshot()) == 1
        clock.t += 5
        assert d.run_once() == 2
    first, second, third = receiver.snapshot()
    assert [(a["labels"]["replica"], a["status"]) for a in second["alerts"]] == [("b", "firing")]
    assert [(a["labels"]["replica"], a["status"]) for a in third["alerts"]] == [("a", "resolved")]
    assert second["commonLabels"]["replica"] == "b" and second["status"] == "firing"
    assert store.outbox_counts() == {"sent": 2}


def test_signed_requests_verify_with_the_documented_verifier(tmp_path: Path, receiver: Receiver) -> None:
    """The verifier in docs/operators-guide.md, run as written, accepts what the dispatcher sends and refuses a
    changed body, another key and a stale timestamp."""
    import re
    import time as _time

    from tests.conftest import ROOT

    block = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```",
                      (ROOT / "docs" / "operators-guide.md").read_text(), re.S)
    assert block is not None, "the verifier block is gone from the operator's guide"
    scope: dict[str, object] = {}
    exec(block.group(1), scope)  # noqa: S102 - our own docs, run as written
    verify = scope["verify"]
    store = Store(tmp_path / "s.db")
    now = _time.time()
    store.enqueue([_payload("oncall", receiver.url, now, "firing", ["a"])], now)
    with httpx.Client() as client:
        assert Dispatcher(store, client, signing={"oncall": ("k2026", b"receiver-secret-0123456789")}).run_once() == 1
    headers, body = receiver.headers[0], receiver.bodies[0]
    keys = {"k2026": b"receiver-secret-0123456789"}
    assert verify(headers, body, keys)  # type: ignore[operator]
    assert not verify(headers, body.replace(b'"firing"', b'"resolved"'), keys)  # type: ignore[operator]
    assert not verify(headers, body, {"k2026": b"another-secret-0123456789"})  # type: ignore[operator]
    stale = {**headers, "X-Sentinel-Timestamp": str(int(now) - 3600)}
    assert not verify(stale, body, keys)  # type: ignore[operator]


def test_sentinel_alerts_cli(tmp_path: Path) -> None:
    """`sentinel alerts` reads the state database: alerts with state and age, receivers with their queues."""
    from typer.testing import CliRunner

    from sentinel.alerts.state import Alert, State
    from sentinel.cli import app

    store = Store(tmp_path / "state" / "sentinel.db")
    now = 1_000_000.0
    firing = Alert({"alertname": "CudaError", "replica": "replica-0"}, {}, 1.0, State.FIRING, now - 120,
                   fired_at=now - 120, last_sent_at=now - 60)
    store.save_rule_state("f;g;CudaError", [firing], [], now)
    store.enqueue([firing_payload("oncall", "http://127.0.0.1:9/", now)], now)
    store.mark_retry(store.due(now)[0].id, now + 10, "HTTP 503: busy")
    store.close()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    r = CliRunner().invoke(app, ["alerts", "-c", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    [a] = doc["alerts"]
    assert a["rule"] == "CudaError" and a["labels"]["replica"] == "replica-0" and a["state"] == "firing"
    assert doc["receivers"]["oncall"]["counts"] == {"pending": 1}
    assert doc["receivers"]["oncall"]["last_error"] == "HTTP 503: busy"
    table = CliRunner().invoke(app, ["alerts", "-c", str(cfg)])
    assert table.exit_code == 0 and "CudaError" in table.output and "oncall" in table.output
    missing = CliRunner().invoke(app, ["alerts", "-c", str(tmp_path / "nothing.yaml")])
    assert missing.exit_code != 0


def test_an_undeliverable_notification_expires_and_the_other_receivers_hear_of_it(tmp_path: Path,
                                                                                  receiver: Receiver) -> None:
    """A page to a dead receiver is retried until it is older than the maximum age, then expires (never
    silently dropped): SentinelNotificationUndeliverable{receiver="dead"} fires and goes to the live one."""
    from sentinel.alerts.delivery import Delivery, ReceiverOptions
    from sentinel.alerts.routing import RouteConfig, build
    from sentinel.rules.evaluator import UNDELIVERABLE_ALERT, Evaluator

    clock = Clock()
    store = Store(tmp_path / "s.db")
    store.enqueue([firing_payload("dead", "http://127.0.0.1:9/hook", clock.t)], clock.t)
    ev = Evaluator(store, None, None, clock=clock)
    delivery = Delivery(store, build(RouteConfig(receiver="oncall", group_wait=0)), {"oncall": ReceiverOptions()},
                        clock=clock)
    with httpx.Client() as client:
        d = Dispatcher(store, client, clock, give_up_after_s=60, urls={"oncall": receiver.url})
        d.run_once()  # refused: retry in 1 s
        clock.t += 61
        d.run_once()  # past its maximum age: expired
        assert store.outbox_counts() == {"expired": 1}
        ev.eval_meta(clock.t)
        [alert] = ev.internal[UNDELIVERABLE_ALERT].machine.firing()
        assert alert.labels == {"alertname": "SentinelNotificationUndeliverable", "receiver": "dead",
                                "severity": "page"}
        assert delivery.tick() == 1
        assert d.run_once() == 1
    [page] = receiver.snapshot()
    assert page["alerts"][0]["labels"]["receiver"] == "dead" and "could not be delivered" in \
        page["alerts"][0]["annotations"]["summary"]
    clock.t += 3700
    ev.eval_meta(clock.t)  # an hour without losses: resolved
    assert ev.internal[UNDELIVERABLE_ALERT].machine.firing() == []


def test_backlog_metrics_read_the_queue_and_the_shipper(tmp_path: Path) -> None:
    """sentinel_notification_queue_* from the outbox; sentinel_log_shipping_{lag_seconds,backlog_bytes} from a
    real shipper over the local store, including while the store refuses."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sentinel.logstore.local import LocalLogStore
    from sentinel.logstore.shipper import LogSource, Shipper
    from sentinel.metrics import BacklogCollector

    store = Store(tmp_path / "s.db")
    store.enqueue([("k1", "oncall", "u", {}), ("k2", "oncall", "u", {}), ("k3", "chat", "u", {})], now=100.0)
    store.mark_sent(3, 101.0)
    log = tmp_path / "r0.log"
    log.write_text('{"message": "a"}\n{"message": "b"}\n')
    local = LocalLogStore(tmp_path / "logs.db")
    shipper = Shipper(local, [LogSource("replica-0", log)], clock=lambda: 200.0)
    now = [250.0]
    reg = CollectorRegistry()
    reg.register(BacklogCollector(store, lambda: shipper, clock=lambda: now[0]))

    def values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}

    v = values()
    assert v[("sentinel_notification_queue_length", (("receiver", "oncall"),))] == 2
    assert ("sentinel_notification_queue_length", (("receiver", "chat"),)) not in v  # delivered
    assert v[("sentinel_notification_queue_oldest_seconds", (("receiver", "oncall"),))] == 150.0
    assert not any(name == "sentinel_log_shipping_lag_seconds" for name, _ in v)  # never shipped yet
    shipper.run_once()
    v = values()
    assert v[("sentinel_log_shipping_lag_seconds", ())] == 50.0
    assert v[("sentinel_log_shipping_backlog_bytes", (("source", "replica-0"),))] == 0
    with log.open("a") as fh:
        fh.write('{"message": "c"}\n')

    def refuse(*a: object, **k: object) -> None:
        raise ConnectionError("store down")

    local.add = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        shipper.run_once()
    now[0] = 400.0
    v = values()
    assert v[("sentinel_log_shipping_backlog_bytes", (("source", "replica-0"),))] == len('{"message": "c"}\n')
    assert v[("sentinel_log_shipping_lag_seconds", ())] == 200.0  # grows while the store is down


def test_a_body_queued_before_notifications_were_typed_is_still_delivered(tmp_path: Path, receiver: Receiver) -> None:
    """A state file from before the outbox kept typed alerts holds rendered webhook bodies: they are read back
    into notifications and sent with the same alerts, status and times."""
    now = 1_000_000.0
    rule = AlertingRule("CudaError", labels={"severity": "page"})
    rule.eval(now - 10, [Sample({"replica": r}, 1) for r in ("a", "b")])
    rule.eval(now, [Sample({"replica": "a"}, 1)])
    events = [AlertEvent(a.labels, a.annotations, a.fired_at or a.active_at, ends_at(a), "http://gen", a.fingerprint)
              for a in rule.to_send(now, 60, 5)]
    old = group_payload("oncall", "{}:{}", {}, events, now, "http://sentinel")
    assert sorted(a["status"] for a in old["alerts"]) == ["firing", "resolved"]
    store = Store(tmp_path / "s.db")
    store.enqueue([("k-legacy", "oncall", receiver.url, old)], now)
    with httpx.Client() as client:
        assert Dispatcher(store, client, Clock(now), render=lambda r, n: n.render(r, "http://sentinel")
                          ).run_once() == 1
    [got] = receiver.snapshot()
    assert got == old
