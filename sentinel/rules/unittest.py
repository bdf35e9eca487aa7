"""`sentinel rules test`: promtool's rule unit-test files, run through sentinel's own state machine.

The PromQL is answered by a real, temporary Prometheus whose TSDB is built from the test's input
series with `promtool tsdb create-blocks-from openmetrics` — no PromQL re-implementation. Like
promtool, every rule is evaluated at every ``evaluation_interval`` from 0 to the last ``eval_time``,
and only firing alerts are compared. Known difference: ``stale`` is written as a gap (OpenMetrics text
cannot carry Prometheus's stale marker), so a series stays visible for the 5m lookback after it.
"""

from __future__ import annotations

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
from sentinel.errors import DatasourceError, FileFormatError, ServiceError
from sentinel.generate.prometheus_rules import render
from sentinel.netutil import free_port
from sentinel.promserver import PrometheusServer, find_binary
from sentinel.rules.model import LoadedGroup, load_rule_file
from sentinel.rules.series import expand_values, format_value, parse_series
from sentinel.rules.sources import PromQLSource
from sentinel.supervisor import ChildRegistry
from sentinel.yamlfile import load_model_file


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSeries(_M):
    series: str
    values: str = ""


class ExpAlert(_M):
    exp_labels: dict[str, str] = Field(default_factory=dict)
    exp_annotations: dict[str, str] = Field(default_factory=dict)


class AlertTest(_M):
    eval_time: Duration
    alertname: str
    exp_alerts: list[ExpAlert] = Field(default_factory=list)


class ExpSample(_M):
    labels: str
    value: float


class ExprTest(_M):
    expr: str
    eval_time: Duration
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


def write_openmetrics(tg: TestGroup, interval: float) -> str:
    """The input series as OpenMetrics text with Unix-second timestamps from 0."""
    families: dict[str, list[str]] = {}
    for s in tg.input_series:
        labels = parse_series(s.series)
        name = labels.pop("__name__", None)
        if name is None:
            raise ValueError(f"input series {s.series!r} has no metric name")
        lbl = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{lbl}}}" if lbl else name
        for i, v in enumerate(expand_values(s.values)):
            if v is None or isinstance(v, str):  # missing, or stale (see the module docstring)
                continue
            families.setdefault(name, []).append(f"{series} {format_value(v)} {i * interval:.3f}")
    lines = []
    for name, samples in families.items():
        lines.append(f"# TYPE {name} unknown")
        lines.extend(samples)
    return "\n".join(lines + ["# EOF", ""])


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class TemporaryTsdb:
    """A temporary Prometheus serving the test's series."""

    def __init__(self, work: Path, metrics: str, promtool: str, prometheus: str) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        (work / "input.om").write_text(metrics)
        out = subprocess.run([find_binary(promtool, "apt-get install prometheus"), "tsdb", "create-blocks-from",
                              "openmetrics", str(work / "input.om"), str(data)], capture_output=True, text=True,
                             timeout=120, check=False)
        if out.returncode != 0:
            raise ServiceError(f"promtool could not build blocks from the input series: {out.stderr.strip()}")
        self.server = PrometheusServer(work, free_port(), [], 3600.0, ChildRegistry(work / "children.json"),
                                       prometheus, extra_args=["--storage.tsdb.retention.time=100y"])

    def __enter__(self) -> PromQLSource:
        self.server.start()
        return PromQLSource(self.server.url, timeout_s=30)

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()


def run_test_file(path: Path, promtool: str = "promtool", prometheus: str = "prometheus") -> Outcome:
    tf = load_model_file(path, TestFile)
    groups: list[LoadedGroup] = []
    for rf in tf.rule_files:
        groups.extend(load_rule_file((path.parent / rf).resolve()))
    outcome = Outcome(path)
    for ti, tg in enumerate(tf.tests):
        label = tg.name or f"tests[{ti}]"
        interval = tg.interval or tf.evaluation_interval
        with tempfile.TemporaryDirectory(prefix="sentinel-rules-test-") as tmp, \
                TemporaryTsdb(Path(tmp), write_openmetrics(tg, interval), promtool, prometheus) as src:
            outcome.failures += [f"{label}: {f}" for f in _run_group(tg, groups, tf.evaluation_interval, src)]
    return outcome


def _run_group(tg: TestGroup, groups: list[LoadedGroup], ei: float, src: PromQLSource) -> list[str]:
    failures: list[str] = []
    rules = [(g, r) for g in groups for r in g.group.rules if r.alert and r.kind == "promql"]
    ext = tg.external_labels

    def expander(text: str, labels: Mapping[str, str], value: float) -> str:
        return expand(text, labels, value, ext)

    machines = {r.name: AlertingRule(
        r.name, r.for_, r.keep_firing_for, {**g.group.labels, **r.labels}, r.annotations, g.group.limit,
        r.sentinel.consecutive_samples or 0, expand=expander) for g, r in rules}
    checks = sorted(tg.alert_rule_test, key=lambda a: a.eval_time)
    end = max([c.eval_time for c in checks], default=0.0)
    steps = int(round(end / ei))
    ci = 0
    for k in range(steps + 1):
        t = k * ei
        for _, r in rules:
            try:
                machines[r.name].eval(t, src.query(r.expr or "", t))
            except DatasourceError as exc:
                failures.append(f"rule {r.name} at {format_duration(t)}: {exc}")
        while ci < len(checks) and checks[ci].eval_time <= t + 1e-9:
            failures += _compare_alerts(checks[ci], machines)
            ci += 1
    for et in tg.promql_expr_test:
        failures += _compare_expr(et, src)
    return failures


def _compare_alerts(c: AlertTest, machines: dict[str, AlertingRule]) -> list[str]:
    m = machines.get(c.alertname)
    if m is None:
        return [f"alertname {c.alertname}: no such alerting rule in rule_files"]
    got = sorted(({"labels": dict(a.labels), "annotations": dict(a.annotations)}
                  for a in m.active.values() if a.state == State.FIRING), key=lambda x: sorted(x["labels"].items()))
    exp = sorted(({"labels": {**e.exp_labels, "alertname": c.alertname}, "annotations": dict(e.exp_annotations)}
                  for e in c.exp_alerts), key=lambda x: sorted(x["labels"].items()))
    if got == exp:
        return []
    return [f"alertname: {c.alertname}, time: {format_duration(c.eval_time)},\n"
            f"        exp:{_show(exp)},\n        got:{_show(got)}"]


def _compare_expr(et: ExprTest, src: PromQLSource) -> list[str]:
    try:
        got = src.query(et.expr, et.eval_time)
    except DatasourceError as exc:
        return [f"expr: {et.expr!r}, time: {format_duration(et.eval_time)}: {exc}"]
    exp = [Sample(parse_series(e.labels) if e.labels else {}, e.value) for e in et.exp_samples]
    key = lambda s: sorted(s.labels.items())  # noqa: E731
    g, e = sorted(got, key=key), sorted(exp, key=key)
    if len(g) == len(e) and all(a.labels == b.labels and math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12)
                                for a, b in zip(g, e, strict=True)):
        return []
    exp_s = [(dict(s.labels), s.value) for s in e]
    got_s = [(dict(s.labels), s.value) for s in g]
    return [f"expr: {et.expr!r}, time: {format_duration(et.eval_time)},\n        exp: {exp_s}\n        got: {got_s}"]


def _show(alerts: list[dict[str, Any]]) -> str:
    return "[" + ", ".join(f"\n            0:\n              Labels:{a['labels']}\n              Annotations:"
                           f"{a['annotations']}" for a in alerts) + "]"


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
