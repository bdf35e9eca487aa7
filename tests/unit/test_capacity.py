"""Repairs before capacity, and capacity that never overcommits the host (issue: sentinel at real size).

The policy is pure (each interaction a table row); the remediator is driven with an actuator whose scale-out
blocks, to show that a restart neither waits for it nor is refused by it; the host plan is arithmetic over
a described host; the supervisor's ``room`` reads the plan and a stand-in for MemAvailable.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inference_core.sizing import Footprint, GiB, replica_footprint
from sentinel.alerts.state import Alert, State
from sentinel.alerts.store import Store
from sentinel.errors import ServiceError
from sentinel.hostplan import Host, plan_host
from sentinel.process import ChildRegistry
from sentinel.remediation.policy import ActionRequest, Guardrails, History, decide
from sentinel.remediation.remediator import Remediator
from sentinel.state.remediation import Remediation
from sentinel.supervisor import ReplicaSpec, Supervisor

RESTART = ActionRequest("CudaError", "restart", "replica-0", "fp", "CudaError/fp/1.000", firing=True)
SCALE_OUT = ActionRequest("Busy", "scale_out", "service", "fb", "Busy/fb/1.000", firing=True)
TARGETS = frozenset({"replica-0", "replica-1"})


def hist(**kw: object) -> History:
    base: dict[str, object] = dict(known_targets=TARGETS, incident_handled=False, last_action_on_target=None,
                                   actions_last_hour=0, in_flight=0, replicas=2)
    return History(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("req", "h", "act", "reason"), [
    # the scale target is the service: no replica name needed, and the alert's replica is not the target
    (SCALE_OUT, hist(), True, "scale_out service"),
    # host full: a decision, never an attempt
    (SCALE_OUT, hist(no_room="no free cores"), False, "host full: no free cores; a human must add capacity"),
    # a scale action in flight: the next waits (one at a time), whatever max_concurrent says
    (SCALE_OUT, hist(in_flight=1), False, "1 scale action(s) in flight (one at a time)"),
    (SCALE_OUT, hist(last_action_on_target=950.0), False, "capacity on service in cooldown for another 250s"),
    # a repair: its own cooldown and slots; the shell counts repairs only for both
    (RESTART, hist(), True, "restart replica-0"),
    (RESTART, hist(in_flight=1), False, "1 repair(s) in flight (max_concurrent=1)"),
    (RESTART, hist(last_action_on_target=950.0), False, "repair on replica-0 in cooldown for another 250s"),
    # a full host never stops a repair (no_room is only read for scale-outs, and ignored otherwise)
    (RESTART, hist(no_room="no free cores"), True, "restart replica-0"),
])
def test_guardrails_are_keyed_by_what_they_protect(req: ActionRequest, h: History, act: bool, reason: str) -> None:
    d = decide(req, h, Guardrails(cooldown_s=300), now=1000.0)
    assert d.act is act and reason in d.reason, d


class SlowScaleOut:
    """Two replicas; a scale-out that blocks until released (a 0.5B replica takes tens of seconds to load)."""

    actions = frozenset({"restart", "scale_out", "scale_in"})
    service = "local-replicas"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.scaling = threading.Event()
        self.restarted = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def targets(self) -> set[str]:
        return {"replica-0", "replica-1"}

    def capacity(self) -> tuple[int, int]:
        return 2, 1

    def room(self) -> str | None:
        return None

    def act(self, action: str, target: str) -> str:
        self.calls.append((action, target))
        if action == "scale_out":
            self.scaling.set()
            assert self.release.wait(10)
        else:
            self.restarted.set()
        return f"{action} {target}"

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        return True


def alert(name: str, replica: str, at: float) -> Alert:
    return Alert({"alertname": name, "replica": replica}, {}, 1.0, State.FIRING, at, fired_at=at)


def test_a_restart_goes_ahead_while_a_scale_out_is_in_flight(tmp_path: Path) -> None:
    """What happened at real size: replica-0's busy alert asked for a scale-out, then replica-1... here
    replica-0 gets a CUDA error while the scale-out (asked for by replica-0's alert) is still loading its new
    replica. max_concurrent=1 and a 300 s cooldown: the restart of replica-0 is decided and runs at once, in
    its own slot, and the scale-out is recorded against the service."""
    store = Store(tmp_path / "s.db")
    a = SlowScaleOut()
    r = Remediator(store, a, Guardrails(cooldown_s=300, max_concurrent=1), clock=lambda: 100.0)
    assert r.consider("EngineBusyScaleOut", "scale_out", alert("EngineBusyScaleOut", "replica-0", 50.0)).act
    assert a.scaling.wait(5)
    d = r.consider("CudaError", "restart", alert("CudaError", "replica-0", 60.0))
    assert d.act, d
    assert a.restarted.wait(5), "the restart waited for the scale-out's worker"
    a.release.set()
    r.shutdown()
    assert sorted(a.calls) == [("restart", "replica-0"), ("scale_out", "local-replicas")]
    decision = next(e for e in store.audit_log() if e["kind"] == "decision" and e["action"] == "scale_out")
    assert decision["target"] == "local-replicas" and decision["asked_by"] == "replica-0"


def test_scale_actions_do_not_use_up_the_repairs_hourly_budget(tmp_path: Path) -> None:
    """Six scale actions in the last hour (max_actions_per_hour=6): a restart still happens; one more
    scale-out does not (capacity counts every action)."""
    store = Store(tmp_path / "s.db")
    for i in range(6):
        store.start_remediation(Remediation(f"Busy/f{i}/1.000", f"f{i}", "Busy", "scale_out", "local-replicas",
                                            10.0 + i, 11.0 + i, "succeeded"))
    a = SlowScaleOut()
    a.release.set()
    r = Remediator(store, a, Guardrails(cooldown_s=0, max_actions_per_hour=6), clock=lambda: 100.0)
    assert r.consider("CudaError", "restart", alert("CudaError", "replica-1", 90.0)).act
    d = r.consider("Busy", "scale_out", alert("Busy", "replica-0", 90.0))
    r.shutdown()
    assert not d.act and "rate limit: 7 actions in the last hour" in d.reason


def test_the_remediator_refuses_a_scale_out_onto_a_full_host(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")

    class Full(SlowScaleOut):
        def room(self) -> str | None:
            return "2 replicas running and this host holds 2 (2 core(s), 1 per replica)"

    a = Full()
    r = Remediator(store, a, Guardrails(cooldown_s=0), clock=lambda: 100.0)
    d = r.consider("EngineBusyScaleOut", "scale_out", alert("EngineBusyScaleOut", "replica-1", 90.0))
    r.shutdown()
    assert not d.act and d.reason.startswith("host full: 2 replicas running and this host holds 2")
    assert a.calls == [] and store.remediations() == []  # never attempted
    assert store.audit_log()[0]["reason"] == d.reason


# -- the host plan ------------------------------------------------------------------------------------------
HALF_B = Footprint(weights=int(0.92 * GiB), kv_cache=int(0.81 * GiB), activation=56 * 2**20, runtime=int(0.75 * GiB))


def test_a_24_gib_two_core_host_holds_two_half_b_replicas_by_its_cores() -> None:
    p = plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=2, max_count=4, local_elasticsearch=False)
    assert p.slots == 2 and p.limited_by == "2 core(s), 1 per replica"
    assert p.core_sets == ((0,), (1,))
    assert p.reserved == {"sentinel": 512 * 2**20, "prometheus": 512 * 2**20,
                          "free floor (10%)": int(0.1 * 24 * GiB)}
    assert p.share_bytes == p.replica_budget // 2 and p.share_bytes >= HALF_B.total
    assert "holds 2 replica(s) (2 core(s), 1 per replica)" in p.describe()
    assert p.summary() == ("holds 2 replica(s) (2 core(s), 1 per replica); each needs 2.53 GiB, gets 10.30 GiB and "
                           "1 core(s); kept: sentinel 0.50 GiB, prometheus 0.50 GiB, free floor (10%) 2.40 GiB")
    doc = p.as_dict()
    assert doc["slots"] == 2 and doc["coreSets"] == [[0], [1]] and doc["footprintBytes"]["weights"] == HALF_B.weights


def test_memory_bounds_the_plan_and_a_replica_that_cannot_fit_is_refused_with_the_numbers() -> None:
    big = Footprint(weights=7 * GiB, kv_cache=4 * GiB, activation=GiB // 4, runtime=GiB)  # 12.25 GiB each
    p = plan_host(Host(24 * GiB, tuple(range(16))), big, count=1, max_count=4, local_elasticsearch=True)
    assert p.slots == 1 and p.limited_by.startswith("memory: ")  # 24 - 0.5 - 0.5 - 1.5 - 2.4 = 19.1 GiB
    assert p.core_sets == ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),)
    with pytest.raises(ServiceError, match=r"replicas.count=2 does not fit this host, which holds 1 \(memory"):
        plan_host(Host(24 * GiB, tuple(range(16))), big, count=2, max_count=4, local_elasticsearch=True)
    with pytest.raises(ServiceError, match=r"not even one replica fits this host: the host has 8.00 GiB; kept for "
                                           r"sentinel 0.50 GiB, prometheus 0.50 GiB, free floor \(10%\) 0.80 GiB, "
                                           r"leaving 6.20 GiB for replicas; one replica of this checkpoint needs "
                                           r"12.25 GiB"):
        plan_host(Host(8 * GiB, (0, 1)), big, count=1, max_count=1, local_elasticsearch=False)


def test_a_gpu_host_plans_one_gpu_per_replica() -> None:
    p = plan_host(Host(64 * GiB, tuple(range(8)), gpus=2), HALF_B, count=1, max_count=4, local_elasticsearch=False)
    assert p.slots == 2 and p.limited_by == "2 GPU(s), one per replica" and p.core_sets == ()


def test_the_footprint_of_a_checkpoint_is_read_from_its_config_and_files(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    f = replica_footprint(tmp_path)
    assert f.weights == 1000 and f.kv_cache == 32 * 2048 * (12288 + 1024)  # the engine's default, with its reserve
    assert replica_footprint(tmp_path, ["--kv-cache-memory", "1GiB"]).kv_cache == GiB
    assert replica_footprint(tmp_path, ["--kv-cache-memory=512MiB"]).kv_cache == GiB // 2
    assert replica_footprint(tmp_path, ["--max-num-seqs", "256"]).kv_cache == 4 * GiB  # the cap
    assert replica_footprint(tmp_path, ["--quantization", "int8"]).weights == 600


def test_room_follows_the_plan_the_free_cores_and_memory_now(tmp_path: Path) -> None:
    one = plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=1, max_count=4, local_elasticsearch=False)
    assert one.slots == 1 and one.core_sets == ((0, 1),)  # one replica on both cores: no core left for another
    plan = plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=2, max_count=4, local_elasticsearch=False)
    assert plan.slots == 2 and plan.core_sets == ((0,), (1,))
    free = [20 * GiB]
    spec = ReplicaSpec("replica-0", 1, tmp_path, tmp_path, cores=(0,))  # replica-1 was scaled in
    sup = Supervisor([spec], tmp_path, ChildRegistry(tmp_path / "c.json"), plan=plan, mem_available=lambda: free[0])
    assert sup.room() is None and sup._free_slot() == 1
    free[0] = 4 * GiB  # the host is short of memory now: 4 GiB - 2.5 GiB < the 2.4 GiB floor
    assert (sup.room() or "").startswith("MemAvailable 4.00 GiB minus one more replica's")
    two = [spec, ReplicaSpec("replica-1", 2, tmp_path, tmp_path, cores=(1,))]
    sup = Supervisor(two, tmp_path, ChildRegistry(tmp_path / "c.json"), plan=plan, mem_available=lambda: 20 * GiB)
    assert sup.room() == "2 replicas running and this host holds 2 (2 core(s), 1 per replica)"


def test_shared_cores_leave_memory_as_the_only_bound(tmp_path: Path) -> None:
    """replicas.cpu_sets: shared (a toy model that never keeps a core busy): no affinity, and a scale-out
    needs only memory."""
    p = plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=2, max_count=3, local_elasticsearch=False, shared_cores=True)
    assert p.slots == 3 and p.limited_by == "replicas.max_count=3" and p.core_sets == ()
    specs = [ReplicaSpec(f"replica-{i}", i + 1, tmp_path, tmp_path) for i in range(2)]
    sup = Supervisor(specs, tmp_path, ChildRegistry(tmp_path / "c.json"), plan=p, mem_available=lambda: 20 * GiB)
    assert sup.room() is None and sup._free_slot() == 2


def test_more_replicas_than_cores_is_refused_with_the_way_out() -> None:
    with pytest.raises(ServiceError, match=r"replicas.count=3 does not fit this host, which holds 2 \(2 core\(s\), 1 "
                                           r"per replica\).*replicas.cpu_sets: shared lets replicas share the cores"):
        plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=3, max_count=4, local_elasticsearch=False)
    p = plan_host(Host(24 * GiB, (0, 1)), HALF_B, count=3, max_count=4, local_elasticsearch=False, shared_cores=True)
    assert p.slots == 4
