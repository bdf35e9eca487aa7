"""A notification as the outbox keeps it: the alerts (typed) of one flush of a group for a webhook receiver, or
a batch handed to an Alertmanager, rendered into the receiver's wire format when it is sent, as Alertmanager's
notifiers render at send time. What is rendered then (the receiver's ``max_alerts``, the external URL) is the
configuration of that moment; which alerts are resolved was decided at the flush (``at``).

Rows queued before notifications were typed hold the rendered body; they are read back into this form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sentinel.alerts.event import AlertEvent

ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ts: float) -> str:
    if not ts:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: Any) -> float:
    if not text or text == ZERO_TIME:
        return 0.0
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def common_labels(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    out = dict(maps[0])
    for m in maps[1:]:
        out = {k: v for k, v in out.items() if m.get(k) == v}
    return out


def group_payload(receiver: str, group_key: str, group_labels: Mapping[str, str], alerts: Sequence[AlertEvent],
                  now: float, external_url: str, max_alerts: int = 0) -> dict[str, Any]:
    """Alertmanager's webhook body (version "4") for one flush of a group."""
    items = []
    for e in alerts:
        done = e.resolved(now)
        item: dict[str, Any] = {
            "status": "resolved" if done else "firing", "labels": dict(e.labels),
            "annotations": dict(e.annotations), "startsAt": rfc3339(e.starts_at),
            "endsAt": rfc3339(e.ends_at) if done else ZERO_TIME,
            "generatorURL": e.generator_url, "fingerprint": e.fp,
        }
        if e.sentinel:
            item["sentinel"] = e.sentinel
        items.append(item)
    truncated = max(0, len(items) - max_alerts) if max_alerts else 0
    return {
        "version": "4", "groupKey": group_key, "truncatedAlerts": truncated,
        "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
        "receiver": receiver, "groupLabels": dict(group_labels),
        "commonLabels": common_labels([i["labels"] for i in items]),
        "commonAnnotations": common_labels([i["annotations"] for i in items]),
        "externalURL": external_url, "alerts": items[:max_alerts] if max_alerts else items,
    }


def alertmanager_body(events: Sequence[AlertEvent]) -> list[dict[str, Any]]:
    """The body of Alertmanager's ``POST /api/v2/alerts``, as Prometheus's notifier sends it."""
    out = []
    for e in events:
        item = {"labels": dict(e.labels), "annotations": dict(e.annotations),
                "startsAt": rfc3339(e.starts_at), "generatorURL": e.generator_url}
        if e.ends_at:
            item["endsAt"] = rfc3339(e.ends_at)
        out.append(item)
    return out


@dataclass(frozen=True)
class Notification:
    format: Literal["webhook", "alertmanager"]
    alerts: tuple[AlertEvent, ...]
    at: float = 0.0  # webhook: the flush, which decided the alerts resolved in it
    group_key: str = ""
    group_labels: Mapping[str, str] = field(default_factory=dict)

    def keys(self) -> list[tuple[str, str]]:
        """Each alert with its group (an Alertmanager batch has none): a later notification of the same key
        supersedes this one's copy of the alert."""
        return [(self.group_key, e.fp) for e in self.alerts]

    def without(self, drop: set[tuple[str, str]]) -> Notification | None:
        """This notification without the alerts in ``drop``; None when nothing is left."""
        kept = tuple(e for e in self.alerts if (self.group_key, e.fp) not in drop)
        return Notification(self.format, kept, self.at, self.group_key, self.group_labels) if kept else None

    def render(self, receiver: str, external_url: str = "", max_alerts: int = 0) -> Any:
        """The body to POST: Alertmanager's webhook payload, or its ``/api/v2/alerts`` list."""
        if self.format == "alertmanager":
            return alertmanager_body(self.alerts)
        return group_payload(receiver, self.group_key, self.group_labels, self.alerts, self.at, external_url,
                             max_alerts)

    def to_json(self) -> dict[str, Any]:
        return {"notification": self.format, "alerts": [e.to_json() for e in self.alerts], "at": self.at,
                "group_key": self.group_key, "group_labels": dict(self.group_labels)}

    @classmethod
    def from_json(cls, doc: Any) -> Notification:
        if isinstance(doc, dict) and "notification" in doc:
            return cls("alertmanager" if doc["notification"] == "alertmanager" else "webhook",
                       tuple(AlertEvent.from_json(a) for a in doc.get("alerts", [])), float(doc.get("at") or 0.0),
                       str(doc.get("group_key") or ""), {str(k): str(v) for k, v in (doc.get("group_labels") or {}
                                                                                     ).items()})
        return cls._rendered(doc)

    @classmethod
    def _rendered(cls, doc: Any) -> Notification:
        """A body rendered before notifications were typed: a webhook payload, or an Alertmanager list."""
        items = doc if isinstance(doc, list) else list(doc.get("alerts", []))
        events = tuple(AlertEvent(
            {str(k): str(v) for k, v in (a.get("labels") or {}).items()},
            {str(k): str(v) for k, v in (a.get("annotations") or {}).items()},
            _parse_time(a.get("startsAt")),
            _parse_time(a.get("endsAt")) if isinstance(doc, list) or a.get("status") == "resolved" else 0.0,
            str(a.get("generatorURL") or ""),
            str(a.get("fingerprint") or "") if not isinstance(doc, list) else "",
            a.get("sentinel")) for a in items)
        if isinstance(doc, list):
            return cls("alertmanager", events)
        ends = [e.ends_at for e in events if e.ends_at]
        return cls("webhook", events, max(ends, default=0.0), str(doc.get("groupKey") or ""),
                   {str(k): str(v) for k, v in (doc.get("groupLabels") or {}).items()})


__all__ = ["ZERO_TIME", "Notification", "alertmanager_body", "common_labels", "group_payload", "rfc3339"]
