"""The alert-state store (rules' alerts, the alerts handed to delivery, delivery's groups and notification
log, runbook findings) and ``Store``, the one handle on sentinel's state database that composes it with the
other areas' stores (``sentinel.state``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.firinglog import TABLE as FIRING_LOG
from sentinel.alerts.firinglog import FiringLog
from sentinel.alerts.state import Alert, State
from sentinel.state.audit import AuditLog
from sentinel.state.db import Database
from sentinel.state.outbox import Outbox, OutboxEntry
from sentinel.state.remediation import Remediations
from sentinel.state.silences import Silences

_ALERT_COLS = ("labels", "annotations", "value", "state", "active_at", "fired_at", "resolved_at",
               "last_sent_at", "valid_until", "keep_firing_since", "hits", "notified_at")


class AlertTables(Database):
    def save_rule_state(self, rule: str, alerts: Iterable[Alert], events: Iterable[AlertEvent], now: float,
                        kv: dict[str, Any] | None = None, firing: Iterable[Alert] = ()) -> None:
        """Replace ``rule``'s alerts and hand ``events`` (the alerts to notify of) to delivery atomically,
        with ``kv`` entries (e.g. an aggregation buffer) and the ``firing`` alerts handed to healing
        (``sentinel.alerts.firinglog``) in the same transaction."""
        with self.tx() as db:
            rang = FiringLog._log_firing(db, rule, firing, now)
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in (kv or {}).items()])
            db.execute("DELETE FROM alerts WHERE rule = ?", (rule,))
            db.executemany(
                f"INSERT INTO alerts (rule, fingerprint, {', '.join(_ALERT_COLS)}) "
                f"VALUES (?, ?{', ?' * len(_ALERT_COLS)})",
                [(rule, a.fingerprint, json.dumps(a.labels), json.dumps(a.annotations), a.value, a.state.value,
                  a.active_at, a.fired_at, a.resolved_at, a.last_sent_at, a.valid_until, a.keep_firing_since, a.hits,
                  a.notified_at) for a in alerts])
            self._log_alerts(db, events, now)
        if rang:
            self.bell(FIRING_LOG).set()

    def forget_rule(self, rule: str, events: Iterable[AlertEvent] = ()) -> None:
        """A rule removed by a reload: its alerts and its keys go; its last notifications are handed over."""
        now = time.time()
        with self.tx() as db:
            db.execute("DELETE FROM alerts WHERE rule = ?", (rule,))
            db.executemany("DELETE FROM kv WHERE key = ?", [(f"{p}:{rule}",) for p in ("held", "last_ok")])
            self._log_alerts(db, events, now)

    # -- delivery: alerts handed over, aggregation groups, the notification log ------------------------
    @staticmethod
    def _log_alerts(db: sqlite3.Connection, events: Iterable[AlertEvent], now: float) -> None:
        db.executemany("INSERT INTO alert_log (alert, created_at) VALUES (?, ?)",
                       [(json.dumps(e.to_json(), separators=(",", ":")), now) for e in events])

    def log_alerts(self, events: Iterable[AlertEvent], now: float) -> None:
        """Hand alerts to delivery (e.g. those that arrived on the inbound webhook)."""
        with self.tx() as db:
            self._log_alerts(db, events, now)

    def alert_log_after(self, after: int, limit: int = 5000) -> list[tuple[int, float, AlertEvent]]:
        """Alerts handed over and not yet consumed by delivery: (id, when, alert)."""
        with self._lock:
            rows = self._db.execute("SELECT id, created_at, alert FROM alert_log WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, limit)).fetchall()
        return [(int(i), float(t), AlertEvent.from_json(json.loads(a))) for i, t, a in rows]

    def delivery_state(self) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
        """The aggregation groups (with their alerts) and the notification log, as last saved."""
        with self._lock:
            groups = [{"id": r[0], "route": r[1], "labels": json.loads(r[2]), "created_at": r[3], "next_flush": r[4],
                       "flushed": bool(r[5]), "alerts": json.loads(r[6])} for r in self._db.execute(
                "SELECT id, route, labels, created_at, next_flush, flushed, alerts FROM agg_groups")]
            nflog = {(r[0], r[1]): {"firing": json.loads(r[2]), "resolved": json.loads(r[3]), "sent_at": r[4]}
                     for r in self._db.execute("SELECT group_id, receiver, firing, resolved, sent_at FROM nflog")}
        return groups, nflog

    def save_delivery(self, cursor: int, groups: Iterable[dict[str, Any]], gone: Iterable[str],
                      nflog: Iterable[tuple[str, str, list[str], list[str], float]], outbox: Iterable[OutboxEntry],
                      now: float) -> None:
        """One delivery round in one transaction: the alerts consumed up to ``cursor``, the groups that
        changed (or are ``gone``), notification-log entries and the notifications queued."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES ('delivery:cursor', ?)", (json.dumps(cursor),))
            db.execute("DELETE FROM alert_log WHERE id <= ?", (cursor,))
            db.executemany("INSERT OR REPLACE INTO agg_groups VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(g["id"], g["route"], json.dumps(g["labels"]), g["created_at"], g["next_flush"],
                             int(g["flushed"]), json.dumps(g["alerts"], separators=(",", ":"))) for g in groups])
            gone = list(gone)
            db.executemany("DELETE FROM agg_groups WHERE id = ?", [(g,) for g in gone])
            db.executemany("DELETE FROM nflog WHERE group_id = ?", [(g,) for g in gone])
            db.executemany("INSERT OR REPLACE INTO nflog VALUES (?, ?, ?, ?, ?)",
                           [(g, r, json.dumps(f), json.dumps(res), t) for g, r, f, res, t in nflog])
            db.executemany(
                "INSERT OR IGNORE INTO outbox (key, receiver, url, payload, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(key, rcv, url, json.dumps(payload), now, now) for key, rcv, url, payload in outbox])

    def load_rule_state(self, rule: str) -> list[Alert]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_ALERT_COLS)} FROM alerts WHERE rule = ?", (rule,)).fetchall()
        return [Alert(json.loads(r[0]), json.loads(r[1]), r[2], State(r[3]), *r[4:]) for r in rows]

    def all_alerts(self) -> list[tuple[str, Alert]]:
        with self._lock:
            rows = self._db.execute(f"SELECT rule, {', '.join(_ALERT_COLS)} FROM alerts ORDER BY rule").fetchall()
        return [(r[0], Alert(json.loads(r[1]), json.loads(r[2]), r[3], State(r[4]), *r[5:])) for r in rows]

    def find_alert(self, fingerprint: str) -> tuple[str, Alert] | None:
        """The stored alert with this fingerprint (the newest episode when several rules share it)."""
        with self._lock:
            row = self._db.execute(f"SELECT rule, {', '.join(_ALERT_COLS)} FROM alerts WHERE fingerprint = ? "
                                   "ORDER BY active_at DESC LIMIT 1", (fingerprint,)).fetchone()
        if row is None:
            return None
        return row[0], Alert(json.loads(row[1]), json.loads(row[2]), row[3], State(row[4]), *row[5:])

    # -- runbook findings, kept with the alert episode they explain -----------------------------------
    def claim_findings(self, rule: str, fingerprint: str, active_at: float, now: float) -> bool:
        """Reserve the episode's runbook run; False when it already ran (or runs): once per episode."""
        with self.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO findings VALUES (?, ?, ?, ?, 'running', '{}')",
                             (rule, fingerprint, active_at, now))
            return cur.rowcount == 1

    def save_findings(self, rule: str, fingerprint: str, active_at: float, status: str,
                      report: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("UPDATE findings SET status = ?, report = ? "
                       "WHERE rule = ? AND fingerprint = ? AND active_at = ?",
                       (status, json.dumps(report, default=str), rule, fingerprint, active_at))

    def findings(self, rule: str, fingerprint: str, active_at: float) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT status, report FROM findings WHERE rule = ? AND fingerprint = ? AND "
                                   "active_at = ?", (rule, fingerprint, active_at)).fetchone()
        if row is None or row[0] == "running":
            return None
        return dict(json.loads(row[1]))

    def interrupted_findings(self) -> list[tuple[str, str, float]]:
        """Runbook runs that never finished (sentinel stopped while they ran): forgotten, so the episode's next
        evaluation runs its runbook again. Returns (rule, fingerprint, active_at) of each."""
        with self.tx() as db:
            rows = db.execute("SELECT rule, fingerprint, active_at FROM findings WHERE status = 'running'").fetchall()
            db.execute("DELETE FROM findings WHERE status = 'running'")
        return [(r[0], r[1], float(r[2])) for r in rows]


class Store(AlertTables, FiringLog, Outbox, Remediations, AuditLog, Silences):
    """sentinel's state: one database, every area's store (each a class of its own over ``Database``)."""
