"""An alert handed to delivery: what Prometheus sends an Alertmanager for one alert (labels, annotations,
start, end, generator URL), and sentinel's own data that travels with it. The evaluator and the inbound
webhook make them; delivery routes, groups and renders them; the store keeps them as JSON (``to_json``,
``from_json``: the same keys the untyped dicts had, so rows written before read back)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sentinel.alerts.fingerprint import fingerprint as label_fingerprint


@dataclass(frozen=True)
class AlertEvent:
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: float = 0.0
    ends_at: float = 0.0                       # 0: no end known (still firing)
    generator_url: str = ""
    fingerprint: str = ""                      # empty: the labels' fingerprint
    sentinel: Mapping[str, Any] | None = None  # the episode's runbook findings (sent with every notification)
    group_by: tuple[str, ...] = ()             # a log rule's aggregation_key: more labels to group by
    flush: bool = False                        # a replayed evaluation: its group is flushed at once

    @property
    def fp(self) -> str:
        return self.fingerprint or label_fingerprint(self.labels)

    def resolved(self, now: float) -> bool:
        return bool(self.ends_at) and self.ends_at <= now

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"labels": dict(self.labels), "annotations": dict(self.annotations),
                               "starts_at": self.starts_at, "ends_at": self.ends_at,
                               "generator_url": self.generator_url, "fingerprint": self.fingerprint}
        if self.sentinel is not None:
            doc["sentinel"] = self.sentinel
        if self.group_by:
            doc["group_by"] = list(self.group_by)
        if self.flush:
            doc["flush"] = True
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AlertEvent:
        return cls({str(k): str(v) for k, v in (doc.get("labels") or {}).items()},
                   {str(k): str(v) for k, v in (doc.get("annotations") or {}).items()},
                   float(doc.get("starts_at") or 0.0), float(doc.get("ends_at") or 0.0),
                   str(doc.get("generator_url") or ""), str(doc.get("fingerprint") or ""),
                   doc.get("sentinel"), tuple(doc.get("group_by") or ()), bool(doc.get("flush")))
