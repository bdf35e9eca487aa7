"""The escalation ladder: what to try next for a problem that keeps coming back. Pure: no I/O.

A problem is a rule firing on a target (``CudaError`` on ``replica-0``). Its rungs, in order:

1. ``restart`` — the replica (a pod on Kubernetes): enough for application faults;
2. ``reset_gpu`` — only with a human's approval (``sentinel remediate approve ID``): GSP, uncontained ECC and
   micro-controller faults, or restarts that did not hold;
3. ``cordon`` — keep new work off the node (Kubernetes): a GPU off the bus or failing ECC needs hardware;
4. ``page`` — nothing automatic is left: a human gets the evidence (``SentinelRemediationEscalated``).

Where the ladder starts comes from the evidence: the XID catalogue's action in the runbook's findings
(``restart_app`` → restart, ``reset_gpu`` → reset, ``reboot``/``ecc_workflow``/``inspect_hardware`` →
cordon), and corrupted weights (the integrity manifest does not match) go straight to ``page``: restarting
a replica over bad files is a loop. A rung is climbed when its attempts within ``window_s`` reach its
limit (restart: 2) or an attempt failed its verification. Rungs the actuator cannot take (no cordon for
local processes) are skipped. After ``window_s`` without an attempt the problem starts over.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

RUNGS = ("restart", "reset_gpu", "cordon", "page")
ATTEMPTS = {"restart": 2, "reset_gpu": 1, "cordon": 1}
NEEDS_APPROVAL = frozenset({"reset_gpu"})
XID_RUNG = {"restart_app": "restart", "none": "restart", "reset_gpu": "reset_gpu", "reboot": "cordon",
            "ecc_workflow": "cordon", "inspect_hardware": "cordon"}
INTEGRITY_MARKERS = ("integrity", "manifest", "md5 mismatch", "checksum")


@dataclass
class Ladder:
    rung: str = "restart"
    attempts: int = 0
    last_at: float = 0.0
    why: str = "the first rung"
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Ladder | None:
        if not doc:
            return None
        return cls(str(doc.get("rung", "restart")), int(doc.get("attempts", 0)), float(doc.get("last_at", 0.0)),
                   str(doc.get("why", "")), list(doc.get("history", [])))


def entry(findings: Mapping[str, Any] | None) -> tuple[str, str]:
    """(the rung to start on, why), from a runbook's findings."""
    if not findings:
        return "restart", "no runbook findings yet: the first rung"
    text = repr(findings).lower()
    if "!= manifest" in text or (any(m in text for m in INTEGRITY_MARKERS) and "mismatch" in text):
        return "page", "the model files do not match their integrity manifest: restarting would not help"
    actions = [str(x.get("action")) for r in findings.get("results", []) if isinstance(r, Mapping)
               for x in (r.get("evidence") or {}).get("xid_events", []) if isinstance(x, Mapping)]
    if actions:
        rungs = [XID_RUNG.get(a, "restart") for a in actions]
        worst = max(rungs, key=RUNGS.index)
        return worst, f"XID catalogue: {sorted(set(actions))} → {worst}"
    return "restart", "findings name no XID: the first rung"


def climb(rung: str, available: Collection[str]) -> str:
    """The next rung above ``rung`` the actuator can take (``page`` always can)."""
    for nxt in RUNGS[RUNGS.index(rung) + 1:]:
        if nxt == "page" or nxt in available:
            return nxt
    return "page"


def settle(rung: str, available: Collection[str]) -> str:
    """``rung`` if the actuator can take it, else the next one it can."""
    return rung if rung == "page" or rung in available else climb(rung, available)


def next_step(state: Ladder | None, findings: Mapping[str, Any] | None, available: Collection[str], now: float,
              window_s: float) -> Ladder:
    """The ladder before the next attempt: started (from the evidence), restarted after a quiet window, or
    climbed when the current rung has used its attempts."""
    if state is None or (state.last_at and now - state.last_at > window_s):
        rung, why = entry(findings)
        return Ladder(settle(rung, available), 0, 0.0, why, list(state.history[-20:]) if state else [])
    start, why = entry(findings)
    if RUNGS.index(start) > RUNGS.index(state.rung):  # new evidence says the problem is worse than thought
        return Ladder(settle(start, available), 0, state.last_at, why, state.history)
    if state.rung != "page" and state.attempts >= ATTEMPTS.get(state.rung, 1):
        nxt = climb(state.rung, available)
        return Ladder(nxt, 0, state.last_at,
                      f"{state.attempts} {state.rung} attempt(s) within {window_s:.0f}s did not hold", state.history)
    return state


def after(state: Ladder, action: str, outcome: str, now: float, available: Collection[str],
          failure: str | None = None) -> Ladder:
    """The ladder after an attempt: counted; a failed one climbs at once (corrupted weights: straight to page)."""
    history = [*state.history[-19:], {"at": now, "action": action, "outcome": outcome}]
    if failure is not None and any(m in failure.lower() for m in INTEGRITY_MARKERS):
        return Ladder("page", 0, now, f"{failure}: restarting would not help", history)
    if outcome != "succeeded":
        return Ladder(climb(state.rung, available), 0, now, f"{action} ended {outcome}", history)
    return Ladder(state.rung, state.attempts + 1, now, state.why, history)
