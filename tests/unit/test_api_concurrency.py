"""The API reads alert state while evaluation threads change it: every read takes a consistent copy under
the evaluator's lock (`Evaluator.view`; before, `/api/v1/alerts` iterated dicts that evaluations were resizing,
and some reads answered 500). A race does not reproduce on demand, so this is a stress test: reads and
churning evaluations side by side, every read a 200."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from sentinel.alerts.state import Sample
from sentinel.alerts.store import Store
from sentinel.api import FixedControls, authenticator, create_app
from sentinel.capabilities.replicas import UNRESPONSIVE_ALERT, liveness_rule
from sentinel.rules.evaluator import Evaluator


def test_reads_never_fail_while_alerts_churn(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ev = Evaluator(store, None, None, internal_rules=[liveness_rule()])
    app = create_app(ev, store, CollectorRegistry(), FixedControls(), authenticator(None))
    stop = threading.Event()
    now = [1000.0]

    def churn() -> None:  # alerts appear and go, hundreds at a time: the dicts the API reads are resized
        i = 0
        while not stop.is_set():
            i += 1
            n = 100 if i % 2 else 5
            exited = [Sample({"replica": f"r{k}", "problem": "has exited"}, 3.0) for k in range(n)]
            ev.push(UNRESPONSIVE_ALERT, now[0], exited)
            now[0] += 1.0

    workers = [threading.Thread(target=churn) for _ in range(2)]
    for w in workers:
        w.start()
    codes: list[int] = []
    try:
        with TestClient(app) as client:
            for _ in range(100):
                codes.append(client.get("/api/v1/alerts").status_code)
                codes.append(client.get("/api/v1/rules").status_code)
    finally:
        stop.set()
        for w in workers:
            w.join(10)
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert now[0] > 1002  # the churn really ran alongside
