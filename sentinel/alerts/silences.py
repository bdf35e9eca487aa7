"""Silences and inhibition with Alertmanager's matching rules.

A matcher is ``name="value"``, ``name!="value"``, ``name=~"regex"`` or ``name!~"regex"``; a regex is
anchored at both ends, and a missing label matches as the empty string (so ``team=""`` matches alerts
without ``team``). A silence mutes the notifications of alerts all of whose matchers match, from
``starts_at`` to ``ends_at``. An inhibition rule mutes a *target* alert while a firing *source* alert has the
same values of the ``equal`` labels (and the source is not itself the target). Muted alerts keep their
state; only their notifications are held back (remediation still acts: a silence is for people).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MATCHER_PATTERN = r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$'
_MATCHER = re.compile(MATCHER_PATTERN)


@dataclass(frozen=True)
class Matcher:
    name: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.name, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = re.fullmatch(self.value, v) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{escaped}"'


def parse_matcher(text: str) -> Matcher:
    """``name="value"`` and the other three operators; the value quoted, with backslash escapes."""
    m = _MATCHER.match(text)
    if m is None:
        raise ValueError(f'{text!r}: a matcher is name="value", name!="value", name=~"regex" or name!~"regex"')
    value = re.sub(r"\\(.)", r"\1", m.group(3))
    op = m.group(2)
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{text!r}: bad regex: {exc}") from exc
    return Matcher(m.group(1), op, value)  # type: ignore[arg-type]


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


class InhibitRule(BaseModel):
    """Alertmanager's ``inhibit_rules`` entry (the matcher-list form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source_matchers: list[str] = Field(min_length=1)
    target_matchers: list[str] = Field(min_length=1)
    equal: list[str] = Field(default_factory=list)

    @field_validator("source_matchers", "target_matchers")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_matcher(text)
        return v

    def sources(self) -> list[Matcher]:
        return [parse_matcher(t) for t in self.source_matchers]

    def targets(self) -> list[Matcher]:
        return [parse_matcher(t) for t in self.target_matchers]


# The defaults: a replica that is down inhibits that replica's latency and GPU utilization alerts (they are
# its consequences, not news).
DEFAULT_INHIBIT_RULES = [
    InhibitRule(source_matchers=['alertname="InferenceReplicaDown"'],
                target_matchers=['alertname=~"InferenceLatency.*|GpuUtilization.*|GpuSaturatedScaleOut|EngineBusyScaleOut"'],
                equal=["replica"]),
    # a datasource that is down explains each of its rules failing: one page, not one per rule
    InhibitRule(source_matchers=['alertname="SentinelDatasourceDown"'],
                target_matchers=['alertname="SentinelRuleEvaluationFailing"'], equal=["datasource"]),
]


def inhibited(labels: Mapping[str, str], firing: Sequence[Mapping[str, str]], rules: Sequence[InhibitRule]) -> bool:
    """Whether an alert with ``labels`` is muted by a firing source alert under one of ``rules``."""
    for rule in rules:
        targets, sources = rule.targets(), rule.sources()
        if not matches_all(targets, labels):
            continue
        for src in firing:
            if src is labels or dict(src) == dict(labels):
                continue
            if matches_all(sources, src) and all(src.get(e, "") == labels.get(e, "") for e in rule.equal):
                return True
    return False
