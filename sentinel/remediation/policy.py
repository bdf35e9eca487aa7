"""The remediation policy: pure guardrails deciding whether an alert may trigger an action.

No I/O: the shell gathers the history from the store and acts on the decision.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Guardrails:
    dry_run: bool = False
    paused: bool = False
    cooldown_s: float = 300.0          # per target, between two actions
    max_actions_per_hour: int = 6      # global
    max_concurrent: int = 1            # global actions in flight


@dataclass(frozen=True)
class ActionRequest:
    rule: str
    action: str
    target: str | None
    fingerprint: str
    incident: str                      # rule + fingerprint + activeAt: one per firing episode
    firing: bool


@dataclass(frozen=True)
class History:
    known_targets: frozenset[str]
    incident_handled: bool             # an action was already taken for this incident
    last_action_on_target: float | None
    actions_last_hour: int
    in_flight: int


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str


def decide(req: ActionRequest, hist: History, g: Guardrails, now: float) -> Decision:
    """Whether to run ``req.action`` now, and why (or why not)."""
    if not req.firing:
        return Decision(False, "alert is not firing (never act on pending or resolved alerts)")
    if req.target is None:
        return Decision(False, "alert has no replica label: no target to act on")
    if req.target not in hist.known_targets:
        return Decision(False, f"unknown target {req.target!r}")
    if hist.incident_handled:
        return Decision(False, "incident already remediated once; waiting for it to resolve")
    if g.paused:
        return Decision(False, "remediation is paused")
    if hist.in_flight >= g.max_concurrent:
        return Decision(False, f"{hist.in_flight} action(s) in flight (max_concurrent={g.max_concurrent})")
    if hist.last_action_on_target is not None and now - hist.last_action_on_target < g.cooldown_s:
        left = g.cooldown_s - (now - hist.last_action_on_target)
        return Decision(False, f"target {req.target} in cooldown for another {left:.0f}s")
    if hist.actions_last_hour >= g.max_actions_per_hour:
        return Decision(False, f"rate limit: {hist.actions_last_hour} actions in the last hour "
                               f"(max_actions_per_hour={g.max_actions_per_hour})")
    if g.dry_run:
        return Decision(False, f"dry-run: would {req.action} {req.target}")
    return Decision(True, f"{req.action} {req.target}")
