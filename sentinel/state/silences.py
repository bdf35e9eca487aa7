"""Silences, as Alertmanager's: matchers, a time range, who and why."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sentinel.state.db import Database


class Silences(Database):
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
