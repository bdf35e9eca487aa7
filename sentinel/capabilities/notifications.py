"""Delivery of alerts: routing, grouping and inhibition (Alertmanager's semantics) into the persisted
outbox, and the dispatcher that posts it to the webhook receivers and to Alertmanager, signed, retried,
surviving restarts. Only the leader notifies."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from sentinel.alerts.delivery import Delivery, ReceiverOptions
from sentinel.alerts.notify import Dispatcher
from sentinel.alerts.routing import build as build_route
from sentinel.alerts.routing import default_tree
from sentinel.alerts.store import Store
from sentinel.capabilities import Clock, Service
from sentinel.metrics import SentinelMetrics
from sentinel.settings import Settings

log = logging.getLogger(__name__)
AM_RECEIVER = "alertmanager"  # the receiver name of alerting.alertmanager_url


class Notifications:
    name = "notifications"

    def __init__(self, settings: Settings, store: Store, metrics: SentinelMetrics, api_url: str,
                 leading: Callable[[], bool]) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.api_url = api_url
        self.leading = leading
        self.http: httpx.Client | None = None
        self.dispatcher: Dispatcher | None = None
        self.delivery: Delivery | None = None

    def start(self, clock: Clock) -> None:
        a = self.settings.alerting
        self.http = httpx.Client(timeout=10.0)
        signing = {r.name: (r.signing_key_id, r.signing_key.get_secret_value().encode())
                   for r in a.receivers if r.signing_key is not None}
        urls = {r.name: r.url for r in a.receivers}
        if a.alertmanager_url:
            urls[AM_RECEIVER] = a.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        route = build_route(a.route or default_tree([r.name for r in a.receivers]))
        self.delivery = delivery = Delivery(
            self.store, route, {r.name: ReceiverOptions(r.send_resolved, r.max_alerts) for r in a.receivers},
            [AM_RECEIVER] if a.alertmanager_url else [], self.api_url, a.inhibit_rules,
            on_groups=self.metrics.alert_groups.set)
        self.dispatcher = Dispatcher(
            self.store, self.http, signing=signing, give_up_after_s=a.notification_max_age, urls=urls,
            on_result=lambda rcv, outcome: self.metrics.notifications.labels(rcv, outcome).inc(),
            render=delivery.render)
        clock.every(1.0, self.tick, "notify")

    def tick(self) -> None:
        if not self.leading():  # a follower notifies no one: the leader does
            return
        assert self.delivery is not None and self.dispatcher is not None
        try:
            self.delivery.tick()
        except Exception:  # logged; the alerts handed over wait in the store for the next round
            log.exception("delivery round failed")
        self.dispatcher.run_once(wait=False)

    def services(self) -> list[Service]:
        a = self.settings.alerting
        out = [Service(f"receiver:{r.name}", r.url, None, "alert webhook (v4)") for r in a.receivers]
        if a.alertmanager_url:
            out.append(Service("alertmanager", a.alertmanager_url, None, "alerts pushed (external)"))
        return out

    def stop(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.http is not None:
            self.http.close()
        self.dispatcher = self.http = None
