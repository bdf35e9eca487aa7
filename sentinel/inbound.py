"""Alerts arriving from Alertmanager's webhook (payload version 4): validated, then matched to
sentinel's rules by ``alertname`` so their runbooks and remediations apply. Resolved alerts are
recorded but never acted on."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sentinel.alerts.event import AlertEvent
from sentinel.alerts.fingerprint import fingerprint
from sentinel.alerts.state import Alert, State
from sentinel.rules.evaluator import AlertingRuntime, Evaluator


def _text(v: object) -> object:
    if not isinstance(v, str | datetime):
        raise ValueError("an RFC 3339 date-time string is expected")  # not a number taken as Unix seconds
    return v


Timestamp = Annotated[datetime, BeforeValidator(_text)]


class InboundAlert(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(min_length=1)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: Timestamp  # noqa: N815 - Alertmanager's field name
    endsAt: Timestamp | None = None  # noqa: N815
    fingerprint: str | None = None


class WebhookPayload(BaseModel):
    """Alertmanager's webhook body (version "4")."""

    model_config = ConfigDict(extra="allow")
    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: str
    alerts: list[InboundAlert] = Field(max_length=10_000)
    groupKey: str = ""  # noqa: N815


def inbound_events(payload: WebhookPayload) -> list[AlertEvent]:
    """The alerts of an inbound webhook, to hand to delivery: a resolved alert ends at its ``endsAt``; a
    firing one has no end (Alertmanager sends the zero time) until its resolution arrives."""
    out: list[AlertEvent] = []
    for a in payload.alerts:
        ends = a.endsAt.timestamp() if a.endsAt is not None and a.endsAt.year > 1 else 0.0
        if a.status == "resolved" and not ends:
            ends = a.startsAt.timestamp()
        out.append(AlertEvent(dict(a.labels), dict(a.annotations), a.startsAt.timestamp(),
                              ends if a.status == "resolved" else 0.0, str(getattr(a, "generatorURL", "") or ""),
                              fingerprint(a.labels)))
    return out


def match(evaluator: Evaluator, payload: WebhookPayload) -> tuple[list[tuple[AlertingRuntime, Alert]], list[str]]:
    """Firing alerts whose alertname is one of our rules (as episodes), and why the others were skipped."""
    by_name = {rt.rule.name: rt for rt in evaluator.all_runtimes() if isinstance(rt, AlertingRuntime)}
    matched: list[tuple[AlertingRuntime, Alert]] = []
    skipped: list[str] = []
    for a in payload.alerts:
        name = a.labels.get("alertname", "")
        if a.status != "firing":
            skipped.append(f"{name}: resolved (never acted on)")
            continue
        rt = by_name.get(name)
        if rt is None:
            skipped.append(f"{name or '(no alertname)'}: no sentinel rule of that name")
            continue
        start = a.startsAt.timestamp()
        alert = Alert(dict(a.labels), dict(a.annotations), 0.0, State.FIRING, start, fired_at=start)
        if a.fingerprint and a.fingerprint != fingerprint(a.labels):
            skipped.append(f"{name}: fingerprint {a.fingerprint} does not match its labels")
            continue
        matched.append((rt, alert))
    return matched, skipped
