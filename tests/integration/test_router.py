"""The router in front of real inference_core replicas (the bundled model), over HTTP, with the official
`openai` client where a client is one: load-aware choice, streams, disconnects, retries, draining, per-client
rate limits through the proxy, and a restart that clients do not notice."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.router import REPLICA_HEADER, Router
from sentinel.supervisor import ReplicaSpec, Supervisor

pytestmark = pytest.mark.integration
ADMIN = "router-test-admin-token-0123456789"
PROXY = "router-test-proxy-token-0123456789"


@contextmanager
def replicas(tmp_path: Path, model: Path, n: int, engine_args: tuple[str, ...] = ()) -> Iterator[Supervisor]:
    specs = [ReplicaSpec(f"replica-{i}", free_port(), model, tmp_path / "run" / f"replica-{i}" / "logs",
                         admin_token=ADMIN, proxy_token=PROXY, served_model_name="deepseek-tiny",
                         engine_args=engine_args) for i in range(n)]
    sup = Supervisor(specs, tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 90)
    sup.start_all()
    try:
        yield sup
    finally:
        sup.stop_all()


@contextmanager
def routed(sup: Supervisor, poll_s: float = 0.1) -> Iterator[tuple[Router, str, CollectorRegistry]]:
    registry = CollectorRegistry()
    router = Router(lambda: [(r.spec.name, r.spec.url) for r in sup.replicas.values()], registry, PROXY, poll_s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(router.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", proxy_headers=False))  # as the daemon serves it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield router, f"http://127.0.0.1:{port}", registry
    finally:
        server.should_exit = True
        thread.join(10)


def wait(what: str, fn: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


LONG = {"model": "deepseek-tiny", "prompt": "The cluster", "max_tokens": 400, "min_tokens": 400, "temperature": 0}


def test_least_loaded_replica_streams_and_disconnects(tmp_path: Path, tiny_model_dir: Path) -> None:
    with replicas(tmp_path, tiny_model_dir, 2) as sup, routed(sup) as (router, url, registry):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        # a long stream occupies one replica; once the router's poll sees its work, the next request goes to the
        # other one
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as long:
            busy = long.headers[REPLICA_HEADER]
            chunks = long.iter_raw()
            assert next(chunks)
            wait("the poll to see the long request", lambda: router.upstreams[busy].tokens > 100)
            other = httpx.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "hi",
                                                               "max_tokens": 2}, timeout=30)
            assert other.status_code == 200 and other.headers[REPLICA_HEADER] != busy
        # leaving the stream closed the client side: the replica aborts the request
        busy_url = sup.replicas[busy].spec.url
        wait("the replica to abort the abandoned stream",
             lambda: httpx.get(f"{busy_url}/load").json()["in_flight"] == 0, 10)
        # a stream through the router is the stream the replica sends (greedy decoding)
        via = "".join(c.choices[0].text for c in client.completions.create(
            model="deepseek-tiny", prompt="GPU utilization", max_tokens=12, temperature=0, stream=True))
        direct = openai.OpenAI(base_url=f"{busy_url}/v1", api_key="unused", max_retries=0).completions.create(
            model="deepseek-tiny", prompt="GPU utilization", max_tokens=12, temperature=0)
        assert via == direct.choices[0].text and via
        chat = client.chat.completions.create(model="deepseek-tiny", max_tokens=4,
                                              messages=[{"role": "user", "content": "hello"}])
        assert chat.choices[0].message.content is not None
        assert [m.id for m in client.models.list().data] == ["deepseek-tiny"]
        assert metric(registry, "sentinel_router_requests_total", {"replica": busy, "code": "200"}) >= 1
        # the router settles its accounting after the last byte went out: the client may read it a moment before
        wait("the router's in-flight count to settle",
             lambda: metric(registry, "sentinel_router_in_flight", {"replica": busy}) == 0, 10)


def test_retry_before_the_first_byte_draining_and_none_left(tmp_path: Path, tiny_model_dir: Path) -> None:
    with replicas(tmp_path, tiny_model_dir, 2) as sup, routed(sup, poll_s=3600) as (router, url, registry):
        body = {"model": "deepseek-tiny", "prompt": "hi", "max_tokens": 2}
        assert all(u.ready for u in router.upstreams.values())  # the one poll, at start
        # replica-0 dies between two polls: the router still believes it ready, picks it (least loaded: replica-1
        # is made to look busy), cannot connect, and retries once on replica-1: the client sees a 200
        router.upstreams["replica-1"].pending = 1000
        os.kill(sup.replicas["replica-0"].pid or 0, signal.SIGKILL)
        sup.replicas["replica-0"].proc.wait(10)  # type: ignore[union-attr]
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "replica-1"
        assert metric(registry, "sentinel_router_retries_total", {"reason": "connect"}) == 1
        errors = {"replica": "replica-0", "kind": "connect"}
        assert metric(registry, "sentinel_router_upstream_errors_total", errors) == 1
        # replica-1 starts draining: it answers 503 before doing anything, and there is no one else: 503 + Retry-After
        assert httpx.post(f"{sup.replicas['replica-1'].spec.url}/admin/drain",
                          headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "no replica can serve" in r.json()["error"]["message"]
        assert metric(registry, "sentinel_router_unavailable_total") == 1


def test_client_identity_reaches_the_replicas_rate_limits(tmp_path: Path, tiny_model_dir: Path) -> None:
    with replicas(tmp_path, tiny_model_dir, 1, ("--rate-limit", "0.01", "--rate-burst", "1")) as sup, \
            routed(sup) as (_, url, _reg):
        body = {"model": "deepseek-tiny", "prompt": "hi", "max_tokens": 1}
        a = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1"), timeout=30)
        b = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
        assert a.post(f"{url}/v1/completions", json=body).status_code == 200
        limited = a.post(f"{url}/v1/completions", json=body, headers={"X-Forwarded-For": "10.9.9.9"})
        assert limited.status_code == 429  # a's own bucket, whatever address a claims
        assert b.post(f"{url}/v1/completions", json=body).status_code == 200  # b is another client
        # straight to the replica, a forged proxy header changes nothing: a is still a
        direct = sup.replicas["replica-0"].spec.url
        forged = a.post(f"{direct}/v1/completions", json=body,
                        headers={"X-Forwarded-For": "10.8.8.8", "X-Sentinel-Proxy": "guess"})
        assert forged.status_code == 429


def test_a_restart_behind_the_router_fails_no_request(tmp_path: Path, tiny_model_dir: Path,
                                                      report_figure: Callable[[str, str], None]) -> None:
    """The drill: steady traffic through the router while sentinel restarts a replica (drain → stop → start
    → ready). Every request succeeds; the ones that met the draining or stopped replica were retried."""
    with replicas(tmp_path, tiny_model_dir, 2) as sup, routed(sup) as (_, url, registry):
        results: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v1/completions", json={"model": "deepseek-tiny", "prompt": "The cluster is",
                                                              "max_tokens": 8, "temperature": 0})
                    results.append(r.status_code)

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        evidence = sup.act("restart", "replica-0")
        time.sleep(1.0)  # traffic reaches the restarted replica again
        stop.set()
        for w in workers:
            w.join(60)
        assert "drained" in evidence
        failed = [c for c in results if c != 200]
        retried = metric(registry, "sentinel_router_retries_total", {"reason": "connect"}) + \
            metric(registry, "sentinel_router_retries_total", {"reason": "unavailable"})
        report_figure("router drill: requests during a replica restart (failed / total, retried)",
                      f"{len(failed)} / {len(results)}, {retried:.0f} retried")
        assert not failed, failed
        assert len(results) > 20
        assert metric(registry, "sentinel_router_requests_total", {"replica": "replica-0", "code": "200"}) > 0
