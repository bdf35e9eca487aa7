"""sentinel's state database: one SQLite file in WAL mode, shared by every area's store (alert state and
the delivery pipeline in ``sentinel.alerts.store``; the outbox, remediation records and approvals, the audit
log and silences here). The ``Database`` owns the connection, the schema and its migrations, transactions,
retention, and a small key/value table for checkpoints.

Everything here survives ``kill -9``: each evaluation's state and the notifications it produced are
written in one transaction, so a crash can repeat a notification (at-least-once) but never lose one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  rule TEXT NOT NULL, fingerprint TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
  value REAL NOT NULL, state TEXT NOT NULL, active_at REAL NOT NULL, fired_at REAL NOT NULL,
  resolved_at REAL NOT NULL, last_sent_at REAL NOT NULL, valid_until REAL NOT NULL,
  keep_firing_since REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 1, notified_at REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (rule, fingerprint));
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, receiver TEXT NOT NULL,
  url TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending', last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS remediations (
  incident TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, rule TEXT NOT NULL, action TEXT NOT NULL,
  target TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, outcome TEXT);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
  detail TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_append_only_u BEFORE UPDATE ON audit
  BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_retained BEFORE DELETE ON audit
  WHEN old.ts >= COALESCE((SELECT CAST(value AS REAL) FROM kv WHERE key = 'audit:pruned_before'), 0)
  BEGIN SELECT RAISE(ABORT, 'audit log is append-only (only rows past its retention are pruned)'); END;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silences (
  id TEXT PRIMARY KEY, matchers TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL NOT NULL,
  created_by TEXT NOT NULL, comment TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS alert_log (
  id INTEGER PRIMARY KEY AUTOINCREMENT, alert TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS agg_groups (
  id TEXT PRIMARY KEY, route TEXT NOT NULL, labels TEXT NOT NULL, created_at REAL NOT NULL,
  next_flush REAL NOT NULL, flushed INTEGER NOT NULL, alerts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nflog (
  group_id TEXT NOT NULL, receiver TEXT NOT NULL, firing TEXT NOT NULL, resolved TEXT NOT NULL,
  sent_at REAL NOT NULL, PRIMARY KEY (group_id, receiver));
CREATE TABLE IF NOT EXISTS findings (
  rule TEXT NOT NULL, fingerprint TEXT NOT NULL, active_at REAL NOT NULL, created_at REAL NOT NULL,
  status TEXT NOT NULL, report TEXT NOT NULL, PRIMARY KEY (rule, fingerprint, active_at));
CREATE TABLE IF NOT EXISTS ladders (
  rule TEXT NOT NULL, target TEXT NOT NULL, ladder TEXT NOT NULL, PRIMARY KEY (rule, target));
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY, status TEXT NOT NULL, requested_at REAL NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS firing_log (
  id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, alert TEXT NOT NULL, created_at REAL NOT NULL);
"""


class Database:
    """One SQLite database in WAL mode; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("DROP TRIGGER IF EXISTS audit_append_only_d")  # before retention existed: no deletes
        self._db.executescript(SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(alerts)")}
        if "hits" not in cols:  # a state file from before consecutive_samples existed
            self._db.execute("ALTER TABLE alerts ADD COLUMN hits INTEGER NOT NULL DEFAULT 1")
        if "notified_at" not in cols:  # ... and from before realert
            self._db.execute("ALTER TABLE alerts ADD COLUMN notified_at REAL NOT NULL DEFAULT 0")
        self._migrate_kv_tables()
        self._lock = threading.RLock()
        self._bells: dict[str, threading.Event] = {}

    def bell(self, table: str) -> threading.Event:
        """Set when rows are appended to ``table`` (a log read by cursor): its reader waits on it instead of
        polling, and clears it before it reads."""
        with self._lock:
            return self._bells.setdefault(table, threading.Event())

    def _migrate_kv_tables(self) -> None:
        """Ladders and approvals were kv entries (``ladder:{rule}/{target}``, ``approval:{id}``) before they had
        tables: a state file from then is moved over in one transaction."""
        rows = self._db.execute("SELECT key, value FROM kv WHERE key LIKE 'ladder:%' OR key LIKE 'approval:%'"
                                ).fetchall()
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        for key, value in rows:
            if key.startswith("ladder:"):
                rule, _, target = key.removeprefix("ladder:").rpartition("/")
                self._db.execute("INSERT OR IGNORE INTO ladders VALUES (?, ?, ?)", (rule, target, value))
            else:
                doc = json.loads(value)
                self._db.execute("INSERT OR IGNORE INTO approvals VALUES (?, ?, ?, ?)",
                                 (key.removeprefix("approval:"), str(doc.get("status", "pending")),
                                  float(doc.get("requested_at", 0)), value))
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        self._db.execute("COMMIT")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- retention -------------------------------------------------------------------------------------
    def prune(self, now: float, retention_s: float, audit_retention_s: float) -> dict[str, int]:
        """Delete what is older than its retention: delivered or failed notifications, runbook findings,
        remediation records that finished, resolved alerts of rules that no longer load (by
        ``retention_s``), and audit rows (by ``audit_retention_s``, usually longer; the trigger lets only
        those go). Pending notifications and firing alerts are never pruned."""
        cut, audit_cut = now - retention_s, now - audit_retention_s  # 'expired' rows go like 'failed' ones
        with self.tx() as db:
            out = {
                "notifications": db.execute("DELETE FROM outbox WHERE status != 'pending' AND created_at < ?",
                                            (cut,)).rowcount,
                "findings": db.execute("DELETE FROM findings WHERE created_at < ?", (cut,)).rowcount,
                "remediations": db.execute("DELETE FROM remediations WHERE finished_at IS NOT NULL AND "
                                           "finished_at < ?", (cut,)).rowcount,
                "alerts": db.execute("DELETE FROM alerts WHERE state = 'inactive' AND resolved_at > 0 AND "
                                     "resolved_at < ?", (cut,)).rowcount,
            }
            db.execute("INSERT OR REPLACE INTO kv VALUES ('audit:pruned_before', ?)", (json.dumps(audit_cut),))
            out["audit"] = db.execute("DELETE FROM audit WHERE ts < ?", (audit_cut,)).rowcount
        return out

    # -- small key/value (checkpoints) ---------------------------------------------------------------
    def get(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def items(self, prefix: str) -> dict[str, Any]:
        """Every kv entry whose key starts with ``prefix``."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM kv WHERE key LIKE ? ESCAPE '\\'", (like,)).fetchall()
        return {k: json.loads(v) for k, v in rows}
