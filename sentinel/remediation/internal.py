"""The remediation ladder's own alerts: an escalation whose automatic remediation is exhausted (a human is
needed), and actions waiting for a human's approval. Their samples come from the ladder and approval
records the remediator keeps in the store."""

from __future__ import annotations

from sentinel.alerts.internal import InternalRule
from sentinel.alerts.state import Sample
from sentinel.state.remediation import Remediations

ESCALATED_ALERT = "SentinelRemediationEscalated"
APPROVAL_ALERT = "SentinelRemediationAwaitingApproval"
ESCALATION_FRESH_S = 120.0  # a ladder at "page" seen by a firing alert this recently is a live escalation
APPROVAL_FRESH_S = 86400.0  # an approval request older than a day no longer pages


def escalations(store: Remediations, now: float) -> list[Sample]:
    """Ladders at their last rung ("page"), seen by a firing alert within ESCALATION_FRESH_S."""
    out = []
    for (rule, target), doc in store.ladders().items():
        if doc.get("rung") == "page" and now - float(doc.get("last_at", 0)) < ESCALATION_FRESH_S:
            out.append(Sample({"rule": rule, "replica": target, "reason": str(doc.get("why", ""))[:200]},
                              float(len(doc.get("history", [])))))
    return out


def awaiting_approval(store: Remediations, now: float) -> list[Sample]:
    """Pending approval requests younger than APPROVAL_FRESH_S."""
    return [Sample({"approval": str(doc.get("id")), "action": str(doc.get("action")),
                    "replica": str(doc.get("target")), "rule": str(doc.get("rule"))}, 1.0)
            for doc in store.approvals()
            if doc.get("status") == "pending" and now - float(doc.get("requested_at", 0)) < APPROVAL_FRESH_S]


def remediation_rules(store: Remediations) -> list[InternalRule]:
    """The ladder's last rung, and actions waiting for a human (sentinel/remediation/ladder.py)."""
    return [
        InternalRule("sentinel-escalation-internal", {
            "alert": ESCALATED_ALERT, "labels": {"severity": "page"},
            "annotations": {"summary": "{{ $labels.rule }} on {{ $labels.replica }}: automatic remediation is "
                            "exhausted, a human is needed: {{ $labels.reason }}",
                            "description": "`sentinel remediate log` shows the attempts; the problem's own alert "
                            "carries the runbook's findings"}}, lambda now: escalations(store, now)),
        InternalRule("sentinel-approval-internal", {
            "alert": APPROVAL_ALERT, "labels": {"severity": "page"},
            "annotations": {"summary": "{{ $labels.action }} on {{ $labels.replica }} ({{ $labels.rule }}) waits for "
                            "approval: sentinel remediate approve {{ $labels.approval }} (or reject)"}},
                     lambda now: awaiting_approval(store, now)),
    ]
