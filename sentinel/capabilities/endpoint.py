"""The router's HTTP endpoint: sentinel's OpenAI-compatible front door to the replicas, on its own port
and thread (``sentinel/router.py`` is the routing itself)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from prometheus_client import CollectorRegistry

from sentinel.capabilities import Clock, Service
from sentinel.errors import ServiceError
from sentinel.netutil import reserve_near
from sentinel.router import Router
from sentinel.settings import Settings


class RouterEndpoint:
    name = "router"

    def __init__(self, settings: Settings, registry: CollectorRegistry, endpoints: Callable[[], list[tuple[str, str]]],
                 proxy_token: str | None) -> None:
        self.settings = settings
        self.router = Router(endpoints, registry, proxy_token, settings.router.poll_interval, settings.router.timeout)
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url: str | None = None
        self.port_note = ""

    def start(self, clock: Clock) -> None:
        r = self.settings.router
        try:
            sock, self.port_note = reserve_near(r.host, r.port, "port" in r.model_fields_set)
        except OSError as exc:
            raise ServiceError(f"the router cannot listen on {r.host}:{r.port}: {exc}") from exc
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.router.app, host=r.host, port=port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=10,
                                proxy_headers=False)  # the client is the peer; the router sets X-Forwarded-For
        server = self.server = uvicorn.Server(config)
        thread = self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="router",
                                                daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServiceError(f"the router did not start on {r.host}:{port}")
            time.sleep(0.02)
        self.url = f"http://{r.host}:{port}"

    def service(self) -> Service | None:
        if self.url is None:
            return None
        return Service("router", f"{self.url}/v1", None,
                       "OpenAI-compatible endpoint: least-loaded ready replica, retried once"
                       + (f" ({self.port_note})" if self.port_note else ""))

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)
