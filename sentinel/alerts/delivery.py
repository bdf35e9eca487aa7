"""Delivery owns the notifications: alerts handed over by the evaluator (and the inbound webhook) are
routed, grouped and deduplicated with Alertmanager's semantics, and each receiver's payload is built
when its group is flushed.

The evaluator writes the alerts it would send to an Alertmanager (the same stream, at the same times:
state changes plus a resend every ``resend_delay``) into the store's ``alert_log``, in the transaction
that saves its state. Each round here consumes that log:

- receivers of kind ``alertmanager`` get the stream as it is (``POST /api/v2/alerts``): Alertmanager
  groups it itself;
- the receivers sentinel pages directly go through the routing tree (``sentinel.alerts.routing``) into
  aggregation groups, as Alertmanager's dispatcher does. A new group is flushed after ``group_wait`` (at
  once when its first alert started longer ago than that), then every ``group_interval``. A flush mutes
  silenced and inhibited alerts, and notifies only when Alertmanager's notification log says so: an alert
  the receiver has not seen firing, a newly resolved alert (with ``send_resolved``), all alerts resolved,
  or ``repeat_interval`` elapsed. Firing alerts carry the zero ``endsAt``; resolved alerts leave the
  group after the notification that reported them. ``max_alerts`` truncates a notification and counts
  the rest in ``truncatedAlerts``.

Sentinel's two additions: an alert whose runbook findings arrived after it was notified makes its group's
next flush notify again, so on-call sees the evidence without waiting for ``repeat_interval``; and an
alert replayed after a log-store outage (``flush``) flushes its group at once, so an episode that fired
and ended while no one could see it is still told (firing, then resolved), not folded away as a flap.

Groups, the notification log and the consumed position are saved with the notifications they produce,
in one transaction: ``kill -9`` repeats at most one round, never loses one. Unlike Alertmanager, which
logs a notification once the receiver took it, the log is written when the notification is queued in
the outbox: the outbox then retries it until it is delivered or expires (``notification_max_age``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.notification import Notification
from sentinel.alerts.routing import Route, labels_string
from sentinel.alerts.silences import InhibitRule, inhibited, matches_all, parse_matcher
from sentinel.alerts.store import Store
from sentinel.state.outbox import OutboxEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverOptions:
    send_resolved: bool = True
    max_alerts: int = 0


@dataclass
class AggGroup:
    id: str
    route: Route
    labels: dict[str, str]
    created_at: float
    next_flush: float
    flushed: bool = False
    alerts: dict[str, AlertEvent] = field(default_factory=dict)
    news: set[str] = field(default_factory=set)  # alerts whose sentinel data changed after they were notified

    @property
    def key(self) -> str:
        return f"{self.route.key}:{labels_string(self.labels)}"

    def saved(self) -> dict[str, Any]:
        return {"id": self.id, "route": self.route.id, "labels": self.labels, "created_at": self.created_at,
                "next_flush": self.next_flush, "flushed": self.flushed,
                "alerts": {"alerts": {fp: e.to_json() for fp, e in self.alerts.items()}, "news": sorted(self.news)}}


def _before(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """``model.LabelSet.Before``."""
    if len(a) != len(b):
        return len(a) < len(b)
    for name in sorted([*a, *b]):
        if name not in a:
            return True
        if name not in b:
            return False
        if a[name] != b[name]:
            return a[name] < b[name]
    return False


def _alert_order(x: AlertEvent, y: AlertEvent) -> int:
    """``types.AlertSlice``: by ``job``, then ``instance`` (alerts with the label first), then all labels."""
    a, b = x.labels, y.labels
    for key in ("job", "instance"):
        if key not in a and key not in b:
            continue
        if key not in a:
            return 1
        if key not in b:
            return -1
        if a[key] != b[key]:
            return -1 if a[key] < b[key] else 1
    return -1 if _before(a, b) else (1 if _before(b, a) else 0)


def needs_update(entry: Mapping[str, Any] | None, firing: set[str], resolved_: set[str], repeat: float,
                 send_resolved: bool, now: float) -> bool:
    """Alertmanager's ``DedupStage.needsUpdate``."""
    if entry is None:
        return bool(firing)
    if not firing <= set(entry["firing"]):
        return True
    if not firing:
        return bool(entry["firing"])
    if send_resolved and not resolved_ <= set(entry["resolved"]):
        return True
    return float(entry["sent_at"]) < now - repeat


@dataclass
class _Round:
    """What one delivery round produces, saved in one transaction at its end."""

    now: float
    touched: set[str] = field(default_factory=set)
    gone: list[str] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    nflog: list[tuple[str, str, list[str], list[str], float]] = field(default_factory=list)
    silences: list[list[Any]] | None = None
    firing: list[Mapping[str, str]] = field(default_factory=list)


class Delivery:
    """Consumes the alerts handed over and queues the notifications; ``tick`` runs one round."""

    def __init__(self, store: Store, route: Route, receivers: Mapping[str, ReceiverOptions],
                 alertmanagers: Sequence[str] = (), external_url: str = "",
                 inhibit_rules: Sequence[InhibitRule] = (), clock: Callable[[], float] = time.time,
                 on_groups: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.route = route
        self.receivers = dict(receivers)
        self.alertmanagers = list(alertmanagers)
        self.external_url = external_url
        self.inhibit_rules = list(inhibit_rules)
        self.clock = clock
        self.on_groups = on_groups
        self._lock = threading.Lock()
        routes = {r.id: r for r in route.walk()}
        saved, self.nflog = store.delivery_state()
        self.groups: dict[str, AggGroup] = {}
        gone = []
        for g in saved:
            r = routes.get(g["route"])
            if r is None:  # its route is no longer configured: dropped, as Alertmanager does on a reload
                gone.append(g["id"])
                continue
            alerts = {fp: AlertEvent.from_json(doc) for fp, doc in g["alerts"]["alerts"].items()}
            self.groups[g["id"]] = AggGroup(g["id"], r, g["labels"], g["created_at"], g["next_flush"], g["flushed"],
                                            alerts, set(g["alerts"]["news"]))
        self.cursor = int(store.get("delivery:cursor") or 0)
        if gone:
            log.warning("dropping %d alert group(s) whose route is no longer configured", len(gone))
            self.nflog = {k: v for k, v in self.nflog.items() if k[0] not in set(gone)}
            store.save_delivery(self.cursor, [], gone, [], [], self.clock())

    def render(self, receiver: str, note: Notification) -> Any:
        """A queued notification's body, with the receiver's options and the external URL of now."""
        return note.render(receiver, self.external_url, self.receivers.get(receiver, ReceiverOptions()).max_alerts)

    def tick(self, now: float | None = None) -> int:
        """Consume what was handed over, flush the groups that are due; returns notifications queued."""
        with self._lock:
            return self._tick(self.clock() if now is None else now)

    def _tick(self, now: float) -> int:
        rnd = _Round(now)
        cursor = self.cursor
        while True:
            batch = self.store.alert_log_after(cursor)
            if not batch:
                break
            cursor = batch[-1][0]
            events = [e for _, _, e in batch]
            for name in self.alertmanagers:
                key = hashlib.sha256(json.dumps([name, batch[0][0], cursor]).encode()).hexdigest()[:32]
                rnd.outbox.append((key, name, "", Notification("alertmanager", tuple(events)).to_json()))
            for _, at, e in batch:  # a group's timers count from when its alert was handed over
                self._insert(e, min(at, now), rnd)
            if len(batch) < 5000:
                break
        for g in list(self.groups.values()):
            if g.next_flush <= now:
                self._flush_round(g, rnd)
        if cursor != self.cursor or rnd.touched or rnd.outbox:
            self.store.save_delivery(cursor, [self.groups[i].saved() for i in rnd.touched if i in self.groups],
                                     rnd.gone, rnd.nflog, rnd.outbox, now)
            self.cursor = cursor
        if self.on_groups is not None:
            self.on_groups(len(self.groups))
        return len(rnd.outbox)

    def _flush_round(self, g: AggGroup, rnd: _Round) -> None:
        if rnd.silences is None:
            now = rnd.now
            rnd.silences = [[parse_matcher(m) for m in s["matchers"]] for s in self.store.silences(now)]
            rnd.firing = list({fp: e.labels for grp in self.groups.values() for fp, e in grp.alerts.items()
                               if not e.resolved(now)}.values()) if self.inhibit_rules else []
        rnd.touched.add(g.id)
        self._flush(g, rnd.now, rnd.silences, rnd.firing, rnd.outbox, rnd.nflog)
        if not g.alerts:
            rnd.gone.append(g.id)
            del self.groups[g.id]
            for k in [k for k in self.nflog if k[0] == g.id]:
                del self.nflog[k]

    def _insert(self, e: AlertEvent, at: float, rnd: _Round) -> None:
        labels = e.labels
        fp = e.fp
        for r in self.route.match(labels):
            if not r.receiver:
                continue  # the implicit root route: every alert is taken by a receiver's route below it
            gl = r.group_labels(labels)
            for k in e.group_by:  # a log rule's aggregation_key: more labels to group by
                if k in labels:
                    gl[k] = labels[k]
            gid = f"{r.id}:{labels_string(gl)}"
            g = self.groups.get(gid)
            if g is not None and g.next_flush <= at:
                # the group was due before this alert arrived: Alertmanager's timer would have fired first
                self._flush_round(g, rnd)
                g = self.groups.get(gid)
            if g is None:
                g = self.groups[gid] = AggGroup(gid, r, gl, at, at + r.group_wait)
            prev = g.alerts.get(fp)
            g.alerts[fp] = e
            if prev is not None and e.sentinel and prev.sentinel != e.sentinel:
                g.news.add(fp)
            if (not g.flushed and e.starts_at + r.group_wait < at) or e.flush:
                g.next_flush = min(g.next_flush, at)
            rnd.touched.add(gid)

    def _flush(self, g: AggGroup, now: float, silences: list[list[Any]], firing_labels: list[Mapping[str, str]],
               outbox: list[OutboxEntry], nflog: list[tuple[str, str, list[str], list[str], float]]) -> None:
        # the timer restarts from when it was due (this round may run a little after it), as Alertmanager's
        # timer restarts when it fires; after a long stop, from now
        g.next_flush += g.route.group_interval
        if g.next_flush <= now:
            g.next_flush = now + g.route.group_interval
        g.flushed = True
        alerts = sorted(g.alerts.values(), key=functools.cmp_to_key(_alert_order))
        done = [e.fp for e in alerts if e.resolved(now)]
        shown = []
        for e in alerts:
            labels = e.labels
            if any(matches_all(ms, labels) for ms in silences):
                continue
            if not e.resolved(now) and firing_labels and inhibited(labels, firing_labels, self.inhibit_rules):
                continue
            shown.append(e)
        rcv = g.route.receiver
        opts = self.receivers.get(rcv, ReceiverOptions())
        if shown:
            firing = {e.fp for e in shown if not e.resolved(now)}
            res = {e.fp for e in shown if e.resolved(now)}
            entry = self.nflog.get((g.id, rcv))
            news = bool(g.news & firing)
            if needs_update(entry, firing, res, g.route.repeat_interval, opts.send_resolved, now) or news:
                send = shown if opts.send_resolved else [e for e in shown if not e.resolved(now)]
                if send:
                    note = Notification("webhook", tuple(send), now, g.key, dict(g.labels))
                    key = hashlib.sha256(json.dumps([rcv, g.id, sorted(firing), sorted(res), now]).encode()
                                         ).hexdigest()[:32]
                    outbox.append((key, rcv, "", note.to_json()))
                self.nflog[(g.id, rcv)] = {"firing": sorted(firing), "resolved": sorted(res), "sent_at": now}
                nflog.append((g.id, rcv, sorted(firing), sorted(res), now))
        g.news.clear()
        for fp in done:  # notified (or muted): a resolved alert leaves its group
            g.alerts.pop(fp, None)
