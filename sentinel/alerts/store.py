"""SQLite (WAL) store: alert state, the notification outbox, remediation records, the audit log.

Everything here survives ``kill -9``: each evaluation's state and the notifications it produced are
written in one transaction, so a crash can repeat a notification (at-least-once) but never lose one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.state import Alert, State

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
"""

_ALERT_COLS = ("labels", "annotations", "value", "state", "active_at", "fired_at", "resolved_at",
               "last_sent_at", "valid_until", "keep_firing_since", "hits", "notified_at")


# (idempotency key, receiver name, url, JSON payload); url "" means the receiver's URL at send time
OutboxEntry = tuple[str, str, str, Any]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    key: str
    receiver: str
    url: str
    payload: Any
    attempts: int
    created_at: float


@dataclass(frozen=True)
class Remediation:
    incident: str
    fingerprint: str
    rule: str
    action: str
    target: str
    started_at: float
    finished_at: float | None
    outcome: str | None


class Store:
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
        self._lock = threading.RLock()

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

    # -- alert state -------------------------------------------------------------------------------
    def save_rule_state(self, rule: str, alerts: Iterable[Alert], events: Iterable[AlertEvent], now: float,
                        kv: dict[str, Any] | None = None) -> None:
        """Replace ``rule``'s alerts and hand ``events`` (the alerts to notify of) to delivery atomically,
        with ``kv`` entries (e.g. an aggregation buffer) in the same transaction."""
        with self.tx() as db:
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

    # -- outbox ------------------------------------------------------------------------------------
    def enqueue(self, outbox: Iterable[OutboxEntry], now: float) -> None:
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO outbox (key, receiver, url, payload, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(key, rcv, url, json.dumps(payload), now, now) for key, rcv, url, payload in outbox])

    def due(self, now: float, limit: int = 50) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, receiver, url, payload, attempts, created_at FROM outbox "
                "WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?", (now, limit)).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]

    def pending_receivers(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT DISTINCT receiver FROM outbox WHERE status = 'pending' ORDER BY receiver").fetchall()]

    def queue(self, receiver: str, limit: int = 200) -> list[tuple[OutboxItem, float]]:
        """A receiver's pending notifications in the order they were queued, with when each may be tried."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, receiver, url, payload, attempts, created_at, next_attempt_at FROM outbox "
                "WHERE status = 'pending' AND receiver = ? ORDER BY id LIMIT ?", (receiver, limit)).fetchall()
        return [(OutboxItem(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]), r[7]) for r in rows]

    def supersede(self, item_id: int, payload: Any | None) -> None:
        """Drop alerts a later notification of the same receiver replaces: the item keeps the rest
        (``payload``), or, with nothing left (None), ends as 'superseded'."""
        with self.tx() as db:
            if payload is None:
                db.execute("UPDATE outbox SET status = 'superseded' WHERE id = ?", (item_id,))
            else:
                db.execute("UPDATE outbox SET payload = ? WHERE id = ?", (json.dumps(payload), item_id))

    def mark_sent(self, item_id: int, now: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE outbox SET status = 'sent', attempts = attempts + 1, next_attempt_at = ?, "
                       "last_error = NULL WHERE id = ?", (now, item_id))

    def mark_retry(self, item_id: int, next_at: float, error: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                       (next_at, error, item_id))

    def mark_failed(self, item_id: int, error: str, now: float | None = None, status: str = "failed") -> None:
        """Final: refused by the receiver ('failed') or past its maximum age ('expired'); ``now`` is kept as
        the time it ended (in next_attempt_at), for SentinelNotificationUndeliverable."""
        with self.tx() as db:
            db.execute("UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?, "
                       "next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?", (status, error, now, item_id))

    def undelivered(self, since: float) -> dict[str, tuple[int, str]]:
        """Per receiver: notifications that ended undelivered since ``since``, and the last error."""
        with self._lock:
            rows = self._db.execute(
                "SELECT receiver, COUNT(*), MAX(id) FROM outbox WHERE status IN ('failed', 'expired') AND "
                "next_attempt_at >= ? GROUP BY receiver", (since,)).fetchall()
            out = {}
            for rcv, n, last_id in rows:
                err = self._db.execute("SELECT last_error FROM outbox WHERE id = ?", (last_id,)).fetchone()[0]
                out[rcv] = (int(n), str(err or ""))
        return out

    def receiver_status(self) -> dict[str, dict[str, Any]]:
        """Per receiver: notifications by status, the oldest still pending, and its last error."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for rcv, status, n, oldest in self._db.execute(
                    "SELECT receiver, status, COUNT(*), MIN(created_at) FROM outbox GROUP BY receiver, status"):
                entry = out.setdefault(rcv, {"counts": {}, "oldest_pending": None, "last_error": None})
                entry["counts"][status] = n
                if status == "pending":
                    entry["oldest_pending"] = oldest
            for rcv, err in self._db.execute(
                    "SELECT receiver, last_error FROM outbox WHERE last_error IS NOT NULL AND id IN "
                    "(SELECT MAX(id) FROM outbox WHERE last_error IS NOT NULL GROUP BY receiver)"):
                out.setdefault(rcv, {"counts": {}, "oldest_pending": None, "last_error": None})["last_error"] = err
        return out

    def pending_by_receiver(self) -> dict[str, tuple[int, float]]:
        """Per receiver: notifications waiting to be delivered, and when the oldest was queued."""
        with self._lock:
            rows = self._db.execute("SELECT receiver, COUNT(*), MIN(created_at) FROM outbox WHERE status = 'pending' "
                                    "GROUP BY receiver").fetchall()
        return {r[0]: (int(r[1]), float(r[2])) for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())

    # -- remediation records -----------------------------------------------------------------------
    def start_remediation(self, r: Remediation) -> bool:
        """Record an action; False when the incident already has one (one remediation per incident)."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO remediations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (r.incident, r.fingerprint, r.rule, r.action, r.target, r.started_at, r.finished_at, r.outcome))
            return cur.rowcount == 1

    def finish_remediation(self, incident: str, now: float, outcome: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE remediations SET finished_at = ?, outcome = ? WHERE incident = ?",
                       (now, outcome, incident))

    def unfinished_remediations(self) -> list[Remediation]:
        """Actions started and never finished: sentinel stopped (``kill -9``) while they ran."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM remediations WHERE finished_at IS NULL ORDER BY started_at"
                                    ).fetchall()
        return [Remediation(*r) for r in rows]

    def in_flight_remediations(self) -> int:
        """Actions started and not finished: the concurrency cap counts these, so it holds across restarts (an
        action a killed sentinel left behind counts until the next run has verified or aborted it)."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM remediations WHERE finished_at IS NULL").fetchone()
        return int(n)

    def abort_remediation(self, incident: str, now: float) -> None:
        """An interrupted action that did not leave its target healthy: kept (it counts towards the hourly
        limit) under another key, so the incident can be remediated again once its rule still says so."""
        with self.tx() as db:
            db.execute("UPDATE remediations SET incident = ?, finished_at = ?, outcome = 'aborted' WHERE incident = ?",
                       (f"{incident}#aborted@{now:.3f}", now, incident))

    def interrupted_findings(self) -> list[tuple[str, str, float]]:
        """Runbook runs that never finished (sentinel stopped while they ran): forgotten, so the episode's next
        evaluation runs its runbook again. Returns (rule, fingerprint, active_at) of each."""
        with self.tx() as db:
            rows = db.execute("SELECT rule, fingerprint, active_at FROM findings WHERE status = 'running'").fetchall()
            db.execute("DELETE FROM findings WHERE status = 'running'")
        return [(r[0], r[1], float(r[2])) for r in rows]

    def remediations(self, since: float = 0.0) -> list[Remediation]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM remediations WHERE started_at >= ? ORDER BY started_at",
                                    (since,)).fetchall()
        return [Remediation(*r) for r in rows]

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, now: float, kind: str, subject: str, **detail: Any) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, kind, subject, json.dumps(detail, default=str)))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, kind, subject, detail FROM audit ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"ts": r[0], "kind": r[1], "subject": r[2], **json.loads(r[3])} for r in rows]

    # -- silences ------------------------------------------------------------------------------------
    def add_silence(self, matchers: list[str], starts_at: float, ends_at: float, created_by: str, comment: str,
                    now: float) -> str:
        sid = uuid.uuid4().hex
        with self.tx() as db:
            db.execute("INSERT INTO silences VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (sid, json.dumps(matchers), starts_at, ends_at, created_by, comment, now))
        return sid

    def silences(self, now: float | None = None) -> list[dict[str, Any]]:
        """All silences (or, with ``now``, those active then), newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, matchers, starts_at, ends_at, created_by, comment, created_at "
                                    "FROM silences ORDER BY created_at DESC").fetchall()
        out = [{"id": r[0], "matchers": json.loads(r[1]), "startsAt": r[2], "endsAt": r[3], "createdBy": r[4],
                "comment": r[5], "createdAt": r[6]} for r in rows]
        return out if now is None else [x for x in out if x["startsAt"] <= now < x["endsAt"]]

    def expire_silence(self, sid: str, now: float) -> bool:
        with self.tx() as db:
            return db.execute("UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?",
                              (now, sid, now)).rowcount == 1

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
        """Every kv entry whose key starts with ``prefix`` (ladders, approvals)."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM kv WHERE key LIKE ? ESCAPE '\\'", (like,)).fetchall()
        return {k: json.loads(v) for k, v in rows}

    # -- approvals (actions a human must allow first) ------------------------------------------------
    def request_approval(self, approval_id: str, doc: dict[str, Any], now: float) -> dict[str, Any]:
        """The approval ``approval_id``, created pending (and audited) when it does not exist yet."""
        key = f"approval:{approval_id}"
        with self.tx() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return dict(json.loads(row[0]))
            doc = {**doc, "id": approval_id, "status": "pending", "requested_at": now}
            db.execute("INSERT INTO kv VALUES (?, ?)", (key, json.dumps(doc)))
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, "approval", doc.get("incident", approval_id), json.dumps({**doc})))
        return doc

    def decide_approval(self, approval_id: str, approve: bool, by: str, now: float) -> dict[str, Any] | None:
        """A human's answer to a pending approval; None when there is no such approval. A decided one stays
        as it was (approvals are answered once)."""
        key = f"approval:{approval_id}"
        with self.tx() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            doc = dict(json.loads(row[0]))
            if doc.get("status") != "pending":
                return doc
            doc.update(status="approved" if approve else "rejected", decided_by=by, decided_at=now)
            db.execute("UPDATE kv SET value = ? WHERE key = ?", (json.dumps(doc), key))
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, "approval", doc.get("incident", approval_id), json.dumps(doc)))
        return doc
