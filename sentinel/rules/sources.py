"""Datasources that answer a rule's query at an instant with a list of samples: log rules here; PromQL
through :mod:`sentinel.prometheus`.

Third-party errors are translated here, at the boundary, into DatasourceError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from sentinel.alerts.state import Sample
from sentinel.errors import DatasourceError
from sentinel.rules.model import LogFilter, LogQuery


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


Key = tuple[tuple[str, str], ...]
SEED_LOOKBACK_S = 86400.0  # a flatline or spike rule's first evaluation learns the groups of the last day


@dataclass
class KeyMemory:
    """What a flatline or spike rule remembers between evaluations, as ElastAlert2's rule objects do: the
    ``query_key`` groups it has seen and when it first saw each (to one evaluation step), and for
    ``forget_keys`` when a group was forgotten. Seeded from the store at the rule's first evaluation, so a
    restart of sentinel neither forgets a dead replica nor takes every group for new."""

    first_seen: dict[Key, float] = field(default_factory=dict)
    forgotten: dict[Key, float] = field(default_factory=dict)
    seeded: bool = False


class LogRuleSource:
    """Turns an ElastAlert-style log query into samples: one per ``query_key`` group that matches.

    ``any``: a group with at least one matching event in ``timeframe`` is a sample (value = count).
    ``frequency``: only groups with at least ``num_events`` matching events.
    ``flatline``, ``spike``, ``percentage_match``: from the counts of two windows or two filters;
    ``metric_aggregation``: groups whose aggregate crosses a threshold (see ``LogQuery``).

    flatline and spike follow ElastAlert2's ``ruletypes.py``:
    - flatline watches every group it has seen (not only the recent ones) until the group reports again;
      with ``forget_keys`` a group is dropped once it has alerted, until it logs again. A group is judged
      once it has been seen for a ``timeframe``.
    - spike judges a group once it has been seen for two ``timeframe``s; an empty reference window is a
      spike when the current one has events (``threshold_ref`` has no default); after a spike the group
      starts over, as ElastAlert2 clears its windows: a spike is one evaluation's match, and the group is
      judged again two timeframes later.
    """

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

    def evidence_since(self, q: LogQuery, labels: dict[str, str], since: float, at: float) -> bool | None:
        """Whether the events that make an ``any``/``frequency`` rule fire for the group ``labels`` are still
        there counting only those after ``since`` (within the rule's window ending at ``at``). None where the
        rule type does not rest on counted events (flatline, spike, percentages, aggregations)."""
        if q.type not in ("any", "frequency"):
            return None
        at -= q.query_delay
        start = max(at - q.timeframe, since)
        if start >= at:
            return False
        want = tuple(sorted((k, labels.get(k, "")) for k in q.query_key))
        need = q.num_events if q.type == "frequency" else 1
        for key, n in self._counts(q.filter, start, at, q.query_key).items():
            if tuple(sorted(key)) == want and n >= need:
                return True
        return False

    def query(self, q: LogQuery, at: float, replay: bool = False, rule: str = "") -> list[Sample]:
        """The samples of ``q`` at ``at``. ``rule`` names the rule, whose flatline or spike memory this
        evaluation reads and updates (evaluations of one rule come in time order)."""
        at -= q.query_delay
        if self.shipped_until is not None:  # a window whose lines are still on their way is not judged yet
            shipped = self.shipped_until()
            if at > shipped + (0.0 if replay else self.slack_s):
                raise DatasourceError(f"log shipping is behind: lines are in the store up to {_iso(shipped)}, "
                                      f"the window ends at {_iso(at)}; the rule waits, then catches up")
        if q.type == "metric_aggregation":
            return self._metric(q, at)
        tf = q.timeframe
        cur = self._counts(q.filter, at - tf, at, q.query_key)
        if q.type in ("any", "frequency"):
            need = q.num_events if q.type == "frequency" else 1
            return [Sample(dict(k), float(n)) for k, n in cur.items() if n >= need]
        if q.type == "percentage_match":
            matched = self._counts([*q.filter, *q.match_bucket_filter], at - tf, at, q.query_key)
            out = []
            for k, total in cur.items():
                pct = 100.0 * matched.get(k, 0) / total
                if (q.min_percentage is not None and pct < q.min_percentage) or (
                        q.max_percentage is not None and pct > q.max_percentage):
                    out.append(Sample(dict(k), pct))
            return out
        if q.type == "new_term":  # from the store itself: a restart neither floods nor forgets
            names = [*q.query_key, *q.fields]
            now = self._counts(q.filter, at - tf, at, names)
            seen = self._counts(q.filter, at - q.terms_window_size, at - tf, names)
            return [Sample({k: v for k, v in key if v != ""}, float(n)) for key, n in now.items()
                    if key not in seen and any(v != "" for k, v in key if k in q.fields)]
        if q.type == "change":
            assert q.compare_key is not None
            values: dict[tuple[tuple[str, str], ...], int] = {}
            for key in self._counts(q.filter, at - tf, at, [*q.query_key, q.compare_key]):
                if dict(key)[q.compare_key] != "":
                    group = key[:-1]
                    values[group] = values.get(group, 0) + 1
            return [Sample(dict(k), float(n)) for k, n in values.items() if n > 1]
        mem = self._memory(q, rule, at)
        if q.type == "flatline":
            return self._flatline(q, mem, cur, at)
        return self._spike(q, mem, cur, self._counts(q.filter, at - 2 * tf, at - tf, q.query_key), at)

    def _memory(self, q: LogQuery, rule: str, at: float) -> KeyMemory:
        mem = self.memory.setdefault((rule, q.model_dump_json()), KeyMemory())
        if not mem.seeded:  # groups seen before the judged windows count as seen long enough
            horizon = at - (q.timeframe if q.type == "flatline" else 2 * q.timeframe)
            if q.query_key:
                for k in self._counts(q.filter, horizon - SEED_LOOKBACK_S, horizon, q.query_key):
                    mem.first_seen[k] = -math.inf
            elif self._counts(q.filter, horizon - SEED_LOOKBACK_S, horizon, ()):
                mem.first_seen[()] = -math.inf
            mem.seeded = True
        return mem

    def _flatline(self, q: LogQuery, mem: KeyMemory, cur: dict[Key, int], at: float) -> list[Sample]:
        assert q.threshold is not None
        if not q.query_key:  # the whole stream: watched from the first evaluation (seen before it, or now)
            mem.first_seen.setdefault((), at)
        for since in sorted(set(mem.forgotten.values())):  # a forgotten group comes back when it logs again
            back = self._counts(q.filter, since, at, q.query_key)
            for k in [k for k, t in mem.forgotten.items() if t == since and back.get(k)]:
                del mem.forgotten[k]
        for k in cur:
            if k not in mem.forgotten:
                mem.first_seen.setdefault(k, at)
        out = []
        for k, first in list(mem.first_seen.items()):
            n = cur.get(k, 0)
            if n >= q.threshold or at - first < q.timeframe - 1e-9:
                continue
            out.append(Sample(dict(k), float(n)))
            if q.forget_keys:
                del mem.first_seen[k]
                mem.forgotten[k] = at
        return out

    def _spike(self, q: LogQuery, mem: KeyMemory, cur: dict[Key, int], ref: dict[Key, int], at: float
               ) -> list[Sample]:
        assert q.spike_height is not None
        out = []
        for k in set(cur) | set(ref):
            first = mem.first_seen.setdefault(k, at)
            if at - first < 2 * q.timeframe - 1e-9:  # no baseline yet (ElastAlert2: two timeframes)
                continue
            c, r = cur.get(k, 0), ref.get(k, 0)
            if c < (q.threshold_cur or 0) or r < (q.threshold_ref or 0):
                continue
            up, down = c >= q.spike_height * r, c * q.spike_height <= r
            if (up and q.spike_type in ("up", "both")) or (down and q.spike_type in ("down", "both")):
                out.append(Sample(dict(k), c / r if r else float(c)))  # an empty reference: the count
                mem.first_seen[k] = at  # the windows start over: the next judgement is two timeframes on
        return out

    def _counts(self, filters: Sequence[LogFilter], since: float, until: float, query_key: Sequence[str]
                ) -> dict[tuple[tuple[str, str], ...], int]:
        try:
            groups = self.store.count(filters, since, until, query_key)
        except Exception as exc:  # sqlite3 or Elasticsearch errors; translated at the boundary
            raise DatasourceError(f"log store query failed: {exc}") from exc
        return {tuple((k, labels[k]) for k in query_key): n for labels, n in groups}

    def _metric(self, q: LogQuery, at: float) -> list[Sample]:
        """``metric_aggregation``: a group is a sample when its value is above ``max_threshold`` or below
        ``min_threshold`` (value = the aggregate, e.g. the P99 in ms)."""
        assert q.metric_agg_key is not None and q.metric_agg_type is not None
        try:
            groups = self.store.aggregate(q.filter, at - q.timeframe, at, q.query_key, q.metric_agg_key,
                                          q.metric_agg_type, q.percentile_range, q.percentiles_method)
        except Exception as exc:  # translated at the boundary, as above
            raise DatasourceError(f"log store aggregation failed: {exc}") from exc
        hi, lo = q.max_threshold, q.min_threshold
        return [Sample(labels, v) for labels, v in groups
                if (hi is not None and v > hi) or (lo is not None and v < lo)]
