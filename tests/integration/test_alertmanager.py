"""sentinel and a real Alertmanager (Debian's prometheus-alertmanager): alerts pushed to
POST /api/v2/alerts come out of Alertmanager's own webhook, firing and then resolved."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sentinel.alerts.delivery import Delivery
from sentinel.alerts.fingerprint import fingerprint
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.routing import build, default_tree
from sentinel.alerts.store import Store
from sentinel.amserver import AlertmanagerServer
from sentinel.logstore.local import LocalLogStore
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.rules.evaluator import Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.sources import LogRuleSource
from tests.conftest import Receiver as HookReceiver
from tests.integration.test_end_to_end import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("prometheus-alertmanager") is None,
    reason="prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")]


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: HookReceiver) -> Iterator[AlertmanagerServer]:
    config = {
        "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "1s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
    }
    am = AlertmanagerServer(tmp_path / "am", free_port(), config, ChildRegistry(tmp_path / "children.json"))
    am.start()
    yield am
    am.stop()


def test_alerts_flow_through_alertmanager(tmp_path: Path, alertmanager: AlertmanagerServer,
                                          receiver: HookReceiver) -> None:
    logs = LocalLogStore(tmp_path / "logs.db")
    rule = Rule.model_validate({"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}],
                                                              "timeframe": "3s", "query_key": "replica"},
                                "labels": {"severity": "page"}, "annotations": {"summary": "{{ $labels.replica }}"}})
    group = LoadedGroup(file="r.yaml", group=Group(name="logs", interval=1.0, rules=[rule]))
    store = Store(tmp_path / "s.db")
    ev = Evaluator(store, None, LogRuleSource(logs), default_interval=1.0, external_url="http://sentinel")
    delivery = Delivery(store, build(default_tree([])), {}, ["alertmanager"])
    ev.load([group])
    with httpx.Client() as client:
        dispatch = Dispatcher(store, client, urls={"alertmanager": f"{alertmanager.url}/api/v2/alerts"})
        logs.add([(time.time(), {"cuda_error": "CUDA error: x", "replica": "replica-0"})])

        def cycle() -> None:
            ev.eval_group(group.key)
            delivery.tick()
            dispatch.run_once()

        def got(status: str) -> list[dict[str, object]]:
            cycle()
            return [a for p in receiver.snapshot() for a in p["alerts"] if a["status"] == status]

        [firing] = wait_for("Alertmanager to deliver the firing alert", lambda: got("firing"), 30)
        assert firing["labels"] == {"alertname": "CudaError", "replica": "replica-0", "severity": "page"}
        assert firing["annotations"] == {"summary": "replica-0"}
        assert firing["fingerprint"] == fingerprint(firing["labels"])  # ours is Alertmanager's, bit for bit
        assert receiver.snapshot()[0]["receiver"] == "hook"  # routed by Alertmanager itself
        am_alerts = httpx.get(f"{alertmanager.url}/api/v2/alerts").json()
        assert [a["labels"]["alertname"] for a in am_alerts] == ["CudaError"]
        [resolved] = wait_for("Alertmanager to deliver the resolution", lambda: got("resolved"), 30)
        assert resolved["fingerprint"] == firing["fingerprint"]
    assert store.outbox_counts().get("failed", 0) == 0


def test_alertmanager_webhook_in(tmp_path: Path) -> None:
    """Another Prometheus's alert reaches Alertmanager, which posts it to sentinel's webhook endpoint."""
    import threading

    import uvicorn
    from prometheus_client import CollectorRegistry
    from pydantic import SecretStr

    from sentinel.api import FixedControls, authenticator, create_app
    from sentinel.inbound import WebhookPayload, match

    token = "inbound-token-0123456789"
    store = Store(tmp_path / "s.db")
    ev = Evaluator(store, None, None)
    rule = Rule.model_validate({"alert": "CudaError", "log": {"filter": [{"exists": "cuda_error"}]},
                                "sentinel": {"remediation": "restart"}})
    ev.load([LoadedGroup(file="r.yaml", group=Group(name="logs", rules=[rule]))])
    seen: list[tuple[str, dict[str, str]]] = []

    def inbound(payload: WebhookPayload) -> dict[str, object]:
        matched, skipped = match(ev, payload)
        seen.extend((rt.rule.name, a.labels) for rt, a in matched)
        return {"matched": len(matched), "skipped": skipped}

    app = create_app(ev, store, CollectorRegistry(), FixedControls(on_inbound=inbound), authenticator(SecretStr(token)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    hook = f"http://127.0.0.1:{port}/api/v1/alertmanager/webhook"
    am = AlertmanagerServer(tmp_path / "am", free_port(), {
        "route": {"receiver": "sentinel", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "sentinel", "webhook_configs": [
            {"url": hook, "http_config": {"authorization": {"type": "Bearer", "credentials": token}}}]}],
    }, ChildRegistry(tmp_path / "children.json"))
    am.start()
    try:
        assert httpx.post(hook, json={}).status_code == 401
        # authentication comes before the body is read: malformed JSON without a token is 401, not 422
        for body in (b"{not json", b"\xff\xfe", b'{"version": "4"'):
            r = httpx.post(hook, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (body, r.text)
        wrong = httpx.post(hook, content=b"{not json", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        malformed = httpx.post(hook, content=b"{not json", headers={"Authorization": f"Bearer {token}",
                                                                   "Content-Type": "application/json"})
        assert malformed.status_code == 422  # with the token, the body's problem is told
        bad = httpx.post(hook, json={"version": "3"}, headers={"Authorization": f"Bearer {token}"})
        assert bad.status_code == 422 and "version" in bad.text
        httpx.post(f"{am.url}/api/v2/alerts", json=[
            {"labels": {"alertname": "CudaError", "replica": "replica-2"}, "annotations": {}},
            {"labels": {"alertname": "SomethingElse"}}]).raise_for_status()
        wait_for("Alertmanager to call sentinel's webhook", lambda: seen, 30)
        assert seen == [("CudaError", {"alertname": "CudaError", "replica": "replica-2"})]
    finally:
        am.stop()
        server.should_exit = True
        thread.join(10)
