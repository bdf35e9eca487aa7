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
    min_replicas: int = 1              # scale-in never goes below this many replicas
    max_replicas: int = 64             # scale-out never goes beyond this many replicas
    scale_in_stabilization_s: float = 300.0  # scale in only after the alert has fired this long (HPA's default)


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
    replicas: int = 0                  # the deployment's replicas now (scale actions)
    healthy_after_scale_in: int = 0    # healthy replicas left if one were removed now
    firing_since: float = 0.0          # when the alert started firing
    last_scale_action: float | None = None


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
    if req.action == "scale_in":
        why = _scale_in_refused(hist, g, now)
        if why:
            return Decision(False, why)
    if req.action == "scale_out" and hist.replicas >= g.max_replicas:
        # HPA's ScalingLimited: a ceiling is a decision, not a failed action (the alert itself still notifies)
        return Decision(False, f"at replicas.max_count={g.max_replicas} ({hist.replicas} running): "
                               f"a human must add capacity")
    if g.dry_run:
        return Decision(False, f"dry-run: would {req.action} {req.target}")
    return Decision(True, f"{req.action} {req.target}")


def _scale_in_refused(hist: History, g: Guardrails, now: float) -> str | None:
    """Kubernetes' HPA habits: scale in only once the wish has held for the stabilization window and no
    scale action happened within it; never below the floor; never the last healthy replica."""
    if hist.replicas <= g.min_replicas:
        return f"at replicas.min_count={g.min_replicas} ({hist.replicas} running): not scaling in"
    if hist.healthy_after_scale_in < 1:
        return "scaling in would remove the last healthy replica"
    if now - hist.firing_since < g.scale_in_stabilization_s:
        return (f"scale-in waits until the alert has fired for the {g.scale_in_stabilization_s:.0f}s stabilization "
                f"window (firing since {hist.firing_since:.0f})")
    if hist.last_scale_action is not None and now - hist.last_scale_action < g.scale_in_stabilization_s:
        return (f"a scale action ran within the {g.scale_in_stabilization_s:.0f}s stabilization window "
                f"(at {hist.last_scale_action:.0f})")
    return None
