"""sentinel's own metrics (named after Prometheus's rule-manager metrics), on an injected registry."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sentinel.alerts.state import Alert, State

if TYPE_CHECKING:
    from sentinel.state.outbox import Outbox


class ShippingStatus(Protocol):
    """What the backlog metrics read of log shipping (``sentinel.logstore.shipper.Shipper`` has it; named
    here as a protocol so that metrics, which the rules import, does not import the log store)."""

    @property
    def synced_at(self) -> float: ...

    @property
    def backlog(self) -> Mapping[str, int]: ...


class SentinelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        g = ["rule_group"]
        self.evaluations = Counter("sentinel_rule_evaluations_total", "Rule evaluations.", g, registry=registry)
        self.failures = Counter("sentinel_rule_evaluation_failures_total", "Rule evaluations that failed.", g,
                                registry=registry)
        self.duration = Histogram("sentinel_rule_evaluation_duration_seconds", "Duration of one rule's evaluation.",
                                  registry=registry)
        self.group_duration = Gauge("sentinel_rule_group_last_duration_seconds",
                                    "Duration of the last evaluation of a rule group.", g, registry=registry)
        self.group_last = Gauge("sentinel_rule_group_last_evaluation_timestamp_seconds",
                                "When a rule group was last evaluated.", g, registry=registry)
        self.missed = Counter("sentinel_rule_group_iterations_missed_total",
                              "Group evaluations skipped because the previous one was still running.", g,
                              registry=registry)
        self.alerts = Gauge("sentinel_alerts", "Active alerts by state.", ["alertname", "state"], registry=registry)
        self.notifications = Counter("sentinel_notifications_total", "Notification delivery attempts by outcome.",
                                     ["receiver", "outcome"], registry=registry)
        self.alert_groups = Gauge("sentinel_notification_groups",
                                  "Alert groups held by delivery (aggregation groups).", registry=registry)
        self.child_restarts = Counter("sentinel_child_restarts_total",
                                      "Restarts of child services sentinel started (Prometheus) after they exited.",
                                      ["child", "outcome"], registry=registry)
        self.remediations = Counter("sentinel_remediations_total", "Remediation decisions and outcomes.",
                                    ["action", "outcome"], registry=registry)
        self.reload_ok = Gauge("sentinel_rules_last_reload_successful",
                               "1 when the last rule/runbook reload succeeded (0: the last good set still runs).",
                               registry=registry)
        self.reload_time = Gauge("sentinel_rules_last_reload_success_timestamp_seconds",
                                 "When rules were last loaded successfully.", registry=registry)
        self.log_store_up = Gauge("sentinel_log_store_up", "1 when the last shipment reached the log store.",
                                  registry=registry)
        self.catch_up = Counter("sentinel_rule_catch_up_evaluations_total",
                                "Missed log-rule evaluations replayed after the log store (or sentinel) was back.", g,
                                registry=registry)
        self.log_events = Counter("sentinel_log_events_shipped_total", "Log events shipped into the log store.",
                                  registry=registry)


class BacklogCollector(Collector):
    """Work sentinel has not finished, read at scrape time: notifications queued per receiver (and the age
    of the oldest), and log shipping's lag (seconds since every line was last handed to the store) and
    backlog (bytes written to a replica's log but not shipped yet)."""

    def __init__(self, store: Outbox, shipper: Callable[[], ShippingStatus | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.shipper = shipper
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        queue = GaugeMetricFamily("sentinel_notification_queue_length",
                                  "Notifications waiting to be delivered, per receiver.", labels=["receiver"])
        oldest = GaugeMetricFamily("sentinel_notification_queue_oldest_seconds",
                                   "Age of the oldest notification waiting, per receiver.", labels=["receiver"])
        for receiver, (n, created) in sorted(self.store.pending_by_receiver().items()):
            queue.add_metric([receiver], n)
            oldest.add_metric([receiver], max(0.0, now - created))
        yield queue
        yield oldest
        shipper = self.shipper()
        if shipper is None:
            return
        lag = GaugeMetricFamily("sentinel_log_shipping_lag_seconds",
                                "Seconds since the last run that handed every log line to the log store "
                                "(grows while the store is down).")
        if shipper.synced_at:
            lag.add_metric([], max(0.0, now - shipper.synced_at))
        yield lag
        backlog = GaugeMetricFamily("sentinel_log_shipping_backlog_bytes",
                                    "Bytes of a replica's log not yet shipped.", labels=["source"])
        for source, n in sorted(dict(shipper.backlog).items()):
            backlog.add_metric([source], n)
        yield backlog


class ActiveAlerts(Collector):
    """``sentinel_active_alerts``: Prometheus's ``ALERTS`` series from sentinel's own alert state.

    One series per pending or firing alert, value 1, labelled like ``ALERTS``: the alert's labels plus
    ``alertname`` and ``alertstate`` (``pending`` | ``firing``). A series ends when its alert resolves, so
    Grafana draws firing and resolved alerts from it without Prometheus evaluating any rule. Scrape sentinel
    with ``honor_labels: true`` so alert labels such as ``job`` or ``instance`` are kept as they are.

    The evaluator replaces a rule's snapshot after each evaluation (one dict assignment); a scrape reads the
    snapshots without taking the evaluator's lock."""

    def __init__(self) -> None:
        self._by_rule: dict[str, list[dict[str, str]]] = {}

    def update(self, key: str, rule_name: str, alerts: Iterable[Alert]) -> None:
        series = [{**_label_names(a.labels), "alertname": rule_name, "alertstate": a.state.value} for a in alerts
                  if a.state in (State.PENDING, State.FIRING)]
        if series:
            self._by_rule[key] = series
        else:
            self._by_rule.pop(key, None)

    def drop(self, key: str) -> None:
        self._by_rule.pop(key, None)

    def collect(self) -> Iterable[Metric]:
        m = Metric("sentinel_active_alerts", "Pending and firing alerts (Prometheus's ALERTS, from sentinel's state).",
                   "gauge")
        for series in list(self._by_rule.values()):
            for labels in series:
                m.add_sample(m.name, labels, 1.0)
        yield m


_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def _label_names(labels: dict[str, str]) -> dict[str, str]:
    """Alert labels as Prometheus label names: a log rule's ``query_key`` may name a field such as ``host.name``,
    which the exposition format cannot carry (one such label would fail the whole scrape): ``host_name``, as
    Prometheus's own relabelling would make it. Reserved ``__`` names are left out."""
    out = {}
    for k, v in labels.items():
        name = _INVALID.sub("_", k)
        if name[:1].isdigit():
            name = "_" + name
        if name and not name.startswith("__"):
            out[name] = v
    return out
