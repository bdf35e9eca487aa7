"""The audit log: append-only (a trigger refuses updates, and deletes of rows within retention)."""

from __future__ import annotations

import json
from typing import Any

from sentinel.state.db import Database


class AuditLog(Database):
    def audit(self, now: float, kind: str, subject: str, **detail: Any) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, kind, subject, json.dumps(detail, default=str)))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, kind, subject, detail FROM audit ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"ts": r[0], "kind": r[1], "subject": r[2], **json.loads(r[3])} for r in rows]
