"""The rule file model: Prometheus rule files as they are, plus a ``sentinel:`` extension block.

A rule is either a PromQL rule (``expr``, evaluated by Prometheus) or a log rule (``log``, an
ElastAlert-style query over the JSON request logs). The extension block carries what Prometheus has no
place for and is stripped on export.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from sentinel.durations import Duration
from sentinel.errors import FileFormatError, RuleFileError
from sentinel.rules import querystring
from sentinel.yamlfile import YamlStr, line_of, load_model_file_lines

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
FIELD_NAME = re.compile(r"^[A-Za-z_@][A-Za-z0-9_.@-]*$")
REMEDIATIONS = ("restart", "scale_out", "scale_in", "rollout_restart", "cordon")  # the last two: Kubernetes mode


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_labels(v: dict[str, str]) -> dict[str, str]:
    for name in v:
        if not LABEL_NAME.match(name):
            raise ValueError(f"invalid label name {name!r}")
    return v


class Learned(Strict):
    """A learned threshold: alert when the signal leaves its robust baseline band (see rules/learned.py)."""

    history: Duration = 86400.0
    step: Duration = 60.0
    refit: Duration = 3600.0
    k: float = Field(4.0, gt=0, description="band half-width in robust standard deviations")
    direction: Literal["above", "below", "both"] = "above"
    min_points: int = Field(30, ge=4)


class Signal(Strict):
    """What a dashboard plots for an alerting rule: the quantity the alert judges (``expr``, a PromQL
    expression that returns it whether or not the alert fires; a learned rule's own expr when omitted),
    its Grafana ``unit``, the ``threshold`` the alert compares it with (drawn as a line; ``direction``
    says which side is bad), a ``legend`` (Grafana's ``{{label}}`` format; only labels the expression
    keeps) and the panel type."""

    expr: str | None = None
    unit: Literal["s", "ms", "percent", "percentunit", "short", "bytes", "reqps", "ops", "none"] = "short"
    threshold: float | None = None
    direction: Literal["above", "below"] = "above"
    legend: str | None = None
    panel: Literal["timeseries", "gauge", "stat"] = "timeseries"

    @field_validator("expr")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expr is empty")
        return v


class Extension(Strict):
    """sentinel-only settings of a rule (stripped on export)."""

    runbook: str | None = None
    remediation: Literal["restart", "scale_out", "scale_in", "rollout_restart", "cordon"] | None = None
    signal: Signal | None = None
    consecutive_samples: int | None = Field(None, ge=1, le=1000,
                                            description="fire only after N consecutive evaluations return the alert")
    learned: Learned | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in ("threshold", "unit", "panel") if k in data]
            if moved:
                raise ValueError(f"{', '.join(moved)}: moved into `signal:` ({{expr: <what to plot>, "
                                 f"threshold, unit, panel}}); the expression to plot is no longer guessed from expr")
        return data


Scalar = str | int | float | bool


class Range(Strict):
    """Bounds on a field (numbers compare as numbers, strings as strings, as in Elasticsearch)."""

    gt: float | str | None = None
    gte: float | str | None = None
    lt: float | str | None = None
    lte: float | str | None = None

    @model_validator(mode="after")
    def _some(self) -> Range:
        if all(getattr(self, k) is None for k in ("gt", "gte", "lt", "lte")):
            raise ValueError("a range needs at least one of: gt, gte, lt, lte")
        return self

    def bounds(self) -> list[tuple[str, float | str]]:
        return [(k, v) for k in ("gt", "gte", "lt", "lte") if (v := getattr(self, k)) is not None]


class LogFilter(Strict):
    """One condition on a log event, in Elasticsearch's query language (the subset both stores answer
    alike): the field ``exists`` (non-null), equals a ``term``, is one of ``terms``, is within a
    ``range``, matches a ``wildcard`` (``*`` any characters, ``?`` one character; case-sensitive), or a
    Lucene ``query_string`` (``cuda_error:* AND NOT replica:0``; see ``sentinel/rules/querystring.py``),
    which parses into a tree of the others. Several fields in one filter must all match."""

    exists: str | None = None
    term: dict[str, Scalar] | None = None
    terms: dict[str, list[Scalar]] | None = None
    range: dict[str, Range] | None = None
    wildcard: dict[str, str] | None = None
    query_string: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("exists", "term", "terms", "range", "wildcard", "query_string")
    _tree: FilterNode | None = PrivateAttr(None)

    @field_validator("query_string", mode="before")
    @classmethod
    def _query_form(cls, v: Any) -> Any:
        if isinstance(v, dict):  # ElastAlert's form: query_string: {query: "..."}
            if set(v) != {"query"}:
                raise ValueError("query_string takes a string, or {query: <string>}")
            return v["query"]
        return v

    @model_validator(mode="after")
    def _one(self) -> LogFilter:
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a filter needs exactly one of: {', '.join(self.KINDS)}")
        kind = given[0]
        if kind == "query_string":
            assert self.query_string is not None
            self._tree = _build(querystring.parse(self.query_string))
            return self
        fields = [self.exists] if kind == "exists" else list(getattr(self, kind).keys())
        if kind != "exists" and not fields:
            raise ValueError(f"{kind}: name a field")
        for f in fields:
            if not f or not FIELD_NAME.match(f):
                raise ValueError(f"invalid field name {f!r}")
        for values in (self.terms or {}).values():
            if not values:
                raise ValueError("terms: give at least one value")
        for pattern in (self.wildcard or {}).values():
            if any(c in pattern for c in "[]\\"):
                raise ValueError(f"wildcard {pattern!r}: only * and ? are special; [, ] and \\ are not allowed")
        return self

    @property
    def tree(self) -> FilterNode | None:
        """A ``query_string`` as a tree of the other kinds; None for the other kinds."""
        return self._tree


# A parsed query_string: ("and" | "or", [nodes]), ("not", node) or ("leaf", LogFilter).
FilterNode = tuple[str, Any]


def _build(node: querystring.Node) -> FilterNode:
    kind, arg = node
    if kind == "leaf":
        return ("leaf", LogFilter.model_validate(arg))
    if kind == "not":
        return ("not", _build(arg))
    return (kind, [_build(n) for n in arg])


class LogQuery(Strict):
    """An ElastAlert-style log rule. ``any``: every matching event counts; ``frequency``: at least
    ``num_events`` matching events in ``timeframe``; ``flatline``: fewer than ``threshold`` (a group
    that had events in the window before and now has fewer, or none); ``spike``: the count in
    ``timeframe`` is ``spike_height`` times the one in the ``timeframe`` before (``spike_type`` up, down
    or both; ``threshold_ref`` / ``threshold_cur`` minimum counts); ``percentage_match``: the share of
    events that also match ``match_bucket_filter`` is below ``min_percentage`` or above
    ``max_percentage``; ``new_term``: a value (or combination) of ``fields`` in ``timeframe`` that did
    not occur in the ``terms_window_size`` before it; ``change``: ``compare_key`` took more than one value
    within ``timeframe`` for the same ``query_key`` group; ``metric_aggregation``: ``metric_agg_type`` of the
    numeric field ``metric_agg_key`` over the matching events in ``timeframe`` is above
    ``max_threshold`` or below ``min_threshold`` (ElastAlert2's names; ``percentiles`` at
    ``percentile_range``, e.g. the seed's P99 of ``inference_time`` > 500 ms; ``percentiles_method``
    ``tdigest``, Elasticsearch's default, or ``hdr``). Each
    ``query_key`` value is its own alert."""

    type: Literal["any", "frequency", "flatline", "spike", "percentage_match", "new_term", "change",
                  "metric_aggregation"] = "any"
    filter: list[LogFilter] = Field(default_factory=list)
    timeframe: Duration = 300.0
    query_delay: Duration = 0.0   # evaluate the window this long ago (the store's indexing delay)
    num_events: int = Field(1, ge=1)
    query_key: list[str] = Field(default_factory=list)
    threshold: int | None = Field(None, ge=1)                     # flatline: fewer events than this
    forget_keys: bool = False  # flatline: drop a group once it has alerted, until it logs again (ElastAlert2)
    spike_height: float | None = Field(None, gt=1)                # spike: current / reference window
    spike_type: Literal["up", "down", "both"] = "both"
    threshold_ref: int | None = Field(None, ge=0)                 # spike: minimum events in the reference window
    threshold_cur: int | None = Field(None, ge=0)                 # spike: minimum events in the current window
    match_bucket_filter: list[LogFilter] = Field(default_factory=list)  # percentage_match: the matching part
    min_percentage: float | None = Field(None, ge=0, le=100)
    max_percentage: float | None = Field(None, ge=0, le=100)
    fields: list[str] = Field(default_factory=list)               # new_term: the fields whose values are watched
    terms_window_size: Duration = 30 * 86400.0                    # new_term: "new" means unseen for this long
    compare_key: str | None = None                                # change: the field whose value changed
    metric_agg_key: str | None = None
    metric_agg_type: Literal["min", "max", "avg", "sum", "value_count", "cardinality", "percentiles"] | None = None
    percentile_range: float | None = Field(None, gt=0, le=100)
    # how percentiles are computed: Elasticsearch's default (t-digest; exact, interpolated between ranks, up
    # to 2,000 values a group), or HdrHistogram (the value at the rank, rounded up to 3 significant digits)
    percentiles_method: Literal["tdigest", "hdr"] = "tdigest"
    max_threshold: float | None = None
    min_threshold: float | None = None
    # ElastAlert's notification options. realert: the least time between two firing notifications of one
    # alert (repeats of a firing alert, and a new episode after a resolved one); unset, a new episode pages
    # at once and a firing alert is repeated at the resend delay, as PromQL rules. aggregation: hold this
    # rule's notifications and send them together once per period (one notification per value of the
    # aggregation_key labels).
    realert: Duration | None = Field(None, ge=0)
    aggregation: Duration | None = Field(None, gt=0)
    aggregation_key: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _by_type(self) -> LogQuery:
        needs = {"flatline": ["threshold"], "spike": ["spike_height"], "percentage_match": ["match_bucket_filter"],
                 "new_term": ["fields"], "change": ["compare_key"]}
        for f in [*self.fields, *([self.compare_key] if self.compare_key else [])]:
            if not FIELD_NAME.match(f):
                raise ValueError(f"invalid field name {f!r}")
        if self.type == "new_term" and self.terms_window_size <= self.timeframe:
            raise ValueError("terms_window_size must be longer than timeframe")
        for kind, fields in needs.items():
            for f in fields:
                if self.type == kind and not getattr(self, f):
                    raise ValueError(f"{kind} needs {f}")
                if self.type != kind and getattr(self, f):
                    raise ValueError(f"{f}: only for type {kind}")
        if self.type == "percentage_match" and self.min_percentage is None and self.max_percentage is None:
            raise ValueError("percentage_match needs min_percentage or max_percentage")
        if self.type != "percentage_match" and (self.min_percentage is not None or self.max_percentage is not None):
            raise ValueError("min_percentage, max_percentage: only for type percentage_match")
        if self.type != "spike" and (self.threshold_ref is not None or self.threshold_cur is not None):
            raise ValueError("threshold_ref, threshold_cur: only for type spike")
        if self.type != "flatline" and self.forget_keys:
            raise ValueError("forget_keys: only for type flatline")
        if self.aggregation_key and self.aggregation is None:
            raise ValueError("aggregation_key needs aggregation (the period)")
        return self._metric()

    def _metric(self) -> LogQuery:
        if self.type != "metric_aggregation":
            given = [k for k in ("metric_agg_key", "metric_agg_type", "percentile_range", "max_threshold",
                                 "min_threshold") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for type metric_aggregation")
            return self
        if not self.metric_agg_key or not FIELD_NAME.match(self.metric_agg_key):
            raise ValueError("metric_aggregation needs metric_agg_key, a field name")
        if self.metric_agg_type is None:
            raise ValueError("metric_aggregation needs metric_agg_type")
        if (self.metric_agg_type == "percentiles") != (self.percentile_range is not None):
            raise ValueError("percentile_range goes with metric_agg_type percentiles, and only with it")
        if self.metric_agg_type != "percentiles" and self.percentiles_method != "tdigest":
            raise ValueError("percentiles_method: only for metric_agg_type percentiles")
        if self.max_threshold is None and self.min_threshold is None:
            raise ValueError("metric_aggregation needs max_threshold or min_threshold")
        return self

    @field_validator("query_key", "aggregation_key", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("query_key", "aggregation_key")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for f in v:
            if not FIELD_NAME.match(f):
                raise ValueError(f"invalid field name {f!r}")
        return v

    @field_validator("timeframe")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeframe must be > 0")
        return v


class Rule(Strict):
    # YamlStr: an unquoted number is taken as the text it was written as (`expr: 1`, `severity: 2`), as rulefmt
    alert: YamlStr | None = None
    record: YamlStr | None = None
    expr: YamlStr | None = None
    log: LogQuery | None = None
    for_: Duration = Field(0.0, alias="for")
    keep_firing_for: Duration = 0.0
    labels: dict[str, YamlStr] = Field(default_factory=dict)
    annotations: dict[str, YamlStr] = Field(default_factory=dict)
    sentinel: Extension = Field(default_factory=Extension)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    _labels = field_validator("labels")(_check_labels)

    @model_validator(mode="after")
    def _shape(self) -> Rule:
        if (self.alert is None) == (self.record is None):
            raise ValueError("a rule needs exactly one of: alert, record")
        if (self.expr is None) == (self.log is None):
            raise ValueError("a rule needs exactly one of: expr (PromQL), log (log query)")
        if self.record is not None and self.log is not None:
            raise ValueError("recording rules take expr, not log")
        if self.record is not None:  # as promtool (rulefmt): these mean nothing on a recording rule
            for name, given in (("annotations", bool(self.annotations)), ("for", self.for_ != 0),
                                ("keep_firing_for", self.keep_firing_for != 0)):
                if given:
                    raise ValueError(f"invalid field '{name}' in recording rule")
        if self.sentinel.learned is not None and self.expr is None:
            raise ValueError("a learned threshold needs a PromQL signal in expr")
        sig = self.sentinel.signal
        if sig is not None:
            if self.alert is None or self.expr is None:
                raise ValueError("sentinel.signal: only on PromQL alerting rules (a log rule plots its matches)")
            if sig.expr is None and self.sentinel.learned is None:
                raise ValueError("sentinel.signal.expr: the expression to plot is required (only a learned "
                                 "rule's expr is its own signal)")
        name = self.alert or self.record or ""
        if self.record is not None and not re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", name):
            raise ValueError(f"invalid recording rule name {name!r}")
        if self.expr is not None and not self.expr.strip():
            raise ValueError("expr is empty")
        return self

    @property
    def name(self) -> str:
        return self.alert or self.record or ""

    @property
    def kind(self) -> Literal["promql", "log", "learned"]:
        if self.log is not None:
            return "log"
        return "learned" if self.sentinel.learned is not None else "promql"


class Group(Strict):
    name: str = Field(min_length=1)
    interval: Duration | None = None
    limit: int = Field(0, ge=0)
    query_offset: Duration | None = None
    labels: dict[str, YamlStr] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    _labels = field_validator("labels")(_check_labels)


class RuleFile(Strict):
    groups: list[Group] = Field(default_factory=list)


class LoadedGroup(BaseModel):
    """A group with the file it came from, as the evaluator and the generators see it."""

    model_config = ConfigDict(frozen=True)

    file: str
    group: Group

    @property
    def key(self) -> str:
        return f"{self.file};{self.group.name}"


def load_rule_file(path: Path) -> list[LoadedGroup]:
    return load_rule_file_lines(path)[0]


def load_rule_file_lines(path: Path) -> tuple[list[LoadedGroup], dict[tuple[str | int, ...], int]]:
    """The groups of one rule file, and the line of each key path (the file is parsed once)."""
    rf, lines = load_model_file_lines(path, RuleFile, RuleFileError)
    seen: dict[str, int] = {}
    problems = []
    for gi, g in enumerate(rf.groups):
        if g.name in seen:
            problems.append(f"{path}:{line_of(lines, ('groups', gi, 'name'))}: groups.{gi}.name: duplicate group name "
                            f"{g.name!r} (first at line {line_of(lines, ('groups', seen[g.name], 'name'))})")
        else:
            seen[g.name] = gi
    if problems:
        raise RuleFileError(str(path), problems)
    return [LoadedGroup(file=str(path), group=g) for g in rf.groups], lines


def rule_files(rules_dir: Path) -> list[Path]:
    return sorted(p for p in rules_dir.glob("*.y*ml") if p.suffix in (".yml", ".yaml"))


def load_rules(rules_dir: Path) -> list[LoadedGroup]:
    """Every group in ``rules_dir``; all files' problems are reported together."""
    groups: list[LoadedGroup] = []
    problems: list[str] = []
    files = rule_files(rules_dir)
    if not files:
        raise RuleFileError(str(rules_dir), [f"{rules_dir}: no rule files (*.yml, *.yaml)"])
    for path in files:
        try:
            groups.extend(load_rule_file(path))
        except FileFormatError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RuleFileError(str(rules_dir), problems)
    return groups


_LUCENE_SPECIAL = re.compile(r'([+\-=&|><!(){}\[\]^"~*?:\\/ ])')


def _lucene_value(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lucene_field(name: str) -> str:
    return _LUCENE_SPECIAL.sub(r"\\\1", name)


def lucene(filters: list[LogFilter]) -> str:
    """The filters as one Lucene query string (Elasticsearch's ``query_string``, what Grafana's
    Elasticsearch datasource takes): the same events as the query DSL sentinel sends (tested on a real
    Elasticsearch). All filters must match; an empty list matches everything (``*``)."""
    parts: list[str] = []
    for f in filters:
        if f.query_string is not None:
            parts.append(f"({f.query_string})")
        elif f.exists is not None:
            parts.append(f"_exists_:{_lucene_field(f.exists)}")
        elif f.term is not None:
            parts.extend(f"{_lucene_field(k)}:{_lucene_value(v)}" for k, v in f.term.items())
        elif f.terms is not None:
            parts.extend(f"{_lucene_field(k)}:({' OR '.join(_lucene_value(x) for x in vs)})"
                         for k, vs in f.terms.items())
        elif f.range is not None:
            for k, r in f.range.items():
                lo = r.gte if r.gte is not None else r.gt
                hi = r.lte if r.lte is not None else r.lt
                left = "[" if r.gte is not None or lo is None else "{"
                right = "]" if r.lte is not None or hi is None else "}"
                lo_s = "*" if lo is None else _lucene_value(lo)
                hi_s = "*" if hi is None else _lucene_value(hi)
                parts.append(f"{_lucene_field(k)}:{left}{lo_s} TO {hi_s}{right}")
        elif f.wildcard is not None:
            for k, pattern in f.wildcard.items():
                escaped = "".join(c if c in "*?" else _LUCENE_SPECIAL.sub(r"\\\1", c) for c in pattern)
                parts.append(f"{_lucene_field(k)}:{escaped}")
    if not parts:
        return "*"
    return " AND ".join(parts) if len(parts) > 1 else parts[0]
