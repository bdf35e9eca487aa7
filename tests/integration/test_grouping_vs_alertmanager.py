"""Delivery's grouping against a real Alertmanager (Debian's prometheus-alertmanager, 0.25) fed the same
alerts at the same moments, with the same routing tree: each receiver must get the same notifications
(group key, group labels, alerts with their status, truncatedAlerts) at about the same time."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentinel.alerts.delivery import Delivery, ReceiverOptions
from sentinel.alerts.event import AlertEvent
from sentinel.alerts.notification import alertmanager_body
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.routing import RouteConfig, build
from sentinel.alerts.store import Store
from sentinel.amserver import AlertmanagerServer
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from tests.httpserver import LoopbackServer

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None,
    reason="prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")]

ROUTE: dict[str, Any] = {
    "receiver": "default", "group_by": ["alertname"], "group_wait": "2s", "group_interval": "4s",
    "repeat_interval": "1h",
    "routes": [
        {"matchers": ['severity="page"'], "receiver": "pager", "group_by": ["alertname", "replica"],
         "continue": True},
        {"matchers": ['team=~"infra|storage"'], "receiver": "infra"},
        {"matchers": ['severity="page"', 'replica="r9"'], "receiver": "infra"},  # continue above: r9 goes to both
    ],
}
MAX_ALERTS = {"default": 2}


class Capture:
    """Records every POST with the time it arrived, by path (/am/<receiver> or /us/<receiver>)."""

    def __init__(self) -> None:
        self.got: list[tuple[float, str, dict[str, Any]]] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                capture.got.append((time.time(), self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, prefix: str, t0: float) -> list[tuple[float, str, str, Any, Any, int, str]]:
        out = []
        for t, path, p in self.got:
            if path.startswith(prefix):
                alerts = sorted((a["fingerprint"], a["status"], a["endsAt"].startswith("0001")) for a in p["alerts"])
                out.append((t - t0, p["receiver"], p["groupKey"], json.dumps(p["groupLabels"], sort_keys=True),
                            alerts, p["truncatedAlerts"], p["status"]))
        return sorted(out, key=lambda n: (n[1], n[2], n[0]))


@pytest.fixture
def capture() -> Iterator[Capture]:
    c = Capture()
    yield c
    c.server.shutdown()


def test_the_same_notifications_as_alertmanager(tmp_path: Path, capture: Capture) -> None:
    names = ["default", "pager", "infra"]
    am = AlertmanagerServer(tmp_path / "am", free_port(), {
        "route": ROUTE,
        "receivers": [{"name": n, "webhook_configs": [{"url": f"{capture.url}/am/{n}", "send_resolved": True,
                                                       "max_alerts": MAX_ALERTS.get(n, 0)}]} for n in names],
    }, ChildRegistry(tmp_path / "children.json"))
    am.start()
    store = Store(tmp_path / "s.db")
    delivery = Delivery(store, build(RouteConfig.model_validate(ROUTE)),
                        {n: ReceiverOptions(max_alerts=MAX_ALERTS.get(n, 0)) for n in names})
    stop = threading.Event()
    with httpx.Client() as client:
        dispatcher = Dispatcher(store, client, urls={n: f"{capture.url}/us/{n}" for n in names},
                                render=delivery.render)

        def loop() -> None:
            while not stop.is_set():
                delivery.tick()
                dispatcher.run_once()
                time.sleep(0.05)

        def hand_over(events: list[AlertEvent]) -> None:
            store.log_alerts(events, time.time())
            r = client.post(f"{am.url}/api/v2/alerts", json=alertmanager_body(events))
            assert r.status_code == 200, r.text

        def alert(t0: float, ends: float, **labels: str) -> AlertEvent:
            return AlertEvent(labels, {"summary": "s"}, t0, ends, "http://gen")

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            t0 = time.time()
            later = t0 + 3600
            first = [alert(t0, later, alertname="Lat", severity="page", replica="r0"),
                     alert(t0, later, alertname="Lat", severity="page", replica="r1"),
                     alert(t0, later, alertname="Lat", severity="page", replica="r9"),
                     alert(t0, later, alertname="Disk", team="infra"),
                     alert(t0, later, alertname="Lat", severity="ticket", replica="r2"),
                     alert(t0, later, alertname="Lat", severity="ticket", replica="r3"),
                     alert(t0, later, alertname="Lat", severity="ticket", replica="r4")]
            hand_over(first)
            time.sleep(3.0)
            t3 = time.time()
            # a resend of r0 (nothing new), a new page alert, and an alert that started long ago
            hand_over([first[0], alert(t3, later, alertname="Lat", severity="page", replica="r5"),
                       alert(t3 - 600, later, alertname="Old", severity="ticket")])
            time.sleep(2.0)
            t5 = time.time()
            hand_over([alert(t0, t5, alertname="Lat", severity="page", replica="r1"),   # resolved
                       alert(t0, t5, alertname="Lat", severity="ticket", replica="r2")])
            time.sleep(9.0)
        finally:
            stop.set()
            thread.join(5)
            am.stop()
    ours, theirs = capture.notifications("/us/", t0), capture.notifications("/am/", t0)
    assert [n[1:] for n in ours] == [n[1:] for n in theirs], (ours, theirs)
    late = [(o[0], a[0], o[1:3]) for o, a in zip(ours, theirs, strict=True) if abs(o[0] - a[0]) > 1.0]
    assert not late, late  # within one evaluation interval of Alertmanager's own timing
    keys = {n[2] for n in ours}
    # route keys as Alertmanager writes them; r9 reached infra through pager's `continue`; max_alerts truncated
    assert '{}/{severity="page"}:{alertname="Lat", replica="r0"}' in keys
    assert '{}/{replica="r9",severity="page"}:{alertname="Lat"}' in keys
    assert any(n[5] == 1 for n in ours)
    assert len(ours) >= 10
