"""Datasources that answer a rule's query at an instant with a list of samples: log rules here; PromQL
through :mod:`sentinel.prometheus`.

Third-party errors are translated here, at the boundary, into DatasourceError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from sentinel.alerts.state import Sample
from sentinel.errors import DatasourceError
from sentinel.rules.filters import LogFilter
from sentinel.rules.logtypes import SEED_LOOKBACK_S, Key, KeyMemory, LogRuleType


def _iso(ts: float) -> str:
    return "never" if not ts else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class LogCounter(Protocol):
    """A log store that counts matching events in (since, until] per ``query_key`` group: the local
    store (``LocalLogStore``) or Elasticsearch (``ElasticsearchLogStore``), with the same answers."""

    def count(self, filters: Iterable[LogFilter], since: float, until: float,
              query_key: Sequence[str] = ()) -> list[tuple[dict[str, str], int]]: ...

    def aggregate(self, filters: Iterable[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None = None, method: str = "tdigest"
                  ) -> list[tuple[dict[str, str], float]]: ...


class LogRuleSource:
    """Answers log rules from a log store: the window of a rule's evaluation (``query_delay`` earlier, and not
    past what the shipper has delivered), the counts and aggregates its type asks for (errors translated into
    DatasourceError here, at the boundary), and the memory of the groups a flatline or spike rule has seen.
    What each type makes of them is the type's own (``sentinel.rules.logtypes``)."""

    def __init__(self, store: LogCounter, shipped_until: Callable[[], float] | None = None,
                 slack_s: float = 3.0) -> None:
        """``shipped_until``: every line written before this time can be found in the store (the shipper's
        ``visible_until``); ``slack_s``: how far a live window may run past that (the next evaluation's
        window overlaps it). Replays of past evaluations get no slack."""
        self.store = store
        self.shipped_until = shipped_until
        self.slack_s = slack_s
        self.memory: dict[tuple[str, str], KeyMemory] = {}

    @property
    def lag_s(self) -> float:
        """How far behind the present the store may be in normal operation."""
        return self.slack_s if self.shipped_until is not None else 0.0

    def evidence_since(self, q: LogRuleType, labels: dict[str, str], since: float, at: float) -> bool | None:
        """Whether the events that make an ``any``/``frequency`` rule fire for the group ``labels`` are still
        there counting only those after ``since`` (within the rule's window ending at ``at``). None where the
        rule type does not rest on counted events (flatline, spike, percentages, aggregations)."""
        return q.evidence_since(self, labels, since, at - q.query_delay)

    def query(self, q: LogRuleType, at: float, replay: bool = False, rule: str = "") -> list[Sample]:
        """The samples of ``q`` at ``at``. ``rule`` names the rule, whose flatline or spike memory this
        evaluation reads and updates (evaluations of one rule come in time order)."""
        at -= q.query_delay
        if self.shipped_until is not None:  # a window whose lines are still on their way is not judged yet
            shipped = self.shipped_until()
            if at > shipped + (0.0 if replay else self.slack_s):
                raise DatasourceError(f"log shipping is behind: lines are in the store up to {_iso(shipped)}, "
                                      f"the window ends at {_iso(at)}; the rule waits, then catches up")
        return q.samples(self, at, self._memory(q, rule, at) if q.baseline else KeyMemory())

    def _memory(self, q: LogRuleType, rule: str, at: float) -> KeyMemory:
        mem = self.memory.setdefault((rule, q.model_dump_json()), KeyMemory())
        if not mem.seeded:  # groups seen before the judged windows count as seen long enough
            horizon = at - q.baseline * q.timeframe
            if q.query_key:
                for k in self.counts(q.filter, horizon - SEED_LOOKBACK_S, horizon, q.query_key):
                    mem.first_seen[k] = -math.inf
            elif self.counts(q.filter, horizon - SEED_LOOKBACK_S, horizon, ()):
                mem.first_seen[()] = -math.inf
            mem.seeded = True
        return mem

    def counts(self, filters: Sequence[LogFilter], since: float, until: float, query_key: Sequence[str]
               ) -> dict[Key, int]:
        try:
            groups = self.store.count(filters, since, until, query_key)
        except Exception as exc:  # sqlite3 or Elasticsearch errors; translated at the boundary
            raise DatasourceError(f"log store query failed: {exc}") from exc
        return {tuple((k, labels[k]) for k in query_key): n for labels, n in groups}

    def aggregate(self, filters: Sequence[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None, method: str) -> list[tuple[dict[str, str], float]]:
        try:
            return self.store.aggregate(filters, since, until, query_key, field, agg, percentile, method)
        except Exception as exc:  # translated at the boundary, as above
            raise DatasourceError(f"log store aggregation failed: {exc}") from exc
