"""`sentinel logs test-rule`: a rule file's log rules evaluated over a past range, as ElastAlert2's
``elastalert-test-rule`` runs a rule over past data.

Each log rule is evaluated at every step (its group's ``interval`` unless one is given) from ``start`` to
``end``, in time order, against the store sentinel would use, with a fresh rule memory (flatline and spike
learn their groups as a restarted sentinel would). Each evaluation's samples are the rule's matches; the
alert state (``for``, ``keep_firing_for``) is not applied, so what is printed is what the rule's query
finds, evaluation by evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sentinel.rules.model import LoadedGroup
from sentinel.rules.sources import LogRuleSource


@dataclass(frozen=True)
class Match:
    rule: str
    at: float
    labels: dict[str, str]
    value: float

    def as_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "at": iso(self.at), "labels": self.labels,
                "value": self.value if math.isfinite(self.value) else str(self.value)}


def parse_time(text: str) -> float:
    """Unix seconds, or an RFC 3339 / ISO 8601 time (``2026-12-05T10:00:00Z``; no zone means UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not a time: {text!r} (expected unix seconds or e.g. 2026-12-05T10:00:00Z)") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def evaluations(groups: list[LoadedGroup], source: LogRuleSource, start: float, end: float,
                step: float | None = None, default_interval: float = 60.0, only: str | None = None
                ) -> Iterator[tuple[str, float, list[Match]]]:
    """(rule, time, matches) for every evaluation of every log rule, in time order (rules of one group in
    file order at each time, as the evaluator runs them)."""
    if end < start:
        raise ValueError("--end is before --start")
    plan = []
    for g in groups:
        rules = [r for r in g.group.rules if r.log is not None and (only is None or r.name == only)]
        if rules:
            plan.append((g, rules, step or g.group.interval or default_interval))
    if not plan:
        raise ValueError(f"no log rule named {only!r}" if only else "no log rules in these files")
    times = sorted({(start + k * every, gi) for gi, (_, _, every) in enumerate(plan)
                    for k in range(int((end - start) / every + 1e-9) + 1)})
    for t, gi in times:
        g, rules, _ = plan[gi]
        for r in rules:
            assert r.log is not None
            samples = source.query(r.log, t, replay=True, rule=f"{g.key}/{r.name}")
            yield r.name, t, [Match(r.name, t, dict(s.labels), s.value) for s in samples]
