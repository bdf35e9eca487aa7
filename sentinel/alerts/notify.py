"""Notifications: Alertmanager webhook v4 payloads, delivered from the outbox at least once.

Delivery follows Alertmanager's webhook notifier: 2xx is done; 5xx, 429 and network errors are
retried with exponential backoff; any other 4xx is final. Each delivery carries an
``Idempotency-Key`` header that stays the same across retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from sentinel.alerts.state import Alert, State, ends_at
from sentinel.alerts.store import OutboxItem, Store

log = logging.getLogger(__name__)
ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ts: float) -> str:
    if not ts:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_status(a: Alert) -> str:
    return "resolved" if a.state == State.INACTIVE else "firing"


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    out = dict(maps[0])
    for m in maps[1:]:
        out = {k: v for k, v in out.items() if m.get(k) == v}
    return out


def webhook_payload(receiver: str, alerts: Sequence[Alert], group_labels: Mapping[str, str], external_url: str,
                    generator_url: str, extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """An Alertmanager webhook (version "4") body for one group of alerts.

    ``extra`` maps a fingerprint to sentinel-specific data (e.g. runbook findings) carried under the
    ``sentinel`` key of that alert; receivers that only know v4 ignore it.
    """
    items = []
    for a in alerts:
        item: dict[str, Any] = {
            "status": alert_status(a), "labels": dict(a.labels), "annotations": dict(a.annotations),
            "startsAt": rfc3339(a.fired_at or a.active_at), "endsAt": rfc3339(ends_at(a)),
            "generatorURL": generator_url, "fingerprint": a.fingerprint,
        }
        if extra and a.fingerprint in extra:
            item["sentinel"] = dict(extra[a.fingerprint])
        items.append(item)
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
    return {
        "version": "4", "groupKey": group_key, "truncatedAlerts": 0,
        "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
        "receiver": receiver, "groupLabels": dict(group_labels),
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url, "alerts": items,
    }


def alertmanager_payload(alerts: Sequence[Alert], generator_url: str) -> list[dict[str, Any]]:
    """The body of Alertmanager's ``POST /api/v2/alerts``, as Prometheus's notifier sends it."""
    return [{"labels": dict(a.labels), "annotations": dict(a.annotations),
             "startsAt": rfc3339(a.fired_at or a.active_at), "endsAt": rfc3339(ends_at(a)),
             "generatorURL": generator_url} for a in alerts]


def alertmanager_key(receiver: str, alerts: Sequence[Alert], sent_at: float) -> str:
    body = json.dumps([receiver, sorted((a.fingerprint, alert_status(a)) for a in alerts), sent_at])
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def idempotency_key(receiver: str, payload: Mapping[str, Any], sent_at: float) -> str:
    body = json.dumps([receiver, payload["groupKey"], [(i["fingerprint"], i["status"]) for i in payload["alerts"]],
                       sent_at], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class Dispatcher:
    """Drains the outbox: one POST per item, retried on 5xx/429/network errors with backoff."""

    def __init__(self, store: Store, client: httpx.Client, clock: Callable[[], float] = time.time,
                 max_backoff_s: float = 300.0, give_up_after_s: float = 24 * 3600.0,
                 on_result: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self.on_result = on_result or (lambda receiver, outcome: None)

    def run_once(self) -> int:
        """Attempt every due item once; returns how many were delivered."""
        sent = 0
        for item in self.store.due(self.clock()):
            sent += self._deliver(item)
        return sent

    def _deliver(self, item: OutboxItem) -> int:
        try:
            resp = self.client.post(item.url, json=item.payload, headers={"Idempotency-Key": item.key})
        except httpx.HTTPError as exc:
            self._retry(item, f"{type(exc).__name__}: {exc}")
            return 0
        if resp.is_success:
            self.store.mark_sent(item.id, self.clock())
            self.on_result(item.receiver, "sent")
            return 1
        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        if resp.status_code >= 500 or resp.status_code == 429:
            self._retry(item, error)
        else:
            log.error("notification to %s refused, not retrying: %s", item.receiver, error)
            self.store.mark_failed(item.id, error)
            self.on_result(item.receiver, "failed")
        return 0

    def _retry(self, item: OutboxItem, error: str) -> None:
        now = self.clock()
        if now - item.created_at > self.give_up_after_s:
            log.error("notification to %s given up after %d attempts: %s", item.receiver, item.attempts + 1, error)
            self.store.mark_failed(item.id, error)
            self.on_result(item.receiver, "failed")
            return
        delay = min(self.max_backoff_s, 2.0 ** min(item.attempts, 16))
        log.warning("notification to %s failed (attempt %d), retrying in %.0fs: %s", item.receiver,
                    item.attempts + 1, delay, error)
        self.store.mark_retry(item.id, now + delay, error)
        self.on_result(item.receiver, "retry")
