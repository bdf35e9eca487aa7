"""The state database (alerts, outbox, remediations, audit): opened first, closed last, pruned hourly."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sentinel.alerts.store import Store
from sentinel.capabilities import Clock
from sentinel.settings import Settings

log = logging.getLogger(__name__)


class State:
    name = "state"

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.path = state_dir / "sentinel.db"
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        assert self._store is not None, "state used before it started"
        return self._store

    def start(self, clock: Clock) -> None:
        self._store = Store(self.path)
        clock.every(3600, self.prune, "prune-state", now=True)

    def prune(self) -> None:
        a = self.settings.alerting
        n = self.store.prune(time.time(), a.retention, a.audit_retention)
        if any(n.values()):
            log.info("pruned past retention: %s", ", ".join(f"{v} {k}" for k, v in n.items() if v))

    def audit(self, kind: str, subject: str, **detail: object) -> None:
        if self._store is not None:
            self._store.audit(time.time(), kind, subject, **detail)

    def stop(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
