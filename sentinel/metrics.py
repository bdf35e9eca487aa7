"""sentinel's own metrics (named after Prometheus's rule-manager metrics), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
