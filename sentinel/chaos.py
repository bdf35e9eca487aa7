"""Drills for operators (``sentinel chaos DRILL``) and for bench/drills.py: arm a fault on one replica of a
running ``sentinel up`` (its fault switch: ``replicas.enable_faults`` and ``replicas.admin_token``), trigger
it with one request, and measure what sentinel does: when the expected alert fires (time to detect), when
the replica serves again as a new process (time to recover), and the remediation's audited outcome.

Drills:

- ``cuda-error``: the next forward pass raises a CUDA error → CudaError (log rule) → restart;
- ``hang``: the step loop stops making progress with work waiting → InferenceReplicaUnresponsive
  (sentinel's liveness probe) → restart;
- ``crash``: the process exits mid-step → InferenceReplicaUnresponsive → restart.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sentinel.errors import SentinelError


@dataclass(frozen=True)
class Drill:
    name: str
    fault: dict[str, Any]
    alert: str
    what: str


DRILLS = {d.name: d for d in (
    Drill("cuda-error", {"cuda_error": True}, "CudaError", "a CUDA error in the forward pass"),
    Drill("hang", {"hang": True}, "InferenceReplicaUnresponsive", "the engine's step loop hangs with work waiting"),
    Drill("crash", {"crash": True}, "InferenceReplicaUnresponsive", "the replica process dies mid-step"),
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

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class ChaosError(SentinelError):
    pass


def run_drill(api: str, drill: Drill, admin_token: str, replica: str | None = None, timeout_s: float = 120.0,
              model: str | None = None) -> DrillResult:
    """Arm ``drill`` on ``replica`` (default: the first), trigger it, wait for sentinel to detect and recover."""
    http = httpx.Client(timeout=10.0)
    status = http.get(f"{api}/api/v1/status").json()["data"]
    reps = {r["name"]: r for r in status.get("replicas", [])}
    if not reps:
        raise ChaosError("sentinel reports no local replicas (chaos drills run against `sentinel up`)")
    name = replica or sorted(reps)[0]
    if name not in reps:
        raise ChaosError(f"no replica {name!r}; replicas: {', '.join(sorted(reps))}")
    target = reps[name]
    old_pid = target.get("pid")
    served = model or http.get(f"{target['url']}/v1/models").json()["data"][0]["id"]  # before the fault fires
    t0 = time.monotonic()
    started = time.time()
    try:
        armed = http.post(f"{target['url']}/admin/faults", json=drill.fault,
                          headers={"Authorization": f"Bearer {admin_token}"})
    except httpx.TransportError:
        if drill.name != "crash":
            raise
        # under load the crash can fire (the next forward pass, another client's) before the answer is written
        armed = httpx.Response(200, request=httpx.Request("POST", f"{target['url']}/admin/faults"))
    if armed.status_code == 404:
        raise ChaosError(f"{name} has no fault switch: start sentinel with replicas.enable_faults: true")
    if armed.status_code == 401:
        raise ChaosError("the replica refused the admin token: pass the one in replicas.admin_token")
    armed.raise_for_status()

    def trigger() -> None:  # the fault fires in the next forward pass: give it one, straight to the replica
        try:
            httpx.post(f"{target['url']}/v1/completions", timeout=timeout_s,
                       json={"model": served, "prompt": "chaos drill", "max_tokens": 4})
        except httpx.HTTPError:
            pass

    threading.Thread(target=trigger, daemon=True).start()
    detect = recover = None
    deadline = t0 + timeout_s
    while time.monotonic() < deadline and (detect is None or recover is None):
        now = time.monotonic()
        if detect is None:
            alerts = http.get(f"{api}/api/v1/alerts").json()["data"]["alerts"]
            if any(a["labels"].get("alertname") == drill.alert and a["labels"].get("replica") == name
                   and a["state"] == "firing" for a in alerts):
                detect = now - t0
        if recover is None:
            st = {r["name"]: r for r in http.get(f"{api}/api/v1/status").json()["data"]["replicas"]}.get(name, {})
            if st.get("pid") not in (None, old_pid) and st.get("healthy"):
                recover = now - t0
        time.sleep(0.1)
    outcome = None
    settle = time.monotonic() + (30.0 if recover is not None else 0.0)  # the remediation verifies, then audits
    while outcome is None:
        for e in http.get(f"{api}/api/v1/actions", params={"limit": 50}).json()["data"]["audit"]:
            if e["kind"] == "outcome" and e.get("target") == name and e["subject"].startswith(drill.alert + "/") \
                    and e["ts"] >= started:
                outcome = e["outcome"]
                break
        if outcome is None:
            if time.monotonic() >= settle:
                break
            time.sleep(0.2)
    new = {r["name"]: r for r in http.get(f"{api}/api/v1/status").json()["data"]["replicas"]}.get(name, {})
    return DrillResult(drill.name, name, detect, recover, outcome, old_pid, new.get("pid"))
