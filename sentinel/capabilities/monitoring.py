"""Prometheus: an external one (``prometheus.url``), or one sentinel starts, configures with the scrape
targets, and keeps running (restarted with backoff when it exits, as a supervisor would)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sentinel.capabilities import Audit, Clock, Service
from sentinel.metrics import SentinelMetrics
from sentinel.netutil import reserve_near
from sentinel.process import ChildRegistry, ChildWatchdog
from sentinel.promserver import PrometheusServer, ScrapeTarget
from sentinel.settings import Settings


class Monitoring:
    name = "prometheus"

    def __init__(self, settings: Settings, state_dir: Path, children: ChildRegistry, targets: list[ScrapeTarget],
                 metrics: SentinelMetrics, audit: Audit, on_restart: Callable[[], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.on_restart = on_restart
        p = settings.prometheus
        self.port_note = ""
        port = p.port
        if p.url is None:  # Prometheus binds its port itself: it is chosen here, then released for it
            sock, self.port_note = reserve_near("127.0.0.1", p.port, "port" in p.model_fields_set)
            port = int(sock.getsockname()[1])
            sock.close()
        self.server = None if p.url is not None else PrometheusServer(
            state_dir / "prometheus", port, targets, p.scrape_interval, children, p.binary,
            ["--storage.tsdb.retention.time=2d",
             "--web.enable-remote-write-receiver"])  # recording rules write back through it

    @property
    def url(self) -> str:
        return self.server.url if self.server is not None else str(self.settings.prometheus.url)

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server is not None and self.server.proc is not None else None

    def start(self, clock: Clock) -> None:
        if self.server is None:
            return
        server = self.server
        server.start()
        watchdog = ChildWatchdog("prometheus", lambda: server.proc, server.start, self._child_event)
        clock.every(2.0, watchdog.check, "watch-prometheus")

    def _child_event(self, outcome: str, detail: dict[str, Any]) -> None:
        self.metrics.child_restarts.labels("prometheus", outcome).inc()
        self.audit("supervise", "prometheus", outcome=outcome, **detail)
        if outcome == "restarted":
            self.on_restart()

    def update_targets(self, targets: list[ScrapeTarget]) -> None:
        if self.server is not None:
            self.server.update_targets(targets)

    def service(self) -> Service:
        detail = "started" if self.server is not None else "external"
        return Service("prometheus", self.url, self.pid, detail + (f" ({self.port_note})" if self.port_note else ""))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
