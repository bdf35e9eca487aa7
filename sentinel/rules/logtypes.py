"""ElastAlert-style log rule types, one class per type (as ElastAlert2's ``ruletypes.py``): each is both the
rule file's schema for its type and the judgement it makes over a :class:`LogWindow` of the log store.

The types, with ElastAlert2's names and semantics:

- ``any``: every group with a matching event in ``timeframe`` (value = the count);
- ``frequency``: groups with at least ``num_events`` matching events in ``timeframe``;
- ``flatline``: fewer than ``threshold`` events (a group seen before that now has fewer, or none);
- ``spike``: the count in ``timeframe`` is ``spike_height`` times the one in the ``timeframe`` before;
- ``percentage_match``: the share of events that also match ``match_bucket_filter`` is out of bounds;
- ``new_term``: a value of ``fields`` not seen in the ``terms_window_size`` before ``timeframe``;
- ``change``: ``compare_key`` took more than one value within ``timeframe`` for one group;
- ``metric_aggregation``: an aggregate of a numeric field crosses ``max_threshold``/``min_threshold``.

Each ``query_key`` value is its own alert. :data:`LogQuery` is their discriminated union (``type``, default
``any``); a field that belongs to another type is refused naming the type it belongs to.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from sentinel.alerts.state import Sample
from sentinel.durations import Duration
from sentinel.rules.filters import FIELD_NAME, LogFilter, Strict

Key = tuple[tuple[str, str], ...]
SEED_LOOKBACK_S = 86400.0  # a flatline or spike rule's first evaluation learns the groups of the last day


class LogWindow(Protocol):
    """What a rule type reads of the log store: matching events counted, or a numeric field aggregated,
    in (since, until] per ``query_key`` group (``sentinel.rules.sources.LogRuleSource``)."""

    def counts(self, filters: Sequence[LogFilter], since: float, until: float, query_key: Sequence[str]
               ) -> dict[Key, int]: ...

    def aggregate(self, filters: Sequence[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None, method: str) -> list[tuple[dict[str, str], float]]:
        ...


@dataclass
class KeyMemory:
    """What a flatline or spike rule remembers between evaluations, as ElastAlert2's rule objects do: the
    ``query_key`` groups it has seen and when it first saw each (to one evaluation step), and for
    ``forget_keys`` when a group was forgotten. Seeded from the store at the rule's first evaluation, so a
    restart of sentinel neither forgets a dead replica nor takes every group for new."""

    first_seen: dict[Key, float] = field(default_factory=dict)
    forgotten: dict[Key, float] = field(default_factory=dict)
    seeded: bool = False


def _field_names(v: list[str]) -> list[str]:
    for f in v:
        if not FIELD_NAME.match(f):
            raise ValueError(f"invalid field name {f!r}")
    return v


class LogRuleType(Strict):
    """The options every type takes: which events (``filter``), the window (``timeframe``, evaluated
    ``query_delay`` ago: the store's indexing delay), the groups (``query_key``), and ElastAlert's
    notification options. ``realert``: the least time between two firing notifications of one alert
    (unset, a new episode pages at once and a firing alert repeats at the resend delay, as PromQL rules);
    ``aggregation``: hold the rule's notifications and send them together once per period, one per value
    of the ``aggregation_key`` labels."""

    type: str
    filter: list[LogFilter] = Field(default_factory=list, description="the events that count; all must match")
    timeframe: Duration = Field(300.0, description="the window judged at each evaluation")
    query_delay: Duration = Field(0.0, description="judge the window this long ago (the store's indexing delay)")
    query_key: list[str] = Field(default_factory=list, description="fields whose values make separate alerts")
    realert: Duration | None = Field(None, ge=0, description="the least time between two pages of one alert")
    aggregation: Duration | None = Field(None, gt=0, description="hold notifications and send them together "
                                         "once per this period")
    aggregation_key: list[str] = Field(default_factory=list, description="with aggregation: one notification "
                                       "per value of these labels")

    # how many timeframes a group must have been seen before it is judged; nonzero: the type remembers the
    # groups it has seen (KeyMemory), and groups seen before the first evaluation count as seen long enough
    baseline: ClassVar[int] = 0

    @model_validator(mode="before")
    @classmethod
    def _own_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("type", "any")
        foreign: dict[str, list[str]] = {}
        for key in data:
            if key not in cls.model_fields:
                owners = [t for t, c in TYPES.items() if key in c.model_fields]
                if owners:
                    foreign.setdefault(" or ".join(owners), []).append(key)
        for owner, keys in foreign.items():
            raise ValueError(f"{', '.join(keys)}: only for type {owner}")
        for need in (n for n, f in cls.model_fields.items() if f.is_required() and n != "type"):
            if data.get(need) in (None, [], ""):
                raise ValueError(f"{kind} needs {need}")
        return data

    @field_validator("query_key", "aggregation_key", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    _keys = field_validator("query_key", "aggregation_key")(_field_names)

    @field_validator("timeframe")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeframe must be > 0")
        return v

    @model_validator(mode="after")
    def _aggregation(self) -> LogRuleType:
        if self.aggregation_key and self.aggregation is None:
            raise ValueError("aggregation_key needs aggregation (the period)")
        return self

    @abstractmethod
    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        """The groups that match at ``at`` (``query_delay`` already applied); ``mem``: this rule's memory."""

    def evidence_since(self, w: LogWindow, labels: dict[str, str], since: float, at: float) -> bool | None:
        """Whether the events that make the rule fire for the group ``labels`` are still there counting only
        those after ``since``; None where the type does not rest on counted events."""
        return None

    def _current(self, w: LogWindow, at: float) -> dict[Key, int]:
        return w.counts(self.filter, at - self.timeframe, at, self.query_key)


class _Counted(LogRuleType):
    """A type that fires on a count of matching events in ``timeframe``."""

    @abstractmethod
    def _need(self) -> int:
        """The least count that matches."""

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        need = self._need()
        return [Sample(dict(k), float(n)) for k, n in self._current(w, at).items() if n >= need]

    def evidence_since(self, w: LogWindow, labels: dict[str, str], since: float, at: float) -> bool | None:
        start = max(at - self.timeframe, since)
        if start >= at:
            return False
        want = tuple(sorted((k, labels.get(k, "")) for k in self.query_key))
        need = self._need()
        return any(tuple(sorted(key)) == want and n >= need
                   for key, n in w.counts(self.filter, start, at, self.query_key).items())


class AnyRule(_Counted):
    """``any``: every group with a matching event in ``timeframe`` (value = the count)."""

    type: Literal["any"] = "any"

    def _need(self) -> int:
        return 1


class FrequencyRule(_Counted):
    """``frequency``: groups with at least ``num_events`` matching events in ``timeframe``."""

    type: Literal["frequency"] = "frequency"
    num_events: int = Field(1, ge=1, description="at least this many events in timeframe")

    def _need(self) -> int:
        return self.num_events


class FlatlineRule(LogRuleType):
    """``flatline``: fewer than ``threshold`` events. As ElastAlert2, every group seen is watched (not only
    the recent ones) until it reports again, and judged once seen for a ``timeframe``; with
    ``forget_keys`` a group is dropped once it has alerted, until it logs again."""

    type: Literal["flatline"] = "flatline"
    threshold: int = Field(ge=1, description="fewer events than this is a flatline")
    forget_keys: bool = Field(False, description="drop a group once it has alerted, until it logs again")

    baseline = 1

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        cur = self._current(w, at)
        if not self.query_key:  # the whole stream: watched from the first evaluation (seen before it, or now)
            mem.first_seen.setdefault((), at)
        for since in sorted(set(mem.forgotten.values())):  # a forgotten group comes back when it logs again
            back = w.counts(self.filter, since, at, self.query_key)
            for k in [k for k, t in mem.forgotten.items() if t == since and back.get(k)]:
                del mem.forgotten[k]
        for k in cur:
            if k not in mem.forgotten:
                mem.first_seen.setdefault(k, at)
        out = []
        for k, first in list(mem.first_seen.items()):
            n = cur.get(k, 0)
            if n >= self.threshold or at - first < self.timeframe - 1e-9:
                continue
            out.append(Sample(dict(k), float(n)))
            if self.forget_keys:
                del mem.first_seen[k]
                mem.forgotten[k] = at
        return out


class SpikeRule(LogRuleType):
    """``spike``: the count in ``timeframe`` is ``spike_height`` times the one in the ``timeframe`` before
    (``spike_type`` up, down or both; ``threshold_ref``/``threshold_cur``: minimum counts). As ElastAlert2:
    a group is judged once seen for two timeframes; an empty reference window is a spike when the current
    one has events; after a spike the group starts over (judged again two timeframes later)."""

    type: Literal["spike"] = "spike"
    spike_height: float = Field(gt=1, description="current / reference count that is a spike")
    spike_type: Literal["up", "down", "both"] = Field("both", description="which direction counts")
    threshold_ref: int | None = Field(None, ge=0, description="at least this many events in the reference window")
    threshold_cur: int | None = Field(None, ge=0, description="at least this many events in the current window")

    baseline = 2

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        tf = self.timeframe
        cur, ref = self._current(w, at), w.counts(self.filter, at - 2 * tf, at - tf, self.query_key)
        out = []
        for k in set(cur) | set(ref):
            first = mem.first_seen.setdefault(k, at)
            if at - first < 2 * tf - 1e-9:  # no baseline yet (ElastAlert2: two timeframes)
                continue
            c, r = cur.get(k, 0), ref.get(k, 0)
            if c < (self.threshold_cur or 0) or r < (self.threshold_ref or 0):
                continue
            up, down = c >= self.spike_height * r, c * self.spike_height <= r
            if (up and self.spike_type in ("up", "both")) or (down and self.spike_type in ("down", "both")):
                out.append(Sample(dict(k), c / r if r else float(c)))  # an empty reference: the count
                mem.first_seen[k] = at  # the windows start over: the next judgement is two timeframes on
        return out


class PercentageMatchRule(LogRuleType):
    """``percentage_match``: the share of events that also match ``match_bucket_filter`` is below
    ``min_percentage`` or above ``max_percentage`` (value = the percentage)."""

    type: Literal["percentage_match"] = "percentage_match"
    match_bucket_filter: list[LogFilter] = Field(min_length=1, description="the events whose share is judged")
    min_percentage: float | None = Field(None, ge=0, le=100, description="a share below this fires")
    max_percentage: float | None = Field(None, ge=0, le=100, description="a share above this fires")

    @model_validator(mode="after")
    def _bounds(self) -> PercentageMatchRule:
        if self.min_percentage is None and self.max_percentage is None:
            raise ValueError("percentage_match needs min_percentage or max_percentage")
        return self

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        tf = self.timeframe
        matched = w.counts([*self.filter, *self.match_bucket_filter], at - tf, at, self.query_key)
        out = []
        for k, total in self._current(w, at).items():
            pct = 100.0 * matched.get(k, 0) / total
            if (self.min_percentage is not None and pct < self.min_percentage) or (
                    self.max_percentage is not None and pct > self.max_percentage):
                out.append(Sample(dict(k), pct))
        return out


class NewTermRule(LogRuleType):
    """``new_term``: a value (or combination) of ``fields`` in ``timeframe`` that did not occur in the
    ``terms_window_size`` before it. Asked of the store itself, so a restart neither floods nor forgets."""

    type: Literal["new_term"] = "new_term"
    fields: list[str] = Field(min_length=1, description="the fields whose values (or combinations) are watched")
    terms_window_size: Duration = Field(30 * 86400.0, description="new means unseen for this long")

    _fields = field_validator("fields")(_field_names)

    @model_validator(mode="after")
    def _window(self) -> NewTermRule:
        if self.terms_window_size <= self.timeframe:
            raise ValueError("terms_window_size must be longer than timeframe")
        return self

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        names = [*self.query_key, *self.fields]
        now = w.counts(self.filter, at - self.timeframe, at, names)
        seen = w.counts(self.filter, at - self.terms_window_size, at - self.timeframe, names)
        return [Sample({k: v for k, v in key if v != ""}, float(n)) for key, n in now.items()
                if key not in seen and any(v != "" for k, v in key if k in self.fields)]


class ChangeRule(LogRuleType):
    """``change``: ``compare_key`` took more than one value within ``timeframe`` for one ``query_key``
    group (value = the number of values)."""

    type: Literal["change"] = "change"
    compare_key: str = Field(description="the field whose value changed")

    @field_validator("compare_key")
    @classmethod
    def _name(cls, v: str) -> str:
        return _field_names([v])[0]

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        values: dict[Key, int] = {}
        for key in w.counts(self.filter, at - self.timeframe, at, [*self.query_key, self.compare_key]):
            if dict(key)[self.compare_key] != "":
                values[key[:-1]] = values.get(key[:-1], 0) + 1
        return [Sample(dict(k), float(n)) for k, n in values.items() if n > 1]


class MetricAggregationRule(LogRuleType):
    """``metric_aggregation``: ``metric_agg_type`` of the numeric field ``metric_agg_key`` over the
    matching events in ``timeframe`` is above ``max_threshold`` or below ``min_threshold`` (value = the
    aggregate; ``percentiles`` at ``percentile_range``, e.g. the seed's P99 of ``inference_time`` > 500
    ms; ``percentiles_method`` ``tdigest``, Elasticsearch's default, exact and interpolated up to 2,000
    values a group, or ``hdr``, the value at the rank rounded up to 3 significant digits)."""

    type: Literal["metric_aggregation"] = "metric_aggregation"
    metric_agg_key: str = Field(description="the numeric field aggregated")
    metric_agg_type: Literal["min", "max", "avg", "sum", "value_count", "cardinality", "percentiles"] = Field(
        description="the aggregation")
    percentile_range: float | None = Field(None, gt=0, le=100, description="with percentiles: which one (99)")
    percentiles_method: Literal["tdigest", "hdr"] = Field("tdigest", description="t-digest (Elasticsearch's "
                                                          "default) or HdrHistogram")
    max_threshold: float | None = Field(None, description="an aggregate above this fires")
    min_threshold: float | None = Field(None, description="an aggregate below this fires")

    @model_validator(mode="after")
    def _metric(self) -> MetricAggregationRule:
        if not FIELD_NAME.match(self.metric_agg_key):
            raise ValueError("metric_aggregation needs metric_agg_key, a field name")
        if (self.metric_agg_type == "percentiles") != (self.percentile_range is not None):
            raise ValueError("percentile_range goes with metric_agg_type percentiles, and only with it")
        if self.metric_agg_type != "percentiles" and self.percentiles_method != "tdigest":
            raise ValueError("percentiles_method: only for metric_agg_type percentiles")
        if self.max_threshold is None and self.min_threshold is None:
            raise ValueError("metric_aggregation needs max_threshold or min_threshold")
        return self

    def samples(self, w: LogWindow, at: float, mem: KeyMemory) -> list[Sample]:
        groups = w.aggregate(self.filter, at - self.timeframe, at, self.query_key, self.metric_agg_key,
                             self.metric_agg_type, self.percentile_range, self.percentiles_method)
        hi, lo = self.max_threshold, self.min_threshold
        return [Sample(labels, v) for labels, v in groups
                if (hi is not None and v > hi) or (lo is not None and v < lo)]


TYPES: dict[str, type[LogRuleType]] = {
    "any": AnyRule, "frequency": FrequencyRule, "flatline": FlatlineRule, "spike": SpikeRule,
    "percentage_match": PercentageMatchRule, "new_term": NewTermRule, "change": ChangeRule,
    "metric_aggregation": MetricAggregationRule}


def _tag(v: Any) -> str | None:
    """The union member of a log rule: by ``type`` (default ``any``). Tags carry the ``tagged-`` prefix
    that error reports drop from a field's path (``sentinel.yamlfile.format_problems``)."""
    kind = v.get("type", "any") if isinstance(v, dict) else getattr(v, "type", None)
    return f"tagged-{kind}" if isinstance(kind, str) else None


LogQuery = Annotated[
    Annotated[AnyRule, Tag("tagged-any")] | Annotated[FrequencyRule, Tag("tagged-frequency")]
    | Annotated[FlatlineRule, Tag("tagged-flatline")] | Annotated[SpikeRule, Tag("tagged-spike")]
    | Annotated[PercentageMatchRule, Tag("tagged-percentage_match")] | Annotated[NewTermRule, Tag("tagged-new_term")]
    | Annotated[ChangeRule, Tag("tagged-change")] | Annotated[MetricAggregationRule, Tag("tagged-metric_aggregation")],
    Discriminator(_tag, custom_error_type="log_rule_type",
                  custom_error_message=f"type: not a log rule type; one of: {', '.join(TYPES)}")]

_ADAPTER: TypeAdapter[LogQuery] = TypeAdapter(LogQuery)


def log_query(data: Any = None, /, **fields: Any) -> LogRuleType:
    """A log rule from its mapping (or keywords), validated as in a rule file."""
    return _ADAPTER.validate_python(data if data is not None else fields)


__all__ = ["SEED_LOOKBACK_S", "TYPES", "KeyMemory", "LogQuery", "LogRuleType", "LogWindow", "log_query"]
