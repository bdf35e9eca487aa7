"""Rule evaluation: the evaluator (PromQL against Prometheus, log rules against the log store), one
scheduled job per group at Prometheus's offsets, refits of learned rules, and hot reload of the rule and
runbook files (a bad file keeps the last good set running)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping

from sentinel.alerts.state import Alert
from sentinel.alerts.store import Store
from sentinel.capabilities import Audit, Clock
from sentinel.capabilities.replicas import liveness_rule
from sentinel.errors import FileFormatError
from sentinel.metrics import SentinelMetrics
from sentinel.prometheus import PromQLSource
from sentinel.remediation.internal import remediation_rules
from sentinel.rules.evaluator import AlertingRuntime, Evaluator
from sentinel.rules.model import LoadedGroup, load_rules, rule_files
from sentinel.rules.remote_write import RemoteWriter
from sentinel.rules.sources import LogRuleSource
from sentinel.runbooks.model import Runbook, check_runbook_references, load_runbooks
from sentinel.settings import Settings

log = logging.getLogger(__name__)
Signature = tuple[tuple[str, int, int], ...]


def file_signature(settings: Settings) -> Signature:
    """(path, mtime, size) of every rule and runbook file: a change means a reload."""
    out = []
    for p in [*rule_files(settings.rules_dir), *sorted(settings.runbooks_dir.glob("*.y*ml"))]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_checked(settings: Settings) -> tuple[list[LoadedGroup], dict[str, Runbook]]:
    """Rules and runbooks, checked against each other; FileFormatError names every problem."""
    groups = load_rules(settings.rules_dir)
    books = load_runbooks(settings.runbooks_dir)
    check_runbook_references(groups, books)
    return groups, books


class RuleEvaluation:
    name = "rules"

    def __init__(self, settings: Settings, store: Store, prometheus_url: str, logs: LogRuleSource,
                 metrics: SentinelMetrics, api_url: str, audit: Audit, groups: list[LoadedGroup],
                 on_books: Callable[[Mapping[str, Runbook]], None]) -> None:
        a = settings.alerting
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.groups = groups
        self.on_books = on_books
        self.evaluator = Evaluator(
            store, PromQLSource(prometheus_url, settings.prometheus.query_timeout), logs,
            a.evaluation_interval, a.resend_delay, api_url, metrics, meta_for=a.meta_for,
            catch_up_max=settings.logs.catch_up_max, writer=RemoteWriter(prometheus_url),
            relay_inbound=a.relay_inbound, internal_rules=[*remediation_rules(store), liveness_rule()])
        self.clock: Clock | None = None
        self._lock = threading.Lock()
        self._signature: Signature = ()

    def evidence(self, rt: AlertingRuntime, a: Alert, since: float) -> bool | None:
        """For a log rule's alert: whether its events are still there counting only those after ``since``
        (the target's current incarnation)."""
        source = self.evaluator.logs
        assert rt.rule.log is not None and source is not None
        return source.evidence_since(rt.rule.log, a.labels, since, time.time())

    def start(self, clock: Clock) -> None:
        self.clock = clock
        self.evaluator.load(self.groups)
        self._signature = file_signature(self.settings)
        self.metrics.reload_ok.set(1)
        self.metrics.reload_time.set(time.time())
        self._sync_jobs()
        clock.every(self.settings.alerting.reload_interval, self.maybe_reload, "reload")
        clock.on_missed(self._missed)

    def stop(self) -> None:
        pass  # its jobs stop with the clock; its state is in the store

    def _missed(self, job_id: str) -> None:
        if job_id.startswith("eval:"):
            group = self.evaluator.groups.get(job_id[5:])
            if group is not None:
                self.metrics.missed.labels(group.name).inc()

    def _sync_jobs(self) -> None:
        """One interval job per group; added, removed or rescheduled to match the loaded rules."""
        assert self.clock is not None
        clock, ev = self.clock, self.evaluator
        want = {f"eval:{k}": ev.interval(g.loaded) for k, g in ev.groups.items() if g.rules}
        learned = {f"refit:{rt.key}": rt for rt in ev.all_runtimes() if rt.rule.sentinel.learned is not None}
        for job_id in [*clock.jobs("eval:"), *clock.jobs("refit:")]:
            if job_id not in want and job_id not in learned:
                clock.cancel(job_id)
        for job_id, rt in learned.items():
            spec = rt.rule.sentinel.learned
            assert spec is not None
            clock.cancel(job_id)  # the rule object may have changed: refit now with the new spec
            clock.every(spec.refit, ev.refit, job_id, now=True, executor="eval", args=[rt])
        running = clock.jobs("eval:")
        for job_id, seconds in want.items():
            if job_id not in running:
                # spread over the interval by a hash of the group, as Prometheus offsets its groups: groups do not
                # all query at once, and a group keeps its slot across restarts
                offset = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) % max(1, int(seconds * 1000)) / 1000
                now = time.time()
                first = now - now % seconds + offset
                if first < now:
                    first += seconds
                clock.every(seconds, ev.eval_group, job_id, executor="eval", first=first, args=[job_id[5:]])
            elif running[job_id] != seconds:
                clock.reschedule(job_id, seconds)

    def maybe_reload(self) -> None:
        if file_signature(self.settings) != self._signature:
            self.reload()

    def reload(self) -> list[str]:
        """Load rules and runbooks again; on any problem keep the last good set. Returns the problems."""
        with self._lock:
            sig = file_signature(self.settings)
            try:
                groups, books = load_checked(self.settings)
            except FileFormatError as exc:
                self._signature = sig  # report a bad file once, not on every poll
                self.metrics.reload_ok.set(0)
                log.error("rules reload failed; the last good rules keep running:\n%s", exc)
                self.audit("reload", "rules", ok=False, problems=exc.problems)
                return exc.problems
            self.evaluator.load(groups)
            self.on_books(books)
            self._sync_jobs()
            self._signature = sig
            self.metrics.reload_ok.set(1)
            self.metrics.reload_time.set(time.time())
            log.warning("rules reloaded: %d groups", len(groups))
            self.audit("reload", "rules", ok=True, groups=len(groups))
            return []
