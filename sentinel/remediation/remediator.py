"""The remediation shell: gathers history, asks the policy, runs the action, verifies, audits."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from sentinel.alerts.state import Alert
from sentinel.alerts.store import Store
from sentinel.errors import RemediationError
from sentinel.metrics import SentinelMetrics
from sentinel.remediation import ladder
from sentinel.remediation.policy import SCALE, ActionRequest, Decision, Guardrails, History, decide, kind_of
from sentinel.rules.evaluator import AlertingRuntime
from sentinel.state.remediation import Remediation

log = logging.getLogger(__name__)
TARGET_LABEL = "replica"
SERVICE = "service"  # the target of a scale action where the actuator names none


class Actuator(Protocol):
    def targets(self) -> set[str]: ...

    def act(self, action: str, target: str) -> str:
        """Run the action; returns evidence text; raises RemediationError."""
        ...

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        """Whether what ``action`` promised holds within ``timeout_s``."""


# for log rules: whether the alert's events are still there counting only those after a time (the target's
# current incarnation), from the log rule source
Evidence = Callable[[AlertingRuntime, Alert, float], bool | None]


def stale_evidence(actuator: Actuator, evidence: Evidence | None, rt: AlertingRuntime, action: str, a: Alert
                   ) -> str | None:
    """Why the alert's evidence says nothing about the target as it runs now, if it does not: every event
    behind a log rule's alert predates the target's current incarnation (say, a rule reload widened the
    window over a line from before the last restart). Never acts on a process that is already gone."""
    target = a.labels.get(TARGET_LABEL)
    incarnation = getattr(actuator, "incarnation", None)
    if rt.rule.log is None or action in SCALE or target is None or evidence is None or incarnation is None:
        return None
    since = incarnation(target)
    if since is None:
        return None
    try:
        fresh = evidence(rt, a, since)
    except Exception as exc:  # noqa: BLE001 - unverifiable evidence never triggers an action
        return f"cannot check the evidence against {target}'s current incarnation: {exc}"
    if fresh is not False:
        return None
    return (f"the evidence predates {target}'s current incarnation (started "
            f"{time.strftime('%H:%M:%S', time.gmtime(since))}Z): it was about the process before it")


class Remediator:
    def __init__(self, store: Store, actuator: Actuator, guardrails: Guardrails,
                 metrics: SentinelMetrics | None = None, clock: Callable[[], float] = time.time,
                 verify_timeout_s: float = 120.0, ladder_window_s: float = 3600.0,
                 clear_deadline_s: float = 600.0,
                 evidence: Evidence | None = None) -> None:
        self.store = store
        self.actuator = actuator
        self.guardrails = guardrails
        self.metrics = metrics
        self.clock = clock
        self.verify_timeout_s = verify_timeout_s
        self.ladder_window_s = ladder_window_s
        self.clear_deadline_s = clear_deadline_s
        # repairs and capacity actions run in pools of their own: a slow scale-out never holds a restart back
        self._pool = ThreadPoolExecutor(max_workers=max(1, guardrails.max_concurrent), thread_name_prefix="remedy")
        self._capacity_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capacity")
        self._lock = threading.Lock()
        self._last_reason: dict[str, str] = {}
        self.evidence = evidence

    def on_firing(self, rt: AlertingRuntime, alerts: list[Alert]) -> None:
        action = rt.rule.sentinel.remediation
        if action is None:
            return
        for a in alerts:
            stale = stale_evidence(self.actuator, self.evidence, rt, action, a)
            if stale:
                self._skip(rt.rule.name, action, a, stale)
                continue
            self.consider(rt.rule.name, action, a)

    def _skip(self, rule: str, action: str, a: Alert, reason: str) -> None:
        incident = f"{rule}/{a.fingerprint}/{a.active_at:.3f}"
        if self._last_reason.get(incident) == reason:
            return
        self._last_reason[incident] = reason
        self.store.audit(self.clock(), "decision", incident, rule=rule, action=action,
                         target=a.labels.get(TARGET_LABEL), act=False, reason=reason, labels=a.labels, value=a.value)
        if self.metrics:
            self.metrics.remediations.labels(action, "skipped").inc()
        log.warning("not acting on %s: %s", incident, reason)

    # -- the escalation ladder (restart problems) -------------------------------------------------------
    def _available(self) -> frozenset[str]:
        return frozenset(getattr(self.actuator, "actions", frozenset({"restart"})))

    def _climb(self, rule: str, target: str, a: Alert, incident: str, now: float) -> tuple[str | None, str]:
        """The action the ladder takes for this incident now, or None and why not (a human is needed, or an
        approval is pending)."""
        findings = self.store.findings(rule, a.fingerprint, a.active_at)
        before = ladder.Ladder.from_json(self.store.ladder(rule, target))
        state = ladder.next_step(before, findings, self._available(), now, self.ladder_window_s)
        if before is not None and before.rung != state.rung:
            self.store.audit(now, "escalation", f"{rule}/{target}", rung=state.rung, previous=before.rung,
                             why=state.why, incident=incident)
        if state.rung == "page":
            state.last_at = now  # SentinelRemediationEscalated fires while the problem keeps firing
            self.store.save_ladder(rule, target, state.to_json())
            return None, f"escalated to a human: {state.why} (SentinelRemediationEscalated pages with the evidence)"
        self.store.save_ladder(rule, target, state.to_json())
        if state.rung in ladder.NEEDS_APPROVAL:
            approval_id = hashlib.sha256(f"{incident}/{state.rung}".encode()).hexdigest()[:12]
            doc = self.store.request_approval(approval_id, {"incident": incident, "rule": rule, "action": state.rung,
                                                            "target": target, "why": state.why}, now)
            if doc["status"] == "pending":
                return None, (f"{state.rung} on {target} needs a human's approval: sentinel remediate approve "
                              f"{approval_id} ({state.why})")
            if doc["status"] == "rejected":
                state = ladder.Ladder(ladder.climb(state.rung, self._available()), 0, now,
                                      f"{state.rung} rejected by {doc.get('decided_by')}", state.history)
                self.store.save_ladder(rule, target, state.to_json())
                return (None, f"escalated: {state.why}") if state.rung == "page" else (state.rung, state.why)
        return state.rung, state.why

    def _climbed(self, rule: str, target: str, action: str, outcome: str) -> None:
        state = ladder.Ladder.from_json(self.store.ladder(rule, target)) or ladder.Ladder()
        reason = getattr(self.actuator, "failure_reason", None)
        failure = reason(target) if reason is not None and outcome != "succeeded" else None
        new = ladder.after(state, action, outcome, self.clock(), self._available(), failure)
        self.store.save_ladder(rule, target, new.to_json())
        if new.rung != state.rung:
            self.store.audit(self.clock(), "escalation", f"{rule}/{target}", rung=new.rung, previous=state.rung,
                             why=new.why)

    def _not_cleared(self, rule: str, target: str, episode: str, now: float, recent: list[Remediation]) -> str:
        """Verify after an action: the episode's last action succeeded (the replica serves), yet its alert
        still fires ``clear_deadline_s`` after it finished. That attempt is counted as not having cleared the
        condition, the ladder climbs, and the episode may take its next action (returned: a new incident key,
        ``<episode>#N``). Otherwise the episode's current incident key."""
        tries = sorted((r for r in recent
                        if r.outcome != "aborted"  # an interrupted try (kill -9) leaves the episode to act again
                        and (r.incident == episode or r.incident.startswith(episode + "#"))),
                       key=lambda r: r.started_at)
        if not tries:
            return episode
        last = tries[-1]
        if last.outcome != "succeeded" or last.finished_at is None or now - last.finished_at < self.clear_deadline_s:
            return last.incident
        key = f"not-cleared:{last.incident}"
        if self.store.get(key) is None:
            self.store.put(key, now)
            self.store.audit(now, "verification", last.incident, action=last.action, target=target,
                             outcome="not-cleared", detail=f"the alert still fires {now - last.finished_at:.0f}s after "
                             f"{last.action} succeeded (deadline {self.clear_deadline_s:.0f}s): escalating")
            if self.metrics:
                self.metrics.remediations.labels(last.action, "not-cleared").inc()
            self._climbed(rule, target, last.action, "not-cleared")
        return f"{episode}#{len(tries)}"  # the episode's next attempt

    def consider(self, rule: str, action: str, a: Alert) -> Decision:
        now = self.clock()
        target = a.labels.get(TARGET_LABEL)
        incident = f"{rule}/{a.fingerprint}/{a.active_at:.3f}"
        # one read of the remediation log serves every window below (the last hour, the scale-in
        # stabilization window, the clear deadline)
        recent = self.store.remediations(since=now - max(3600.0, 2 * self.clear_deadline_s,
                                                         self.guardrails.scale_in_stabilization_s))
        past = [r for r in recent if r.started_at >= now - 3600]
        rung_why = ""
        if action == "restart" and target is not None and a.fired_at > 0 and not a.resolved_at:
            incident = self._not_cleared(rule, target, incident, now, recent)
        if action == "restart" and target is not None and target in self.actuator.targets() \
                and a.fired_at > 0 and not a.resolved_at and not any(r.incident == incident for r in past):
            step, rung_why = self._climb(rule, target, a, incident, now)
            if step is None:
                self._skip(rule, action, a, rung_why)
                return Decision(False, rung_why)
            action = step
        kind = kind_of(action)
        asked_by = target
        if kind == "capacity":  # scaling acts on the service as a whole, whichever replica's alert asked
            target = self.service
        req = ActionRequest(rule, action, target, a.fingerprint, incident, firing=a.fired_at > 0 and not a.resolved_at)
        live = [r for r in past if r.outcome != "aborted"]
        if kind == "capacity":
            # one cooldown for every scale action, counted from when the last one finished (an in-flight one:
            # now), so the metrics that asked for it see the new capacity before another alert asks again (a
            # scale-out can take longer to start its replica than the cooldown lasts)
            on_target = [r.finished_at if r.finished_at is not None else now for r in live if r.action in SCALE]
            counted = past  # capacity yields to repairs: every action of the hour counts against it
        else:  # a repair's cooldown and hourly count see repairs only: a scale action never holds one back
            on_target = [r.started_at for r in live if r.action not in SCALE and r.target == target]
            counted = [r for r in past if r.action not in SCALE]
        scaled = [r.started_at for r in recent if r.action in SCALE and r.outcome != "aborted"]
        capacity = getattr(self.actuator, "capacity", None)
        replicas, healthy_after = capacity() if capacity is not None and kind == "capacity" else (0, 0)
        room = getattr(self.actuator, "room", None)
        no_room = room() if room is not None and action == "scale_out" else None
        with self._lock:
            in_flight = sum(kind_of(r.action) == kind for r in self.store.unfinished_remediations())
            hist = History(frozenset(self.actuator.targets()), any(r.incident == incident for r in past),
                           max(on_target) if on_target else None, len(counted), in_flight,
                           replicas, healthy_after, a.fired_at, max(scaled) if scaled else None, no_room)
            decision = decide(req, hist, self.guardrails, now)
            if decision.act:
                if not self.store.start_remediation(Remediation(incident, a.fingerprint, rule, action,
                                                                target or "", now, None, None)):
                    return Decision(False, "incident already remediated once")
        self._audit_decision(req, decision, a, now, {"asked_by": asked_by} if kind == "capacity" else {})
        if decision.act:
            assert target is not None
            pool = self._capacity_pool if kind == "capacity" else self._pool
            pool.submit(self._run, incident, action, target, rule if rung_why else None)
        return decision

    def _audit_decision(self, req: ActionRequest, decision: Decision, a: Alert, now: float,
                        extra: dict[str, Any]) -> None:
        """Each new decision about an incident is audited (and counted) once."""
        if self._last_reason.get(req.incident) == decision.reason:
            return
        self._last_reason[req.incident] = decision.reason
        self.store.audit(now, "decision", req.incident, rule=req.rule, action=req.action, target=req.target,
                         act=decision.act, reason=decision.reason, labels=a.labels, value=a.value, **extra)
        if self.metrics:
            self.metrics.remediations.labels(req.action, "started" if decision.act else "skipped").inc()

    @property
    def service(self) -> str:
        """The target of scale actions: the service the actuator scales."""
        return str(getattr(self.actuator, "service", SERVICE))

    def _run(self, incident: str, action: str, target: str, laddered_rule: str | None = None) -> None:
        t0 = self.clock()
        try:
            evidence = self.actuator.act(action, target)
            healthy = self.actuator.verify(target, self.verify_timeout_s, action)
            outcome = "succeeded" if healthy else "failed-verification"
        except RemediationError as exc:
            evidence, outcome = str(exc), "failed"
        except Exception as exc:  # an actuator bug must not kill the worker; it is audited
            log.exception("remediation %s on %s crashed", action, target)
            evidence, outcome = f"{type(exc).__name__}: {exc}", "failed"
        now = self.clock()
        if outcome != "succeeded" and getattr(self.actuator, "stopping", False):
            # sentinel's stop cut the action short: no outcome (it would climb the ladder for nothing); the next
            # start verifies the target, as after kill -9
            log.warning("remediation %s on %s interrupted by sentinel's stop: %s", action, target, evidence)
            return
        self.store.finish_remediation(incident, now, outcome)
        self.store.audit(now, "outcome", incident, action=action, target=target, outcome=outcome,
                         evidence=evidence, duration_s=round(now - t0, 3),
                         escalate=outcome != "succeeded")
        if laddered_rule is not None:  # after the outcome: the escalation it causes follows it in the audit
            self._climbed(laddered_rule, target, action, outcome)
        if self.metrics:
            self.metrics.remediations.labels(action, outcome).inc()
        if outcome != "succeeded":
            log.error("remediation %s on %s %s: %s; a human is needed", action, target, outcome, evidence)
        else:
            log.warning("remediation %s on %s succeeded in %.1fs", action, target, now - t0)

    def recover(self) -> list[str]:
        """At start: actions a previous run began and never finished (it was killed) get an outcome. Each
        target is verified in the background: healthy within the verify timeout is 'interrupted-verified';
        otherwise the action is marked aborted and its incident may be remediated again when its rule, evaluated
        afresh, still fires (the aborted attempt counts towards the hourly limit, not the cooldown). The audit
        says which. Returns the incidents found."""
        found = self.store.unfinished_remediations()
        for r in found:
            (self._capacity_pool if r.action in SCALE else self._pool).submit(self._recover, r)
        return [r.incident for r in found]

    def _recover(self, r: Remediation) -> None:
        try:
            known = r.target in self.actuator.targets() or (r.action in SCALE and r.target == self.service)
            healthy = bool(r.target) and known and self.actuator.verify(r.target, self.verify_timeout_s, r.action)
        except Exception as exc:  # noqa: BLE001 - audited as not verified
            log.warning("verifying interrupted %s on %s failed: %s", r.action, r.target, exc)
            healthy = False
        now = self.clock()
        if healthy:
            self.store.finish_remediation(r.incident, now, "interrupted-verified")
        else:
            self.store.abort_remediation(r.incident, now)
        outcome = "interrupted-verified" if healthy else "aborted"
        self.store.audit(now, "recovery", r.incident, action=r.action, target=r.target, outcome=outcome,
                         started_at=r.started_at, detail="sentinel stopped while this action ran; " + (
                             "its target is healthy" if healthy else
                             "its target is not healthy: the incident is re-evaluated by its rule"))
        log.warning("interrupted remediation %s on %s: %s", r.action, r.target, outcome)
        if self.metrics:
            self.metrics.remediations.labels(r.action, outcome).inc()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._capacity_pool.shutdown(wait=True, cancel_futures=False)
