"""`sentinel rules test`: promtool's rule unit-test files, run through sentinel's own state machine.

The PromQL is answered by a real, temporary Prometheus (no PromQL re-implementation). The test's input
series, stale markers included, are written into it through its remote-write receiver, with an
out-of-order window so that results can be written at past timestamps. Then, as `promtool test rules`
does, every group is evaluated at every ``evaluation_interval`` from 0 to the last ``eval_time`` (of alert
and expression tests alike), in ``group_eval_order`` or file order:
- recording rules write their results back at the evaluation time (and a stale marker for a series they
  no longer return), so the rules after them, and ``promql_expr_test``, read them;
- alerting rules run sentinel's state machine and write ``ALERTS`` / ``ALERTS_FOR_STATE`` as Prometheus does;
- an ``alert_rule_test`` at ``eval_time`` is checked against the last evaluation at or before it;
- an evaluation error stops the test group, as in promtool.
Log rules are skipped (promtool has no log store).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from sentinel.alerts.state import AlertingRule, Sample, State
from sentinel.alerts.templates import expand
from sentinel.durations import Duration, format_duration
from sentinel.errors import DatasourceError, EvaluationError, FileFormatError
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.prometheus import PromQLSource
from sentinel.promserver import PrometheusServer
from sentinel.rules.export import promtool_problems, render
from sentinel.rules.model import LoadedGroup, Rule, load_rule_file
from sentinel.rules.remote_write import RemoteWriter, Series, recorded_series
from sentinel.rules.series import expand_values, parse_series
from sentinel.yamlfile import YamlStr, load_model_file


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


# YamlStr: an unquoted number is the text it was written as (`values: 1`, `expr: 1`), as promtool reads them


class InputSeries(_M):
    series: YamlStr
    values: YamlStr = ""


class ExpAlert(_M):
    exp_labels: dict[str, YamlStr] = Field(default_factory=dict)
    exp_annotations: dict[str, YamlStr] = Field(default_factory=dict)


class AlertTest(_M):
    eval_time: Duration = 0.0  # promtool's zero value
    alertname: YamlStr
    exp_alerts: list[ExpAlert] = Field(default_factory=list)


class ExpSample(_M):
    labels: YamlStr = ""  # none: a sample without labels (a scalar's, or one whose labels were all removed)
    value: float


class ExprTest(_M):
    expr: YamlStr
    eval_time: Duration = 0.0
    exp_samples: list[ExpSample] = Field(default_factory=list)


class TestGroup(_M):
    name: str = ""
    interval: Duration | None = None
    input_series: list[InputSeries] = Field(default_factory=list)
    alert_rule_test: list[AlertTest] = Field(default_factory=list)
    promql_expr_test: list[ExprTest] = Field(default_factory=list)
    external_labels: dict[str, str] = Field(default_factory=dict)
    external_url: str = ""


class TestFile(_M):
    rule_files: list[str] = Field(default_factory=list)
    evaluation_interval: Duration = 60.0
    group_eval_order: list[str] = Field(default_factory=list)
    tests: list[TestGroup] = Field(default_factory=list)


@dataclass
class Outcome:
    file: Path
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def input_series(tg: TestGroup, interval: float) -> list[Series]:
    """The input series with millisecond timestamps from 0; ``_`` is no sample, ``stale`` a stale marker."""
    out: list[Series] = []
    for s in tg.input_series:
        labels = parse_series(s.series)
        if "__name__" not in labels:
            raise ValueError(f"input series {s.series!r} has no metric name")
        samples: list[tuple[int, float | None]] = []
        for i, v in enumerate(expand_values(s.values)):
            if v is None:
                continue
            samples.append((round(i * interval * 1000), None if isinstance(v, str) else v))
        if samples:
            out.append((labels, samples))
    return out


class TemporaryTsdb:
    """A temporary Prometheus that takes samples through remote write, at any past time."""

    def __init__(self, work: Path, prometheus: str) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.server = PrometheusServer(
            work, free_port(), [], 3600.0, ChildRegistry(work / "children.json"), prometheus,
            extra_args=["--storage.tsdb.retention.time=100y", "--web.enable-remote-write-receiver"],
            # the widest window Prometheus takes (a Go time.Duration: 2^63 ns, 106751 days): a test's series may
            # run to the year 2262 (promtool's long-period.yml) and results are still written back at time 0
            extra_config={"storage": {"tsdb": {"out_of_order_time_window": "106751d"}}})

    def __enter__(self) -> tuple[PromQLSource, RemoteWriter]:
        self.server.start()
        return PromQLSource(self.server.url, timeout_s=30), RemoteWriter(self.server.url)

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()


def ordered_groups(groups: list[LoadedGroup], order: list[str]) -> list[LoadedGroup]:
    """``group_eval_order`` first, in its order; the rest in file order (promtool requires all or none)."""
    if not order:
        return groups
    rank = {name: i for i, name in enumerate(order)}
    missing = [g.group.name for g in groups if g.group.name not in rank]
    if missing:
        raise ValueError(f"group_eval_order does not name every group: missing {', '.join(missing)}")
    return sorted(groups, key=lambda g: rank[g.group.name])


def run_test_file(path: Path, promtool: str = "promtool", prometheus: str = "prometheus") -> Outcome:
    tf = load_model_file(path, TestFile)
    groups: list[LoadedGroup] = []
    for rf in tf.rule_files:
        groups.extend(load_rule_file((path.parent / rf).resolve()))
    groups = ordered_groups(groups, tf.group_eval_order)
    outcome = Outcome(path)
    # as promtool, a rule whose PromQL does not parse fails the file when the rules load, before any test runs
    for lg in groups:
        try:
            problems = promtool_problems([lg], promtool)
        except FileNotFoundError:
            break  # no promtool: Prometheus rejects the expression at its first evaluation instead
        outcome.failures += [f"{Path(lg.file).name}: group {_quote(group)}, rule {ri + 1}, "
                             f"{_quote(lg.group.rules[ri].name)}: {msg}" if ri is not None else msg
                             for group, ri, msg in problems]
    if outcome.failures:
        return outcome
    for ti, tg in enumerate(tf.tests):
        label = tg.name or f"tests[{ti}]"
        interval = tg.interval or tf.evaluation_interval
        with tempfile.TemporaryDirectory(prefix="sentinel-rules-test-") as tmp, \
                TemporaryTsdb(Path(tmp), prometheus) as (src, writer):
            try:
                writer.write(input_series(tg, interval))
                failures = _run_group(tg, groups, tf.evaluation_interval, src, writer)
            except DatasourceError as exc:  # the temporary Prometheus refused samples: the test cannot run
                failures = [f"the test's samples were not stored: {exc}"]
            outcome.failures += [f"{label}: {f}" for f in failures]
    return outcome


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _run_group(tg: TestGroup, groups: list[LoadedGroup], ei: float, src: PromQLSource,
               writer: RemoteWriter) -> list[str]:
    failures: list[str] = []
    ext = tg.external_labels

    def expander(text: str, labels: Mapping[str, str], value: float) -> str:
        return expand(text, labels, value, ext)

    rules = [(gi, ri, g, r) for gi, g in enumerate(groups) for ri, r in enumerate(g.group.rules)
             if r.expr is not None and r.kind == "promql"]
    machines = {(gi, ri): AlertingRule(
        r.name, r.for_, r.keep_firing_for, {**g.group.labels, **r.labels}, r.annotations, g.group.limit,
        r.sentinel.consecutive_samples or 0, expand=expander) for gi, ri, g, r in rules if r.alert}
    checks = sorted(tg.alert_rule_test, key=lambda a: a.eval_time)
    end = max([c.eval_time for c in checks] + [e.eval_time for e in tg.promql_expr_test], default=0.0)
    previous: dict[tuple[int, int], set[tuple[tuple[str, str], ...]]] = {}
    ci = 0
    k = 0
    while k * ei <= end + 1e-9:
        t = k * ei
        ms = round(t * 1000)
        errors: list[str] = []
        for gi, ri, g, r in rules:
            try:
                samples = src.query_raw(r.expr or "", t)
                if r.record is not None:
                    out = recorded_series(r.record, {**g.group.labels, **r.labels}, samples)
                else:
                    m = machines[(gi, ri)]
                    m.eval(t, [x for x in samples if not math.isnan(x.value)])
                    out = _alerts_series(m)
            except (DatasourceError, EvaluationError) as exc:
                errors.append(f"    rule: {r.name}, time: {format_duration(t)}, err: {exc}")
                continue
            now = {_key(labels) for labels, _ in out}
            gone = previous.get((gi, ri), set()) - now
            previous[(gi, ri)] = now
            batch: list[Series] = [(labels, [(ms, v)]) for labels, v in out]
            batch += [(dict(key), [(ms, None)]) for key in gone]  # a stale marker, as Prometheus writes
            if batch:
                writer.write(batch)
        if errors:  # promtool stops the group at the first evaluation with errors
            return failures + errors
        while ci < len(checks) and checks[ci].eval_time < t + ei - 1e-9:
            failures += _compare_alerts(checks[ci], rules, machines)
            ci += 1
        k += 1
    for et in tg.promql_expr_test:
        failures += _compare_expr(et, src)
    return failures


def _alerts_series(m: AlertingRule) -> list[tuple[dict[str, str], float]]:
    """``ALERTS`` (1 per pending or firing alert) and ``ALERTS_FOR_STATE`` (its activation time)."""
    out: list[tuple[dict[str, str], float]] = []
    for a in m.active.values():
        if a.state == State.INACTIVE:
            continue
        out.append(({**a.labels, "__name__": "ALERTS", "alertstate": a.state.value}, 1.0))
        out.append(({**a.labels, "__name__": "ALERTS_FOR_STATE"}, a.active_at))
    return out


def _compare_alerts(c: AlertTest, rules: list[tuple[int, int, LoadedGroup, Rule]],
                    machines: dict[tuple[int, int], AlertingRule]) -> list[str]:
    """Firing alerts of every rule named ``alertname`` (the name may be in several groups), as promtool."""
    got = sorted(({"labels": dict(a.labels), "annotations": dict(a.annotations)}
                  for gi, ri, _, r in rules if r.alert == c.alertname
                  for a in machines[(gi, ri)].active.values() if a.state == State.FIRING),
                 key=lambda x: sorted(x["labels"].items()))
    exp = sorted(({"labels": {**e.exp_labels, "alertname": c.alertname}, "annotations": dict(e.exp_annotations)}
                  for e in c.exp_alerts), key=lambda x: sorted(x["labels"].items()))
    if got == exp:
        return []
    return [f"alertname: {c.alertname}, time: {format_duration(c.eval_time)},\n"
            f"        exp:{_show(exp)},\n        got:{_show(got)}"]


def _quote(text: str) -> str:
    """Go's %q for the printable text rules hold: double quotes, backslash escapes."""
    return json.dumps(text, ensure_ascii=False)


def _labels_text(labels: Mapping[str, str]) -> str:
    """A label set as Prometheus prints one: ``{a="1", b="2"}``, sorted by name."""
    return "{" + ", ".join(f"{k}={_quote(v)}" for k, v in sorted(labels.items())) + "}"


def _go_float(v: float) -> str:
    """A value as promtool prints it (Go's ``strconv.FormatFloat(v, 'E', -1, 64)``): ``1E+00``, ``9.21888E+09``."""
    if math.isnan(v) or math.isinf(v):
        return {True: "NaN"}.get(math.isnan(v), "+Inf" if v > 0 else "-Inf")
    for digits in range(17):
        text = f"{v:.{digits}E}"
        if float(text) == v:
            return text
    return f"{v:.17E}"


def _compare_expr(et: ExprTest, src: PromQLSource) -> list[str]:
    try:
        got = src.query(et.expr, et.eval_time)
    except (DatasourceError, EvaluationError) as exc:
        return [f"expr: {_quote(et.expr)}, time: {format_duration(et.eval_time)}, err: {exc}"]
    exp = [Sample(parse_series(e.labels) if e.labels else {}, e.value) for e in et.exp_samples]
    key = lambda s: sorted(s.labels.items())  # noqa: E731
    g, e = sorted(got, key=key), sorted(exp, key=key)
    if len(g) == len(e) and all(a.labels == b.labels and math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12)
                                for a, b in zip(g, e, strict=True)):
        return []
    exp_s = ", ".join(f"{_labels_text(s.labels)} {_go_float(s.value)}" for s in e)
    got_s = ", ".join(f"{_labels_text(s.labels)} {_go_float(s.value)}" for s in g)
    return [f"expr: {_quote(et.expr)}, time: {format_duration(et.eval_time)},\n        exp: {exp_s}\n"
            f"        got: {got_s}"]


def _show(alerts: list[dict[str, Any]]) -> str:
    """Alerts as promtool lists them: index, labels and annotations, each set sorted by name."""
    return "[" + "".join(f"\n            {i}:\n              Labels:{_labels_text(a['labels'])}\n"
                         f"              Annotations:{_labels_text(a['annotations'])}"
                         for i, a in enumerate(alerts)) + ("\n            ]" if alerts else "]")


def promtool_copy(path: Path, out_dir: Path) -> Path:
    """The test file rewritten to point at exported (promtool-readable) rule files, for cross-checking."""
    tf = load_model_file(path, TestFile)
    raw = yaml.safe_load(path.read_text())
    names = []
    for i, rf in enumerate(tf.rule_files):
        src = (path.parent / rf).resolve()
        dst = out_dir / f"{i}-{src.name}"
        dst.write_text(render(load_rule_file(src), src.name))
        names.append(dst.name)
    raw["rule_files"] = names
    out = out_dir / path.name
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run_promtool(path: Path, promtool: str = "promtool") -> tuple[bool, str]:
    binary = shutil.which(promtool)
    if binary is None:
        raise FileFormatError(str(path), [f"{promtool} not found (apt-get install prometheus)"])
    with tempfile.TemporaryDirectory(prefix="sentinel-promtool-") as tmp:
        copy = promtool_copy(path, Path(tmp))
        out = subprocess.run([binary, "test", "rules", str(copy)], capture_output=True, text=True, timeout=300,
                             check=False)
    return out.returncode == 0, (out.stdout + out.stderr).strip()
