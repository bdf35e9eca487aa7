"""The walking skeleton, end to end, with real parts only.

`sentinel up` runs as a subprocess: an inference_core replica (real forward passes), Debian's
Prometheus scraping it, the daemon evaluating the default rule pack (timings shortened for the test),
and this test's own webhook receiver. The official `openai` client sends completions; the replica's
fault switch injects latency and a CUDA error. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml

from sentinel.netutil import port_in_use
from tests.conftest import ROOT, ElasticsearchNode, Receiver

pytestmark = pytest.mark.integration
T = TypeVar("T")
ADMIN_TOKEN = "drill-token-0123456789"


def wait_for(what: str, fn: Callable[[], T | None], timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)  # polls stay well under the API's 10 requests/s per client
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n--- sentinel output ---\n{tail}")


def shortened_rules(dst: Path) -> None:
    """The default pack, with intervals and windows shortened so the test runs in seconds."""
    doc = yaml.safe_load((ROOT / "rules" / "inference.yaml").read_text())
    for g in doc["groups"]:
        g["interval"] = "1s"
        for r in g["rules"]:
            if r["alert"] == "InferenceLatencyP99High":
                r["for"] = "0s"
            if r["alert"] == "CudaError":
                r["log"]["timeframe"] = "6s"
            if r["alert"] == "InferenceModelLoadFailed":
                r["for"] = "1s"
    dst.mkdir()
    (dst / "inference.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@contextlib.contextmanager
def run_sentinel(tmp_path: Path, receiver: Receiver, model_dir: Path, extra_rules: dict[str, str] | None = None,
                 **extra: Any) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any], Path]]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus); scripts/setup.sh installs it")
    shortened_rules(tmp_path / "rules")
    for name, text in (extra_rules or {}).items():
        (tmp_path / "rules" / name).write_text(text)
    config = {
        "state_dir": str(tmp_path / "state"), "rules_dir": str(tmp_path / "rules"),
        "prometheus": {"scrape_interval": "1s"},
        "replicas": {"enable_faults": True, "admin_token": ADMIN_TOKEN, "model_dir": str(model_dir)},
        # Alertmanager-style grouping with timers short enough for a test: a page as soon as it fires
        "alerting": {"receivers": [{"name": "oncall", "url": receiver.url}],
                     "route": {"receiver": "oncall", "group_by": ["alertname", "replica"], "group_wait": "0s",
                               "group_interval": "1s", "repeat_interval": "1h"}},
        "remediation": {"verify_timeout": "60s"}, **extra,
    }
    (tmp_path / "sentinel.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "sentinel.out"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sentinel.cli", "up", "-c", str(tmp_path / "sentinel.yaml")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    up_file = tmp_path / "state" / "up.json"
    try:
        up = wait_for("sentinel up to be ready", lambda: up_file.exists() and json.loads(up_file.read_text()),
                      180, proc, log)
        assert up["pid"] == proc.pid
        yield proc, up, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def sentinel_up(tmp_path: Path, receiver: Receiver, tiny_model_dir: Path
                ) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any], Path]]:
    with run_sentinel(tmp_path, receiver, tiny_model_dir) as running:
        yield running


def prom_value(prom_url: str, query: str) -> float:
    result = httpx.get(f"{prom_url}/api/v1/query", params={"query": query}).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def alerts_named(receiver: Receiver, name: str, status: str) -> list[dict[str, Any]]:
    return [a for p in receiver.snapshot() for a in p["alerts"]
            if a["labels"]["alertname"] == name and a["status"] == status]


def test_request_to_page_to_restart(sentinel_up: tuple[subprocess.Popen[bytes], dict[str, Any], Path],
                                    receiver: Receiver, report_figure: Callable[[str, str], None]) -> None:
    proc, up, log = sentinel_up
    replica = up["replicas"][0]
    api = up["api"]
    old_pid = replica["pid"]
    client = openai.OpenAI(base_url=f"{replica['url']}/v1", api_key="unused", max_retries=0, timeout=30)
    admin = httpx.Client(base_url=replica["url"], headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    # 1. Completions through the official client: a real forward pass, usage counted.
    # Prometheus must have scraped the idle replica before the traffic, or rate() sees no increase.
    wait_for("two scrapes of the replica", lambda: prom_value(up["prometheus"],
             'count_over_time(up{job="inference"}[1m])') >= 2, 30, proc, log)
    for prompt in ("The cluster is", "Why did the alert fire?", "GPU utilization"):
        c = client.completions.create(model="deepseek-tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert c.choices[0].finish_reason in ("stop", "length")
        assert c.usage is not None and c.usage.completion_tokens >= 1 and c.usage.prompt_tokens >= 1
    again = client.completions.create(model="deepseek-tiny", prompt="GPU utilization", max_tokens=8, temperature=0)
    assert again.choices[0].text == c.choices[0].text  # greedy decoding is deterministic
    # the router is what `sentinel up` lists first: the same completion through it, the replica named
    assert up["services"][0]["name"] == "router" and up["router"] == up["services"][0]["url"]
    routed = openai.OpenAI(base_url=up["router"], api_key="unused", max_retries=0, timeout=30)
    raw = routed.completions.with_raw_response.create(model="deepseek-tiny", prompt="GPU utilization", max_tokens=8,
                                                      temperature=0)
    assert raw.parse().choices[0].text == c.choices[0].text and raw.headers["x-sentinel-replica"] == "replica-0"

    # 2. Latency fault: P99 over 500 ms through Prometheus → InferenceLatencyP99High fires (PromQL path).
    assert admin.post("/admin/faults", json={"latency_ms": 200}).status_code == 200
    for _ in range(4):
        client.completions.create(model="deepseek-tiny", prompt="slow", max_tokens=3, temperature=0)
    assert admin.post("/admin/faults", json={"latency_ms": 0}).status_code == 200
    slow = wait_for("a firing InferenceLatencyP99High notification",
                    lambda: alerts_named(receiver, "InferenceLatencyP99High", "firing"), 60, proc, log)
    assert slow[0]["labels"]["replica"] == "replica-0"
    # sentinel's ALERTS-shaped series reaches Prometheus with the alert's own labels (honor_labels)
    wait_for("sentinel_active_alerts for the firing alert in Prometheus", lambda: prom_value(
        up["prometheus"], 'sentinel_active_alerts{alertname="InferenceLatencyP99High", alertstate="firing", '
        'replica="replica-0", severity="page", job="sentinel"}') == 1, 30, proc, log)
    assert float(slow[0]["annotations"]["summary"].split(" is ")[1].split("ms")[0].split("s")[0]) > 0

    # 3. CUDA error inside the forward pass → log rule → page → restart → healthy → resolved.
    assert admin.post("/admin/faults", json={"cuda_error": True}).status_code == 200
    t_fault = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="deepseek-tiny", prompt="boom", max_tokens=4)
    assert httpx.get(f"{replica['url']}/health").status_code == 503
    firing = wait_for("a firing CudaError notification", lambda: alerts_named(receiver, "CudaError", "firing"),
                      60, proc, log)
    t_detect = time.monotonic() - t_fault
    assert firing[0]["labels"] == {"alertname": "CudaError", "replica": "replica-0", "severity": "page"}
    assert "CUDA error on replica-0" in firing[0]["annotations"]["summary"]

    def restarted() -> dict[str, Any] | None:
        st = httpx.get(f"{api}/api/v1/status").json()["data"]["replicas"][0]
        return st if st["pid"] != old_pid and st["healthy"] else None

    new = wait_for("the replica to be restarted and healthy", restarted, 90, proc, log)
    t_recover = time.monotonic() - t_fault
    assert new["restarts"] == 1
    ok = client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=4, temperature=0)
    assert ok.usage is not None and ok.usage.completion_tokens >= 1

    # The cuda-error runbook ran once for the episode; its findings followed the page.
    def with_findings() -> list[dict[str, Any]]:
        return [a for a in alerts_named(receiver, "CudaError", "firing") if "sentinel" in a]

    [update] = wait_for("a CudaError notification carrying runbook findings", with_findings, 60, proc, log)
    findings = update["sentinel"]["findings"]
    assert findings["runbook"] == "cuda-error" and findings["status"] == "fail"
    steps = {r["step"]: r for r in findings["results"]}
    assert list(steps) == ["nvml", "nvidia-smi", "cuda", "driver-log", "service"]
    assert steps["nvml"]["status"] == "skipped"  # no NVIDIA driver on this machine, said so, no crash
    assert steps["service"]["status"] == "fail" and "cuda_error" in steps["service"]["summary"]
    active = [a for a in httpx.get(f"{api}/api/v1/alerts").json()["data"]["alerts"]
              if a["labels"]["alertname"] == "CudaError"]
    if active:  # while the episode is still firing, the API shows its findings too
        assert [a["findings"]["runbook"] for a in active] == ["cuda-error"]
    else:  # the 6 s window may have passed already: then it is because the episode resolved
        wait_for("CudaError to be resolved (it is no longer active in the API)",
                 lambda: alerts_named(receiver, "CudaError", "resolved"), 30, proc, log)

    resolved = wait_for("a resolved CudaError notification", lambda: alerts_named(receiver, "CudaError", "resolved"),
                        60, proc, log)
    t_resolved = time.monotonic() - t_fault
    assert resolved[0]["fingerprint"] == firing[0]["fingerprint"]
    assert resolved[0]["endsAt"] > resolved[0]["startsAt"]

    # Every payload is Alertmanager webhook v4.
    for p in receiver.snapshot():
        assert p["version"] == "4" and p["receiver"] == "oncall"
        assert set(p) >= {"status", "alerts", "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
                          "groupKey", "truncatedAlerts"}
    # The audit log holds the decision and its verified outcome; exactly one restart for the incident.
    audit = httpx.get(f"{api}/api/v1/actions").json()["data"]["audit"]
    outcomes = [e for e in audit if e["kind"] == "outcome"]
    assert [e["outcome"] for e in outcomes] == ["succeeded"], audit
    report_figure("e2e time-to-detect (CUDA fault -> firing webhook)", f"{t_detect:.2f}s")
    report_figure("e2e time-to-recover (CUDA fault -> restarted replica healthy)", f"{t_recover:.2f}s")
    report_figure("e2e time-to-resolve (CUDA fault -> resolved webhook; 6s rule window)", f"{t_resolved:.2f}s")

    # Every metric the overview dashboard plots exists in this Prometheus, but for those that need what this
    # run lacks: a GPU (NVML), a refused request, an overrun evaluation, a child's restart, a queued notification.
    from tests.unit.test_dashboards import _metric_names, _promql
    names = set(httpx.get(f"{up['prometheus']}/api/v1/label/__name__/values").json()["data"])
    overview = json.loads((ROOT / "dashboards" / "sentinel-overview.json").read_text())
    plotted = set().union(*(_metric_names(e) for e in _promql(overview)))
    absent_here = {"gpu_utilization", "inference_requests_refused_total", "sentinel_rule_group_iterations_missed_total",
                   "sentinel_child_restarts_total", "sentinel_notification_queue_length",
                   "sentinel_notification_queue_oldest_seconds", "sentinel_rule_evaluation_failures_total",
                   "sentinel_router_retries_total", "sentinel_router_upstream_errors_total"}
    assert plotted - names <= absent_here, sorted(plotted - names - absent_here)
    assert {"inference_request_queue_time_seconds_bucket", "inference_model_info", "sentinel_log_shipping_lag_seconds",
            "sentinel_log_shipping_backlog_bytes"} <= names

    # 4. SIGINT stops every child: no orphans, no stale ports.
    prom_pid = next(s["pid"] for s in up["services"] if s["name"] == "prometheus")
    prom_port = int(up["prometheus"].rsplit(":", 1)[1])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    for pid in (new["pid"], prom_pid):
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    for port in (int(replica["url"].rsplit(":", 1)[1]), prom_port, int(api.rsplit(":", 1)[1])):
        assert not port_in_use(port), f"port {port} still in use after shutdown"


def test_cuda_error_pages_through_elasticsearch(tmp_path: Path, receiver: Receiver, tiny_model_dir: Path,
                                                elasticsearch: ElasticsearchNode,
                                                report_figure: Callable[[str, str], None]) -> None:
    """`sentinel up --elasticsearch-url` (here via the settings file): the replica's log lines are shipped
    to Elasticsearch, the CudaError log rule is answered from it, the page goes out and the runbook cites
    the lines from the store. Then Elasticsearch goes down: SentinelLogStoreDown pages, a CUDA error logged
    during the outage is not lost: once the store is back the rule replays the missed evaluations and
    pages with the time the error really happened."""
    from elasticsearch import Elasticsearch

    down_rule = next(r for g in yaml.safe_load((ROOT / "rules" / "slo.yaml").read_text())["groups"]
                     for r in g["rules"] if r.get("alert") == "SentinelLogStoreDown")
    down_rule["for"] = "2s"
    with run_sentinel(tmp_path, receiver, tiny_model_dir, logs={"elasticsearch_url": elasticsearch.url}) as (
            proc, up, log):
        (tmp_path / "rules" / "store.yaml").write_text(yaml.safe_dump(
            {"groups": [{"name": "store", "interval": "1s", "rules": [down_rule]}]}))  # picked up by the reload
        replica = up["replicas"][0]
        client = openai.OpenAI(base_url=f"{replica['url']}/v1", api_key="unused", max_retries=0, timeout=30)
        admin = httpx.Client(base_url=replica["url"], headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        client.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=4, temperature=0)
        assert admin.post("/admin/faults", json={"cuda_error": True}).status_code == 200
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="deepseek-tiny", prompt="boom", max_tokens=4)
        firing = wait_for("a firing CudaError notification", lambda: alerts_named(receiver, "CudaError", "firing"),
                          60, proc, log)
        assert firing[0]["labels"] == {"alertname": "CudaError", "replica": "replica-0", "severity": "page"}
        es = Elasticsearch(elasticsearch.url)
        es.indices.refresh(index="deepseek-inference-*")
        # this run's lines (the shared node also holds other tests' documents)
        recent = {"bool": {"filter": [{"exists": {"field": "cuda_error"}},
                                      {"range": {"@timestamp": {"gte": "now-10m"}}}]}}
        hits = es.search(index="deepseek-inference-*", query=recent, sort=[{"@timestamp": "desc"}])["hits"]["hits"]
        assert hits and {h["_source"]["replica"] for h in hits} == {"replica-0"}
        assert "sentinel_log_store_up 1.0" in httpx.get(f"{up['api']}/metrics").text
        assert not (tmp_path / "state" / "logs.db").exists()  # nothing went to the local store
        # The runbook's findings cite the line from Elasticsearch (its event id is the document's).
        [update] = wait_for("CudaError findings", lambda: [a for a in alerts_named(receiver, "CudaError", "firing")
                                                         if "sentinel" in a], 60, proc, log)
        service = next(r for r in update["sentinel"]["findings"]["results"] if r["step"] == "service")
        assert "from the log store (ElasticsearchLogStore)" in service["summary"], service
        wait_for("the first episode to resolve", lambda: alerts_named(receiver, "CudaError", "resolved"), 60,
                 proc, log)

        def serving() -> dict[str, Any] | None:
            st = httpx.get(f"{up['api']}/api/v1/status").json()["data"]["replicas"][0]
            return st if st["healthy"] else None

        wait_for("the replica to serve again", serving, 90, proc, log)

        # The outage.
        elasticsearch.stop()
        try:
            wait_for("SentinelLogStoreDown to page", lambda: alerts_named(receiver, "SentinelLogStoreDown", "firing"),
                     60, proc, log)
            before = len(alerts_named(receiver, "CudaError", "firing"))
            assert admin.post("/admin/faults", json={"cuda_error": True}).status_code == 200
            t_fault = time.time()
            with pytest.raises(openai.InternalServerError):
                client.completions.create(model="deepseek-tiny", prompt="boom", max_tokens=4)
            time.sleep(8)  # longer than the rule's 6 s window: only a replay can still see the line
            assert len(alerts_named(receiver, "CudaError", "firing")) == before  # the store is down: no verdict
        finally:
            mark = len(log.read_text())  # what sentinel says from here on is about the store coming back
            elasticsearch.start()
        t_back = time.time()

        def second_episode() -> list[dict[str, Any]] | None:
            # replayed at once, the episode fired and resolved before delivery ran: only its newest state,
            # resolved, is delivered (as Alertmanager would), carrying when it really started
            fresh = [a for status in ("firing", "resolved") for a in alerts_named(receiver, "CudaError", status)
                     if a["startsAt"] > firing[0]["startsAt"]]
            return fresh or None

        again = wait_for("the CudaError logged during the outage to page", second_episode, 90, proc, log)
        starts = datetime.fromisoformat(again[0]["startsAt"].replace("Z", "+00:00")).timestamp()
        assert t_fault - 1 <= starts <= t_fault + 4 < t_back, (t_fault, starts, t_back)  # its real time
        wait_for("SentinelLogStoreDown to resolve", lambda: alerts_named(receiver, "SentinelLogStoreDown",
                                                                         "resolved"), 60, proc, log)
        # How the missed evaluations were made up depends on when the shipper caught up: replayed one by one
        # after failed queries (counted), or, when the queries found the store back but the lines not yet
        # shipped, deferred until they were ("the rule waits, then catches up"). Either way the episode above
        # paged with its real start; here, which one happened is checked to be one of the two.
        metrics = httpx.get(f"{up['api']}/metrics").text
        replayed = [ln for ln in metrics.splitlines() if ln.startswith("sentinel_rule_catch_up_evaluations_total{")]
        waited = "the rule waits, then catches up" in log.read_text()[mark:]
        assert (replayed and float(replayed[0].rsplit(" ", 1)[1]) >= 1) or waited, replayed
        report_figure("ES outage -> CudaError from the outage paged after the store returned",
                      f"{time.time() - t_back:.1f}s after Elasticsearch was back")


def test_a_wedged_engine_and_a_crashed_replica_are_restarted(tmp_path: Path, receiver: Receiver,
                                                             tiny_model_dir: Path) -> None:
    """sentinel's own liveness probe: an engine that stops making progress (the hang fault: requests wait,
    no step runs; /metrics and the HTTP thread still answer) and a replica killed with -9 are each restarted
    through the remediator, paged as InferenceReplicaUnresponsive, and audited."""
    replicas = {"enable_faults": True, "admin_token": ADMIN_TOKEN, "model_dir": str(tiny_model_dir),
                "engine_args": ["--stall-timeout", "2"], "liveness_interval": "1s", "liveness_failures": 2}
    with run_sentinel(tmp_path, receiver, tiny_model_dir, replicas=replicas,
                      remediation={"verify_timeout": "60s", "cooldown": "0s"}) as (proc, up, log):
        api, replica = up["api"], up["replicas"][0]
        admin = httpx.Client(base_url=replica["url"], headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.post("/admin/faults", json={"hang": True}).status_code == 200
        stuck = threading.Thread(target=_quietly, args=(lambda: httpx.post(
            f"{replica['url']}/v1/completions", timeout=60, json={"model": "deepseek-tiny", "prompt": "x",
                                                                  "max_tokens": 2}),))
        stuck.start()
        assert httpx.get(f"{replica['url']}/metrics").status_code == 200  # the HTTP thread is fine

        def replaced(old: int) -> Callable[[], dict[str, Any] | None]:
            def check() -> dict[str, Any] | None:
                st = httpx.get(f"{api}/api/v1/status").json()["data"]["replicas"][0]
                return st if st["pid"] != old and st["healthy"] else None
            return check

        first = wait_for("the wedged replica to be restarted", replaced(replica["pid"]), 60, proc, log)
        page = wait_for("an InferenceReplicaUnresponsive page",
                        lambda: alerts_named(receiver, "InferenceReplicaUnresponsive", "firing"), 30, proc, log)
        assert page[0]["labels"]["replica"] == "replica-0" and "stalled" in page[0]["labels"]["problem"]
        stuck.join(60)

        def outcomes() -> list[tuple[str, str]]:
            audit = httpx.get(f"{api}/api/v1/actions").json()["data"]["audit"]
            return [(e["subject"].split("/")[0], e["outcome"]) for e in audit if e["kind"] == "outcome"]

        wait_for("the first restart's verified outcome", outcomes, 60, proc, log)
        os.kill(first["pid"], signal.SIGKILL)  # a crash
        second = wait_for("the crashed replica to be restarted", replaced(first["pid"]), 60, proc, log)
        assert second["restarts"] == 2
        done = wait_for("the second restart's verified outcome", lambda: len(outcomes()) == 2 and outcomes(), 60,
                        proc, log)
        assert done == [("InferenceReplicaUnresponsive", "succeeded")] * 2


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except httpx.HTTPError:
        pass
