"""Runs a rule's runbook once per alert episode when it fires; the findings are kept with the alert
and sent with its notifications."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sentinel.alerts.state import Alert
from sentinel.alerts.store import AlertTables
from sentinel.rules.evaluator import AlertingRuntime
from sentinel.runbooks.base import Context
from sentinel.runbooks.model import Runbook
from sentinel.runbooks.runner import Report, run

log = logging.getLogger(__name__)


def summary(report: Report, runbook: str) -> dict[str, Any]:
    """What travels in a notification: statuses, summaries and remedies (the evidence stays in the store)."""
    return {"runbook": runbook, "status": report.status.value, "seconds": round(report.seconds, 2),
            "results": [{"step": r.step, "status": r.finding.status.value, "summary": r.finding.summary,
                         "remedy": r.finding.remedy} for r in report.results]}


class AlertRunbooks:
    def __init__(self, store: AlertTables, books: Mapping[str, Runbook], context: Callable[[dict[str, str]], Context],
                 on_done: Callable[[AlertingRuntime, Alert, dict[str, Any]], None], max_parallel: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.books = books
        self.context = context
        self.on_done = on_done
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="runbook")

    def on_firing(self, rt: AlertingRuntime, alerts: list[Alert]) -> None:
        name = rt.rule.sentinel.runbook
        if name is None:
            return
        for a in alerts:
            if self.store.claim_findings(rt.key, a.fingerprint, a.active_at, self.clock()):
                self._pool.submit(self._run, rt, a, name)

    def _run(self, rt: AlertingRuntime, a: Alert, name: str) -> None:
        try:
            report = run([self.books[name]], self.context(dict(a.labels)), f"{rt.rule.name}: {name}")
            data = {**summary(report, name), "report": report.to_dict()}
            self.store.save_findings(rt.key, a.fingerprint, a.active_at, report.status.value, data)
            log.warning("runbook %s for %s %s: %s", name, rt.rule.name, a.labels, report.status.value)
            self.on_done(rt, a, summary(report, name))
        except Exception:  # a broken runbook must not take the daemon down; it is logged loudly
            log.exception("runbook %s for %s failed to run", name, rt.rule.name)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
