"""The rules as they run, in the shape of Prometheus's ``rules/`` package: every rule is a :class:`RuleRuntime`
whose ``evaluate(now, ctx)`` returns its firing alerts, and a :class:`RuleGroup` evaluates its rules with one
timestamp at its interval.

- :class:`PromQLRule`: an alerting rule over a PromQL query (with a learned band where the rule has one);
- :class:`LogRule`: an alerting rule over a log query; it owns its catch-up (replaying the evaluations it
  missed) and ElastAlert's aggregation (holding notifications for a period);
- :class:`RecordingRule`: its result is written back to Prometheus;
- :class:`AlertingRuntime` itself: sentinel's own alerts, whose samples their owners hand over.

What the rules share (the datasources, the store, the commit of an evaluation's state and notifications) is
the :class:`RuleContext`, which the evaluator (``sentinel.rules.evaluator``) implements.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sentinel.alerts.state import Alert, AlertingRule, Sample, State
from sentinel.alerts.store import AlertTables
from sentinel.alerts.templates import expand
from sentinel.errors import DatasourceError, EvaluationError
from sentinel.metrics import SentinelMetrics
from sentinel.prometheus import PromQLSource
from sentinel.rules.learned import LearnedThresholds
from sentinel.rules.logtypes import LogRuleType
from sentinel.rules.model import LoadedGroup, Rule
from sentinel.rules.remote_write import RemoteWriter, Series, recorded_series
from sentinel.rules.sources import LogRuleSource

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class RuleContext(Protocol):
    """What a rule's evaluation reads and where it commits its result (the evaluator)."""

    promql: PromQLSource | None
    logs: LogRuleSource | None
    writer: RemoteWriter | None
    learned: LearnedThresholds
    metrics: SentinelMetrics | None
    catch_up_max: float

    def interval(self, g: LoadedGroup) -> float: ...

    def commit(self, rt: AlertingRuntime, now: float, samples: list[Sample], sent_at: float | None = None) -> None:
        """Evaluate ``rt``'s state machine on ``samples`` at ``now`` and persist and hand over the result."""


@dataclass
class RuleRuntime(ABC):
    """One loaded rule: its definition, its group, and how its last evaluation went."""

    group: LoadedGroup
    rule: Rule
    health: str = "unknown"
    last_error: str | None = None
    last_eval: float = 0.0
    last_duration: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.group.key};{self.rule.name}"

    @property
    def datasource(self) -> str:
        return "prometheus"

    @abstractmethod
    def evaluate(self, now: float, ctx: RuleContext) -> list[Alert]:
        """Evaluate at ``now``; the alerts firing after it. Raises on a failed query (no state changed)."""

    def alerts(self) -> list[Alert]:
        """Copies of the rule's active alerts."""
        return []

    def restore(self, store: AlertTables) -> None:
        """Take up the state a previous run of sentinel left in ``store``."""
        return None  # a recording rule keeps nothing between runs (its series are in Prometheus)


def machine_for(g: LoadedGroup, rule: Rule) -> AlertingRule:
    return AlertingRule(
        name=rule.name, for_s=rule.for_, keep_firing_for_s=rule.keep_firing_for,
        labels={**g.group.labels, **rule.labels}, annotations=rule.annotations, limit=g.group.limit,
        consecutive=rule.sentinel.consecutive_samples or 0,
        realert_s=rule.log.realert if rule.log is not None else None,
        expand=lambda text, labels, value: expand(text, labels, value))


@dataclass
class AlertingRuntime(RuleRuntime):
    """An alerting rule: its samples drive the alert state machine (``sentinel.alerts.state``). This class
    itself is one of sentinel's own alerts, whose samples their owner hands over."""

    machine: AlertingRule = field(init=False)
    persisted: tuple[object, ...] | None = None  # the state last written to the store

    def __post_init__(self) -> None:
        self.machine = machine_for(self.group, self.rule)

    def query(self, now: float, ctx: RuleContext, replay: bool = False) -> list[Sample]:
        raise DatasourceError(f"{self.rule.name}: sentinel's own alert; its owner hands over its samples")

    def evaluate(self, now: float, ctx: RuleContext) -> list[Alert]:
        samples = self.query(now, ctx)  # outside the evaluator's lock: groups query in parallel
        ctx.commit(self, now, samples)
        return self.machine.firing()

    def alerts(self) -> list[Alert]:
        return [replace(a, labels=dict(a.labels), annotations=dict(a.annotations))
                for a in self.machine.active.values()]

    def restore(self, store: AlertTables) -> None:
        for a in store.load_rule_state(self.key):
            self.machine.active[a.fingerprint] = a

    @property
    def heals(self) -> bool:
        """Whether healing acts on this rule's firing alerts (a runbook, a remedy, or both)."""
        return self.rule.sentinel.runbook is not None or self.rule.sentinel.remediation is not None

    @property
    def group_by(self) -> tuple[str, ...]:
        """Labels delivery groups by in addition to the route's."""
        return ()

    def hold(self, due: list[Alert], now: float) -> tuple[list[Alert], dict[str, Any]]:
        """The notifications to send now of those ``due``, and what to save with the state (kv entries)."""
        return due, {}

    @property
    def hold_s(self) -> float:
        return 0.0

    def progress(self, now: float, changed: bool) -> dict[str, Any]:
        """What to save of the evaluation's progress (kv entries) after a successful one."""
        return {}


@dataclass
class PromQLRule(AlertingRuntime):
    """An alerting rule over a PromQL query; a learned rule's signal becomes alerts only where it leaves its
    learned band."""

    def query(self, now: float, ctx: RuleContext, replay: bool = False) -> list[Sample]:
        if ctx.promql is None:
            raise DatasourceError("no Prometheus is configured for PromQL rules")
        samples = ctx.promql.query(self.rule.expr or "", now - (self.group.group.query_offset or 0.0))
        spec = self.rule.sentinel.learned
        if spec is not None:
            return ctx.learned.departures(self.key, samples, spec.direction)
        return samples


@dataclass
class LogRule(AlertingRuntime):
    """An alerting rule over a log query (``sentinel.rules.logtypes``)."""

    held: dict[str, Any] | None = None  # aggregation: {"since": t, "fingerprints": [...]} until it is sent
    last_ok: float = 0.0  # the last evaluation that answered (evaluations after it are replayed)
    last_ok_saved: float = 0.0

    @property
    def spec(self) -> LogRuleType:
        assert self.rule.log is not None
        return self.rule.log

    @property
    def datasource(self) -> str:
        return "logs"

    def restore(self, store: AlertTables) -> None:
        super().restore(store)
        self.held = store.get(f"held:{self.key}")
        self.last_ok = float(store.get(f"last_ok:{self.key}") or 0.0)

    def query(self, now: float, ctx: RuleContext, replay: bool = False) -> list[Sample]:
        if ctx.logs is None:
            raise DatasourceError("no log store is configured for log rules")
        return ctx.logs.query(self.spec, now - (self.group.group.query_offset or 0.0), replay, rule=self.key)

    def evaluate(self, now: float, ctx: RuleContext) -> list[Alert]:
        if self.last_ok and ctx.catch_up_max > 0 and not self.catch_up(now, ctx):
            return []  # still replaying the past: the present waits (its state would skip what is not replayed)
        return super().evaluate(now, ctx)

    def catch_up(self, now: float, ctx: RuleContext) -> bool:
        """Replay the evaluations this rule missed (the log store was down, or sentinel was), in order, so that
        what happened meanwhile fires and resolves with its real times, as ElastAlert queries from its last
        run. Windows are (at - timeframe, at], so a past evaluation sees exactly what it would have, once the
        shipper has delivered the lines up to ``at``. Replays send state changes only (no repeats of an alert
        already sent) and start no runbook or remediation. The gap is replayed at the group's interval,
        coarser (never coarser than the rule's timeframe, so every line is in some window) when that would
        take more than 60 queries, and at most the last ``catch_up_max`` seconds of it; the last seconds,
        which the store may not show yet in normal operation either, are left to the live evaluation's
        window. Returns False while replays remain (the first failing one stops this round; the next
        evaluation resumes from it)."""
        interval = ctx.interval(self.group)
        lag = ctx.logs.lag_s if ctx.logs is not None else 0.0
        if now - self.last_ok <= 1.5 * interval + lag:
            return True
        start = max(self.last_ok, now - ctx.catch_up_max)
        step = max(interval, min((now - start) / 60.0, self.spec.timeframe))
        n = 0
        t = start + step
        done = True
        while t < now - max(0.5 * interval, lag):
            try:
                ctx.commit(self, t, self.query(t, ctx, replay=True), sent_at=now)
            except Exception as exc:  # as in the evaluator's eval_rule: this rule's failure alone
                self.health, self.last_error = "err", f"catching up from {_iso(t)}: {exc}"
                log.warning("rule %s: catching up paused at %s: %s", self.rule.name, _iso(t), exc)
                done = False
                break
            n += 1
            t += step
        if n:
            log.warning("rule %s: replayed %d evaluations missed since %s", self.rule.name, n, _iso(start))
            if ctx.metrics:
                ctx.metrics.catch_up.labels(self.group.group.name).inc(n)
        return done

    @property
    def group_by(self) -> tuple[str, ...]:
        return tuple(self.spec.aggregation_key or ())  # ElastAlert's split, as extra group_by labels

    @property
    def hold_s(self) -> float:
        return float(self.spec.aggregation or 0.0)

    def hold(self, due: list[Alert], now: float) -> tuple[list[Alert], dict[str, Any]]:
        """ElastAlert's ``aggregation``: due notifications are held from the first one for the period, then
        sent together with each held alert's state at that time (firing, or resolved if it ended meanwhile).
        The held set is saved with the alert state, so a restart neither loses nor repeats it."""
        period = self.spec.aggregation
        if period is None:
            return due, {}
        held = self.held or {"since": now, "fingerprints": []}
        if not self.held and not due:
            return [], {}
        fps = list(dict.fromkeys([*held["fingerprints"], *(a.fingerprint for a in due)]))
        if now - float(held["since"]) < period:
            if self.held is not None and fps == self.held["fingerprints"]:
                return [], {}  # nothing new while holding: nothing to write
            self.held = {"since": held["since"], "fingerprints": fps}
            return [], {f"held:{self.key}": self.held}
        self.held = None
        out = []
        for fp in fps:
            a = self.machine.active.get(fp)
            if a is not None and a.state != State.PENDING:
                out.append(replace(a, labels=dict(a.labels), annotations=dict(a.annotations)))
        return out, {f"held:{self.key}": None}

    def progress(self, now: float, changed: bool) -> dict[str, Any]:
        self.last_ok = now
        # with every state change, else once a minute: replaying evaluations that changed nothing is harmless
        if changed or now - self.last_ok_saved >= 60.0:
            self.last_ok_saved = now
            return {f"last_ok:{self.key}": now}
        return {}


@dataclass
class RecordingRule(RuleRuntime):
    """A recording rule: its result is written back to Prometheus (remote write) at the evaluation time, with
    stale markers for the series it no longer returns, where later rules and dashboards read it."""

    recorded: set[tuple[tuple[str, str], ...]] = field(default_factory=set)  # the series written last time

    def evaluate(self, now: float, ctx: RuleContext) -> list[Alert]:
        if ctx.promql is None:
            raise DatasourceError("no Prometheus is configured for recording rules")
        if ctx.writer is None:
            raise DatasourceError("recording rules need a Prometheus remote-write receiver "
                                  "(--web.enable-remote-write-receiver; sentinel starts its own Prometheus with it)")
        offset = self.group.group.query_offset or 0.0
        out = recorded_series(self.rule.name, {**self.group.group.labels, **self.rule.labels},
                              ctx.promql.query_raw(self.rule.expr or "", now - offset))
        ms = round((now - offset) * 1000)
        keys = {tuple(sorted(labels.items())) for labels, _ in out}
        batch: list[Series] = [(labels, [(ms, v)]) for labels, v in out]
        batch += [(dict(k), [(ms, None)]) for k in self.recorded - keys]
        if batch:
            try:
                ctx.writer.write(batch)
            except Exception as exc:
                raise DatasourceError(f"writing the recorded series failed: {exc}") from exc
        self.recorded = keys
        self.health, self.last_error = "ok", None
        return []

    def stale(self, now: float, writer: RemoteWriter | None) -> None:
        """The rule was removed: its series end now (stale markers), as Prometheus does."""
        if self.recorded and writer is not None:
            try:
                writer.write([(dict(k), [(round(now * 1000), None)]) for k in self.recorded])
            except Exception as exc:  # the series then end at Prometheus's 5m lookback instead
                log.warning("recording rule %s removed; stale markers not written: %s", self.rule.name, exc)


def runtime_for(g: LoadedGroup, rule: Rule) -> RuleRuntime:
    if rule.record is not None:
        return RecordingRule(g, rule)
    if rule.log is not None:
        return LogRule(g, rule)
    return PromQLRule(g, rule)


def eval_rule(rt: RuleRuntime, now: float, ctx: RuleContext) -> list[Alert]:
    """Evaluate one rule at ``now``; its firing alerts. Any failure is this rule's alone: it is marked (a
    failed query changes no state: nothing resolves because a datasource is down), and its group carries on."""
    gname = rt.group.group.name
    t0 = time.perf_counter()
    if ctx.metrics:
        ctx.metrics.evaluations.labels(gname).inc()
    try:
        return rt.evaluate(now, ctx)
    except Exception as exc:
        rt.health = "err"
        known = isinstance(exc, DatasourceError | EvaluationError)
        rt.last_error = str(exc) if known else f"internal error: {type(exc).__name__}: {exc}"
        if ctx.metrics:
            ctx.metrics.failures.labels(gname).inc()
        if known:
            log.warning("rule %s: %s", rt.rule.name, exc)
        else:
            log.exception("rule %s: evaluation failed", rt.rule.name)
        return []
    finally:
        rt.last_duration = time.perf_counter() - t0
        rt.last_eval = now
        if ctx.metrics:
            ctx.metrics.duration.observe(rt.last_duration)


@dataclass
class RuleGroup:
    """A loaded group's rules, evaluated in order with one timestamp (as Prometheus) at its interval."""

    loaded: LoadedGroup
    rules: list[RuleRuntime]

    @property
    def name(self) -> str:
        return self.loaded.group.name

    def eval(self, now: float, ctx: RuleContext) -> list[tuple[AlertingRuntime, list[Alert]]]:
        """Evaluate every rule at ``now``; the alerting rules with firing alerts, and those alerts."""
        out: list[tuple[AlertingRuntime, list[Alert]]] = []
        for rt in self.rules:
            firing = eval_rule(rt, now, ctx)
            if firing and isinstance(rt, AlertingRuntime):
                out.append((rt, firing))
        return out
