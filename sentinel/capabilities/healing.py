"""What sentinel does about a firing alert: the rule's runbook first (the evidence, attached to the
alert), then its remedy through the remediator (guardrails, escalation ladder, verification). At start
it resolves what a previous run left unfinished (killed with -9)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

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


class SelfHealing:
    name = "remediation"

    def __init__(self, settings: Settings, store: Store, actuator: Actuator, metrics: SentinelMetrics,
                 books: Mapping[str, Runbook], context: Callable[[dict[str, str]], Context],
                 on_findings: Callable[[AlertingRuntime, Alert, dict[str, Any]], None],
                 evidence: Callable[[AlertingRuntime, Alert, float], bool | None], audit: Audit) -> None:
        r = settings.remediation
        self.settings = settings
        self.store = store
        self.audit = audit
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
        self.runbooks.shutdown()
        self.remediator.shutdown()
