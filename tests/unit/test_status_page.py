"""sentinel's status page at / (sentinel/statuspage.py) through FastAPI's test client: what it shows, who may
read and who may press its buttons, the CSRF token, and its speed with 1,000 alerts. The same page in a real
browser (headless Chromium) is tests/integration/test_status_page.py."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from inference_core.security import Authenticator, hash_key, issue_token
from sentinel.alerts.state import Sample
from sentinel.alerts.store import Store
from sentinel.api import FixedControls, create_app
from sentinel.rules.evaluator import Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule

TOKEN = "status-page-token-0123456789"
SECRET = "jwt-secret-for-the-status-page-0123456789"


class Controls(FixedControls):
    def status(self) -> dict[str, Any]:
        return {"startedAt": time.time() - 60, "api": "http://127.0.0.1:9095", "router": "http://127.0.0.1:8000/v1",
                "replicas": [{"name": "replica-0", "url": "http://127.0.0.1:40001", "pid": 4242, "restarts": 1,
                              "healthy": True, "rssBytes": 3 * 2**30,
                              "load": {"ready": True, "tokens": 17, "inFlight": 2}}],
                "guardrails": {"paused": False, "dry_run": False}}


def setup(tmp_path: Path, n_alerts: int = 3, protect_reads: bool = False, auth: Authenticator | None = None,
          secure_cookie: bool = False) -> tuple[TestClient, Store]:
    logging.getLogger("sentinel").setLevel(logging.ERROR)
    store = Store(tmp_path / "s.db")
    ev = Evaluator(store, None, None)
    rule = Rule.model_validate({"alert": "CudaError", "expr": "x", "labels": {"severity": "page"},
                                "annotations": {"summary": "CUDA error on {{ $labels.replica }}"}})
    ev.load([LoadedGroup(file="r.yaml", group=Group(name="g", rules=[rule]))])
    [rt] = ev.all_runtimes()
    now = time.time()
    ev.commit(rt, now, [Sample({"replica": f"replica-{i}"}, 1.0) for i in range(n_alerts)])  # type: ignore[arg-type]
    for a0 in [a for a in rt.alerts() if a.labels["replica"] == "replica-0"]:
        assert store.claim_findings(rt.key, a0.fingerprint, a0.active_at, now)
        store.save_findings(rt.key, a0.fingerprint, a0.active_at, "fail", {
            "runbook": "cuda-error", "status": "fail", "summary": "Xid 79 on GPU 0: fell off the bus"})
    store.request_approval("ab12cd34", {"incident": "CudaError/x/1", "rule": "CudaError", "action": "reset_gpu",
                                        "target": "replica-0", "why": "two restarts did not clear it"}, now)
    app = create_app(ev, store, CollectorRegistry(), Controls(),
                     auth or Authenticator((hash_key(TOKEN),), SECRET), protect_reads=protect_reads,
                     secure_cookie=secure_cookie)
    return TestClient(app), store


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    client, store = setup(tmp_path)
    yield client, store
    store.close()


def sign_in(client: TestClient, token: str = TOKEN) -> str:
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
    return found.group(1) if found else ""  # a read-only session has no forms


def test_the_page_shows_what_runs_the_alerts_with_findings_receivers_silences_and_approvals(
        page: tuple[TestClient, Store]) -> None:
    client, _ = page
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "replica-0" in html and "healthy" in html and "17 tokens to compute, 2 in flight" in html
    assert "3.00 GiB" in html and "http://127.0.0.1:8000/v1" in html
    assert "3 firing, 0 pending" in html and "CUDA error on replica-2" in html
    assert "Xid 79 on GPU 0: fell off the bus" in html  # the runbook's findings with their alert
    assert "ab12cd34" in html and "reset_gpu" in html and "two restarts did not clear it" in html
    assert "Approve" not in html and "Sign in to act" in html  # no buttons before signing in
    assert "script" not in html.lower().replace("noscript", "")  # no script at all
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and r.headers["x-frame-options"] == "DENY"


def test_buttons_need_a_signed_in_operator_and_the_forms_csrf_token(page: tuple[TestClient, Store]) -> None:
    client, store = page
    silence = {"matchers": 'alertname="CudaError"\nreplica=~"replica-[01]"', "duration": "2h", "comment": "maint"}
    assert client.post("/ui/silences", data={**silence, "csrf": ""}).status_code == 401
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    csrf = sign_in(client)
    html = client.get("/").text
    assert "Approve" in html and "Sign out" in html
    assert client.post("/ui/silences", data={**silence, "csrf": "forged"}).status_code == 403
    assert client.post("/ui/approvals/ab12cd34/approve", data={}).status_code == 403
    assert store.silences() == [] and store.approvals()[0]["status"] == "pending"  # nothing changed
    r = client.post("/ui/silences", data={**silence, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/#silences"
    [s] = store.silences(time.time())
    assert s["matchers"] == ['alertname="CudaError"', 'replica=~"replica-[01]"'] and s["comment"] == "maint"
    assert 7190 < s["endsAt"] - s["startsAt"] <= 7200 and s["createdBy"].startswith("key:")
    assert client.post(f"/ui/silences/{s['id']}/expire", data={"csrf": csrf}).status_code == 200
    assert store.silences(time.time()) == []
    assert client.post("/ui/approvals/ab12cd34/approve", data={"csrf": csrf}).status_code == 200
    assert client.post("/ui/approvals/ab12cd34/reject", data={"csrf": csrf}).status_code == 200  # answered once
    [doc] = store.approvals()
    assert doc["status"] == "approved" and doc["decided_by"].startswith("key:")
    assert client.post("/ui/approvals/nosuch/approve", data={"csrf": csrf}).status_code == 404
    kinds = [e["kind"] for e in store.audit_log()]
    assert kinds.count("approval") == 2 and "silence" in kinds and "silence-expired" in kinds
    client.post("/logout")
    assert client.post("/ui/silences", data={**silence, "csrf": csrf}).status_code == 401


def test_a_bad_silence_is_refused_with_the_reason_and_nothing_is_added(page: tuple[TestClient, Store]) -> None:
    client, store = page
    csrf = sign_in(client)
    for form, reason in [({"matchers": "alertname=CudaError", "duration": "2h", "comment": "x"}, "a matcher is"),
                         ({"matchers": 'a="b"', "duration": "soon", "comment": "x"}, "not a duration"),
                         ({"matchers": 'a="b"', "duration": "2h", "comment": " "}, "a comment is required")]:
        r = client.post("/ui/silences", data={**form, "csrf": csrf})
        assert r.status_code == 400 and reason in r.text
    assert store.silences() == []


def test_protected_reads_and_a_read_only_token(tmp_path: Path) -> None:
    client, store = setup(tmp_path, protect_reads=True)
    r = client.get("/")
    assert r.status_code == 401 and "Sign in" in r.text and "replica-0" not in r.text
    reader = issue_token(SECRET, "viewer", ["read"], 600)
    assert client.get("/", headers={"Authorization": f"Bearer {reader}"}).status_code == 200  # curl works
    csrf = sign_in(client, reader)
    html = client.get("/").text
    assert "replica-0" in html and "Approve" not in html and "viewer (read)" in html
    r = client.post("/ui/approvals/ab12cd34/approve", data={"csrf": csrf})
    assert r.status_code == 403 and "may read, not act" in r.text
    assert store.approvals()[0]["status"] == "pending"


def test_the_session_cookie(tmp_path: Path) -> None:
    client, _ = setup(tmp_path, secure_cookie=True)
    cookie = client.post("/login", data={"token": TOKEN}, follow_redirects=False).headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie and "path=/" in cookie


def test_without_credentials_configured_there_are_no_buttons(tmp_path: Path) -> None:
    client, store = setup(tmp_path, auth=Authenticator([]))
    html = client.get("/").text
    assert "replica-0" in html and "Sign in" not in html and "Approve" not in html
    assert client.post("/login", data={"token": "anything"}).status_code == 403
    r = client.post("/ui/approvals/ab12cd34/approve", data={"csrf": ""})
    assert r.status_code == 403 and "disabled" in r.text and store.approvals()[0]["status"] == "pending"


def test_labels_are_escaped(tmp_path: Path) -> None:
    client, store = setup(tmp_path, n_alerts=0)
    store.request_approval("x", {"rule": "R", "action": "restart", "target": '<img src=x onerror="alert(1)">',
                                 "why": "<b>why</b>"}, time.time())
    html = client.get("/").text
    assert "<img src=x" not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "<b>why</b>" not in html


def test_a_thousand_alerts_render_in_under_200_ms(tmp_path: Path) -> None:
    client, _ = setup(tmp_path, n_alerts=1000)
    assert client.get("/").text.count("CUDA error on replica-") == 1000
    best = min(_timed(client) for _ in range(5))
    assert best < 0.2, f"{best * 1000:.0f} ms"


def _timed(client: TestClient) -> float:
    t = time.perf_counter()
    assert client.get("/").status_code == 200
    return time.perf_counter() - t


def test_the_page_is_not_in_the_openapi_document(page: tuple[TestClient, Store]) -> None:
    client, _ = page
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/login" not in paths and not any(p.startswith("/ui/") for p in paths)
    assert SecretStr  # the API's token type (imported for the reader: api.token is a SecretStr)
