"""The alert state machine, exactly as Prometheus's ``AlertingRule.Eval`` and ``sendAlerts``.

Pure: no I/O, no clock of its own. Times are Unix seconds (floats); 0 means "never".
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from sentinel.alerts.fingerprint import fingerprint
from sentinel.errors import EvaluationError

RESOLVED_RETENTION_S = 15 * 60.0
DEFAULT_RESEND_DELAY_S = 60.0


class State(enum.StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


@dataclass(frozen=True)
class Sample:
    """One element of a query result: a label set and its value."""

    labels: Mapping[str, str]
    value: float


@dataclass
class Alert:
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    state: State
    active_at: float
    fired_at: float = 0.0
    resolved_at: float = 0.0
    last_sent_at: float = 0.0
    valid_until: float = 0.0
    keep_firing_since: float = 0.0
    hits: int = 1  # consecutive evaluations that returned this alert (for consecutive_samples)
    notified_at: float = 0.0  # the last firing notification, carried across episodes (for realert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def needs_sending(self, now: float, resend_delay: float) -> bool:
        if self.state == State.PENDING:
            return False
        if not self.last_sent_at or self.resolved_at > self.last_sent_at:
            return True  # never sent (Go's zero time is long past), or resolved since the last send
        return self.last_sent_at + resend_delay < now


# Expands a template (labels and annotations) against an alert's labels and value.
Expander = Callable[[str, Mapping[str, str], float], str]


def _no_templates(text: str, labels: Mapping[str, str], value: float) -> str:
    return text


@dataclass
class AlertingRule:
    name: str
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    limit: int = 0
    consecutive: int = 0  # the seed's "N consecutive samples": also needs N evaluations in a row
    realert_s: float | None = None  # ElastAlert's realert (log rules): see ``to_send``
    expand: Expander = _no_templates
    active: dict[str, Alert] = field(default_factory=dict)

    def eval(self, now: float, samples: Iterable[Sample]) -> list[Alert]:
        """Advance the state with one query result; returns the alerts now pending or firing.

        Raises EvaluationError (leaving state untouched) on duplicate label sets; on exceeding
        ``limit`` all alerts are dropped, as Prometheus does.
        """
        fresh: dict[str, Alert] = {}
        for s in samples:
            base = {k: v for k, v in s.labels.items() if k != "__name__"}
            lbs = dict(base)
            for k, tmpl in self.labels.items():
                lbs[k] = self.expand(tmpl, base, s.value)
            lbs["alertname"] = self.name
            ann = {k: self.expand(t, base, s.value) for k, t in self.annotations.items()}
            fp = fingerprint(lbs)
            if fp in fresh:
                raise EvaluationError(
                    f"rule {self.name}: vector contains metrics with the same labelset after applying "
                    f"alert labels: {lbs}")
            fresh[fp] = Alert(lbs, ann, s.value, State.PENDING, now)

        for fp, a in fresh.items():
            old = self.active.get(fp)
            if old is not None and old.state != State.INACTIVE:
                old.value, old.annotations = a.value, a.annotations
                old.hits = min(old.hits + 1, max(self.consecutive, 1))  # capped: steady state stays steady
            else:
                if old is not None:
                    a.notified_at = old.notified_at
                self.active[fp] = a

        retention = max(RESOLVED_RETENTION_S, self.realert_s or 0.0)
        num_active = 0
        for fp, a in list(self.active.items()):
            if fp not in fresh:
                keep_firing = False
                if a.state == State.FIRING and self.keep_firing_for_s > 0:
                    if not a.keep_firing_since:
                        a.keep_firing_since = now
                    keep_firing = now - a.keep_firing_since < self.keep_firing_for_s
                if a.state == State.PENDING or (a.resolved_at and now - a.resolved_at > retention):
                    del self.active[fp]
                if a.state != State.INACTIVE and not keep_firing:
                    a.state = State.INACTIVE
                    a.resolved_at = now
                if not keep_firing:
                    continue
            else:
                a.keep_firing_since = 0.0
            num_active += 1
            if a.state == State.PENDING and now - a.active_at >= self.for_s and a.hits >= self.consecutive:
                a.state = State.FIRING
                a.fired_at = now

        if self.limit and num_active > self.limit:
            self.active.clear()
            raise EvaluationError(f"rule {self.name}: exceeded limit of {self.limit} with {num_active} alerts")
        return [replace(a) for a in self.active.values() if a.state != State.INACTIVE]

    def to_send(self, now: float, resend_delay: float, interval: float, repeat: bool = True,
                sent_at: float | None = None) -> list[Alert]:
        """Alerts due to be sent now; marks them sent and sets ``valid_until`` (the ``endsAt``).

        With ``realert_s`` (ElastAlert's realert) it replaces ``resend_delay``, and it also spaces the
        firing notifications of one label set across episodes: an alert that fires again sooner than
        ``realert_s`` after the last firing notification is held until then (sent if it still fires), and
        an episode whose firing was never sent is not sent as resolved either (a flap within realert is
        one page, not two). ``repeat=False`` sends state changes only, and ``sent_at`` is when they really
        go out (replaying missed evaluations: ``endsAt`` counts from then, not from the past evaluation)."""
        out = []
        realert = self.realert_s
        delay = resend_delay if realert is None else realert
        for a in self.active.values():
            if realert is not None:
                if a.state == State.FIRING and not a.last_sent_at and a.notified_at and now - a.notified_at < realert:
                    continue  # fired again within realert of the last page: held
                if a.state == State.INACTIVE and a.notified_at < a.active_at:
                    continue  # its firing was never sent: nothing to resolve
            if not repeat and a.last_sent_at and a.resolved_at <= a.last_sent_at:
                continue
            if a.needs_sending(now, delay):
                a.last_sent_at = now
                a.valid_until = (now if sent_at is None else sent_at) + 4 * max(delay, interval)
                if a.state == State.FIRING:
                    a.notified_at = now
                out.append(replace(a, labels=dict(a.labels), annotations=dict(a.annotations)))
        return out

    def firing(self) -> list[Alert]:
        return [a for a in self.active.values() if a.state == State.FIRING]


def ends_at(a: Alert) -> float:
    """Prometheus's notifier: resolved alerts end when they resolved, others at ``valid_until``."""
    return a.resolved_at if a.resolved_at else a.valid_until

