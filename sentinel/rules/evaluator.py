"""Evaluates rule groups: query → alert state machine → persisted state + the alerts handed to delivery,
atomically. The alerts handed over are the stream Prometheus would send an Alertmanager (state changes and
a resend every ``resend_delay``); delivery (``sentinel.alerts.delivery``) routes, groups and sends them.

The evaluator is the manager of Prometheus's ``rules/`` package: it loads and reloads groups (rules whose
definition is unchanged keep their state), evaluates a group on its job, and commits each alerting rule's
evaluation. The rules themselves (what a PromQL, log or recording rule does) are in ``sentinel.rules.runtime``.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.internal import UNDELIVERABLE_ALERT, InternalRule, undeliverable
from sentinel.alerts.state import Alert, Sample, State, ends_at
from sentinel.alerts.store import Store
from sentinel.errors import DatasourceError
from sentinel.metrics import ActiveAlerts, SentinelMetrics
from sentinel.prometheus import PromQLSource
from sentinel.rules.internal import DATASOURCE_DOWN_ALERT, META_ALERT, health_rules
from sentinel.rules.learned import LearnedThresholds
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.remote_write import RemoteWriter
from sentinel.rules.runtime import (
    AlertingRuntime,
    PromQLRule,
    RecordingRule,
    RuleGroup,
    RuleRuntime,
    eval_rule,
    runtime_for,
)
from sentinel.rules.sources import LogRuleSource

log = logging.getLogger(__name__)
__all__ = ["DATASOURCE_DOWN_ALERT", "META_ALERT", "UNDELIVERABLE_ALERT", "AlertingRuntime", "Evaluator", "RuleRuntime"]


def _persisted_state(alerts: Iterable[Alert]) -> tuple[object, ...]:
    """What restoring needs (value and annotations are recomputed by the next evaluation)."""
    return tuple(sorted((a.fingerprint, a.state.value, a.active_at, a.fired_at, a.resolved_at, a.last_sent_at,
                         a.valid_until, a.keep_firing_since, a.hits, a.notified_at) for a in alerts))


@dataclass
class Evaluator:
    store: Store
    promql: PromQLSource | None
    logs: LogRuleSource | None
    default_interval: float = 15.0
    resend_delay: float = 60.0
    external_url: str = ""
    metrics: SentinelMetrics | None = None
    clock: Callable[[], float] = time.time
    groups: dict[str, RuleGroup] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    meta_for: float = 60.0
    catch_up_max: float = 3600.0  # log rules: replay at most this much of a gap (0: never)
    writer: RemoteWriter | None = None  # where recording rules write their results (Prometheus's remote write)
    learned: LearnedThresholds = field(default_factory=LearnedThresholds)
    active: ActiveAlerts = field(default_factory=ActiveAlerts)  # sentinel_active_alerts (ALERTS-shaped)
    relay_inbound: bool = False  # findings of inbound alerts are handed to delivery with them
    internal_rules: Sequence[InternalRule] = ()  # sentinel's own alerts that other packages own

    def __post_init__(self) -> None:
        # sentinel's own alerts, as data (sentinel.alerts.internal): the rules' health and undeliverable
        # notifications always; others (remediation's, the replicas' liveness) from their owners, ``internal``
        rules = [*health_rules(self.all_runtimes, self.meta_for), undeliverable(self.store), *self.internal_rules]
        self.internal = {r.alert: self._internal(r) for r in rules}
        self._sources = {r.alert: r.source for r in rules}

    def _internal(self, spec: InternalRule) -> AlertingRuntime:
        """One of sentinel's own alerting rules, evaluated from its own samples, its state restored."""
        rule = Rule.model_validate({**spec.spec, "expr": "(sentinel internal)"})
        rt = AlertingRuntime(LoadedGroup(file="(sentinel)", group=Group(name=spec.group, rules=[rule])), rule)
        rt.restore(self.store)
        self.active.update(rt.key, rule.name, rt.machine.active.values())
        return rt

    def load(self, groups: Sequence[LoadedGroup]) -> None:
        """Install a rule set; rules whose definition is unchanged keep their in-memory state."""
        with self._lock:
            self._load(groups)

    def _load(self, groups: Sequence[LoadedGroup]) -> None:
        old = {rt.key: rt for rt in self.all_runtimes()}
        new: dict[str, RuleGroup] = {}
        for g in groups:
            rts = []
            for rule in g.group.rules:
                rt = runtime_for(g, rule)
                prev = old.get(rt.key)
                if prev is not None and prev.rule == rule and prev.group.group.labels == g.group.labels:
                    rt = prev
                    rt.group = g
                else:
                    rt.restore(self.store)
                rts.append(rt)
                self.active.update(rt.key, rt.rule.name, rt.alerts())
            new[g.key] = RuleGroup(g, rts)
        self.groups = new
        kept = {rt.key for rt in self.all_runtimes()}
        self.learned.forget({rt.key for rt in self.all_runtimes() if rt.rule.sentinel.learned})
        for key, rt in old.items():
            if key not in kept:
                self._forget(rt)

    def _forget(self, rt: RuleRuntime) -> None:
        """A rule that a reload removed: its firing alerts are sent as resolved, its stored state and its
        gauges go, and a recording rule's series get stale markers (as Prometheus does)."""
        now = self.clock()
        ended = []
        if isinstance(rt, AlertingRuntime):
            for a in rt.machine.active.values():
                if a.state == State.FIRING and a.last_sent_at:
                    a.state, a.resolved_at = State.INACTIVE, now
                    ended.append(replace(a, labels=dict(a.labels), annotations=dict(a.annotations)))
        self.store.forget_rule(rt.key, self._events(rt, ended) if isinstance(rt, AlertingRuntime) else [])
        self.active.drop(rt.key)
        if self.metrics:
            for state in State:
                try:
                    self.metrics.alerts.remove(rt.rule.name, state.value)
                except KeyError:
                    pass
        if isinstance(rt, RecordingRule):
            rt.stale(now, self.writer)
        log.warning("rule %s removed by a reload: %d firing alert(s) resolved, its state forgotten", rt.rule.name,
                    len(ended))

    def interval(self, g: LoadedGroup) -> float:
        return g.group.interval or self.default_interval

    def eval_group(self, group_key: str) -> None:
        group = self.groups.get(group_key)
        if group is None or not group.rules:
            return
        start = self.clock()
        group.eval(start, self)  # like Prometheus: one timestamp for every rule of the group
        self.eval_meta(start)
        if self.metrics:
            self.metrics.group_duration.labels(group.name).set(self.clock() - start)
            self.metrics.group_last.labels(group.name).set(start)

    def eval_rule(self, rt: RuleRuntime, now: float) -> None:
        eval_rule(rt, now, self)

    def alerting_rules(self) -> dict[str, AlertingRuntime]:
        """Every alerting rule by its key, sentinel's own included (how healing finds a firing log row's rule)."""
        out = {rt.key: rt for rt in self.all_runtimes() if isinstance(rt, AlertingRuntime)}
        out.update((rt.key, rt) for rt in self.internal.values())
        return out

    def refit(self, rt: RuleRuntime) -> int:
        """Fit the learned bands of one rule from Prometheus history; returns the number of series."""
        spec = rt.rule.sentinel.learned
        if spec is None or self.promql is None:
            return 0
        try:
            n = self.learned.refit(rt.key, rt.rule.expr or "", self.promql.query_range, spec.history, spec.step,
                                   spec.k, spec.min_points, self.clock())
        except DatasourceError as exc:
            log.warning("rule %s: learned threshold refit failed, keeping the old bands: %s", rt.rule.name, exc)
            return 0
        log.info("rule %s: learned bands for %d series", rt.rule.name, n)
        return n

    def commit(self, rt: AlertingRuntime, now: float, samples: list[Sample], sent_at: float | None = None) -> None:
        """Evaluate ``rt``'s state machine on ``samples`` at ``now``, then hand the notifications due to delivery
        and persist the state with them, in one transaction; ``sent_at``: a replayed evaluation's notifications
        go out at that (later) time and carry state changes only. A live evaluation of a rule with a runbook or a
        remedy also hands its firing alerts to healing (``sentinel.alerts.firinglog``) in that transaction."""
        with self._lock:
            firing_before = {a.fingerprint for a in rt.machine.firing()}
            rt.machine.eval(now, samples)
            rt.health, rt.last_error = "ok", None
            hold = max(self.interval(rt.group), rt.hold_s)
            due = rt.machine.to_send(now, self.resend_delay, hold, repeat=sent_at is None, sent_at=sent_at)
            due, kv = rt.hold(due, now)
            outbox = self._events(rt, due)
            if sent_at is not None:  # replayed: delivery tells the episode even if it is already over
                outbox = [replace(e, flush=True) for e in outbox]
            snapshot = _persisted_state(rt.machine.active.values())
            changed = bool(outbox) or snapshot != rt.persisted or bool(kv)
            kv.update(rt.progress(now, changed))
            firing = rt.machine.firing() if sent_at is None and rt.heals else []  # a replay starts no remedy
            if changed or kv or firing:  # a steady state is not rewritten on every evaluation
                self.store.save_rule_state(rt.key, list(rt.machine.active.values()), outbox, now, kv, firing)
                rt.persisted = snapshot
            self._report(rt, firing_before)

    def _report(self, rt: AlertingRuntime, firing_before: set[str]) -> None:
        for a in rt.machine.active.values():
            if a.state == State.FIRING and a.fingerprint not in firing_before:
                log.warning("alert firing: %s %s", rt.rule.name, a.labels)
            elif a.state == State.INACTIVE and a.fingerprint in firing_before:
                log.warning("alert resolved: %s %s", rt.rule.name, a.labels)
        self.active.update(rt.key, rt.rule.name, rt.machine.active.values())
        if self.metrics:
            for state in State:
                n = sum(1 for a in rt.machine.active.values() if a.state == state)
                self.metrics.alerts.labels(rt.rule.name, state.value).set(n)

    def eval_meta(self, now: float) -> None:
        """sentinel's own alerts whose samples it reads (the rules' health, delivery, the ladder)."""
        for name, source in self._sources.items():
            if source is not None:
                self.commit(self.internal[name], now, source(now))

    def push(self, alert: str, now: float, samples: list[Sample]) -> None:
        """Evaluate an internal alert whose owner pushes its samples (the replicas' liveness probe); its firing
        alerts go to healing as a rule's do."""
        self.commit(self.internal[alert], now, samples)

    def _events(self, rt: AlertingRuntime, due: list[Alert], extra: dict[str, dict[str, Any]] | None = None
                ) -> list[AlertEvent]:
        """The alerts to hand to delivery, with the episode's runbook findings (they travel with every later
        notification of the episode)."""
        out: list[AlertEvent] = []
        for a in due:
            data = (extra or {}).get(a.fingerprint)
            if data is None:
                found = self.store.findings(rt.key, a.fingerprint, a.active_at)
                if found is not None:
                    data = {"findings": {k: v for k, v in found.items() if k != "report"}}
            out.append(AlertEvent(dict(a.labels), dict(a.annotations), a.fired_at or a.active_at, ends_at(a),
                                  self._generator_url(rt), a.fingerprint, data, rt.group_by))
        return out

    def notify_findings(self, rt: AlertingRuntime, alert: Alert, findings: dict[str, Any]) -> None:
        """Send the episode's runbook findings at once, if the alert is still firing."""
        with self._lock:
            a = rt.machine.active.get(alert.fingerprint)
            if a is None and self.relay_inbound and alert.state == State.FIRING:
                # an alert that arrived on the inbound webhook (this rule's name, another system's evaluation):
                # its findings go with it as relayed, with no end known, as the relay handed it over
                e = self._events(rt, [alert], {alert.fingerprint: {"findings": findings}})[0]
                self.store.log_alerts([replace(e, ends_at=0.0)], self.clock())
                return
            if a is None or a.state != State.FIRING or a.active_at != alert.active_at:
                return
            now = self.clock()
            sent = replace(a, labels=dict(a.labels), annotations=dict(a.annotations))
            entries = self._events(rt, [sent], {a.fingerprint: {"findings": findings}})
            self.store.save_rule_state(rt.key, list(rt.machine.active.values()), entries, now)

    def _generator_url(self, rt: RuleRuntime) -> str:
        if isinstance(rt, PromQLRule) and self.promql is not None:
            q = urllib.parse.urlencode({"g0.expr": rt.rule.expr or "", "g0.tab": "1"})
            return f"{self.promql.url}/graph?{q}"
        return f"{self.external_url}/api/v1/rules?rule={urllib.parse.quote(rt.rule.name)}"

    def view(self, include_meta: bool = False) -> list[tuple[RuleRuntime, list[Alert]]]:
        """Every rule with copies of its alerts, taken under the lock: readers (the API) never iterate state
        an evaluation is changing. The lock is held only for in-memory state changes (queries run outside it),
        so this is quick."""
        with self._lock:
            return [(rt, rt.alerts()) for rt in self.all_runtimes(include_meta)]

    def all_runtimes(self, include_meta: bool = False) -> list[RuleRuntime]:
        return [rt for g in self.groups.values() for rt in g.rules] + (
            list(self.internal.values()) if include_meta else [])
