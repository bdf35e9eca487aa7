"""PromQL rules against a real Prometheus (Debian's binary), and `sentinel up`'s failure paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sentinel.alerts.state import State
from sentinel.alerts.store import Store
from sentinel.errors import DatasourceError, EvaluationError
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.prometheus import PromQLSource
from sentinel.promserver import PrometheusServer, ScrapeTarget
from sentinel.rules.evaluator import META_ALERT, Evaluator
from sentinel.rules.model import Group, LoadedGroup, Rule
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus); scripts/setup.sh installs it")
    work = tmp_path_factory.mktemp("prom")
    port = free_port()
    server = PrometheusServer(work, port, [ScrapeTarget("self", f"127.0.0.1:{port}", {"replica": "p"})], 1.0,
                              ChildRegistry(work / "children.json"))
    server.start()
    yield server
    server.stop()


def test_instant_queries_and_errors(prometheus: PrometheusServer) -> None:
    src = PromQLSource(prometheus.url, timeout_s=5)
    [s] = src.query('label_replace(vector(2), "replica", "r1", "", "")', at=time.time())
    assert s.labels == {"replica": "r1"} and s.value == 2
    with pytest.raises(DatasourceError, match="rejected the query"):
        src.query("sum(", at=0)
    # a scalar is one sample without labels, as in Prometheus's rule engine (rules/manager.go EngineQueryFunc)
    assert [(s.labels, s.value) for s in src.query("1", at=0)] == [({}, 1.0)]
    assert [(s.labels, s.value) for s in src.query("scalar(vector(3)) * 2", at=0)] == [({}, 6.0)]
    with pytest.raises(EvaluationError, match=r"not a vector or scalar \(it is a range vector\)"):
        src.query("up[1m]", at=time.time())
    with pytest.raises(EvaluationError, match=r"not a vector or scalar \(it is a string\)"):
        src.query('"text"', at=0)
    with pytest.raises(DatasourceError, match="unreachable"):
        PromQLSource(f"http://127.0.0.1:{free_port()}", timeout_s=1).query("up", at=0)


def test_one_failing_rule_does_not_stop_its_group(prometheus: PrometheusServer, tmp_path: Path) -> None:
    """A rule whose expression returns a range vector or a string (or fails in any other way) is marked
    unhealthy with its error, raises SentinelRuleEvaluationFailing, and the rules after it in the group are
    still evaluated. A scalar is a one-sample vector without labels, as in Prometheus: its alert fires."""
    rules = [Rule.model_validate({"alert": "Range", "expr": "up[1m]"}),
             Rule.model_validate({"alert": "Text", "expr": '"text"'}),
             Rule.model_validate({"alert": "Scalar", "expr": "time()"}),
             Rule.model_validate({"alert": "After", "expr": 'label_replace(vector(1), "replica", "r", "", "")'})]
    group = LoadedGroup(file="f.yaml", group=Group(name="g", rules=rules))
    ev = Evaluator(Store(tmp_path / "s.db"), PromQLSource(prometheus.url, 5), None, meta_for=0)
    ev.load([group])
    ev.eval_group(group.key)
    rng, text, scalar, after = ev.all_runtimes()
    assert rng.health == "err" and "range vector" in (rng.last_error or "")
    assert text.health == "err" and "a string" in (text.last_error or "")
    assert scalar.health == "ok" and [(dict(a.labels), a.state) for a in scalar.machine.active.values()] == [
        ({"alertname": "Scalar"}, State.FIRING)]
    assert after.health == "ok" and [a.state for a in after.machine.active.values()] == [State.FIRING]
    assert sorted(a.labels["rule"] for a in ev.internal[META_ALERT].machine.firing()) == ["Range", "Text"]


def test_a_failed_query_changes_no_state(prometheus: PrometheusServer, tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    rule = Rule.model_validate({"alert": "Always", "expr": 'label_replace(vector(1), "replica", "r", "", "")'})
    group = LoadedGroup(file="f.yaml", group=Group(name="g", rules=[rule]))
    ev = Evaluator(store, PromQLSource(prometheus.url, 5), None, meta_for=0)
    ev.load([group])
    [rt] = ev.all_runtimes()
    now = time.time()
    ev.eval_rule(rt, now)
    assert [a.state for a in rt.machine.active.values()] == [State.FIRING] and rt.health == "ok"
    ev.promql = PromQLSource(f"http://127.0.0.1:{free_port()}", 1)  # the datasource goes away
    ev.eval_rule(rt, now + 60)
    assert rt.health == "err" and "unreachable" in (rt.last_error or "")
    assert [a.state for a in rt.machine.active.values()] == [State.FIRING]  # nothing resolved
    ev.eval_meta(now + 60)  # ... and a meta-alert names the failing rule and its datasource
    [meta] = ev.internal[META_ALERT].machine.firing()
    assert meta.labels == {"alertname": "SentinelRuleEvaluationFailing", "rule": "Always", "rule_group": "g",
                           "datasource": "prometheus", "severity": "warning"}
    assert "cannot be evaluated" in meta.annotations["summary"]
    # state is persisted with the alerts handed to delivery: a new evaluator (a restarted daemon) restores the
    # firing alert
    ev2 = Evaluator(store, None, None)
    ev2.load([group])
    assert [a.state for a in ev2.all_runtimes()[0].machine.active.values()] == [State.FIRING]
    # its only PromQL rule failing is its datasource down: both meta-alerts (delivery's inhibition mutes the first)
    assert sorted(e.labels["alertname"] for _, _, e in store.alert_log_after(0)) == [
        "Always", "SentinelDatasourceDown", "SentinelRuleEvaluationFailing"]


def test_up_without_prometheus_says_what_to_install_and_leaves_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "SENTINEL_PROMETHEUS__BINARY": "prometheus-not-installed"}
    out = subprocess.run([sys.executable, "-m", "sentinel.cli", "up", "--state-dir", str(tmp_path), "--model-dir",
                          str(tiny_model_dir)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    assert "apt-get install prometheus" in out.stderr and "--prometheus-url" in out.stderr
    leftover = subprocess.run(["pgrep", "-f", f"inference_core.server.*{tmp_path}"], capture_output=True)
    assert leftover.returncode == 1, "the replica started before the failure must be stopped"


def test_up_refuses_bad_rules_before_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    bad = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        for: soon\n"
    (tmp_path / "rules" / "bad.yaml").write_text(bad)
    out = subprocess.run([sys.executable, "-m", "sentinel.cli", "up", "--state-dir", str(tmp_path / "st"),
                          "--rules-dir", str(tmp_path / "rules")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "bad.yaml:6: groups.0.rules.0.for" in out.stderr.replace("\n", "")
    assert not (tmp_path / "st" / "models").exists()


def test_recording_rules_write_back_and_reloads_forget_removed_rules(tmp_path: Path) -> None:
    """sentinel evaluates recording rules itself and writes their results into Prometheus through its
    remote-write receiver: the alert after it in the group reads the recorded series. A reload that removes
    rules resolves their firing alerts (a notification says so), forgets their stored state and gauges, and
    ends the recorded series with a stale marker (absent at once, not after the 5m lookback)."""
    from prometheus_client import CollectorRegistry

    from sentinel.metrics import SentinelMetrics
    from sentinel.rules.remote_write import RemoteWriter

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    server = PrometheusServer(tmp_path / "prom", port, [ScrapeTarget("self", f"127.0.0.1:{port}", {})], 1.0,
                              ChildRegistry(tmp_path / "children.json"),
                              extra_args=["--web.enable-remote-write-receiver"])
    server.start()
    try:
        rec = Rule.model_validate({"record": "job:up:count", "expr": "count by (job) (up)", "labels": {"src": "s"}})
        alert = Rule.model_validate({"alert": "Recorded", "expr": "job:up:count > 0"})
        g = LoadedGroup(file="f.yaml", group=Group(name="g", rules=[rec, alert]))
        store = Store(tmp_path / "s.db")
        metrics = SentinelMetrics(CollectorRegistry())
        ev = Evaluator(store, PromQLSource(server.url, 5), None, metrics=metrics, writer=RemoteWriter(server.url))
        ev.load([g])
        src = PromQLSource(server.url, 5)
        deadline = time.time() + 30
        while not src.query("up", time.time()) and time.time() < deadline:
            time.sleep(0.5)  # the first self-scrape
        ev.eval_group(g.key)
        time.sleep(0.1)
        ev.eval_group(g.key)
        rt_rec, rt_alert = ev.all_runtimes()
        assert rt_rec.health == "ok" and rt_alert.health == "ok", (rt_rec.last_error, rt_alert.last_error)
        [s] = src.query("job:up:count", time.time())
        assert s.labels == {"__name__": "job:up:count", "job": "self", "src": "s"} and s.value == 1
        assert [a.labels["job"] for a in rt_alert.machine.firing()] == ["self"]
        assert store.load_rule_state(rt_alert.key)
        # the reload: both rules gone
        ev.load([LoadedGroup(file="f.yaml", group=Group(name="g", rules=[]))])
        assert store.load_rule_state(rt_alert.key) == []
        resolved = [e for _, t, e in store.alert_log_after(0) if e.resolved(t)]
        assert resolved and resolved[-1].labels["alertname"] == "Recorded"
        assert "sentinel_alerts{alertname=\"Recorded\"" not in generate_latest(metrics.registry).decode()
        assert src.query("job:up:count", time.time() + 0.001) == []  # stale now, not in 5 minutes
    finally:
        server.stop()


def test_a_killed_prometheus_is_said_and_restarted_then_a_crash_loop_is_given_up(tmp_path: Path) -> None:
    """Prometheus that sentinel started, killed with -9: the watchdog logs it, restarts it (a new process,
    ready, its data kept), and backs off; a child that keeps dying is given up on with a reason."""
    import signal

    import httpx

    from sentinel.process import ChildWatchdog

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    server = PrometheusServer(tmp_path, port, [ScrapeTarget("self", f"127.0.0.1:{port}", {})], 1.0,
                              ChildRegistry(tmp_path / "children.json"))
    server.start()
    events: list[tuple[str, dict[str, object]]] = []
    now = [0.0]
    dog = ChildWatchdog("prometheus", lambda: server.proc, server.start, lambda o, d: events.append((o, d)),
                        clock=lambda: now[0], max_restarts=2, window_s=600)
    try:
        assert dog.check() is None  # running
        assert server.proc is not None
        first = server.proc.pid
        os.kill(first, signal.SIGKILL)
        server.proc.wait(10)
        assert dog.check() == "restarted"
        assert server.proc.pid != first and server.proc.poll() is None
        assert httpx.get(f"{server.url}/-/ready", timeout=5).status_code == 200
        assert events[0][0] == "restarted" and events[0][1]["exit_code"] == -signal.SIGKILL
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        assert dog.check() == "waiting"  # backoff: 2 s after the first restart
        now[0] += 2.0
        assert dog.check() == "restarted"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        now[0] += 10.0
        assert dog.check() == "gave-up" and dog.check() == "gave-up"
        assert [o for o, _ in events] == ["restarted", "restarted", "gave-up"]  # said once
    finally:
        server.stop()
