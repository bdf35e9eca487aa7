"""``sentinel up``: wires the capabilities (``sentinel/capabilities/``) together, starts them in order and
stops them in reverse, and serves the API. Each capability owns its own start, stop and jobs; this module
only says which feeds which, and what ``up.json`` and ``/api/v1/status`` list.

Order: state DB → replicas (local children, or a Deployment) → router → Prometheus → log shipping →
self-healing (recovers what a killed run left) → rule evaluation → notifications → leadership; then the
clock starts their jobs, and the API serves. What started is one :class:`Running`; nothing is wired by a
callback assigned after construction: rule evaluation hands firing alerts to healing through the state
database's firing log (``sentinel.alerts.firinglog``), and delivery reads the alert log the same way.
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
from sentinel.runbooks.base import Context
from sentinel.runbooks.context import build_context
from sentinel.runbooks.model import Runbook
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec

__all__ = ["Daemon", "Service", "bundled_model_dir"]
log = logging.getLogger(__name__)
C = TypeVar("C", bound=Capability)


@dataclass(frozen=True)
class Running:
    """The capabilities ``start`` built and started, in start order; the router is absent when disabled or in
    Kubernetes mode, where the cluster's Service routes."""
    replicas: LocalReplicas | ClusterReplicas
    router: RouterEndpoint | None
    monitoring: Monitoring
    logs: LogShipping
    rules: RuleEvaluation
    healing: SelfHealing
    notifications: Notifications
    leadership: Leadership


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
        # the state database opens first and closes last: every part after it audits into it
        self.state = State(s, self.state_dir)
        self.running: Running | None = None  # set once every part has started

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
        store = self._run(self.state).store

        replicas: LocalReplicas | ClusterReplicas
        router = None
        if s.kubernetes.enabled:
            replicas = self._run(ClusterReplicas(s))
        else:
            replicas = local = LocalReplicas(s, self.state_dir, self.children, self._replicas_changed,
                                             self._liveness, self.on_stage)
            self._run(local)
            if s.router.enabled:
                router = self._run(RouterEndpoint(s, self.registry, local.endpoints, local.proxy_token))
        monitoring = self._run(Monitoring(
            s, self.state_dir, self.children, self._targets(replicas.specs), self.metrics, self.audit,
            on_restart=self._write_up_file))
        logs = self._run(LogShipping(s, self.state_dir, self.metrics, replicas.specs, ship=not s.kubernetes.enabled))
        rules = RuleEvaluation(s, store, monitoring.url, logs.rule_source(), self.metrics, self.api_url, self.audit,
                               groups, self._set_books)
        healing = self._run(SelfHealing(s, store, replicas.actuator, self.metrics, books, self._runbook_context,
                                        rules.evaluator.notify_findings, rules.evidence, self.audit, rules.evaluator,
                                        lambda: self.leading))
        self._run(rules)
        self.registry.register(rules.evaluator.learned)
        self.registry.register(rules.evaluator.active)
        self.registry.register(BacklogCollector(store, lambda: logs.shipper))
        notifications = self._run(Notifications(s, store, self.metrics, self.api_url, lambda: self.leading))
        leadership = self._run(Leadership(s, replicas.api if isinstance(replicas, ClusterReplicas) else None,
                                          self.audit))
        self.running = Running(replicas, router, monitoring, logs, rules, healing, notifications, leadership)
        self.clock.start()
        self.app = create_app(rules.evaluator, store, self.registry, self, authenticator(s.api.token, s.api),
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
    def parts(self) -> Running:
        """The started capabilities; what the API and the jobs use (both run only once start has returned)."""
        if self.running is None:
            raise ServiceError("sentinel has not finished starting")
        return self.running

    @property
    def leading(self) -> bool:
        """Whether this sentinel notifies and acts: always, unless a Lease elects another one."""
        return self.running is None or self.running.leadership.leading

    def audit(self, kind: str, subject: str, **detail: Any) -> None:
        self.state.audit(kind, subject, **detail)

    def _liveness(self, now: float, samples: list[Any]) -> None:
        if self.running is not None:  # the replicas' probe runs on the clock, which starts after every part
            self.running.rules.evaluator.push(UNRESPONSIVE_ALERT, now, samples)

    def _set_books(self, books: Mapping[str, Runbook]) -> None:
        self.parts.healing.set_books(books)

    # -- sentinel.api.Controls: what the API asks of the running daemon ---------------------------------
    def guardrails(self) -> Guardrails:
        return self.parts.healing.guardrails

    def set_paused(self, paused: bool) -> None:
        self.parts.healing.set_paused(paused)

    def reload_rules(self) -> list[str]:
        return self.parts.rules.reload()

    def inbound(self, payload: WebhookPayload) -> dict[str, Any]:
        matched, skipped = match(self.parts.rules.evaluator, payload)
        now = time.time()
        for rt, alert in matched:  # to healing, as the rule's own evaluation would hand them over
            if rt.heals:
                self.state.store.log_firing(rt.key, [alert], now)
        if self.settings.alerting.relay_inbound:
            self.state.store.log_alerts(inbound_events(payload), now)
        self.audit("inbound", payload.receiver, group=payload.groupKey, matched=[
            f"{rt.rule.name} {alert.labels}" for rt, alert in matched], skipped=skipped)
        return {"matched": len(matched), "skipped": skipped}

    def _targets(self, specs: list[ReplicaSpec]) -> list[ScrapeTarget]:
        targets = [ScrapeTarget("inference", f"127.0.0.1:{sp.port}", {"replica": sp.name}) for sp in specs]
        return [*targets, ScrapeTarget("sentinel", f"127.0.0.1:{self.api_port}", {},
                                       "https" if self.settings.api.tls_cert else "http")]

    def _replicas_changed(self, specs: list[ReplicaSpec]) -> None:
        """After a scale-out or scale-in (a remediation, so after start): scrape, ship logs from, and list the
        replicas now running."""
        self.parts.monitoring.update_targets(self._targets(specs))
        self.parts.logs.add(specs)
        self.services = self._services()
        self._write_up_file()

    def _runbook_context(self, labels: dict[str, str]) -> Context:
        p = self.parts
        up = {"prometheus": p.monitoring.url, "replicas": p.replicas.runbook_rows()}
        return build_context(self.settings, labels, up, p.logs.reader)

    # -- what runs where -------------------------------------------------------------------------------
    def _services(self) -> list[Service]:
        api = Service("sentinel-api", self.api_url, None, "webhook in, /api/v1, /metrics"
                      + (f" ({self.api_port_note})" if self.api_port_note else ""))
        if self.running is None:
            return [api]
        p = self.running
        router = p.router.service() if p.router is not None else None
        return [*([router] if router is not None else []), api,  # what clients use: first
                *p.replicas.services(), p.monitoring.service(), *p.notifications.services()]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"startedAt": self.started_at, "api": self.api_url, "prometheus": None,
                               "replicas": [], "guardrails": {}}
        if self.running is None:
            return out
        p = self.running
        out.update(prometheus=p.monitoring.url, replicas=self._replica_rows(p), guardrails=vars(p.healing.guardrails))
        if p.router is not None and p.router.url is not None:
            out["router"] = f"{p.router.url}/v1"
        if isinstance(p.replicas, LocalReplicas) and p.replicas.plan is not None:
            out["hostPlan"] = p.replicas.plan.as_dict()
        if (leader := p.leadership.status()) is not None:
            out["leader"] = leader
        return out

    @staticmethod
    def _replica_rows(p: Running) -> list[dict[str, Any]]:
        """Each replica's status, with its memory (RSS, read from /proc) and the load the router last polled."""
        rows = p.replicas.status()
        ups = p.router.router.upstreams if p.router is not None else {}
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
        if self.running is not None and isinstance(self.running.replicas, LocalReplicas):
            self.running.replicas.begin_stop()
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
