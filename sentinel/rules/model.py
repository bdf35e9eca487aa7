"""The rule file model: Prometheus rule files as they are, plus a ``sentinel:`` extension block.

A rule is either a PromQL rule (``expr``, evaluated by Prometheus) or a log rule (``log``, an
ElastAlert-style query over the JSON request logs). The extension block carries what Prometheus has no
place for and is stripped on export.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sentinel.durations import Duration
from sentinel.errors import FileFormatError, RuleFileError
from sentinel.rules.filters import Strict
from sentinel.rules.logtypes import LogQuery
from sentinel.yamlfile import YamlStr, line_of, load_model_file_lines

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
REMEDIATIONS = ("restart", "scale_out", "scale_in", "rollout_restart", "cordon")  # the last two: Kubernetes mode


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

    runbook: str | None = Field(None, description="the runbook (runbooks/NAME.yaml) run once per episode; its "
                                "findings go out with the alert")
    remediation: Literal["restart", "scale_out", "scale_in", "rollout_restart", "cordon"] | None = Field(
        None, description="the action taken while it fires, under the guardrails (the last two: Kubernetes mode)")
    signal: Signal | None = Field(None, description="what a dashboard plots for it (below)")
    consecutive_samples: int | None = Field(None, ge=1, le=1000,
                                            description="fire only after N consecutive evaluations return the alert")
    learned: Learned | None = Field(None, description="a learned threshold instead of a fixed one (below)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in ("threshold", "unit", "panel") if k in data]
            if moved:
                raise ValueError(f"{', '.join(moved)}: moved into `signal:` ({{expr: <what to plot>, "
                                 f"threshold, unit, panel}}); the expression to plot is no longer guessed from expr")
        return data


class Rule(Strict):
    # YamlStr: an unquoted number is taken as the text it was written as (`expr: 1`, `severity: 2`), as rulefmt
    alert: YamlStr | None = Field(None, description="an alerting rule's name (exactly one of alert, record)")
    record: YamlStr | None = Field(None, description="a recording rule's series name, written back by remote write")
    expr: YamlStr | None = Field(None, description="the PromQL query (exactly one of expr, log)")
    log: LogQuery | None = Field(None, description="a log query, one of the types below")
    for_: Duration = Field(0.0, alias="for", description="pending this long before firing")
    keep_firing_for: Duration = Field(0.0, description="keep firing this long after the condition clears")
    labels: dict[str, YamlStr] = Field(default_factory=dict, description="added to every alert; Go templates")
    annotations: dict[str, YamlStr] = Field(default_factory=dict, description="summary, description, ...; Go "
                                            "templates ({{ $labels.x }}, {{ $value }}, humanize)")
    sentinel: Extension = Field(default_factory=Extension, description="sentinel's own block (below)")

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
    name: str = Field(min_length=1, description="unique in its file")
    interval: Duration | None = Field(None, description="how often its rules are evaluated (default: "
                                      "alerting.evaluation_interval)")
    limit: int = Field(0, ge=0, description="at most this many alerts per rule (0: no limit), as Prometheus")
    query_offset: Duration | None = Field(None, description="evaluate this long in the past (late data)")
    labels: dict[str, YamlStr] = Field(default_factory=dict, description="added to every rule's alerts")
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
