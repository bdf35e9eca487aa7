"""inference_core.client against a replica that answers wrongly: a stand-in HTTP server on 127.0.0.1 (the
real server's documents are checked in tests/integration/test_inference_server.py). Each wrong answer is a
ReplicaError naming the endpoint and the field; no answer is ReplicaUnreachable."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from inference_core.client import Health, Load, Ready, ReplicaClient, ReplicaError, ReplicaUnreachable
from sentinel.netutil import free_port
from tests.httpserver import LoopbackServer

ANSWERS: dict[str, tuple[int, str]] = {
    "/health": (200, json.dumps({"status": "sleeping", "pid": 7})),
    "/ready": (503, "<html>bad gateway</html>"),
    "/load": (500, json.dumps({"ready": True})),
    "/metrics": (200, "# HELP x\n"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code, body = ANSWERS.get(self.path, (404, "{}"))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:  # noqa: N802
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def wrong() -> Iterator[str]:
    srv = LoopbackServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_wrong_documents_are_errors_naming_the_endpoint_and_field(wrong: str) -> None:
    api = ReplicaClient(wrong, admin_token="t")
    with pytest.raises(ReplicaError, match=r"GET /health: status: Input should be 'ok', 'loading' or 'unhealthy'"):
        api.health()
    with pytest.raises(ReplicaError, match=r"GET /ready: not JSON"):
        api.ready()
    with pytest.raises(ReplicaError, match=r"GET /load: HTTP 500"):
        api.load()
    with pytest.raises(ReplicaError, match=r"POST /admin/drain: HTTP 404"):
        api.drain()
    assert api.metrics_text() == "# HELP x\n"


def test_no_answer_is_unreachable() -> None:
    api = ReplicaClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    for call in (api.health, api.ready, api.load, api.metrics_text):
        with pytest.raises(ReplicaUnreachable, match="ConnectError"):
            call()


def test_documents_round_trip_and_allow_fields_a_newer_replica_adds() -> None:
    """The server sends exactly the fields it set (body()), and a client reads a document with more."""
    assert Health(status="unhealthy", cuda_error=None, stalled=True).body() == \
        {"status": "unhealthy", "cuda_error": None, "stalled": True}
    h = Health.model_validate({"status": "unhealthy", "stalled": True, "gpu": "lost"})
    assert h.problem == "engine stalled" and h.model_extra == {"gpu": "lost"}
    assert Ready.model_validate({"ready": False, "loading": True}).loading is True
    load = Load.model_validate({"ready": True, "in_flight": 2, "tokens": 96, "queue_age_s": 1.5})
    assert (load.in_flight, load.tokens, load.running) == (2, 96, 0)
