"""Alertmanager's routing tree, for the receivers sentinel pages directly.

A route has matchers, a receiver, ``group_by`` and the three timers; children inherit what they leave
unset. An alert goes down the tree depth-first, left to right: at each level the first matching child
takes it unless that child says ``continue: true``; a route none of whose children match is itself the
match. As in Alertmanager, ``group_by: ['...']`` groups by every label, and the group key a receiver sees
is ``<route key>:<group labels>``, the route key being the matchers of the route and its ancestors,
``{}/{severity="page"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sentinel.alerts.silences import Matcher, matches_all, parse_matcher
from sentinel.durations import Duration

GROUP_WAIT = 30.0
GROUP_INTERVAL = 300.0
REPEAT_INTERVAL = 4 * 3600.0


class RouteConfig(BaseModel):
    """One node of the routing tree, in Alertmanager's ``route`` syntax (matcher-list form)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    receiver: str | None = None
    matchers: list[str] = Field(default_factory=list)
    group_by: list[str] | None = Field(None, description="labels that split alerts into notifications; ['...']: "
                                       "every label")
    group_wait: Duration | None = Field(None, ge=0, description="how long a new group waits for more alerts before "
                                        "its first notification (default 30s)")
    group_interval: Duration | None = Field(None, gt=0, description="how long a group waits before notifying of "
                                            "alerts added or resolved since its last notification (default 5m)")
    repeat_interval: Duration | None = Field(None, gt=0, description="how long before a notification that changed "
                                             "nothing is sent again (default 4h)")
    continue_: bool = Field(False, alias="continue")
    routes: list[RouteConfig] = Field(default_factory=list)

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_matcher(text)
        return v

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, v: list[str] | None) -> list[str] | None:
        if v and "..." in v and len(v) > 1:
            raise ValueError("group_by: '...' groups by every label and cannot be combined with label names")
        return v

    @model_validator(mode="after")
    def _interval(self) -> RouteConfig:
        if self.group_interval is not None and self.repeat_interval is not None \
                and self.repeat_interval < self.group_interval:
            raise ValueError("repeat_interval is shorter than group_interval: it would never take effect")
        return self

    def receivers(self) -> set[str]:
        out = {self.receiver} if self.receiver else set()
        for child in self.routes:
            out |= child.receivers()
        return out


def _gostr(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def labels_string(labels: Mapping[str, str]) -> str:
    """``model.LabelSet.String()``: ``{a="1", b="2"}``."""
    return "{" + ", ".join(f"{k}={_gostr(v)}" for k, v in sorted(labels.items())) + "}"


@dataclass
class Route:
    """A resolved node: inherited options filled in."""

    receiver: str
    matchers: list[Matcher]
    group_by: frozenset[str] | None  # None: every label ('...')
    group_wait: float
    group_interval: float
    repeat_interval: float
    continue_: bool
    key: str
    id: str
    routes: list[Route] = field(default_factory=list)

    def match(self, labels: Mapping[str, str]) -> list[Route]:
        if not matches_all(self.matchers, labels):
            return []
        out: list[Route] = []
        for child in self.routes:
            hit = child.match(labels)
            out.extend(hit)
            if hit and not child.continue_:
                break
        return out or [self]

    def group_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        if self.group_by is None:
            return dict(labels)
        return {k: v for k, v in labels.items() if k in self.group_by}

    def walk(self) -> list[Route]:
        return [self, *(r for child in self.routes for r in child.walk())]


def _matchers_string(ms: Sequence[Matcher]) -> str:
    ordered = sorted(ms, key=lambda m: (m.name, m.value, m.op))
    return "{" + ",".join(f"{m.name}{m.op}{_gostr(m.value)}" for m in ordered) + "}"


def build(cfg: RouteConfig, parent: Route | None = None, index: int = 0) -> Route:
    """Resolve a configured tree (children inherit unset options from their parent)."""
    matchers = [parse_matcher(t) for t in cfg.matchers]
    ms = _matchers_string(matchers)
    group_by: frozenset[str] | None
    if cfg.group_by is not None:
        group_by = None if cfg.group_by == ["..."] else frozenset(cfg.group_by)
    else:
        group_by = parent.group_by if parent is not None else frozenset()
    node = Route(
        receiver=cfg.receiver or (parent.receiver if parent is not None else ""),
        matchers=matchers, group_by=group_by,
        group_wait=cfg.group_wait if cfg.group_wait is not None else (parent.group_wait if parent else GROUP_WAIT),
        group_interval=cfg.group_interval if cfg.group_interval is not None else (
            parent.group_interval if parent else GROUP_INTERVAL),
        repeat_interval=cfg.repeat_interval if cfg.repeat_interval is not None else (
            parent.repeat_interval if parent else REPEAT_INTERVAL),
        continue_=cfg.continue_,
        key=f"{parent.key}/{ms}" if parent is not None else ms,
        id=f"{parent.id}/{ms}/{index}" if parent is not None else ms)
    node.routes = [build(child, node, i) for i, child in enumerate(cfg.routes)]
    return node


def default_tree(receivers: Sequence[str]) -> RouteConfig:
    """Without a configured ``route``: every receiver gets every alert, grouped by alertname, with
    Alertmanager's default timers."""
    return RouteConfig(group_by=["alertname"],
                       routes=[RouteConfig(receiver=r, continue_=True) for r in receivers])
