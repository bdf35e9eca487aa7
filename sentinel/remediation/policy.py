"""The remediation policy: pure guardrails deciding whether an alert may trigger an action.

No I/O: the shell gathers the history from the store and acts on the decision.

Guardrails are keyed by what they protect. A *repair* (restart, GPU reset, cordon) mends one broken
replica; a *capacity* action (scale out, scale in) changes the service as a whole, and its target is the
service, not the replica whose alert asked for it. Cooldowns are per (kind, target); each kind has its own
concurrency slots and hourly count, so a scale action never refuses or delays a repair: repairs go first.
A scale-out needs room on the host (or cluster) for one more replica's plan, else it is refused as a
decision ("host full"), the way Kubernetes leaves a pod Pending rather than evicting its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE = frozenset({"scale_out", "scale_in"})


def kind_of(action: str) -> str:
    """'capacity' for the scale actions, 'repair' for everything that mends one replica."""
    return "capacity" if action in SCALE else "repair"


@dataclass(frozen=True)
class Guardrails:
    dry_run: bool = False
    paused: bool = False
    cooldown_s: float = 300.0          # per (kind, target), between two actions
    max_actions_per_hour: int = 6      # repairs count repairs; capacity actions count every action
    max_concurrent: int = 1            # repairs in flight (capacity actions: one at a time, in their own slot)
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
    last_action_on_target: float | None  # the last action of the same kind on the same target
    actions_last_hour: int             # of the same kind (a repair), or of every kind (a capacity action)
    in_flight: int                     # actions of the same kind in flight
    replicas: int = 0                  # the deployment's replicas now (scale actions)
    healthy_after_scale_in: int = 0    # healthy replicas left if one were removed now
    firing_since: float = 0.0          # when the alert started firing
    last_scale_action: float | None = None
    no_room: str | None = None         # why the host (cluster) cannot hold one more replica now (scale-out)


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str


def decide(req: ActionRequest, hist: History, g: Guardrails, now: float) -> Decision:
    """Whether to run ``req.action`` now, and why (or why not)."""
    if not req.firing:
        return Decision(False, "alert is not firing (never act on pending or resolved alerts)")
    capacity = kind_of(req.action) == "capacity"
    if req.target is None:
        return Decision(False, "alert has no replica label: no target to act on")
    if not capacity and req.target not in hist.known_targets:
        return Decision(False, f"unknown target {req.target!r}")
    if hist.incident_handled:
        return Decision(False, "incident already remediated once; waiting for it to resolve")
    if g.paused:
        return Decision(False, "remediation is paused")
    slots = 1 if capacity else g.max_concurrent
    if hist.in_flight >= slots:
        what = "scale action(s) in flight (one at a time)" if capacity else \
            f"repair(s) in flight (max_concurrent={g.max_concurrent})"
        return Decision(False, f"{hist.in_flight} {what}")
    if hist.last_action_on_target is not None and now - hist.last_action_on_target < g.cooldown_s:
        left = g.cooldown_s - (now - hist.last_action_on_target)
        return Decision(False, f"{kind_of(req.action)} on {req.target} in cooldown for another {left:.0f}s")
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
    if req.action == "scale_out" and hist.no_room:
        # never overcommit: a replica more on a full host takes capacity away from the ones that serve
        return Decision(False, f"host full: {hist.no_room}; a human must add capacity")
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
