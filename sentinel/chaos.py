"""Drills for operators (``sentinel chaos DRILL``) and for bench/drills.py: arm a fault on one replica of a
running ``sentinel up`` (its fault switch: ``replicas.enable_faults`` and ``replicas.admin_token``), trigger
it with one request, and measure what sentinel does: when the expected alert fires (time to detect), when
the replica serves again as a new process (time to recover), and the remediation's audited outcome.

Drills:

- ``cuda-error``: the next forward pass raises a CUDA error → CudaError (log rule) → restart;
- ``hang``: the step loop stops making progress with work waiting → InferenceReplicaUnresponsive
  (sentinel's liveness probe) → restart;
- ``crash``: the process exits mid-step → InferenceReplicaUnresponsive → restart;
- ``memory-leak``: resident memory grows at a steady rate, paced to meet the replica's memory limit in
  ``reach_limit_s`` (10 minutes by default), while the drill keeps the replica busy (the leak grows as steps
  run) → InferenceMemoryLeak → restart, drained, before the limit. Past the limit the replica is killed, as
  the OOM killer would (the fault switch simulates it); that is a lost drill. The replica needs a memory
  limit near its usage: ``--memory-limit`` in ``replicas.engine_args`` (or a cgroup limit); a drill that
  would have to leak more than ``max_leak_bytes`` to reach the limit is refused;
- ``scale-out`` (``run_scale_out``): no fault; concurrent clients with long completions through the router
  until a scale-out rule fires and the new replica serves.

Corrupted weights have no operator drill: sentinel never damages the model files it watches
(tests/integration/test_drills.py and bench/drills.py damage a copy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inference_core.client import ReplicaClient, ReplicaError, ReplicaUnreachable
from sentinel.errors import SentinelError

GiB = 2**30


@dataclass(frozen=True)
class Drill:
    name: str
    fault: dict[str, Any]
    alert: str
    what: str
    load: bool = False  # the fault grows only while steps run: the drill keeps the replica busy


DRILLS = {d.name: d for d in (
    Drill("cuda-error", {"cuda_error": True}, "CudaError", "a CUDA error in the forward pass"),
    Drill("hang", {"hang": True}, "InferenceReplicaUnresponsive", "the engine's step loop hangs with work waiting"),
    Drill("crash", {"crash": True}, "InferenceReplicaUnresponsive", "the replica process dies mid-step"),
    Drill("memory-leak", {}, "InferenceMemoryLeak", "resident memory grows steadily towards the replica's limit",
          load=True),
)}


@dataclass
class DrillResult:
    drill: str
    replica: str
    detect_s: float | None
    recover_s: float | None
    outcome: str | None
    old_pid: int | None
    new_pid: int | None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class ChaosError(SentinelError):
    pass


def _audited_outcome(http: httpx.Client, api: str, since: float, wait_s: float,
                     match: Callable[[dict[str, Any]], bool]) -> str | None:
    """The outcome of the first audited action since ``since`` that ``match`` accepts, waiting up to ``wait_s``:
    an action verifies before it audits its outcome. The audit lists the newest first: the drill's own action
    is the oldest match, not whatever a still-firing alert asked for after it."""
    deadline = time.monotonic() + wait_s
    while True:
        for e in reversed(_data(http, f"{api}/api/v1/actions", params={"limit": 100})["audit"]):
            if e["kind"] == "outcome" and e["ts"] >= since and match(e):
                return str(e["outcome"])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def memory(url: str) -> tuple[float, float]:
    """(memory_usage_bytes, memory_limit_bytes) a replica reports (its first device)."""
    try:
        text = ReplicaClient(url, timeout_s=10).metrics_text()
    except ReplicaError as exc:
        raise ChaosError(f"cannot read the replica's memory: {exc}") from exc
    found: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in ("memory_usage_bytes", "memory_limit_bytes") and fam.samples:
            found[fam.name] = fam.samples[0].value
    if len(found) != 2:
        raise ChaosError(f"{url}/metrics has no memory_usage_bytes and memory_limit_bytes")
    return found["memory_usage_bytes"], found["memory_limit_bytes"]


def leak_fault(url: str, reach_limit_s: float, max_leak_bytes: float) -> tuple[dict[str, Any], str]:
    """The memory-leak fault for a replica: the rate that meets its limit in ``reach_limit_s``."""
    usage, limit = memory(url)
    headroom = limit - usage
    if headroom <= 0:
        raise ChaosError(f"the replica already uses {usage / GiB:.2f} GiB of its {limit / GiB:.2f} GiB limit")
    if headroom > max_leak_bytes:
        raise ChaosError(f"the replica is {headroom / GiB:.1f} GiB from its memory limit ({limit / GiB:.1f} GiB): "
                         f"more than this drill leaks ({max_leak_bytes / GiB:.1f} GiB). Start the replicas with a "
                         "limit near their usage (replicas.engine_args: [--memory-limit, 3GiB]) or in a container "
                         "with a memory limit")
    rate = headroom / reach_limit_s / 2**20
    return {"leak_mb_per_s": rate}, (f"leaking {rate:.1f} MiB/s from {usage / 2**20:.0f} MiB: the "
                                     f"{limit / 2**20:.0f} MiB limit in {reach_limit_s:.0f}s")


def _data(http: httpx.Client, url: str, params: dict[str, Any] | None = None) -> Any:
    """``data`` of a sentinel API read; a 429 (its rate limit per client) waits ``Retry-After`` and asks again."""
    for _ in range(10):
        r = http.get(url, params=params)
        if r.status_code != 429:
            break
        time.sleep(float(r.headers.get("Retry-After", "1")))
    if not r.is_success:
        raise ChaosError(f"GET {url}: {r.status_code} {r.text[:200]}")
    return r.json()["data"]


def _arm(replica_api: ReplicaClient, fault: dict[str, Any], drill: Drill, name: str) -> None:
    try:
        armed = replica_api.arm_fault(fault)
    except ReplicaUnreachable:
        if drill.name != "crash":
            raise
        # under load the crash can fire (the next forward pass, another client's) before the answer is written
        armed = httpx.Response(200, request=httpx.Request("POST", f"{replica_api.url}/admin/faults"))
    if armed.status_code == 404:
        raise ChaosError(f"{name} has no fault switch: start sentinel with replicas.enable_faults: true")
    if armed.status_code == 401:
        raise ChaosError("the replica refused the admin token: pass the one in replicas.admin_token")
    armed.raise_for_status()


def _watch(http: httpx.Client, api: str, alert: str, name: str, old_pid: Any, t0: float, timeout_s: float,
           on_phase: Callable[[str], None] = lambda phase: None) -> tuple[float | None, float | None]:
    """Seconds from ``t0`` until sentinel's ``alert`` fired for the replica (detect), and until the replica runs
    as a new, healthy process (recover); None for what did not happen within ``timeout_s``. ``on_phase`` hears
    what is awaited, with the time so far (a progress display)."""
    detect = recover = None
    deadline = t0 + timeout_s
    while time.monotonic() < deadline and (detect is None or recover is None):
        now = time.monotonic()
        on_phase(f"waiting for {alert} to fire ({now - t0:.0f}s)" if detect is None else
                 f"{alert} fired after {detect:.1f}s; waiting for {name} to be restarted and serve ({now - t0:.0f}s)")
        if detect is None:
            alerts = _data(http, f"{api}/api/v1/alerts")["alerts"]
            if any(a["labels"].get("alertname") == alert and a["labels"].get("replica") == name
                   and a["state"] == "firing" for a in alerts):
                detect = now - t0
        if recover is None:
            st = {r["name"]: r for r in _data(http, f"{api}/api/v1/status")["replicas"]}.get(name, {})
            if st.get("pid") not in (None, old_pid) and st.get("healthy"):
                recover = now - t0
        time.sleep(0.25)  # two reads a round: within sentinel's API rate limit (10/s per client)
    return detect, recover


def run_drill(api: str, drill: Drill, admin_token: str, replica: str | None = None, timeout_s: float = 120.0,
              model: str | None = None, reach_limit_s: float = 600.0, max_leak_bytes: float = 4 * GiB,
              on_phase: Callable[[str], None] = lambda phase: None) -> DrillResult:
    """Arm ``drill`` on ``replica`` (default: the first), trigger it, wait for sentinel to detect and recover."""
    http = httpx.Client(timeout=10.0)
    status = _data(http, f"{api}/api/v1/status")
    reps = {r["name"]: r for r in status.get("replicas", [])}
    if not reps:
        raise ChaosError("sentinel reports no local replicas (chaos drills run against `sentinel up`)")
    name = replica or sorted(reps)[0]
    if name not in reps:
        raise ChaosError(f"no replica {name!r}; replicas: {', '.join(sorted(reps))}")
    target = reps[name]
    old_pid = target.get("pid")
    served = model or http.get(f"{target['url']}/v1/models").json()["data"][0]["id"]  # before the fault fires
    fault, detail = drill.fault, ""
    if drill.name == "memory-leak":
        fault, detail = leak_fault(target["url"], reach_limit_s, max_leak_bytes)
    replica_api = ReplicaClient(target["url"], timeout_s=10.0, admin_token=admin_token, http=http)
    t0 = time.monotonic()
    started = time.time()
    _arm(replica_api, fault, drill, name)

    def trigger() -> None:  # the fault fires in the next forward pass: give it one, straight to the replica
        try:
            ReplicaClient(target["url"]).complete({"model": served, "prompt": "chaos drill", "max_tokens": 4},
                                                  timeout_s=timeout_s)
        except ReplicaUnreachable:
            pass

    done = threading.Event()

    def busy() -> None:  # steady work on the target until it is replaced (errors: it is being restarted)
        with httpx.Client(timeout=30) as c:
            busy_api = ReplicaClient(target["url"], timeout_s=30, http=c)
            while not done.is_set():
                try:
                    busy_api.complete({"model": served, "prompt": "chaos drill load", "max_tokens": 16})
                except ReplicaUnreachable:
                    time.sleep(0.2)

    threading.Thread(target=busy if drill.load else trigger, daemon=True).start()
    detect, recover = _watch(http, api, drill.alert, name, old_pid, t0, timeout_s, on_phase)
    done.set()
    if drill.load and recover is None:  # not recovered in time: stop the fault rather than leave it running
        try:
            replica_api.arm_fault({"leak_mb_per_s": 0})
        except ReplicaUnreachable:
            pass
    outcome = _audited_outcome(http, api, started, 30.0 if recover is not None else 0.0, lambda e: e.get(
        "target") == name and e["subject"].startswith(drill.alert + "/"))
    new = {r["name"]: r for r in _data(http, f"{api}/api/v1/status")["replicas"]}.get(name, {})
    return DrillResult(drill.name, name, detect, recover, outcome, old_pid, new.get("pid"), detail)


SCALE_OUT_ALERTS = ("EngineBusyScaleOut", "GpuSaturatedScaleOut")


def run_scale_out(api: str, clients: int = 8, max_tokens: int = 160, timeout_s: float = 300.0,
                  model: str | None = None) -> DrillResult:
    """The ``scale-out`` drill: ``clients`` concurrent clients send long completions through sentinel's router
    (what real users would) until sentinel has started one more replica and it serves, then stop. Detect:
    a scale-out alert firing; recover: the new replica ready. No fault switch is involved, so this drill runs
    against any ``sentinel up`` with the router on and a scale-out rule in its pack."""
    http = httpx.Client(timeout=10.0)
    status = _data(http, f"{api}/api/v1/status")
    router = status.get("router")
    if not router:
        raise ChaosError("sentinel runs no router (router.enabled): the scale-out drill loads replicas through it")
    before = {r["name"] for r in status.get("replicas", [])}
    if not before:
        raise ChaosError("sentinel reports no local replicas (chaos drills run against `sentinel up`)")
    served = model or http.get(f"{router}/models").json()["data"][0]["id"]
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while not done.is_set():
                try:
                    c.post(f"{router}/completions", json={"model": served, "prompt": "chaos drill load",
                                                          "max_tokens": max_tokens, "min_tokens": max_tokens})
                except httpx.HTTPError:
                    time.sleep(0.2)

    t0 = time.monotonic()
    started = time.time()
    for _ in range(clients):
        threading.Thread(target=client, daemon=True).start()
    detect = recover = None
    new: dict[str, Any] = {}
    try:
        while time.monotonic() - t0 < timeout_s and recover is None:
            now = time.monotonic()
            if detect is None:
                alerts = _data(http, f"{api}/api/v1/alerts")["alerts"]
                if any(a["labels"].get("alertname") in SCALE_OUT_ALERTS and a["state"] == "firing" for a in alerts):
                    detect = now - t0
            reps = _data(http, f"{api}/api/v1/status")["replicas"]
            added = [r for r in reps if r["name"] not in before]
            if added and added[0].get("healthy"):
                new, recover = added[0], now - t0
            time.sleep(0.25)
    finally:
        done.set()
    outcome = _audited_outcome(http, api, started, 30.0 if recover is not None else 0.0,
                               lambda e: e.get("action") == "scale_out")
    return DrillResult("scale-out", str(new.get("name", "-")), detect, recover, outcome, None, new.get("pid"),
                       f"{clients} clients through the router, {len(before)} replicas before")
