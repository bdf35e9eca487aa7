"""Grafana dashboards and provisioning: in step with the rules, loaded back into grafana-foundation-sdk's
models, every PromQL query accepted by the real promtool, every plotted metric exported by someone, and
every alerting rule drawn with the signal it judges."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import elasticsearch as es_m
from grafana_foundation_sdk.models import prometheus as prom_m
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.generate.dashboards import render_all, threshold_steps
from sentinel.generate.grafana import DashboardsFile, DatasourcesFile, render_provisioning
from sentinel.rules.filters import LogFilter, lucene
from sentinel.rules.model import Rule, load_rules
from sentinel.settings import load_settings
from tests.conftest import ROOT

DASHBOARDS = ROOT / "dashboards"
GRAFANA = ROOT / "deploy" / "grafana"
REGEN = "run `sentinel dashboards generate`"
plugins.register_default_plugins()


def _docs() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["panels"] if p["type"] != "row"]


def _promql(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression a dashboard sends: panel targets, annotations and variable queries."""
    out = [t["expr"] for p in _panels(doc) if p["datasource"]["type"] == "prometheus" for t in p["targets"]]
    out += [a["expr"] for a in doc["annotations"]["list"] if a.get("expr")]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), *\w+\)", v["query"])
            assert m, v["query"]
            out.append(m[1])
    return out


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$replica", ".*").replace("$model", ".*")


def test_checked_in_files_are_in_step() -> None:
    groups = load_rules(ROOT / "rules")
    for name, text in render_all(groups).items():
        assert (DASHBOARDS / name).read_text() == text, f"dashboards/{name} is stale: {REGEN}"
    for name, text in render_provisioning(load_settings(None)).items():
        assert (GRAFANA / name).read_text() == text, f"deploy/grafana/{name} is stale: {REGEN}"
    assert sorted(p.name for p in DASHBOARDS.iterdir()) == sorted(render_all(groups))


def test_dashboards_load_back_into_the_sdk() -> None:
    for name, doc in _docs().items():
        model = dash_m.Dashboard.from_json(doc)
        assert json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json())) == doc, name
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)) and all(ids), f"{name}: panel ids must be unique and set"
        for panel in model.panels or []:
            if isinstance(panel, dash_m.RowPanel):
                continue
            assert panel.targets, panel.title
            for t in panel.targets:  # typed by the SDK's variant registry, not left unknown
                assert isinstance(t, prom_m.Dataquery | es_m.Dataquery), (panel.title, type(t))
        for p in _panels(doc):  # a 24-column grid, nothing overlapping
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"], g)
        cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in doc["panels"]
                 for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
        assert len(cells) == len(set(cells)), f"{name}: panels overlap"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_accepts_every_query(tmp_path: Path) -> None:
    exprs = [e for doc in _docs().values() for e in _promql(doc)]
    assert len(exprs) > 40
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"q:{i}", "expr": _substitute(e)} for i, e in enumerate(exprs)]}]}
    f = tmp_path / "queries.yaml"
    f.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# PromQL's functions, aggregations and keywords (prometheus/promql/parser: functions.go, lex.go), and Grafana's
# label_values: every other word in an expression is a metric name
PROMQL_WORDS = set("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max clamp_min
cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv exp floor histogram_avg
histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
double_exponential_smoothing holt_winters hour idelta increase info irate label_join label_replace last_over_time ln
log10 log2 mad_over_time max_over_time min_over_time minute month pi predict_linear present_over_time
quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt
stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
and or unless offset bool by without on ignoring group_left group_right atan2 start end inf nan le label_values
""".split())


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("__")}


def _exported() -> set[str]:
    """Every series name the inference core and sentinel can export, from their real registries."""
    from inference_core.telemetry import BusyTracker, Metrics
    from sentinel.metrics import ActiveAlerts, BacklogCollector, SentinelMetrics
    from sentinel.router import RouterMetrics
    from sentinel.rules.learned import LearnedThresholds

    names: set[str] = {"up"}  # Prometheus's own
    reg = CollectorRegistry()
    Metrics(reg, BusyTracker())
    SentinelMetrics(reg)
    RouterMetrics(reg)
    for family in reg.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
        names.update(family.name + s for s in suffixes.get(family.type, [""]))

    class _Store:
        def pending_by_receiver(self) -> dict[str, tuple[int, float]]:
            return {"oncall": (1, 0.0)}

    class _Shipper:
        synced_at = 1.0
        backlog = {"replica-0": 0}

    for collector in (ActiveAlerts(), LearnedThresholds(), BacklogCollector(_Store(), lambda: _Shipper())):  # type: ignore[arg-type]
        names.update(f.name for f in collector.collect())
    # the replica's device collector (gpu_utilization only where NVML reads a GPU) and the API's refusal counter
    devices = (ROOT / "inference_core" / "telemetry.py").read_text()
    extra = {"gpu_utilization", "memory_usage_bytes", "memory_limit_bytes", "inference_engine_busy_percent"}
    assert all(f'"{n}"' in devices for n in extra)
    names.update(extra)
    from inference_core.api.app import create_app
    from inference_core.api.slot import EngineSlot

    api = CollectorRegistry()  # the replica API's own metrics (its refusal counter), registered by the app
    create_app(EngineSlot(), "m", api)
    names.update(f"{f.name}_total" if f.type == "counter" else f.name for f in api.collect())
    return names


def test_every_plotted_metric_is_exported() -> None:
    exported = _exported()
    for name, doc in _docs().items():
        for expr in _promql(doc):
            missing = _metric_names(expr) - exported
            assert not missing, f"{name}: {expr!r} plots {missing}, which nothing exports"


def test_rules_dashboard_draws_each_rule_as_it_is_judged() -> None:
    doc = json.loads((DASHBOARDS / "sentinel-rules.json").read_text())
    panels = {p["title"]: p for p in _panels(doc)}
    for lg in load_rules(ROOT / "rules"):
        for rule in lg.group.rules:
            if not rule.alert:
                continue
            sig = rule.sentinel.signal
            if rule.log is not None:
                state = panels[f"{rule.name}: alerts"]
                assert f'alertname="{rule.name}"' in state["targets"][0]["expr"]
                logs = panels[f"{rule.name}: matching log lines"]
                assert logs["type"] == "logs" and logs["datasource"]["uid"] == "${logs}"
                assert logs["targets"][0]["query"] == lucene(rule.log.filter)
                continue
            p = panels[rule.name]
            if rule.sentinel.learned is not None:
                exprs = [t["expr"] for t in p["targets"]]
                assert exprs[0] == (rule.expr or "").strip()
                assert any("sentinel_learned_threshold_upper" in e for e in exprs)
            elif sig is None or sig.expr is None:
                assert p["type"] == "state-timeline" and "sentinel_active_alerts" in p["targets"][0]["expr"]
            else:
                assert p["targets"][0]["expr"] == sig.expr.strip()
                assert p["type"] == sig.panel
                # the signal is the quantity the alert judges: every metric it plots is in the alert's expr
                assert _metric_names(sig.expr) <= _metric_names(rule.expr or ""), rule.name
                steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                assert steps == [{"color": c, "value": v} for v, c in threshold_steps(sig.threshold, sig.direction)]
                assert p["fieldConfig"]["defaults"]["unit"] == sig.unit
    p99 = panels["InferenceLatencyP99High"]
    assert p99["fieldConfig"]["defaults"]["thresholds"]["steps"][-1] == {"color": "red", "value": 0.5}
    down = panels["InferenceReplicaDown"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert down == [{"color": "red", "value": None}, {"color": "green", "value": 1}]  # bad below 1


def test_overview_has_the_seed_signals_and_the_serving_panels() -> None:
    doc = json.loads((DASHBOARDS / "sentinel-overview.json").read_text())
    panels = {p["title"]: p for p in _panels(doc)}
    assert {"P99 latency (SLO)", "Utilization (target band)", "Memory headroom", "End-to-end latency",
            "Time to first token", "Time per output token", "Queue time", "Token throughput", "Requests",
            "Error rate", "CUDA errors", "Preemptions", "Batch size", "Scheduler state", "KV and prefix cache",
            "Routed requests", "Router in flight", "Retries and upstream errors", "Router upstream latency",
            "Remediations", "Rule evaluation time", "Rule evaluation failures", "Notification queue",
            "Log shipping", "Errors in the request log"} <= set(panels)
    util = panels["Utilization (target band)"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in util] == [None, 70, 85, 90]  # the seed's band, read from the rules
    head = panels["Memory headroom"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert head == [{"color": "red", "value": None}, {"color": "green", "value": 0.2}]
    assert {"P50", "P90", "P95", "P99"} == {t["legendFormat"] for t in panels["Time to first token"]["targets"]}
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["logs"]["query"] == "elasticsearch"
    assert variables["replica"]["multi"] and 'model=~"$model"' in variables["replica"]["query"]
    assert any("sentinel_active_alerts" in a["expr"] for a in doc["annotations"]["list"])
    # no legend names a label the query aggregated away
    for p in _panels(doc):
        for t in p["targets"]:
            for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                by = re.findall(r"\bby \(([^)]*)\)", t["expr"])
                assert by and all(label in b for b in by), (p["title"], t["expr"], label)


def test_thresholds_follow_the_rule_pack(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    src = (ROOT / "rules" / "inference.yaml").read_text().replace("threshold: 0.5", "threshold: 0.25")
    (rules / "inference.yaml").write_text(src)
    out = tmp_path / "d"
    res = CliRunner().invoke(app, ["dashboards", "generate", "--rules-dir", str(rules), "--out", str(out),
                                   "--provisioning", str(tmp_path / "g"), "--no-logs"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "sentinel-overview.json").read_text())
    p99 = next(p for p in doc["panels"] if p["title"] == "P99 latency (SLO)")
    assert p99["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.25
    util = next(p for p in doc["panels"] if p["title"] == "Utilization (target band)")  # rule absent: the seed's
    assert [s["value"] for s in util["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 70, 85, 90]
    assert not any(p["type"] == "logs" for p in doc["panels"])
    assert "logs" not in {v["name"] for v in doc["templating"]["list"]}
    ds = yaml.safe_load((tmp_path / "g" / "provisioning" / "datasources" / "sentinel.yaml").read_text())
    assert [d["type"] for d in ds["datasources"]] == ["prometheus"]


def test_provisioning_files_match_grafanas_shapes_and_the_dashboards() -> None:
    ds = DatasourcesFile.model_validate(yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "sentinel.yaml").read_text()))
    prov = DashboardsFile.model_validate(yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "sentinel.yaml").read_text()))
    assert sum(d.isDefault for d in ds.datasources) == 1
    es = next(d for d in ds.datasources if d.type == "elasticsearch")
    assert es.jsonData["index"] == "deepseek-inference-*" and es.jsonData["timeField"] == "@timestamp"
    assert prov.providers[0].options.path.endswith("/sentinel")
    provided = {d.type for d in ds.datasources}
    for name, doc in _docs().items():  # every datasource variable has a provisioned datasource to pick
        wanted = {v["query"] for v in doc["templating"]["list"] if v["type"] == "datasource"}
        assert wanted <= provided, (name, wanted, provided)


def test_signal_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="moved into `signal:`"):
        Rule.model_validate({"alert": "A", "expr": "x > 5", "sentinel": {"threshold": 5}})
    with pytest.raises(ValueError, match="signal.expr"):
        Rule.model_validate({"alert": "A", "expr": "x > 5", "sentinel": {"signal": {"threshold": 5}}})
    with pytest.raises(ValueError, match="only on PromQL alerting rules"):
        Rule.model_validate({"alert": "A", "log": {"filter": [{"exists": "x"}]}, "sentinel": {"signal": {"expr": "x"}}})
    ok = Rule.model_validate({"alert": "A", "expr": "x > 5", "sentinel": {"signal": {"expr": "x", "threshold": 5}}})
    assert ok.sentinel.signal is not None and ok.sentinel.signal.direction == "above"


def test_lucene_of_each_filter_kind() -> None:
    fs = [LogFilter.model_validate(x) for x in [
        {"exists": "cuda_error"}, {"term": {"replica": "r 0", "batch_size": 4}},
        {"terms": {"finish_reason": ["stop", 'len"x']}}, {"range": {"inference_time": {"gt": 100, "lte": 500}}},
        {"wildcard": {"message": "*CUDA error:*"}}, {"query_string": "level:error OR level:fatal"}]]
    assert lucene(fs) == ('_exists_:cuda_error AND replica:"r 0" AND batch_size:4 AND finish_reason:("stop" OR '
                          '"len\\"x") AND inference_time:{100.0 TO 500.0] AND message:*CUDA\\ error\\:* AND '
                          "(level:error OR level:fatal)")
    assert lucene([]) == "*"
