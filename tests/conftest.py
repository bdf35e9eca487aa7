"""Shared fixtures: a real webhook receiver on loopback, the bundled model, free ports."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from inference_core.model.weights import make_tiny_checkpoint
from tests.httpserver import LoopbackServer

ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A real HTTP server that records every POSTed JSON body; answers with ``status_codes`` in turn."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.status_codes: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    code = receiver.status_codes.pop(0) if receiver.status_codes else 200
                    receiver.received.append(json.loads(body))
                    receiver.bodies.append(body)
                    receiver.headers.append(dict(self.headers))
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "deepseek-tiny", seed=0)


_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def report_figure() -> Any:
    """Record a measured figure; the run prints all of them at the end (see pytest_terminal_summary)."""

    def record(name: str, value: str) -> None:
        _FIGURES.append((name, value))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for name, value in _FIGURES:
            terminalreporter.write_line(f"{name}: {value}")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason printed, where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class ElasticsearchNode:
    """The local Elasticsearch that scripts/elasticsearch.sh runs (integ-test distribution, 1 GiB heap)."""

    def __init__(self, run_dir: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ES_PORT": str(self.port), "ES_HOME_DIR": str(run_dir)}

    def _script(self, action: str) -> None:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "elasticsearch.sh"), action], env=self.env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"elasticsearch.sh {action}: {r.stdout}{r.stderr}"

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")


@pytest.fixture(scope="session")
def elasticsearch() -> Iterator[ElasticsearchNode]:
    """Started once per run and waited on to yellow health. Missing (set-up not run): skipped with the
    reason here, a failure in CI."""
    if not any((ROOT / "var" / "elasticsearch").glob("elasticsearch-*/bin/elasticsearch")):
        reason = "Elasticsearch is not set up (var/elasticsearch): run scripts/setup.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    import shutil
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="sentinel-es-"))  # outside pytest's 0700 tree: the node runs as
    os.chmod(run_dir, 0o755)                                   # an unprivileged user when we are root
    node = ElasticsearchNode(run_dir)
    node.start()
    yield node
    node.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
