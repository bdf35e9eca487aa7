"""Two sentinels in Kubernetes mode (`sentinel up` processes) against one API: one leader notifies and acts,
the other follows; when the leader stops, the other takes over within the lease timings.

The Kubernetes API is tests/k8s_stub.py (no API server can run here; the stub checks each request against
the Kubernetes API and records anything unexpected). Elasticsearch is real: a `cuda_error` line is indexed
into it as Filebeat would, both sentinels' CudaError rule fires on it, and only the leader pages and deletes
the pod."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sentinel.netutil import free_port
from tests.conftest import ROOT, ElasticsearchNode, Receiver
from tests.integration.test_end_to_end import alerts_named, wait_for
from tests.k8s_stub import KubeStub

pytestmark = pytest.mark.integration
TOKEN = "stub-service-account-token"


@contextmanager
def sentinel(tmp_path: Path, name: str, stub: KubeStub, es: ElasticsearchNode, receiver: Receiver
             ) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    rules = tmp_path / "rules"
    if not rules.exists():
        rules.mkdir()
        cuda = next(r for g in yaml.safe_load((ROOT / "rules" / "inference.yaml").read_text())["groups"]
                    for r in g["rules"] if r.get("alert") == "CudaError")
        cuda["log"]["timeframe"] = "1m"
        (rules / "logs.yaml").write_text(yaml.safe_dump({"groups": [{"name": "logs", "interval": "1s",
                                                                      "rules": [cuda]}]}))
    port = free_port()
    config = {
        "state_dir": str(tmp_path / name), "rules_dir": str(rules),
        "api": {"port": port},
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}"},  # no PromQL rule here: never queried
        "logs": {"elasticsearch_url": es.url, "ship_interval": "1s"},
        "alerting": {"receivers": [{"name": "oncall", "url": receiver.url}],
                     "route": {"receiver": "oncall", "group_by": ["alertname", "replica"], "group_wait": "0s",
                               "group_interval": "1s", "repeat_interval": "1h"}},
        "remediation": {"verify_timeout": "20s", "cooldown": "0s"},
        "kubernetes": {"enabled": True, "api_url": stub.url, "namespace": "inference", "identity": name,
                       "lease_duration": "3s", "renew_deadline": "2s", "retry_period": "250ms"},
    }
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp_path / f"{name}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sentinel.cli", "up", "-c", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**_env(), "KUBERNETES_TOKEN": TOKEN})
    try:
        wait_for(f"{name} to be ready", lambda: (tmp_path / name / "up.json").exists(), 60, proc, log)
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _leader(api: str) -> dict[str, Any]:
    return dict(httpx.get(f"{api}/api/v1/status", timeout=5).json()["data"]["leader"])


def test_one_sentinel_leads_and_the_other_takes_over(tmp_path: Path, elasticsearch: ElasticsearchNode,
                                                     receiver: Receiver) -> None:
    from elasticsearch import Elasticsearch

    from sentinel.logstore.elasticsearch import ElasticsearchSink

    with KubeStub(namespace="inference", token=TOKEN) as stub, ExitStack() as stack:
        a_proc, a_api, a_log = stack.enter_context(sentinel(tmp_path, "sentinel-a", stub, elasticsearch, receiver))
        b_proc, b_api, b_log = stack.enter_context(sentinel(tmp_path, "sentinel-b", stub, elasticsearch, receiver))
        wait_for("one leader", lambda: [_leader(a_api)["leading"], _leader(b_api)["leading"]].count(True) == 1,
                 20, a_proc, a_log)
        leader_api, follower_api = (a_api, b_api) if _leader(a_api)["leading"] else (b_api, a_api)
        leader = _leader(leader_api)["identity"]
        assert _leader(follower_api)["holder"] == leader
        assert stub.leases["sentinel-leader"]["spec"]["holderIdentity"] == leader
        assert httpx.get(f"{leader_api}/api/v1/status").json()["data"]["replicas"] == [
            {"name": n} for n in sorted(stub.pods)]

        # a CUDA error on one pod, indexed as Filebeat would: both evaluate it, only the leader acts and pages
        victim = sorted(stub.pods)[0]
        sink = ElasticsearchSink(Elasticsearch(elasticsearch.url), tmp_path / "filebeat.db")
        now = datetime.now(UTC)
        sink.add([(now.timestamp(), {"@timestamp": now.isoformat().replace("+00:00", "Z"), "replica": victim,
                                     "cuda_error": "CUDA error: an illegal memory access was encountered",
                                     "message": "inference request failed", "level": "error",
                                     "event.id": f"k8s-test-{victim}"})])
        firing = wait_for("a CudaError page", lambda: alerts_named(receiver, "CudaError", "firing"), 30,
                          a_proc, a_log)
        assert firing[0]["labels"]["replica"] == victim
        wait_for("the pod to be deleted", lambda: victim not in stub.pods, 30, a_proc, a_log)
        time.sleep(3)  # both sentinels have evaluated the alert many times by now
        deletes = [p for v, p, _ in stub.requests if v == "DELETE"]
        assert deletes == [f"/api/v1/namespaces/inference/pods/{victim}"]  # once, by the leader
        pages = [p for p in receiver.snapshot() if any(a["labels"]["alertname"] == "CudaError" for a in p["alerts"])]
        assert {p["externalURL"] for p in pages} == {leader_api}  # every page came from the leader
        assert len({json.dumps(p["alerts"][0]["labels"]) for p in pages}) == 1
        assert len([p for p in pages if "sentinel" not in p["alerts"][0]]) == 1  # one page, then its findings
        follower_actions = httpx.get(f"{follower_api}/api/v1/actions").json()["data"]["audit"]
        assert not [e for e in follower_actions if e["kind"] in ("decision", "outcome")]
        leader_actions = httpx.get(f"{leader_api}/api/v1/actions").json()["data"]["audit"]
        assert [e["outcome"] for e in leader_actions if e["kind"] == "outcome"] == ["succeeded"]

        # the leader stops (SIGTERM releases the lease): the follower leads at its next try
        leader_proc = a_proc if leader_api == a_api else b_proc
        t0 = time.monotonic()
        leader_proc.send_signal(signal.SIGTERM)
        assert leader_proc.wait(30) == 0
        wait_for("the follower to lead", lambda: _leader(follower_api)["leading"], 10, None, None)
        took = time.monotonic() - t0
        assert stub.leases["sentinel-leader"]["spec"]["holderIdentity"] != leader
        assert stub.leases["sentinel-leader"]["spec"]["leaseTransitions"] == 1
        assert took < 10
        kinds = [e for e in httpx.get(f"{follower_api}/api/v1/actions").json()["data"]["audit"]
                 if e["kind"] == "leadership"]
        assert kinds and kinds[0]["leading"] is True
