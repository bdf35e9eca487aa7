"""Evaluates rule groups: query → alert state machine → persisted state + the alerts handed to delivery,
atomically. The alerts handed over are the stream Prometheus would send an Alertmanager (state changes and
a resend every ``resend_delay``); delivery (``sentinel.alerts.delivery``) routes, groups and sends them."""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.internal import UNDELIVERABLE_ALERT, InternalRule, undeliverable
from sentinel.alerts.state import Alert, AlertingRule, Sample, State, ends_at
from sentinel.alerts.store import Store
from sentinel.alerts.templates import expand
from sentinel.errors import DatasourceError, EvaluationError
from sentinel.metrics import ActiveAlerts, SentinelMetrics
from sentinel.prometheus import PromQLSource
from sentinel.rules.internal import DATASOURCE_DOWN_ALERT, META_ALERT, health_rules
from sentinel.rules.learned import LearnedThresholds
from sentinel.rules.model import Group, LoadedGroup, Rule
from sentinel.rules.remote_write import RemoteWriter, Series, recorded_series
from sentinel.rules.sources import LogRuleSource

log = logging.getLogger(__name__)
__all__ = ["DATASOURCE_DOWN_ALERT", "META_ALERT", "UNDELIVERABLE_ALERT", "Evaluator", "FiringHook", "RuleRuntime"]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _persisted_state(alerts: Iterable[Alert]) -> tuple[object, ...]:
    """What restoring needs (value and annotations are recomputed by the next evaluation)."""
    return tuple(sorted((a.fingerprint, a.state.value, a.active_at, a.fired_at, a.resolved_at, a.last_sent_at,
                         a.valid_until, a.keep_firing_since, a.hits, a.notified_at) for a in alerts))


@dataclass
class RuleRuntime:
    group: LoadedGroup
    rule: Rule
    machine: AlertingRule
    health: str = "unknown"
    last_error: str | None = None
    last_eval: float = 0.0
    last_duration: float = 0.0
    persisted: tuple[object, ...] | None = None  # the state last written to the store
    held: dict[str, Any] | None = None  # aggregation: {"since": t, "fingerprints": [...]} until it is sent
    last_ok: float = 0.0  # log rules: the last evaluation that answered (evaluations after it are replayed)
    last_ok_saved: float = 0.0
    recorded: set[tuple[tuple[str, str], ...]] = field(default_factory=set)  # a recording rule's series last time

    @property
    def key(self) -> str:
        return f"{self.group.key};{self.rule.name}"


# Called with the rule and its alerts that are firing after an evaluation.
FiringHook = Callable[[RuleRuntime, list[Alert]], None]


@dataclass
class Evaluator:
    store: Store
    promql: PromQLSource | None
    logs: LogRuleSource | None
    default_interval: float = 15.0
    resend_delay: float = 60.0
    external_url: str = ""
    metrics: SentinelMetrics | None = None
    on_firing: FiringHook | None = None
    clock: Callable[[], float] = time.time
    runtimes: dict[str, list[RuleRuntime]] = field(default_factory=dict)
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

    def _internal(self, spec: InternalRule) -> RuleRuntime:
        """One of sentinel's own alerting rules, evaluated from its own samples, its state restored."""
        rule = Rule.model_validate({**spec.spec, "expr": "(sentinel internal)"})
        group = LoadedGroup(file="(sentinel)", group=Group(name=spec.group, rules=[rule]))
        rt = RuleRuntime(group, rule, self._machine(group, rule))
        for a in self.store.load_rule_state(rt.key):
            rt.machine.active[a.fingerprint] = a
        self.active.update(rt.key, rule.name, rt.machine.active.values())
        return rt

    def _eval_internal(self, rt: RuleRuntime, now: float, samples: list[Sample]) -> None:
        with self._lock:
            firing_before = {a.fingerprint for a in rt.machine.firing()}
            rt.machine.eval(now, samples)
            self._after_eval(rt, now, firing_before)

    def load(self, groups: Sequence[LoadedGroup]) -> None:
        """Install a rule set; rules whose definition is unchanged keep their in-memory state."""
        with self._lock:
            self._load(groups)

    def _load(self, groups: Sequence[LoadedGroup]) -> None:
        old = {rt.key: rt for rts in self.runtimes.values() for rt in rts}
        new: dict[str, list[RuleRuntime]] = {}
        for g in groups:
            rts = []
            for rule in g.group.rules:
                rt = RuleRuntime(g, rule, self._machine(g, rule))
                prev = old.get(rt.key)
                if prev is not None and prev.rule == rule and prev.group.group.labels == g.group.labels:
                    rt = prev
                    rt.group = g
                else:
                    for a in self.store.load_rule_state(rt.key):
                        rt.machine.active[a.fingerprint] = a
                    if rule.log is not None:
                        rt.held = self.store.get(f"held:{rt.key}")
                        rt.last_ok = float(self.store.get(f"last_ok:{rt.key}") or 0.0)
                rts.append(rt)
                self.active.update(rt.key, rt.rule.name, rt.machine.active.values())
            new[g.key] = rts
        self.runtimes = new
        self.learned.forget({rt.key for rts in new.values() for rt in rts if rt.rule.sentinel.learned})
        kept = {rt.key for rts in new.values() for rt in rts}
        for key, rt in old.items():
            if key not in kept:
                self._forget(rt)

    def _forget(self, rt: RuleRuntime) -> None:
        """A rule that a reload removed: its firing alerts are sent as resolved, its stored state and its
        gauges go, and a recording rule's series get stale markers (as Prometheus does)."""
        now = self.clock()
        ended = []
        for a in rt.machine.active.values():
            if a.state == State.FIRING and a.last_sent_at:
                a.state, a.resolved_at = State.INACTIVE, now
                ended.append(replace(a, labels=dict(a.labels), annotations=dict(a.annotations)))
        self.store.forget_rule(rt.key, self._events(rt, ended))
        self.active.drop(rt.key)
        if self.metrics:
            for state in State:
                try:
                    self.metrics.alerts.remove(rt.rule.name, state.value)
                except KeyError:
                    pass
        if rt.recorded and self.writer is not None:
            try:
                self.writer.write([(dict(k), [(round(now * 1000), None)]) for k in rt.recorded])
            except Exception as exc:  # the series then end at Prometheus's 5m lookback instead
                log.warning("recording rule %s removed; stale markers not written: %s", rt.rule.name, exc)
        log.warning("rule %s removed by a reload: %d firing alert(s) resolved, its state forgotten", rt.rule.name,
                    len(ended))

    @staticmethod
    def _machine(g: LoadedGroup, rule: Rule) -> AlertingRule:
        return AlertingRule(
            name=rule.name, for_s=rule.for_, keep_firing_for_s=rule.keep_firing_for,
            labels={**g.group.labels, **rule.labels}, annotations=rule.annotations, limit=g.group.limit,
            consecutive=rule.sentinel.consecutive_samples or 0,
            realert_s=rule.log.realert if rule.log is not None else None,
            expand=lambda text, labels, value: expand(text, labels, value))

    def interval(self, g: LoadedGroup) -> float:
        return g.group.interval or self.default_interval

    def eval_group(self, group_key: str) -> None:
        rts = self.runtimes.get(group_key, [])
        if not rts:
            return
        start = self.clock()
        for rt in rts:
            self.eval_rule(rt, start)  # like Prometheus: one timestamp for every rule of the group
        self.eval_meta(start)
        if self.metrics:
            name = rts[0].group.group.name
            self.metrics.group_duration.labels(name).set(self.clock() - start)
            self.metrics.group_last.labels(name).set(start)

    def _query(self, rt: RuleRuntime, now: float, replay: bool = False) -> list[Sample]:
        offset = rt.group.group.query_offset or 0.0
        if rt.rule.log is not None:
            if self.logs is None:
                raise DatasourceError("no log store is configured for log rules")
            return self.logs.query(rt.rule.log, now - offset, replay, rule=rt.key)
        if self.promql is None:
            raise DatasourceError("no Prometheus is configured for PromQL rules")
        samples = self.promql.query(rt.rule.expr or "", now - offset)
        spec = rt.rule.sentinel.learned
        if spec is not None:  # the signal becomes alerts only where it leaves its learned band
            return self.learned.departures(rt.key, samples, spec.direction)
        return samples

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

    def _record(self, rt: RuleRuntime, now: float) -> None:
        """A recording rule: its result is written back to Prometheus (remote write) at the evaluation time,
        with stale markers for the series it no longer returns, where later rules and dashboards read it."""
        if self.promql is None:
            raise DatasourceError("no Prometheus is configured for recording rules")
        if self.writer is None:
            raise DatasourceError("recording rules need a Prometheus remote-write receiver "
                                  "(--web.enable-remote-write-receiver; sentinel starts its own Prometheus with it)")
        offset = rt.group.group.query_offset or 0.0
        out = recorded_series(rt.rule.name, {**rt.group.group.labels, **rt.rule.labels},
                              self.promql.query_raw(rt.rule.expr or "", now - offset))
        ms = round((now - offset) * 1000)
        keys = {tuple(sorted(labels.items())) for labels, _ in out}
        batch: list[Series] = [(labels, [(ms, v)]) for labels, v in out]
        batch += [(dict(k), [(ms, None)]) for k in rt.recorded - keys]
        if batch:
            try:
                self.writer.write(batch)
            except Exception as exc:
                raise DatasourceError(f"writing the recorded series failed: {exc}") from exc
        rt.recorded = keys
        rt.health, rt.last_error = "ok", None

    def eval_rule(self, rt: RuleRuntime, now: float) -> None:
        if rt.rule.record is not None:
            t0 = time.perf_counter()
            try:
                self._record(rt, now)
            except Exception as exc:  # as below: this rule's failure alone
                rt.health, rt.last_error = "err", str(exc)
                if self.metrics:
                    self.metrics.failures.labels(rt.group.group.name).inc()
                log.warning("recording rule %s: %s", rt.rule.name, exc)
            finally:
                rt.last_duration = time.perf_counter() - t0
                rt.last_eval = now
            return
        if rt.rule.log is not None and rt.last_ok and self.catch_up_max > 0 and not self._catch_up(rt, now):
            return  # still replaying the past: the present waits (its state would skip what is not replayed)
        gname = rt.group.group.name
        t0 = time.perf_counter()
        if self.metrics:
            self.metrics.evaluations.labels(gname).inc()
        try:
            samples = self._query(rt, now)  # outside the lock: groups query in parallel
            with self._lock:
                firing_before = {a.fingerprint for a in rt.machine.firing()}
                rt.machine.eval(now, samples)
                self._after_eval(rt, now, firing_before)
        except Exception as exc:  # any failure is this rule's alone: it is marked, and the group carries on
            # A failed query changes no state: nothing resolves because a datasource is down.
            rt.health = "err"
            rt.last_error = str(exc) if isinstance(exc, DatasourceError | EvaluationError) else \
                f"internal error: {type(exc).__name__}: {exc}"
            if self.metrics:
                self.metrics.failures.labels(gname).inc()
            if isinstance(exc, DatasourceError | EvaluationError):
                log.warning("rule %s: %s", rt.rule.name, exc)
            else:
                log.exception("rule %s: evaluation failed", rt.rule.name)
            return
        finally:
            rt.last_duration = time.perf_counter() - t0
            rt.last_eval = now
            if self.metrics:
                self.metrics.duration.observe(rt.last_duration)
        firing = rt.machine.firing()
        if firing and self.on_firing is not None:
            self.on_firing(rt, firing)

    def _catch_up(self, rt: RuleRuntime, now: float) -> bool:
        """Replay the evaluations a log rule missed (the log store was down, or sentinel was), in order,
        so that what happened meanwhile fires and resolves with its real times, as ElastAlert queries from
        its last run. Windows are (at - timeframe, at], so a past evaluation sees exactly what it would
        have, once the shipper has delivered the lines up to ``at``. Replays send state changes only (no
        repeats of an alert already sent) and start no runbook or remediation. The gap is replayed at the
        group's interval, coarser (never coarser than the rule's timeframe, so every line is in some
        window) when that would take more than 60 queries, and at most the last ``catch_up_max`` seconds
        of it; the last seconds, which the store may not show yet in normal operation either, are left to
        the live evaluation's window. Returns False while replays remain (the first failing one stops this
        round; the next evaluation resumes from it)."""
        assert rt.rule.log is not None
        interval = self.interval(rt.group)
        if now - rt.last_ok <= 1.5 * interval + (self.logs.lag_s if self.logs is not None else 0.0):
            return True
        start = max(rt.last_ok, now - self.catch_up_max)
        step = max(interval, min((now - start) / 60.0, rt.rule.log.timeframe))
        n = 0
        t = start + step
        done = True
        margin = max(0.5 * interval, self.logs.lag_s if self.logs is not None else 0.0)
        while t < now - margin:
            try:
                samples = self._query(rt, t, replay=True)
                with self._lock:
                    firing_before = {a.fingerprint for a in rt.machine.firing()}
                    rt.machine.eval(t, samples)
                    self._after_eval(rt, t, firing_before, sent_at=now)
            except Exception as exc:  # as in eval_rule: this rule's failure alone
                rt.health, rt.last_error = "err", f"catching up from {_iso(t)}: {exc}"
                log.warning("rule %s: catching up paused at %s: %s", rt.rule.name, _iso(t), exc)
                done = False
                break
            n += 1
            t += step
        if n:
            log.warning("rule %s: replayed %d evaluations missed since %s", rt.rule.name, n, _iso(start))
            if self.metrics:
                self.metrics.catch_up.labels(rt.group.group.name).inc(n)
        return done

    def _after_eval(self, rt: RuleRuntime, now: float, firing_before: set[str], sent_at: float | None = None
                    ) -> None:
        """Notifications and persistence after ``rt.machine`` was evaluated at ``now``; ``sent_at``: a
        replayed evaluation's notifications go out at that (later) time and carry state changes only."""
        rt.health, rt.last_error = "ok", None
        agg = rt.rule.log.aggregation if rt.rule.log is not None else None
        interval = self.interval(rt.group)
        due = rt.machine.to_send(now, self.resend_delay, max(interval, agg or 0.0), repeat=sent_at is None,
                                 sent_at=sent_at)
        kv: dict[str, Any] = {}
        if agg is not None:
            due, kv = self._aggregate(rt, due, now, agg)
        outbox = self._events(rt, due)
        if sent_at is not None:  # replayed: delivery tells the episode even if it is already over
            outbox = [replace(e, flush=True) for e in outbox]
        snapshot = _persisted_state(rt.machine.active.values())
        changed = bool(outbox) or snapshot != rt.persisted or bool(kv)
        if rt.rule.log is not None:
            rt.last_ok = now
            # with every state change, else once a minute: replaying evaluations that changed nothing is harmless
            if changed or now - rt.last_ok_saved >= 60.0:
                kv[f"last_ok:{rt.key}"] = now
                rt.last_ok_saved = now
        if changed or kv:  # a steady state is not rewritten on every evaluation
            self.store.save_rule_state(rt.key, list(rt.machine.active.values()), outbox, now, kv)
            rt.persisted = snapshot
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

    def _aggregate(self, rt: RuleRuntime, due: list[Alert], now: float, period: float
                   ) -> tuple[list[Alert], dict[str, Any]]:
        """ElastAlert's ``aggregation``: due notifications are held from the first one for ``period``, then
        sent together with each held alert's state at that time (firing, or resolved if it ended meanwhile).
        The held set is saved with the alert state, so a restart neither loses nor repeats it."""
        held = rt.held or {"since": now, "fingerprints": []}
        if not rt.held and not due:
            return [], {}
        fps = list(dict.fromkeys([*held["fingerprints"], *(a.fingerprint for a in due)]))
        if now - float(held["since"]) < period:
            if rt.held is not None and fps == rt.held["fingerprints"]:
                return [], {}  # nothing new while holding: nothing to write
            rt.held = {"since": held["since"], "fingerprints": fps}
            return [], {f"held:{rt.key}": rt.held}
        rt.held = None
        out = []
        for fp in fps:
            a = rt.machine.active.get(fp)
            if a is not None and a.state != State.PENDING:
                out.append(replace(a, labels=dict(a.labels), annotations=dict(a.annotations)))
        return out, {f"held:{rt.key}": None}

    def eval_meta(self, now: float) -> None:
        """sentinel's own alerts whose samples it reads (the rules' health, delivery, the ladder)."""
        for name, source in self._sources.items():
            if source is not None:
                self._eval_internal(self.internal[name], now, source(now))

    def push(self, alert: str, now: float, samples: list[Sample]) -> None:
        """Evaluate an internal alert whose owner pushes its samples (the replicas' liveness probe); its firing
        alerts go to remediation as a rule's do."""
        rt = self.internal[alert]
        self._eval_internal(rt, now, samples)
        firing = rt.machine.firing()
        if firing and self.on_firing is not None:
            self.on_firing(rt, firing)

    def _events(self, rt: RuleRuntime, due: list[Alert], extra: dict[str, dict[str, Any]] | None = None
                ) -> list[AlertEvent]:
        """The alerts to hand to delivery, with the episode's runbook findings (they travel with every later
        notification of the episode)."""
        out: list[AlertEvent] = []
        # a log rule's aggregation_key: ElastAlert's split, as extra group_by labels
        group_by = tuple(rt.rule.log.aggregation_key or ()) if rt.rule.log is not None else ()
        for a in due:
            data = (extra or {}).get(a.fingerprint)
            if data is None:
                found = self.store.findings(rt.key, a.fingerprint, a.active_at)
                if found is not None:
                    data = {"findings": {k: v for k, v in found.items() if k != "report"}}
            out.append(AlertEvent(dict(a.labels), dict(a.annotations), a.fired_at or a.active_at, ends_at(a),
                                  self._generator_url(rt), a.fingerprint, data, group_by))
        return out

    def notify_findings(self, rt: RuleRuntime, alert: Alert, findings: dict[str, Any]) -> None:
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
        internal = any(rt is x for x in self.internal.values())
        if rt.rule.expr is not None and self.promql is not None and not internal:
            q = urllib.parse.urlencode({"g0.expr": rt.rule.expr, "g0.tab": "1"})
            return f"{self.promql.url}/graph?{q}"
        return f"{self.external_url}/api/v1/rules?rule={urllib.parse.quote(rt.rule.name)}"

    def view(self, include_meta: bool = False) -> list[tuple[RuleRuntime, list[Alert]]]:
        """Every rule with copies of its alerts, taken under the lock: readers (the API) never iterate state
        an evaluation is changing. The lock is held only for in-memory state changes (queries run outside it),
        so this is quick."""
        with self._lock:
            return [(rt, [replace(a, labels=dict(a.labels), annotations=dict(a.annotations))
                          for a in rt.machine.active.values()]) for rt in self.all_runtimes(include_meta)]

    def all_runtimes(self, include_meta: bool = False) -> list[RuleRuntime]:
        return [rt for rts in self.runtimes.values() for rt in rts] + (
            list(self.internal.values()) if include_meta else [])
