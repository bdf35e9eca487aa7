"""The notification outbox: rendered notifications per receiver, delivered at least once with retries,
superseded by later ones of the same receiver, ended as sent, failed or expired."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sentinel.state.db import Database

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


class Outbox(Database):
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
