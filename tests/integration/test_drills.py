"""Drills, end to end: `sentinel up` with two replicas behind its router, steady client load from the official
`openai` client through the router, one fault each. Each drill asserts the outcome, the audit trail, the
notifications, and that no client request failed.

The CUDA error, hang and crash drills are in test_end_to_end.py and test_router.py (and bench/drills.py
measures them); these are the memory leak, scale out and scale in under load, and corrupted weights.
Nothing is mocked. Rule windows are shortened so a drill takes seconds, by rewriting the shipped rule
(the memory-leak rule's windows are all divided by 15), never by writing a different one; the scale-in
rule is a user's own (the default pack has none, as documented).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from sentinel.chaos import DRILLS, run_drill, run_scale_out
from tests.conftest import ROOT, Receiver
from tests.integration.test_end_to_end import ADMIN_TOKEN, alerts_named, prom_value, run_sentinel, wait_for

pytestmark = pytest.mark.integration


class Load:
    """``clients`` threads, each sending completions through the router one after another with the official
    client (no retries: a failure is counted, not hidden), recording which replica answered."""

    def __init__(self, router: str, clients: int = 2, max_tokens: int = 8, pause_s: float = 0.25) -> None:
        self.router, self.clients, self.max_tokens, self.pause_s = router, clients, max_tokens, pause_s
        self.sent = 0
        self.failed: list[str] = []
        self.served_by: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        # each client from its own loopback address, as real clients are: the replicas' per-client rate limit
        # (the seed's 10 requests/s) then sees each of them, not one client for all (nor the drill's own load)
        http = httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.0.{10 + i}"), timeout=60)
        client = openai.OpenAI(base_url=self.router, api_key="unused", max_retries=0, timeout=60, http_client=http)
        while not self._stop.is_set():
            try:
                raw = client.completions.with_raw_response.create(
                    model="deepseek-tiny", prompt="The cluster", max_tokens=self.max_tokens,
                    extra_body={"min_tokens": self.max_tokens})
                raw.parse()
                with self._lock:
                    self.sent += 1
                    who = raw.headers.get("x-sentinel-replica", "?")
                    self.served_by[who] = self.served_by.get(who, 0) + 1
            except openai.OpenAIError as exc:
                with self._lock:
                    self.sent += 1
                    self.failed.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(self.pause_s)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        return self


@contextmanager
def loaded(router: str, **kw: Any) -> Iterator[Load]:
    load = Load(router, **kw).start()
    try:
        yield load
    finally:
        load.stop()


def audit(api: str) -> list[dict[str, Any]]:
    return list(reversed(httpx.get(f"{api}/api/v1/actions", params={"limit": 500}).json()["data"]["audit"]))


def outcomes(api: str) -> list[tuple[str, str, str]]:
    """(rule, action, outcome) of every finished action, oldest first."""
    return [(e["subject"].split("/")[0], e["action"], e["outcome"]) for e in audit(api) if e["kind"] == "outcome"]


def status(api: str) -> dict[str, Any]:
    return httpx.get(f"{api}/api/v1/status").json()["data"]  # type: ignore[no-any-return]


def test_cuda_error_hang_and_crash_behind_the_router(tmp_path: Path, receiver: Receiver, tiny_model_dir: Path) -> None:
    """`sentinel chaos`'s three fault drills one after another under steady client load: a CUDA error (log rule
    CudaError), a hung engine and a crashed process (sentinel's liveness probe, InferenceReplicaUnresponsive):
    each detected, paged, restarted (drained when healthy), verified and audited; no client request fails."""
    replicas = {"count": 2, "enable_faults": True, "admin_token": ADMIN_TOKEN, "model_dir": str(tiny_model_dir),
                "engine_args": ["--stall-timeout", "2"], "liveness_interval": "1s", "liveness_failures": 2}
    with run_sentinel(tmp_path, receiver, tiny_model_dir, replicas=replicas,
                      remediation={"verify_timeout": "60s", "cooldown": "0s"}) as (proc, up, log), \
            loaded(up["router"]) as load:
        api = up["api"]
        wait_for("a few requests through the router", lambda: load.sent >= 4, 60, proc, log)
        results = {}
        for drill, replica in (("cuda-error", "replica-0"), ("hang", "replica-1"), ("crash", "replica-0")):
            res = results[drill] = run_drill(api, DRILLS[drill], ADMIN_TOKEN, replica, timeout_s=90)
            assert res.detect_s is not None and res.recover_s is not None, (res, log.read_text()[-3000:])
            assert res.outcome == "succeeded" and res.new_pid != res.old_pid, res
        load.stop()
        assert load.failed == [] and load.sent >= 20, (load.sent, load.failed[:5])
        assert outcomes(api) == [("CudaError", "restart", "succeeded"),
                                 ("InferenceReplicaUnresponsive", "restart", "succeeded"),
                                 ("InferenceReplicaUnresponsive", "restart", "succeeded")]
        assert [r["restarts"] for r in status(api)["replicas"]] == [2, 1]
        cuda = wait_for("a CudaError page", lambda: alerts_named(receiver, "CudaError", "firing"), 30, proc, log)
        assert cuda[0]["labels"]["replica"] == "replica-0"
        pages = wait_for("two InferenceReplicaUnresponsive pages", lambda: len(
            {(a["labels"]["replica"], a["labels"]["problem"]) for a in alerts_named(
                receiver, "InferenceReplicaUnresponsive", "firing")}) >= 2 and alerts_named(
            receiver, "InferenceReplicaUnresponsive", "firing"), 30, proc, log)
        problems = {(a["labels"]["replica"], a["labels"]["problem"]) for a in pages}
        assert ("replica-1", "is not making progress (engine stalled)") in problems, problems
        assert any(r == "replica-0" and p in ("has exited", "does not answer /health") for r, p in problems)
        print({k: (round(v.detect_s or 0, 2), round(v.recover_s or 0, 2)) for k, v in results.items()},
              f"{load.sent} requests, none failed")


def compressed_leak_rule() -> str:
    """The shipped InferenceMemoryLeak rule with every window divided by 15 (5m → 20s, 900 s → 60 s, 1m → 4s,
    5m:30s → 20s:2s, process age 300 s → 20 s, for 2m → 8s): the same expression, judged in seconds."""
    doc = yaml.safe_load((ROOT / "rules" / "capacity.yaml").read_text())
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "InferenceMemoryLeak"]
    expr = rule["expr"]
    for long, short in (("[5m]", "[20s]"), ("900", "60"), ("[1m]", "[4s]"), ("[5m:30s]", "[20s:2s]"),
                        ("> 300", "> 20")):
        assert long in expr, f"the shipped rule changed: {long} is no longer in {expr}"
        expr = expr.replace(long, short)
    rule["expr"], rule["for"] = expr, "8s"
    rule["sentinel"].pop("signal")
    return yaml.safe_dump({"groups": [{"name": "leak", "interval": "1s", "rules": [rule]}]}, sort_keys=False)


def test_memory_leak_is_restarted_before_the_oom_killer(tmp_path: Path, receiver: Receiver,
                                                        tiny_model_dir: Path) -> None:
    """replica-0 leaks at the rate that meets its 2 GiB --memory-limit in 90 s (the simulated OOM killer
    SIGKILLs it there; the compressed rule looks 60 s ahead). InferenceMemoryLeak fires, the model-load
    runbook runs, and sentinel drains and restarts the replica before the limit; clients of the router see
    no failure."""
    replicas = {"count": 2, "enable_faults": True, "admin_token": ADMIN_TOKEN, "model_dir": str(tiny_model_dir),
                "engine_args": ["--memory-limit", "2GiB"]}
    with run_sentinel(tmp_path, receiver, tiny_model_dir, extra_rules={"leak.yaml": compressed_leak_rule()},
                      replicas=replicas, remediation={"verify_timeout": "60s"}) as (proc, up, log), \
            loaded(up["router"]) as load:
        wait_for("a few requests through the router", lambda: load.sent >= 4, 60, proc, log)
        result = run_drill(up["api"], DRILLS["memory-leak"], ADMIN_TOKEN, "replica-0", timeout_s=130,
                           reach_limit_s=90)
        load.stop()
        assert result.detect_s is not None and result.recover_s is not None, (result, log.read_text()[-3000:])
        assert result.recover_s < 90, result  # before the limit
        assert result.outcome == "succeeded" and result.new_pid != result.old_pid, result
        out = (tmp_path / "state" / "run" / "replica-0.out").read_text()
        assert "memory limit exceeded" not in out, "the OOM killer came first"
        assert load.failed == [] and load.sent >= 20, (load.sent, load.failed[:5])
        page = wait_for("an InferenceMemoryLeak page", lambda: alerts_named(receiver, "InferenceMemoryLeak",
                                                                             "firing"), 30, proc, log)
        assert page[0]["labels"]["replica"] == "replica-0" and page[0]["labels"]["severity"] == "critical"
        assert outcomes(up["api"]) == [("InferenceMemoryLeak", "restart", "succeeded")]
        decision = [e for e in audit(up["api"]) if e["kind"] == "decision" and e["act"]]
        assert [(d["rule"], d["target"]) for d in decision] == [("InferenceMemoryLeak", "replica-0")]
        # the new process starts from its baseline: no second alert, no second restart
        time.sleep(10)
        assert [r["restarts"] for r in status(up["api"])["replicas"]] == [1, 0]


def scale_rules() -> str:
    """The shipped EngineBusyScaleOut (evaluated every second) and a user's idle rule that scales in."""
    doc = yaml.safe_load((ROOT / "rules" / "capacity.yaml").read_text())
    [busy] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "EngineBusyScaleOut"]
    idle = {"alert": "InferenceIdleScaleIn", "expr": "avg by (replica) (inference_engine_busy_percent) < 40",
            "labels": {"severity": "info"}, "annotations": {"summary": "{{ $labels.replica }} is idle"},
            "sentinel": {"remediation": "scale_in"}}
    return yaml.safe_dump({"groups": [{"name": "scale", "interval": "1s", "rules": [busy, idle]}]}, sort_keys=False)


def test_scale_out_under_load_then_in_past_the_window(tmp_path: Path, receiver: Receiver,
                                                       tiny_model_dir: Path) -> None:
    """Heavy load (`sentinel chaos scale-out`'s clients) keeps both engines over 90 % busy for 3 samples:
    EngineBusyScaleOut starts replica-2, which Prometheus scrapes and the router sends work to. When the load
    drops, the idle rule scales in only after the stabilization window (15 s here, 300 s by default), removes
    the newest replica, and never goes below replicas.min_count (2). Clients see no failure throughout."""
    # the toy model never keeps a core busy: its replicas share the cores, and memory alone bounds scale-out
    # (at real size, the default, disjoint core sets, refuses this scale-out: test_realsize.py)
    replicas = {"count": 2, "min_count": 2, "max_count": 3, "enable_faults": True, "admin_token": ADMIN_TOKEN,
                "model_dir": str(tiny_model_dir), "cpu_sets": "shared"}
    remediation = {"verify_timeout": "60s", "cooldown": "5s", "scale_in_stabilization": "15s"}
    with run_sentinel(tmp_path, receiver, tiny_model_dir, extra_rules={"scale.yaml": scale_rules()},
                      replicas=replicas, remediation=remediation) as (proc, up, log):
        api, prom = up["api"], up["prometheus"]
        # idle at the start: the idle rule fires, but two replicas is the floor
        wait_for("a scale-in refused at the floor", lambda: [
            e for e in audit(api) if e["kind"] == "decision" and e["action"] == "scale_in"
            and "min_count=2" in e["reason"]], 60, proc, log)
        light = Load(up["router"], clients=1, pause_s=0.5).start()
        # the operators' drill: 8 clients with long completions through the router until a replica is added
        grown = run_scale_out(api, clients=8, max_tokens=160, timeout_s=150)
        assert grown.detect_s is not None and grown.recover_s is not None, (grown, log.read_text()[-3000:])
        assert grown.replica == "replica-2" and grown.outcome == "succeeded", grown
        t_out = grown.recover_s
        assert [r["name"] for r in status(api)["replicas"]] == ["replica-0", "replica-1", "replica-2"]
        wait_for("Prometheus scraping replica-2", lambda: prom_value(
            prom, 'up{job="inference",replica="replica-2"}') == 1, 30, proc, log)
        wait_for("the router sending work to replica-2", lambda: light.served_by.get("replica-2", 0) >= 1, 60,
                 proc, log)
        page = wait_for("an EngineBusyScaleOut notification",
                        lambda: alerts_named(receiver, "EngineBusyScaleOut", "firing"), 30, proc, log)
        assert page[0]["labels"]["replica"] in {"replica-0", "replica-1"}
        # light load only: idle everywhere; the scale-in waits out the window, then removes the newest
        t1 = time.monotonic()
        shrunk = wait_for("a scale-in back to two replicas", lambda: len(st := status(api)["replicas"]) == 2 and st,
                          120, proc, log)
        t_in = time.monotonic() - t1
        light.stop()
        assert [r["name"] for r in shrunk] == ["replica-0", "replica-1"]
        assert t_in >= 10, f"scaled in {t_in:.1f}s after the load dropped: the 15 s window was not waited out"
        assert light.failed == [], light.failed[:5]

        def scraped() -> list[str]:
            targets = httpx.get(f"{prom}/api/v1/targets").json()["data"]["activeTargets"]
            return sorted(t["labels"].get("replica", "") for t in targets if t["labels"]["job"] == "inference")

        # Prometheus applies a reloaded target list within its discovery manager's 5 s update interval
        wait_for("Prometheus to stop scraping replica-2", lambda: scraped() == ["replica-0", "replica-1"], 20,
                 proc, log)
        done = outcomes(api)
        assert ("EngineBusyScaleOut", "scale_out", "succeeded") in done
        assert ("InferenceIdleScaleIn", "scale_in", "succeeded") in done
        assert sum(1 for o in done if o[1] == "scale_in") == 1, done
        # one scale-out: a second busy replica's alert waits out the cooldown from the first's end, and at
        # max_count=3 it is a refused decision, never a failed (escalated) action
        assert [o for o in done if o[1] == "scale_out"] == [("EngineBusyScaleOut", "scale_out", "succeeded")], done
        idle = wait_for("an InferenceIdleScaleIn notification for replica-2", lambda: [
            a for a in alerts_named(receiver, "InferenceIdleScaleIn", "firing")
            if a["labels"]["replica"] == "replica-2"], 30, proc, log)
        assert idle[0]["labels"]["severity"] == "info"
        refused = [e["reason"] for e in audit(api) if e["kind"] == "decision" and e["action"] == "scale_in"
                   and not e["act"]]
        assert any("stabilization window" in r or "scale action ran within" in r for r in refused), refused
        print(f"scale-out {t_out:.1f}s after heavy load began; scale-in {t_in:.1f}s after it ended")


def test_a_repair_is_never_held_up_by_a_scale_out_in_flight(tmp_path: Path, receiver: Receiver,
                                                             tiny_model_dir: Path) -> None:
    """What real size showed: a scale-out asked for by replica-0's busy alert held the repair of replica-0 (one
    cooldown per target, one concurrency slot). Here Alertmanager's webhook brings EngineBusyScaleOut for
    replica-0; the replica the scale-out starts is frozen (SIGSTOP) while it loads, so the scale-out stays in
    flight; then replica-0 gets a CUDA error. With max_concurrent=1 and a 300 s cooldown the restart is decided
    and done at once, the scale-out still in flight; the scale-out is recorded against the service, and
    finishes once its replica runs again. Clients see no failure."""
    token = "operate-token-0123456789abcdef"
    replicas = {"count": 2, "max_count": 3, "enable_faults": True, "admin_token": ADMIN_TOKEN,
                "model_dir": str(tiny_model_dir), "cpu_sets": "shared"}
    remediation = {"verify_timeout": "60s", "cooldown": "300s", "max_concurrent": 1}
    doc = yaml.safe_load((ROOT / "rules" / "capacity.yaml").read_text())
    busy = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "EngineBusyScaleOut"]
    rules = {"scale.yaml": yaml.safe_dump({"groups": [{"name": "scale", "rules": busy}]}, sort_keys=False)}
    with run_sentinel(tmp_path, receiver, tiny_model_dir, extra_rules=rules, replicas=replicas,
                      remediation=remediation, api={"token": token}) as (proc, up, log), \
            loaded(up["router"], clients=2) as load:
        api = up["api"]
        started = datetime.now(UTC).isoformat()
        payload = {"version": "4", "status": "firing", "receiver": "sentinel", "groupKey": "{}:{}", "alerts": [
            {"status": "firing", "labels": {"alertname": "EngineBusyScaleOut", "replica": "replica-0",
                                            "severity": "warning"}, "startsAt": started}]}
        r = httpx.post(f"{api}/api/v1/alertmanager/webhook", json=payload,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["data"]["matched"] == 1, r.text
        children = tmp_path / "state" / "children.json"
        pid = wait_for("the scale-out to start replica-2", lambda: json.loads(children.read_text()).get("replica-2"),
                       30, proc, log)
        os.kill(pid, signal.SIGSTOP)  # loading, frozen: the scale-out waits for it to become ready
        try:
            res = run_drill(api, DRILLS["cuda-error"], ADMIN_TOKEN, "replica-0", timeout_s=60)
            assert res.outcome == "succeeded" and res.recover_s is not None and res.recover_s <= 30, res
            assert [o for o in outcomes(api) if o[1] == "scale_out"] == []  # still in flight
            assert [r["name"] for r in status(api)["replicas"]] == ["replica-0", "replica-1"]
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for("the scale-out to finish", lambda: ("EngineBusyScaleOut", "scale_out", "succeeded")
                 in outcomes(api), 90, proc, log)
        decided = [e for e in audit(api) if e["kind"] == "decision" and e["act"]]
        assert [(e["action"], e["target"]) for e in decided] == [("scale_out", "local-replicas"),
                                                                 ("restart", "replica-0")], decided
        assert decided[0]["asked_by"] == "replica-0"
    assert load.failed == [], load.failed[:5]
    print(f"restart of replica-0 {res.recover_s:.1f}s after its CUDA error, with a scale-out in flight")


def test_corrupted_weights_page_a_human_without_a_restart_loop(tmp_path: Path, receiver: Receiver,
                                                               tiny_model_dir: Path) -> None:
    """The weights on disk are damaged (same size, different bytes) while both replicas serve. replica-0
    crashes; sentinel restarts it once, the new process refuses the files (integrity manifest), and the ladder
    goes straight to a human: SentinelRemediationEscalated pages, InferenceModelLoadFailed carries the
    model-load runbook's findings naming the file, and nothing restarts again. replica-1 serves the clients."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert (model / "integrity.json").exists()
    replicas = {"count": 2, "enable_faults": True, "admin_token": ADMIN_TOKEN, "model_dir": str(model),
                "liveness_interval": "1s", "liveness_failures": 2}
    with run_sentinel(tmp_path, receiver, model, replicas=replicas,
                      remediation={"verify_timeout": "60s"}) as (proc, up, log), loaded(up["router"]) as load:
        api = up["api"]
        wait_for("a few requests through the router", lambda: load.sent >= 4, 60, proc, log)
        weights = model / "model.safetensors"
        data = bytearray(weights.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        weights.write_bytes(bytes(data))
        old = status(api)["replicas"][0]
        os.kill(old["pid"], signal.SIGKILL)
        escalated = wait_for("a SentinelRemediationEscalated page", lambda: alerts_named(
            receiver, "SentinelRemediationEscalated", "firing"), 90, proc, log)
        assert escalated[0]["labels"]["replica"] == "replica-0"
        assert "integrity" in escalated[0]["labels"]["reason"] or "manifest" in escalated[0]["labels"]["reason"]

        def with_findings() -> list[dict[str, Any]]:
            return [a for a in alerts_named(receiver, "InferenceModelLoadFailed", "firing") if "sentinel" in a]

        [update] = wait_for("InferenceModelLoadFailed with the model-load runbook's findings", with_findings, 90,
                            proc, log)[:1]
        findings = update["sentinel"]["findings"]
        assert findings["runbook"] == "model-load" and findings["status"] == "fail"
        files = {r["step"]: r for r in findings["results"]}["model-files"]
        assert files["status"] == "fail" and "model.safetensors" in files["summary"], files
        time.sleep(15)  # long enough for a loop to show: it does not
        load.stop()
        restarts = [o for o in outcomes(api) if o[1] == "restart"]
        assert restarts == [("InferenceReplicaUnresponsive", "restart", "failed")], restarts
        [failed] = [e for e in audit(api) if e["kind"] == "outcome"]
        assert "integrity.json" in failed["evidence"] and "model.safetensors" in failed["evidence"], failed
        assert status(api)["replicas"][0]["restarts"] == 1
        health = httpx.get(f"{old['url']}/health").json()
        assert "integrity.json" in health["load_error"] and "model.safetensors" in health["load_error"]
        assert load.failed == [] and load.sent >= 10, (load.sent, load.failed[:5])
        assert set(load.served_by) >= {"replica-1"}
        esc = [e for e in audit(api) if e["kind"] == "escalation"]
        assert esc and esc[-1]["rung"] == "page", esc
        up_doc = json.loads((tmp_path / "state" / "up.json").read_text())
        assert [s["name"] for s in up_doc["services"]][:2] == ["router", "sentinel-api"]
