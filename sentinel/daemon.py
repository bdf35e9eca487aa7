"""``sentinel up``: wires the capabilities (``sentinel/capabilities/``) together, starts them in order and
stops them in reverse, and serves the API. Each capability owns its own start, stop and jobs; this module
only says which feeds which, and what ``up.json`` and ``/api/v1/status`` list.

Order: replicas (local children, or a Deployment) → router → Prometheus → state DB → log shipping →
self-healing (recovers what a killed run left) → rule evaluation → notifications → leadership; then the
clock starts their jobs, and the API serves.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CollectorRegistry

from inference_core.security import RateLimiter, server_config
from inference_core.telemetry import rss_bytes
from sentinel.alerts.state import Alert
from sentinel.api import authenticator, create_app
from sentinel.capabilities import Capability, Clock, Service
from sentinel.capabilities.endpoint import RouterEndpoint
from sentinel.capabilities.healing import SelfHealing
from sentinel.capabilities.leadership import Leadership
from sentinel.capabilities.logs import LogShipping
from sentinel.capabilities.monitoring import Monitoring
from sentinel.capabilities.notifications import Notifications
from sentinel.capabilities.replicas import UNRESPONSIVE_ALERT, ClusterReplicas, LocalReplicas, bundled_model_dir
from sentinel.capabilities.rules import RuleEvaluation, load_checked
from sentinel.capabilities.state import State
from sentinel.errors import ServiceError
from sentinel.inbound import WebhookPayload, inbound_events, match
from sentinel.metrics import BacklogCollector, SentinelMetrics
from sentinel.netutil import reserve_near
from sentinel.process import ChildRegistry
from sentinel.promserver import ScrapeTarget
from sentinel.remediation.policy import Guardrails
from sentinel.rules.evaluator import AlertingRuntime
from sentinel.runbooks.base import Context
from sentinel.runbooks.context import build_context
from sentinel.runbooks.model import Runbook
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec

__all__ = ["Daemon", "Service", "bundled_model_dir"]
log = logging.getLogger(__name__)
C = TypeVar("C", bound=Capability)


@dataclass
class Daemon:
    settings: Settings
    on_ready: Callable[[list[Service]], None] = lambda services: None
    on_stage: Callable[[str, str], None] | None = None  # (replica, what it does) while the replicas start
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        s = self.settings
        self.state_dir = s.state_dir.resolve()
        self.children = ChildRegistry(self.state_dir / "children.json")
        self.metrics = SentinelMetrics(self.registry)
        # bound now, served on in serve(): the port is known to every part started before the API serves, and
        # no child's outbound connection can take it meanwhile (a free_port() chosen here once lost that race)
        try:
            self.api_socket, self.api_port_note = reserve_near(s.api.host, s.api.port,
                                                               "port" in s.api.model_fields_set)
        except OSError as exc:
            raise ServiceError(f"sentinel's API cannot listen on {s.api.host}:{s.api.port}: {exc}") from exc
        self.api_port = int(self.api_socket.getsockname()[1])
        self.clock = Clock(s.alerting.max_concurrent_evaluations)
        self.started: list[Capability] = []  # in start order; stopped in reverse
        self.keeper_pid: int | None = None
        self.services: list[Service] = []
        self.replicas: LocalReplicas | ClusterReplicas | None = None
        self.router: RouterEndpoint | None = None
        self.monitoring: Monitoring | None = None
        self.state: State | None = None
        self.logs: LogShipping | None = None
        self.healing: SelfHealing | None = None
        self.rules: RuleEvaluation | None = None
        self.notifications: Notifications | None = None
        self.leadership: Leadership | None = None

    def _run(self, part: C) -> C:
        self.started.append(part)  # before start: a start that fails half-way is still stopped
        part.start(self.clock)
        return part

    # -- start -----------------------------------------------------------------------------------------
    def start(self) -> list[Service]:
        s = self.settings
        groups, books = load_checked(s)  # fail before starting anything when rules or runbooks are bad
        (self.state_dir / "up.json").unlink(missing_ok=True)  # left by a sentinel killed with -9
        for leftover in self.children.reap_leftovers():
            log.warning("killed a leftover child of a previous sentinel: %s", leftover)
        self.keeper_pid = self.children.start_keeper()  # from here on, every child dies with this process

        replicas: LocalReplicas | ClusterReplicas
        if s.kubernetes.enabled:
            replicas = self.replicas = self._run(ClusterReplicas(s))
        else:
            local = self.replicas = replicas = LocalReplicas(s, self.state_dir, self.children, self._replicas_changed,
                                                             self._liveness, self.on_stage)
            self._run(local)
            if s.router.enabled:
                self.router = self._run(RouterEndpoint(s, self.registry, local.endpoints, local.proxy_token))
        monitoring = self.monitoring = self._run(Monitoring(
            s, self.state_dir, self.children, self._targets(replicas.specs), self.metrics, self.audit,
            on_restart=self._write_up_file))
        state = self.state = self._run(State(s, self.state_dir))
        logs = self.logs = self._run(LogShipping(s, self.state_dir, self.metrics, replicas.specs,
                                                 ship=not s.kubernetes.enabled))
        rules = self.rules = RuleEvaluation(s, state.store, monitoring.url, logs.rule_source(), self.metrics,
                                            self.api_url, self.audit, groups, self._set_books, self._on_firing)
        self.healing = self._run(SelfHealing(s, state.store, replicas.actuator, self.metrics, books,
                                             self._runbook_context, rules.evaluator.notify_findings, rules.evidence,
                                             self.audit))
        self._run(rules)
        self.registry.register(rules.evaluator.learned)
        self.registry.register(rules.evaluator.active)
        self.registry.register(BacklogCollector(state.store, lambda: logs.shipper))
        self.notifications = self._run(Notifications(s, state.store, self.metrics, self.api_url,
                                                     lambda: self.leading))
        self.leadership = self._run(Leadership(s, replicas.api if isinstance(replicas, ClusterReplicas) else None,
                                               self.audit))
        self.clock.start()
        self.app = create_app(rules.evaluator, state.store, self.registry, self, authenticator(s.api.token, s.api),
                              limiter=RateLimiter(s.api.rate_limit, s.api.rate_burst) if s.api.rate_limit else None,
                              protect_reads=s.api.protect_reads, secure_cookie=s.api.tls_cert is not None)
        self.services = self._services()
        return self.services

    # -- wiring ----------------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        scheme = "https" if self.settings.api.tls_cert else "http"
        return f"{scheme}://{self.settings.api.host}:{self.api_port}"

    @property
    def leading(self) -> bool:
        """Whether this sentinel notifies and acts: always, unless a Lease elects another one."""
        return self.leadership is None or self.leadership.leading

    def audit(self, kind: str, subject: str, **detail: Any) -> None:
        if self.state is not None:
            self.state.audit(kind, subject, **detail)

    def _healing(self) -> SelfHealing:
        assert self.healing is not None
        return self.healing

    def _on_firing(self, rt: AlertingRuntime, alerts: list[Alert]) -> None:
        if self.leading and self.healing is not None:  # a follower evaluates, the leader acts
            self.healing.on_firing(rt, alerts)

    def _liveness(self, now: float, samples: list[Any]) -> None:
        if self.rules is not None:
            self.rules.evaluator.push(UNRESPONSIVE_ALERT, now, samples)

    def _set_books(self, books: Mapping[str, Runbook]) -> None:
        if self.healing is not None:
            self.healing.set_books(books)

    # -- sentinel.api.Controls: what the API asks of the running daemon ---------------------------------
    def guardrails(self) -> Guardrails:
        return self._healing().guardrails

    def set_paused(self, paused: bool) -> None:
        self._healing().set_paused(paused)

    def reload_rules(self) -> list[str]:
        assert self.rules is not None
        return self.rules.reload()

    def inbound(self, payload: WebhookPayload) -> dict[str, Any]:
        assert self.rules is not None and self.state is not None
        matched, skipped = match(self.rules.evaluator, payload)
        for rt, alert in matched:
            self._on_firing(rt, [alert])
        if self.settings.alerting.relay_inbound:
            self.state.store.log_alerts(inbound_events(payload), time.time())
        self.audit("inbound", payload.receiver, group=payload.groupKey, matched=[
            f"{rt.rule.name} {alert.labels}" for rt, alert in matched], skipped=skipped)
        return {"matched": len(matched), "skipped": skipped}

    def _targets(self, specs: list[ReplicaSpec]) -> list[ScrapeTarget]:
        targets = [ScrapeTarget("inference", f"127.0.0.1:{sp.port}", {"replica": sp.name}) for sp in specs]
        return [*targets, ScrapeTarget("sentinel", f"127.0.0.1:{self.api_port}", {},
                                       "https" if self.settings.api.tls_cert else "http")]

    def _replicas_changed(self, specs: list[ReplicaSpec]) -> None:
        """After a scale-out or scale-in: scrape, ship logs from, and list the replicas now running."""
        if self.monitoring is not None:
            self.monitoring.update_targets(self._targets(specs))
        if self.logs is not None:
            self.logs.add(specs)
        self.services = self._services()
        self._write_up_file()

    def _runbook_context(self, labels: dict[str, str]) -> Context:
        up = {"prometheus": self.monitoring.url if self.monitoring else None,
              "replicas": self.replicas.runbook_rows() if self.replicas else []}
        return build_context(self.settings, labels, up, self.logs.reader if self.logs else None)

    # -- what runs where -------------------------------------------------------------------------------
    def _services(self) -> list[Service]:
        out = []
        if self.router is not None and (svc := self.router.service()) is not None:
            out.append(svc)  # what clients use: first
        out.append(Service("sentinel-api", self.api_url, None, "webhook in, /api/v1, /metrics"
                           + (f" ({self.api_port_note})" if self.api_port_note else "")))
        if self.replicas is not None:
            out += self.replicas.services()
        if self.monitoring is not None:
            out.append(self.monitoring.service())
        if self.notifications is not None:
            out += self.notifications.services()
        return out

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "startedAt": self.started_at, "api": self.api_url,
            "prometheus": self.monitoring.url if self.monitoring else None,
            "replicas": self._replica_rows(),
            "guardrails": vars(self.healing.guardrails) if self.healing else {},
        }
        if self.router is not None and self.router.url is not None:
            out["router"] = f"{self.router.url}/v1"
        if isinstance(self.replicas, LocalReplicas) and self.replicas.plan is not None:
            out["hostPlan"] = self.replicas.plan.as_dict()
        if self.leadership is not None and (leader := self.leadership.status()) is not None:
            out["leader"] = leader
        return out

    def _replica_rows(self) -> list[dict[str, Any]]:
        """Each replica's status, with its memory (RSS, read from /proc) and the load the router last polled."""
        rows = self.replicas.status() if self.replicas else []
        ups = self.router.router.upstreams if self.router is not None else {}
        for row in rows:
            if row.get("pid"):
                try:
                    row["rssBytes"] = rss_bytes(pid=row["pid"])
                except OSError:  # exited meanwhile
                    pass
            up = ups.get(row["name"])
            if up is not None and up.polled_at:
                row["load"] = {"ready": up.ready, "tokens": up.tokens, "inFlight": up.in_flight}
        return rows

    def on_serving(self) -> None:
        """The API serves: up.json is written and the caller told what runs where."""
        self._write_up_file()
        self.on_ready(self.services)

    def _write_up_file(self) -> None:
        self.services = self._services()  # pids change when a child is restarted
        path = self.state_dir / "up.json"
        tmp = path.with_suffix(".tmp")
        doc = {"pid": os.getpid(), "keeper": self.keeper_pid, "services": [vars(x) for x in self.services],
               **self.status()}
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)

    # -- run and stop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve the API until SIGINT/SIGTERM (uvicorn handles them), then return."""
        api = self.settings.api
        config = server_config(self.app, api.host, self.api_port, api.tls_cert, api.tls_key, api.tls_client_ca,
                               log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[self.api_socket])

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop within ``timeout_s``, however loaded the host: the clock first (no job runs while parts stop),
        the replicas told first that a restart in flight is to end (it is left for the next start to verify,
        as after ``kill -9``), then each started capability in reverse order: the Lease is released, the router
        closes before its replicas stop. Past the deadline every child is killed (SIGKILL). Returns whether
        the stop finished in time."""
        (self.state_dir / "up.json").unlink(missing_ok=True)
        if isinstance(self.replicas, LocalReplicas):
            self.replicas.begin_stop()
        stopper = threading.Thread(target=self._stop_parts, name="stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        in_time = not stopper.is_alive()
        if not in_time:
            killed = self.children.kill_all()
            log.error("stopping took longer than %.0fs: killed %s", timeout_s, ", ".join(killed) or "no child")
        self.children.stop_keeper()
        return in_time

    def _stop_parts(self) -> None:
        self.clock.stop()
        for part in reversed(self.started):
            try:
                part.stop()
            except Exception:  # one part failing to stop must not leave the others running
                log.exception("stopping %s failed", part.name)
        self.started.clear()
