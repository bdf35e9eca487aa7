"""The firing log: the bus between rule evaluation and self-healing.

Delivery reads ``alert_log`` by cursor: the stream Prometheus sends an Alertmanager, edge-triggered (a row
per state change, and a resend every ``resend_delay``). Healing is level-triggered instead: the remediator
judges every firing alert at every evaluation (the ladder's next rung after a failed action, an approval
answered, a cooldown that ended), and it needs what the stream does not carry: the episode's ``active_at``
(the incident key) and the sample value. So evaluation appends, for each rule with a runbook or a remedy,
the alerts firing after each evaluation here, in the transaction that saves the rule's state; healing reads
them by its own cursor (``healing:cursor``), in order, and deletes what it has read. Nothing calls healing:
the evaluator only writes, and a slow runbook or remediation decision never holds an evaluation up.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from sentinel.alerts.state import Alert, State
from sentinel.state.db import Database

TABLE = "firing_log"
CURSOR_KEY = "healing:cursor"


@dataclass(frozen=True)
class Firing:
    """One rule's alert, firing at ``at`` (one row of the log)."""
    id: int
    at: float
    rule: str  # the rule's key (``AlertingRuntime.key``)
    alert: Alert


def _row(a: Alert) -> str:
    return json.dumps({"labels": a.labels, "annotations": a.annotations, "value": a.value, "state": a.state.value,
                       "active_at": a.active_at, "fired_at": a.fired_at}, separators=(",", ":"))


def _alert(doc: str) -> Alert:
    d = json.loads(doc)
    return Alert(dict(d["labels"]), dict(d["annotations"]), float(d["value"]), State(d["state"]),
                 float(d["active_at"]), float(d.get("fired_at") or 0.0))


class FiringLog(Database):
    @staticmethod
    def _log_firing(db: sqlite3.Connection, rule: str, alerts: Iterable[Alert], now: float) -> int:
        return db.executemany(f"INSERT INTO {TABLE} (rule, alert, created_at) VALUES (?, ?, ?)",
                              [(rule, _row(a), now) for a in alerts]).rowcount

    def log_firing(self, rule: str, alerts: Iterable[Alert], now: float) -> None:
        """Hand firing alerts to healing outside an evaluation (those that arrived on the inbound webhook)."""
        with self.tx() as db:
            n = self._log_firing(db, rule, alerts, now)
        if n:
            self.bell(TABLE).set()

    def firing_after(self, after: int, limit: int = 1000) -> list[Firing]:
        """The log's rows after ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT id, created_at, rule, alert FROM {TABLE} WHERE id > ? ORDER BY id "
                                    "LIMIT ?", (after, limit)).fetchall()
        return [Firing(int(i), float(t), str(r), _alert(a)) for i, t, r, a in rows]

    def firing_cursor(self) -> int:
        """Healing's cursor: the last row it consumed (0 before the first)."""
        return int(self.get(CURSOR_KEY) or 0)

    def firing_head(self) -> int:
        """The newest row's id (0 when the log is empty)."""
        with self._lock:
            row = self._db.execute(f"SELECT MAX(id) FROM {TABLE}").fetchone()
        return int(row[0] or 0)

    def consume_firing(self, cursor: int) -> int:
        """Healing has read up to ``cursor``: saved, and the rows up to it deleted, in one transaction. Returns
        how many rows went."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (CURSOR_KEY, json.dumps(cursor)))
            return int(db.execute(f"DELETE FROM {TABLE} WHERE id <= ?", (cursor,)).rowcount)
