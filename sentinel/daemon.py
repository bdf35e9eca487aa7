"""Wiring and lifecycle of ``sentinel up``: replicas, Prometheus, log shipping, evaluation,
notification, remediation and the API, started in order and stopped in reverse."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPool
from apscheduler.schedulers.background import BackgroundScheduler
from elasticsearch import Elasticsearch
from prometheus_client import CollectorRegistry

from inference_core.security import RateLimiter, server_config
from sentinel.alerts.delivery import Delivery, ReceiverOptions
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.routing import build as build_route
from sentinel.alerts.routing import default_tree
from sentinel.alerts.state import Alert, Sample
from sentinel.alerts.store import Store
from sentinel.api import authenticator, create_app
from sentinel.errors import FileFormatError, ServiceError
from sentinel.inbound import WebhookPayload, inbound_events, match
from sentinel.kube import api_client
from sentinel.kube import identity as kube_identity
from sentinel.kube.actuator import KubernetesActuator
from sentinel.kube.lease import LeaderElector
from sentinel.logstore.elasticsearch import ElasticsearchLogStore, ElasticsearchSink, LogStoreUnavailable
from sentinel.logstore.local import LocalLogStore
from sentinel.logstore.shipper import LogSource, Shipper, Sink
from sentinel.metrics import BacklogCollector, SentinelMetrics
from sentinel.netutil import free_port, port_in_use
from sentinel.process import ChildRegistry, ChildWatchdog
from sentinel.promserver import PrometheusServer, ScrapeTarget
from sentinel.remediation.policy import Guardrails
from sentinel.remediation.remediator import Actuator, Remediator
from sentinel.router import Router
from sentinel.rules.evaluator import Evaluator, RuleRuntime
from sentinel.rules.model import LoadedGroup, load_rules, rule_files
from sentinel.rules.remote_write import RemoteWriter
from sentinel.rules.sources import LogCounter, LogRuleSource, PromQLSource
from sentinel.runbooks.base import Context
from sentinel.runbooks.context import build_context
from sentinel.runbooks.model import Runbook, check_runbook_references, load_runbooks
from sentinel.runbooks.onalert import AlertRunbooks
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec, Supervisor

log = logging.getLogger(__name__)
AM_RECEIVER = "alertmanager"  # the receiver name of alerting.alertmanager_url


@dataclass
class Service:
    name: str
    url: str
    pid: int | None
    detail: str = ""


def bundled_model_dir(state_dir: Path) -> Path:
    """The bundled model, generated once with a fixed seed (no download), in a child process: the daemon
    itself never loads torch (it would hold some 700 MiB more for its whole life)."""
    d = state_dir / "models" / "deepseek-tiny"
    if not (d / "config.json").exists():
        code = "import sys; from pathlib import Path; from inference_core.weights import make_tiny_checkpoint; " \
               "make_tiny_checkpoint(Path(sys.argv[1]), seed=0)"
        p = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=False)
        if p.returncode != 0 or not (d / "config.json").exists():
            raise ServiceError(f"generating the bundled model in {d} failed: {p.stderr.strip()[-2000:]}")
    return d


@dataclass
class Daemon:
    settings: Settings
    on_ready: Callable[[list[Service]], None] = lambda services: None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        s = self.settings
        self.state_dir = s.state_dir.resolve()
        self.children = ChildRegistry(self.state_dir / "children.json")
        self.metrics = SentinelMetrics(self.registry)
        self.guardrails = Guardrails(s.remediation.dry_run, s.remediation.paused, s.remediation.cooldown,
                                     s.remediation.max_actions_per_hour, s.remediation.max_concurrent,
                                     s.replicas.min_count, s.remediation.scale_in_stabilization)
        self.supervisor: Supervisor | None = None
        self.kube: KubernetesActuator | None = None
        self.elector: LeaderElector | None = None
        self.shipper: Shipper | None = None
        self.router: Router | None = None
        self.router_server: uvicorn.Server | None = None
        self.router_thread: threading.Thread | None = None
        self.router_url: str | None = None
        self.proxy_token: str | None = None
        self._liveness_failures: dict[str, tuple[int, str]] = {}
        self.prometheus: PrometheusServer | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.remediator: Remediator | None = None
        self.runbooks: AlertRunbooks | None = None
        self.dispatcher: Dispatcher | None = None
        self.delivery: Delivery | None = None
        self._reload_lock = threading.Lock()
        self._loaded_signature: tuple[tuple[str, int, int], ...] = ()
        self.store: Store | None = None
        self.logstore: LocalLogStore | None = None
        self.es_sink: ElasticsearchSink | None = None
        self.http: httpx.Client | None = None
        self.api_port = s.api.port or free_port(s.api.host)

    # -- start -----------------------------------------------------------------------------------------
    def start(self) -> list[Service]:
        s = self.settings
        groups = load_rules(s.rules_dir)  # fail before starting anything when rules or runbooks are bad
        books = load_runbooks(s.runbooks_dir)
        check_runbook_references(groups, books)
        (self.state_dir / "up.json").unlink(missing_ok=True)  # left by a sentinel killed with -9
        for leftover in self.children.reap_leftovers():
            log.warning("killed a leftover child of a previous sentinel: %s", leftover)
        if s.kubernetes.enabled:
            return self._start(groups, books, [])
        run_dir = self.state_dir / "run"
        model_dir = (s.replicas.model_dir or bundled_model_dir(self.state_dir)).resolve()
        ports = s.replicas.ports or [free_port() for _ in range(s.replicas.count)]
        if len(ports) != s.replicas.count:
            raise ServiceError(f"replicas.ports lists {len(ports)} ports for {s.replicas.count} replicas")
        for p in ports:
            if port_in_use(p):
                raise ServiceError(f"port {p} is already in use (a stale process?)")
        # without a configured admin token, one for this run (in the replicas' environment only), so sentinel can
        # always drain a replica before restarting it
        admin = s.replicas.admin_token.get_secret_value() if s.replicas.admin_token else secrets.token_urlsafe(24)
        # the router proves itself to the replicas with this (then they take its X-Forwarded-For as the client)
        self.proxy_token = secrets.token_urlsafe(24) if s.router.enabled else None
        limits = ("--rate-limit", f"{s.replicas.rate_limit:g}", "--rate-burst", str(s.replicas.rate_burst))
        specs = [ReplicaSpec(f"replica-{i}", port, model_dir, run_dir / f"replica-{i}" / "logs",
                             enable_faults=s.replicas.enable_faults, admin_token=admin,
                             proxy_token=self.proxy_token,
                             served_model_name=s.replicas.served_model_name,
                             engine_args=(*limits, *s.replicas.engine_args)) for i, port in enumerate(ports)]
        self.supervisor = Supervisor(specs, run_dir, self.children, s.replicas.start_timeout,
                                     max(s.replicas.max_count, s.replicas.count), self._replicas_changed,
                                     [s.diagnostics.nvidia_smi, "--gpu-reset"])
        self.supervisor.start_all()
        if s.router.enabled:
            self._start_router()
        return self._start(groups, books, specs)

    def _start_router(self) -> None:
        """The OpenAI-compatible endpoint in front of the supervised replicas, on its own port and thread."""
        s = self.settings
        sup = self.supervisor
        assert sup is not None
        self.router = Router(lambda: [(r.spec.name, r.spec.url) for r in list(sup.replicas.values())],
                             self.registry, self.proxy_token, s.router.poll_interval, s.router.timeout)
        port = s.router.port or free_port(s.router.host)
        config = uvicorn.Config(self.router.app, host=s.router.host, port=port, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                                proxy_headers=False)  # the client is the peer; the router sets X-Forwarded-For
        server = self.router_server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="router", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServiceError(f"the router did not start on {s.router.host}:{port}")
            time.sleep(0.02)
        self.router_thread = thread
        self.router_url = f"http://{s.router.host}:{port}"

    def _start(self, groups: list[LoadedGroup], books: dict[str, Runbook], specs: list[ReplicaSpec]) -> list[Service]:
        """Everything after the replicas: local ones (``specs``, supervised), or a Deployment's pods."""
        s = self.settings
        actuator: Actuator
        if s.kubernetes.enabled:
            k = s.kubernetes
            api = api_client(k)
            actuator = self.kube = KubernetesActuator(api, k.namespace, k.deployment, s.replicas.min_count,
                                                      s.replicas.max_count)
            self.elector = LeaderElector(api, k.namespace, k.lease_name, kube_identity(k), k.lease_duration,
                                         k.renew_deadline, k.retry_period, on_change=self._leadership_changed)
        else:
            assert self.supervisor is not None
            actuator = self.supervisor

        prom_url = s.prometheus.url
        if prom_url is None:
            self.prometheus = PrometheusServer(self.state_dir / "prometheus", s.prometheus.port or free_port(),
                                               self._targets(specs), s.prometheus.scrape_interval, self.children,
                                               s.prometheus.binary,  # recording rules write back through it:
                                               ["--storage.tsdb.retention.time=2d",
                                                "--web.enable-remote-write-receiver"])
            self.prometheus.start()
            prom_url = self.prometheus.url

        self.store = Store(self.state_dir / "sentinel.db")
        counter: LogCounter
        if s.logs.elasticsearch_url:  # Elasticsearch: shipped there, log rules answered from it
            es = Elasticsearch(s.logs.elasticsearch_url)
            self.es_sink = ElasticsearchSink(es, self.state_dir / "shipper.db")
            sink: Sink = self.es_sink
            counter = ElasticsearchLogStore(es, s.logs.elasticsearch_timeout)
            self.log_reader: Any = counter
        else:
            self.logstore = LocalLogStore(self.state_dir / "logs.db")
            sink = counter = self.logstore
            self.log_reader = self.logstore
        settle = 1.0 if s.logs.elasticsearch_url else 0.0  # Elasticsearch shows new documents within 1 s
        visible: Callable[[], float]
        if s.kubernetes.enabled:  # Filebeat ships, sentinel does not: allow it one shipping interval
            self.shipper = None
            visible = lambda: time.time() - s.logs.ship_interval - settle  # noqa: E731
        else:
            shipper = self.shipper = Shipper(sink, [_log_source(sp) for sp in specs])
            visible = lambda: shipper.visible_until(settle)  # noqa: E731
        self.remediator = Remediator(self.store, actuator, self.guardrails, self.metrics,
                                     verify_timeout_s=s.remediation.verify_timeout,
                                     ladder_window_s=s.remediation.escalation_window,
                                     clear_deadline_s=s.remediation.clear_deadline)
        evaluator = Evaluator(
            self.store, PromQLSource(prom_url, s.prometheus.query_timeout),
            LogRuleSource(counter, visible, slack_s=s.logs.ship_interval + 2.0 + settle),
            s.alerting.evaluation_interval, s.alerting.resend_delay, self.api_url, self.metrics,
            meta_for=s.alerting.meta_for, catch_up_max=s.logs.catch_up_max, writer=RemoteWriter(prom_url),
            relay_inbound=s.alerting.relay_inbound)
        self.runbooks = AlertRunbooks(self.store, books, self._runbook_context, evaluator.notify_findings,
                                      s.diagnostics.max_parallel_runbooks)
        # what a previous run (killed with -9) left unfinished: runbooks run again, actions get an outcome
        for rule, fp, active_at in self.store.interrupted_findings():
            self.store_audit("recovery", f"{rule}/{fp}/{active_at:.3f}", outcome="runbook-rerun",
                             detail="sentinel stopped while this runbook ran; it runs again if the alert fires")
        interrupted = self.remediator.recover()
        if interrupted:
            log.warning("%d remediation(s) were interrupted by the last stop; verifying their targets",
                        len(interrupted))
        evaluator.on_firing = self._on_firing
        log_source = evaluator.logs
        assert log_source is not None

        def evidence(rt: RuleRuntime, a: Alert, since: float) -> bool | None:
            assert rt.rule.log is not None
            return log_source.evidence_since(rt.rule.log, a.labels, since, time.time())

        self.remediator.evidence = evidence
        self.registry.register(evaluator.learned)
        self.registry.register(evaluator.active)
        self.registry.register(BacklogCollector(self.store, lambda: self.shipper))
        evaluator.load(groups)
        self.evaluator = evaluator
        self._loaded_signature = self._signature()
        self.metrics.reload_ok.set(1)
        self.metrics.reload_time.set(time.time())
        self.http = httpx.Client(timeout=10.0)
        signing = {r.name: (r.signing_key_id, r.signing_key.get_secret_value().encode())
                   for r in s.alerting.receivers if r.signing_key is not None}
        urls = {r.name: r.url for r in s.alerting.receivers}
        if s.alerting.alertmanager_url:
            urls[AM_RECEIVER] = s.alerting.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        dispatcher = Dispatcher(self.store, self.http, signing=signing, give_up_after_s=s.alerting.notification_max_age,
                                on_result=lambda rcv, outcome: self.metrics.notifications.labels(rcv, outcome).inc(),
                                urls=urls)
        route = build_route(s.alerting.route or default_tree([r.name for r in s.alerting.receivers]))
        self.delivery = Delivery(self.store, route, {r.name: ReceiverOptions(r.send_resolved, r.max_alerts)
                                                     for r in s.alerting.receivers},
                                 [AM_RECEIVER] if s.alerting.alertmanager_url else [], self.api_url,
                                 s.alerting.inhibit_rules, on_groups=self.metrics.alert_groups.set)
        self._schedule(evaluator, self.shipper, dispatcher, s)
        if self.elector is not None:
            self.elector.start()

        self.app = create_app(evaluator, self.store, self.registry, self.status, lambda: self.guardrails,
                              self._set_paused, s.api.token, self._ready, self.reload_rules, self._inbound,
                              auth=authenticator(s.api.token, s.api),
                              limiter=RateLimiter(s.api.rate_limit, s.api.rate_burst) if s.api.rate_limit else None,
                              protect_reads=s.api.protect_reads)
        if self.supervisor is not None:
            self.services = [Service(sp.name, sp.url, pid) for sp, pid in
                             ((r.spec, r.pid) for r in self.supervisor.replicas.values())]
        else:
            k = s.kubernetes
            self.services = [Service(f"deployment:{k.deployment}", f"{k.api_url or 'in-cluster'}", None,
                                     f"namespace {k.namespace}; leader election on lease {k.lease_name}")]
        self.services[0:0] = [Service("sentinel-api", self.api_url, None, "webhook in, /api/v1, /metrics")]
        if self.router_url is not None:  # what clients use: first
            self.services.insert(0, Service("router", f"{self.router_url}/v1", None,
                                            "OpenAI-compatible endpoint: least-loaded ready replica, retried once"))
        self.services.append(Service("prometheus", prom_url, self.prometheus.proc.pid if self.prometheus and
                                     self.prometheus.proc else None, "started" if self.prometheus else "external"))
        for rcv in s.alerting.receivers:
            self.services.append(Service(f"receiver:{rcv.name}", rcv.url, None, "alert webhook (v4)"))
        if s.alerting.alertmanager_url:
            self.services.append(Service("alertmanager", s.alerting.alertmanager_url, None, "alerts pushed (external)"))
        return self.services

    def _schedule(self, evaluator: Evaluator, shipper: Shipper | None, dispatcher: Dispatcher, s: Settings) -> None:
        sched = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5},
            executors={"default": APThreadPool(4),
                       "eval": APThreadPool(s.alerting.max_concurrent_evaluations)})  # bounded query concurrency
        self.scheduler = sched

        store_up = [True]

        def ship() -> None:
            assert shipper is not None
            try:
                self.metrics.log_events.inc(shipper.run_once())
            except LogStoreUnavailable as exc:  # the offsets stay; the next run catches up
                if store_up[0]:  # said once per outage
                    log.warning("log store unavailable, shipping paused: %s", exc)
                store_up[0] = False
                self.metrics.log_store_up.set(0)
                return
            if not store_up[0]:
                log.info("log store reachable again, shipping resumed")
            store_up[0] = True
            self.metrics.log_store_up.set(1)

        if shipper is not None:
            sched.add_job(ship, "interval", seconds=s.logs.ship_interval, id="ship", next_run_time=_now_dt())
        self._sync_eval_jobs()
        delivery = self.delivery
        assert delivery is not None

        def notify() -> None:
            if not self.leading:  # a follower notifies no one: the leader does
                return
            try:
                delivery.tick()
            except Exception:  # logged; the alerts handed over wait in the store for the next round
                log.exception("delivery round failed")
            dispatcher.run_once(wait=False)

        sched.add_job(notify, "interval", seconds=1.0, id="notify")
        self.dispatcher = dispatcher
        sched.add_job(self._maybe_reload, "interval", seconds=s.alerting.reload_interval, id="reload")
        if self.supervisor is not None:  # in a cluster the kubelet's liveness probe does this
            sched.add_job(self._probe_liveness, "interval", seconds=s.replicas.liveness_interval, id="liveness")
        if self.prometheus is not None:  # a child sentinel started is kept running, as a supervisor would
            prometheus = self.prometheus

            def child_event(outcome: str, detail: dict[str, Any]) -> None:
                self.metrics.child_restarts.labels("prometheus", outcome).inc()
                self.store_audit("supervise", "prometheus", outcome=outcome, **detail)
                if outcome == "restarted":
                    self.services = [dataclasses.replace(x, pid=prometheus.proc.pid if prometheus.proc else None)
                                     if x.name == "prometheus" else x for x in self.services]
                    self._write_up_file()

            watchdog = ChildWatchdog("prometheus", lambda: prometheus.proc, prometheus.start, child_event)
            sched.add_job(watchdog.check, "interval", seconds=2.0, id="watch-prometheus")
        store = self.store
        assert store is not None

        def prune_state() -> None:
            n = store.prune(time.time(), s.alerting.retention, s.alerting.audit_retention)
            if any(n.values()):
                log.info("pruned past retention: %s", ", ".join(f"{v} {k}" for k, v in n.items() if v))

        sched.add_job(prune_state, "interval", hours=1, id="prune-state", next_run_time=_now_dt())
        if self.logstore is not None:  # Elasticsearch's retention is the cluster's business (ILM, curator)
            logstore = self.logstore
            sched.add_job(lambda: logstore.prune(time.time() - s.logs.retention), "interval", minutes=10,
                          id="prune")

        def missed(ev: JobExecutionEvent) -> None:
            if ev.job_id.startswith("eval:"):
                rts = evaluator.runtimes.get(ev.job_id[5:])
                if rts:
                    self.metrics.missed.labels(rts[0].group.group.name).inc()

        sched.add_listener(missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        sched.start()

    def _sync_eval_jobs(self) -> None:
        """One interval job per group; added, removed or rescheduled to match the loaded rules."""
        sched, ev = self.scheduler, self.evaluator
        assert sched is not None
        want = {f"eval:{k}": ev.interval(rts[0].group) for k, rts in ev.runtimes.items() if rts}
        learned = {f"refit:{rt.key}": rt for rt in ev.all_runtimes() if rt.rule.sentinel.learned is not None}
        for job in sched.get_jobs():
            if (job.id.startswith("eval:") and job.id not in want) or (job.id.startswith("refit:")
                                                                       and job.id not in learned):
                job.remove()
        for job_id, rt in learned.items():
            spec = rt.rule.sentinel.learned
            assert spec is not None
            if sched.get_job(job_id) is not None:
                sched.remove_job(job_id)  # the rule object changed: refit now with the new spec
            sched.add_job(ev.refit, "interval", args=[rt], id=job_id, seconds=spec.refit, executor="eval",
                          next_run_time=_now_dt())
        for job_id, seconds in want.items():
            job = sched.get_job(job_id)
            if job is None:
                # spread over the interval by a hash of the group, as Prometheus offsets its groups: groups do not
                # all query at once, and a group keeps its slot across restarts
                offset = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) % max(1, int(seconds * 1000)) / 1000
                now = time.time()
                first = now - now % seconds + offset
                if first < now:
                    first += seconds
                sched.add_job(ev.eval_group, "interval", args=[job_id[5:]], id=job_id, seconds=seconds,
                              executor="eval", next_run_time=datetime.fromtimestamp(first, UTC))
            elif job.trigger.interval.total_seconds() != seconds:
                job.reschedule("interval", seconds=seconds)

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        s = self.settings
        files = [*rule_files(s.rules_dir), *sorted(s.runbooks_dir.glob("*.y*ml"))]
        out = []
        for p in files:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _maybe_reload(self) -> None:
        if self._signature() != self._loaded_signature:
            self.reload_rules()

    def reload_rules(self) -> list[str]:
        """Load rules and runbooks again; on any problem keep the last good set. Returns the problems."""
        s = self.settings
        with self._reload_lock:
            sig = self._signature()
            try:
                groups = load_rules(s.rules_dir)
                books = load_runbooks(s.runbooks_dir)
                check_runbook_references(groups, books)
            except FileFormatError as exc:
                self._loaded_signature = sig  # report a bad file once, not on every poll
                self.metrics.reload_ok.set(0)
                log.error("rules reload failed; the last good rules keep running:\n%s", exc)
                self.store_audit("reload", "rules", ok=False, problems=exc.problems)
                return exc.problems
            self.evaluator.load(groups)
            if self.runbooks is not None:
                self.runbooks.books = books
            self._sync_eval_jobs()
            self._loaded_signature = sig
            self.metrics.reload_ok.set(1)
            self.metrics.reload_time.set(time.time())
            log.warning("rules reloaded: %d groups", len(groups))
            self.store_audit("reload", "rules", ok=True, groups=len(groups))
            return []

    def store_audit(self, kind: str, subject: str, **detail: Any) -> None:
        if self.store is not None:
            self.store.audit(time.time(), kind, subject, **detail)

    def _inbound(self, payload: WebhookPayload) -> dict[str, Any]:
        matched, skipped = match(self.evaluator, payload)
        for rt, alert in matched:
            self._on_firing(rt, [alert])
        if self.settings.alerting.relay_inbound and self.store is not None:
            self.store.log_alerts(inbound_events(payload), time.time())
        self.store_audit("inbound", payload.receiver, group=payload.groupKey, matched=[
            f"{rt.rule.name} {alert.labels}" for rt, alert in matched], skipped=skipped)
        return {"matched": len(matched), "skipped": skipped}

    def _targets(self, specs: list[ReplicaSpec]) -> list[ScrapeTarget]:
        targets = [ScrapeTarget("inference", f"127.0.0.1:{sp.port}", {"replica": sp.name}) for sp in specs]
        return [*targets, ScrapeTarget("sentinel", f"127.0.0.1:{self.api_port}", {},
                                       "https" if self.settings.api.tls_cert else "http")]

    def _replicas_changed(self, specs: list[ReplicaSpec]) -> None:
        """After a scale-out: scrape, ship logs from, and list the new replica."""
        if self.prometheus is not None:
            self.prometheus.update_targets(self._targets(specs))
        assert self.shipper is not None  # local replicas are shipped by sentinel
        known = {src.name for src in self.shipper.sources}
        self.shipper.sources.extend(_log_source(sp) for sp in specs if sp.name not in known)
        sup = self.supervisor
        assert sup is not None
        self.services = [x for x in self.services if not x.name.startswith("replica-")]
        at = next(i for i, x in enumerate(self.services) if x.name == "sentinel-api") + 1
        self.services[at:at] = [Service(r.spec.name, r.spec.url, r.pid) for r in sup.replicas.values()]
        self._write_up_file()

    def _probe_liveness(self) -> None:
        """Each local replica's /health: an exited process or an engine that stopped making progress (the
        engine's own liveness: work waiting and no step for --stall-timeout; not the HTTP thread) counts as a
        failed probe; ``liveness_failures`` in a row fire InferenceReplicaUnresponsive, whose remedy is a
        restart. A CUDA error is left to the CudaError rule (its evidence, its page); a replica being restarted
        or still loading is not probed."""
        sup = self.supervisor
        if sup is None:
            return
        failures = self._liveness_failures
        samples = []
        for r in list(sup.replicas.values()):
            name = r.spec.name
            if r.busy():
                failures.pop(name, None)
                continue
            problem = None
            if not r.alive():
                problem = "has exited"
            else:
                try:
                    resp = httpx.get(f"{r.spec.url}/health", timeout=2.0)
                    doc = resp.json() if resp.status_code == 503 else {}
                    if doc.get("stalled"):
                        problem = "is not making progress (engine stalled)"
                except (httpx.HTTPError, ValueError):
                    problem = "does not answer /health"
            if problem is None:
                failures.pop(name, None)
                continue
            n, _ = failures.get(name, (0, problem))
            failures[name] = (n + 1, problem)
            if n + 1 >= self.settings.replicas.liveness_failures:
                samples.append(Sample({"replica": name, "problem": problem}, float(n + 1)))
        self.evaluator.eval_liveness(time.time(), samples)

    @property
    def leading(self) -> bool:
        """Whether this sentinel notifies and acts: always, unless a Lease elects another one."""
        return self.elector is None or self.elector.leading

    def _leadership_changed(self, leading: bool) -> None:
        self.store_audit("leadership", self.settings.kubernetes.lease_name, leading=leading,
                         identity=self.elector.identity if self.elector else None)

    def _on_firing(self, rt: RuleRuntime, alerts: list[Alert]) -> None:
        """Evidence first (the runbook), then the remedy; both run off the evaluation thread, on the leader."""
        if not self.leading:
            return
        if self.runbooks is not None:
            self.runbooks.on_firing(rt, alerts)
        if self.settings.remediation.enabled and self.remediator is not None:
            self.remediator.on_firing(rt, alerts)

    def _runbook_context(self, labels: dict[str, str]) -> Context:
        up = {"prometheus": next((x.url for x in self.services if x.name == "prometheus"), None),
              "replicas": [{"name": r.spec.name, "url": r.spec.url, "logFile": str(r.spec.log_dir / "inference.log")}
                           for r in (self.supervisor.replicas.values() if self.supervisor else [])]}
        return build_context(self.settings, labels, up, self.log_reader)

    @property
    def api_url(self) -> str:
        scheme = "https" if self.settings.api.tls_cert else "http"
        return f"{scheme}://{self.settings.api.host}:{self.api_port}"

    def _set_paused(self, paused: bool) -> None:
        self.guardrails = dataclasses.replace(self.guardrails, paused=paused)
        if self.remediator is not None:
            self.remediator.guardrails = self.guardrails
        if self.store is not None:
            self.store.audit(time.time(), "control", "remediation", paused=paused)

    def status(self) -> dict[str, Any]:
        reps = self.supervisor.replicas.values() if self.supervisor else []
        out: dict[str, Any] = {
            "startedAt": self.started_at, "api": self.api_url,
            "prometheus": next((x.url for x in self.services if x.name == "prometheus"), None),
            "replicas": [{"name": r.spec.name, "url": r.spec.url, "pid": r.pid, "restarts": r.restarts,
                          "healthy": r.healthy(), "logFile": str(r.spec.log_dir / "inference.log")} for r in reps],
            "guardrails": vars(self.guardrails),
        }
        if self.router_url is not None:
            out["router"] = f"{self.router_url}/v1"
        if self.kube is not None:
            out["replicas"] = [{"name": name} for name in sorted(self.kube.targets())]
        if self.elector is not None:
            out["leader"] = {"identity": self.elector.identity, "leading": self.elector.leading,
                             "holder": self.elector.holder, "lease": self.settings.kubernetes.lease_name,
                             "lastError": self.elector.last_error}
        return out

    # -- run and stop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve the API until SIGINT/SIGTERM (uvicorn handles them), then return."""
        api = self.settings.api
        config = server_config(self.app, api.host, self.api_port, api.tls_cert, api.tls_key, api.tls_client_ca,
                               log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10)
        uvicorn.Server(config).run()

    def _ready(self) -> None:
        self._write_up_file()
        self.on_ready(self.services)

    def _write_up_file(self) -> None:
        path = self.state_dir / "up.json"
        tmp = path.with_suffix(".tmp")
        doc = {"pid": os.getpid(), "services": [vars(x) for x in self.services], **self.status()}
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)

    def stop(self) -> None:
        (self.state_dir / "up.json").unlink(missing_ok=True)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.elector is not None:
            self.elector.stop()  # releases the lease: a follower takes over at once
        if self.runbooks is not None:
            self.runbooks.shutdown()
        if self.remediator is not None:
            self.remediator.shutdown()
        if self.router_server is not None:  # first: no new requests reach replicas that are stopping
            self.router_server.should_exit = True
            if self.router_thread is not None:
                self.router_thread.join(timeout=15)
        if self.supervisor is not None:
            self.supervisor.stop_all()
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.http is not None:
            self.http.close()
        for db in (self.store, self.logstore, self.es_sink):
            if db is not None:
                db.close()


def _log_source(spec: ReplicaSpec) -> LogSource:
    return LogSource(spec.name, spec.log_dir / "inference.log", {"replica": spec.name})


def _now_dt() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()
