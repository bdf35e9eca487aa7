"""What sentinel does about a firing alert: the rule's runbook first (the evidence, attached to the
alert), then its remedy through the remediator (guardrails, escalation ladder, verification). At start
it resolves what a previous run left unfinished (killed with -9).

Healing is the second reader of the state database's logs (delivery reads ``alert_log``): a thread of its
own reads the firing log (``sentinel.alerts.firinglog``) by its cursor, woken by the log's bell, and acts
on each row in order, as the leader (a follower consumes the rows and acts on none). Rows a previous run
left are skipped: their rules fire again at their next evaluation, with the state of now, and acting on an
old row could act on a problem that has since gone."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sentinel.alerts.firinglog import TABLE as FIRING_LOG
from sentinel.alerts.firinglog import Firing
from sentinel.alerts.state import Alert
from sentinel.alerts.store import Store
from sentinel.capabilities import Audit, Clock
from sentinel.metrics import SentinelMetrics
from sentinel.remediation.policy import Guardrails
from sentinel.remediation.remediator import Actuator, Remediator
from sentinel.rules.evaluator import AlertingRuntime
from sentinel.runbooks.base import Context
from sentinel.runbooks.model import Runbook
from sentinel.runbooks.onalert import AlertRunbooks
from sentinel.settings import Settings

log = logging.getLogger(__name__)


class RuleIndex(Protocol):
    """Where healing finds the rule of a firing log row (the evaluator)."""

    def alerting_rules(self) -> Mapping[str, AlertingRuntime]: ...


class SelfHealing:
    name = "remediation"

    def __init__(self, settings: Settings, store: Store, actuator: Actuator, metrics: SentinelMetrics,
                 books: Mapping[str, Runbook], context: Callable[[dict[str, str]], Context],
                 on_findings: Callable[[AlertingRuntime, Alert, dict[str, Any]], None],
                 evidence: Callable[[AlertingRuntime, Alert, float], bool | None], audit: Audit,
                 rules: RuleIndex, leading: Callable[[], bool] = lambda: True) -> None:
        r = settings.remediation
        self.settings = settings
        self.store = store
        self.audit = audit
        self.rules = rules
        self.leading = leading
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.guardrails = Guardrails(r.dry_run, r.paused, r.cooldown, r.max_actions_per_hour, r.max_concurrent,
                                     settings.replicas.min_count,
                                     max(settings.replicas.max_count, settings.replicas.count),
                                     r.scale_in_stabilization)
        self.remediator = Remediator(store, actuator, self.guardrails, metrics, verify_timeout_s=r.verify_timeout,
                                     ladder_window_s=r.escalation_window, clear_deadline_s=r.clear_deadline,
                                     evidence=evidence)
        self.runbooks = AlertRunbooks(store, books, context, on_findings, settings.diagnostics.max_parallel_runbooks)

    def start(self, clock: Clock) -> None:
        # what a previous run (killed with -9) left unfinished: runbooks run again, actions get an outcome
        for rule, fp, active_at in self.store.interrupted_findings():
            self.audit("recovery", f"{rule}/{fp}/{active_at:.3f}", outcome="runbook-rerun",
                       detail="sentinel stopped while this runbook ran; it runs again if the alert fires")
        interrupted = self.remediator.recover()
        if interrupted:
            log.warning("%d remediation(s) were interrupted by the last stop; verifying their targets",
                        len(interrupted))
        head = self.store.firing_head()
        if head > self.store.firing_cursor():
            skipped = self.store.consume_firing(head)  # counted by the delete, not read and parsed
            self.audit("recovery", "firing-log", outcome="skipped", rows=skipped,
                       detail="firing alerts handed over before this start; their rules fire again if still true")
        self._stop.clear()
        self._reader = threading.Thread(target=self._read, name="healing", daemon=True)
        self._reader.start()

    # -- the firing log's reader -----------------------------------------------------------------------
    def _read(self) -> None:
        bell = self.store.bell(FIRING_LOG)
        while not self._stop.is_set():
            bell.wait(1.0)  # the timeout is a safety net: a write always rings
            bell.clear()
            try:
                while not self._stop.is_set() and self.drain():
                    pass
            except Exception:  # the log could not be read or consumed (the database): tried again on the next ring
                log.exception("healing could not read the firing log")

    def drain(self, limit: int = 1000) -> int:
        """Act on the firing log's next rows (up to ``limit``), in order, then consume them; the number read."""
        rows = self.store.firing_after(self.store.firing_cursor(), limit)
        if not rows:
            return 0
        if self.leading():  # a follower evaluates, the leader acts
            rules = self.rules.alerting_rules()
            for rt, alerts in _batches(rows, rules):
                try:
                    self.on_firing(rt, alerts)
                except Exception:  # this batch's failure alone, and consumed: firing is a level, so the rule's
                    # next evaluation hands the alert over again; a row that always fails cannot pile the log up
                    log.exception("healing failed to act on %s %s", rt.rule.name, [a.labels for a in alerts])
        self.store.consume_firing(rows[-1].id)
        return len(rows)

    def set_books(self, books: Mapping[str, Runbook]) -> None:
        self.runbooks.books = books

    def on_firing(self, rt: AlertingRuntime, alerts: list[Alert]) -> None:
        """Evidence first (the runbook), then the remedy; both off the evaluation thread."""
        self.runbooks.on_firing(rt, alerts)
        if self.settings.remediation.enabled:
            self.remediator.on_firing(rt, alerts)

    def set_paused(self, paused: bool) -> None:
        self.guardrails = dataclasses.replace(self.guardrails, paused=paused)
        self.remediator.guardrails = self.guardrails
        self.audit("control", "remediation", paused=paused)

    def stop(self) -> None:
        self._stop.set()
        self.store.bell(FIRING_LOG).set()
        if self._reader is not None:
            self._reader.join(10.0)
            self._reader = None
        self.runbooks.shutdown()
        self.remediator.shutdown()


def _batches(rows: list[Firing], rules: Mapping[str, AlertingRuntime]) -> list[tuple[AlertingRuntime, list[Alert]]]:
    """The rows as (rule, alerts) batches in log order, one per evaluation (a rule's rows written together).
    Firing is a level: when the reader fell behind, only the newest row of each alert is acted on. A row
    whose rule a reload removed is dropped."""
    newest = {(row.rule, row.alert.fingerprint): row.id for row in rows}
    out: list[tuple[AlertingRuntime, list[Alert]]] = []
    last: tuple[str, float] | None = None
    for row in rows:
        if newest[(row.rule, row.alert.fingerprint)] != row.id:
            continue
        rt = rules.get(row.rule)
        if rt is None:
            log.info("firing log: rule %s is no longer loaded; its alert %s is dropped", row.rule, row.alert.labels)
            continue
        if out and last == (row.rule, row.at):
            out[-1][1].append(row.alert)
        else:
            out.append((rt, [row.alert]))
        last = (row.rule, row.at)
    return out
