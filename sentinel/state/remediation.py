"""Remediation records (one action per incident; what a killed sentinel left unfinished) and approvals
(actions a human must allow first)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sentinel.state.db import Database


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


class Remediations(Database):
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

    def remediations(self, since: float = 0.0) -> list[Remediation]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM remediations WHERE started_at >= ? ORDER BY started_at",
                                    (since,)).fetchall()
        return [Remediation(*r) for r in rows]

    def ladder(self, rule: str, target: str) -> dict[str, Any] | None:
        """The escalation ladder of one problem (a rule on a target), as ``remediation.ladder.Ladder`` saves it."""
        with self._lock:
            row = self._db.execute("SELECT ladder FROM ladders WHERE rule = ? AND target = ?", (rule, target)
                                   ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def save_ladder(self, rule: str, target: str, doc: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO ladders VALUES (?, ?, ?)", (rule, target, json.dumps(doc)))

    def ladders(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every ladder by (rule, target)."""
        with self._lock:
            rows = self._db.execute("SELECT rule, target, ladder FROM ladders ORDER BY rule, target").fetchall()
        return {(r, t): dict(json.loads(doc)) for r, t, doc in rows}

    def approvals(self) -> list[dict[str, Any]]:
        """Every approval request, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT doc FROM approvals ORDER BY requested_at DESC, id").fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def request_approval(self, approval_id: str, doc: dict[str, Any], now: float) -> dict[str, Any]:
        """The approval ``approval_id``, created pending (and audited) when it does not exist yet."""
        with self.tx() as db:
            row = db.execute("SELECT doc FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is not None:
                return dict(json.loads(row[0]))
            doc = {**doc, "id": approval_id, "status": "pending", "requested_at": now}
            db.execute("INSERT INTO approvals VALUES (?, 'pending', ?, ?)", (approval_id, now, json.dumps(doc)))
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, "approval", doc.get("incident", approval_id), json.dumps({**doc})))
        return doc

    def decide_approval(self, approval_id: str, approve: bool, by: str, now: float) -> dict[str, Any] | None:
        """A human's answer to a pending approval; None when there is no such approval. A decided one stays
        as it was (approvals are answered once)."""
        with self.tx() as db:
            row = db.execute("SELECT doc FROM approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                return None
            doc = dict(json.loads(row[0]))
            if doc.get("status") != "pending":
                return doc
            doc.update(status="approved" if approve else "rejected", decided_by=by, decided_at=now)
            db.execute("UPDATE approvals SET status = ?, doc = ? WHERE id = ?", (doc["status"], json.dumps(doc),
                                                                              approval_id))
            db.execute("INSERT INTO audit (ts, kind, subject, detail) VALUES (?, ?, ?, ?)",
                       (now, "approval", doc.get("incident", approval_id), json.dumps(doc)))
        return doc
