"""Kubernetes mode: leader election with a Lease and the actuator, through the official `kubernetes` client
against tests/k8s_stub.py. No Kubernetes API server can run here; the stub checks each request's path, verb,
content type and body against the Kubernetes API (strict schemas of a current release, resourceVersion
conflicts, delete preconditions, the bearer token) and records anything it does not recognise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sentinel.errors import RemediationError
from sentinel.kube import api_client
from sentinel.kube.actuator import RESTARTED_AT, KubernetesActuator
from sentinel.kube.lease import LeaderElector
from sentinel.settings import KubernetesSettings
from tests.k8s_stub import KubeStub

TOKEN = "stub-service-account-token"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeStub]:
    monkeypatch.setenv("KUBERNETES_TOKEN", TOKEN)
    with KubeStub(namespace="inference", token=TOKEN) as s:
        yield s
    assert not s.unexpected, s.unexpected


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _elector(stub: KubeStub, who: str, clock: Clock, changes: list[tuple[str, bool]] | None = None) -> LeaderElector:
    api = api_client(KubernetesSettings(api_url=stub.url, namespace="inference"))
    return LeaderElector(api, "inference", "sentinel-leader", who, 15.0, 10.0, 2.0,
                         on_change=lambda leading: changes.append((who, leading)) if changes is not None else None,
                         clock=clock)


def test_one_leader_takeover_after_expiry_and_release(stub: KubeStub) -> None:
    clock = Clock()
    changes: list[tuple[str, bool]] = []
    a, b = _elector(stub, "sentinel-a", clock, changes), _elector(stub, "sentinel-b", clock, changes)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    assert stub.requests[1][0] == "POST"  # a created the lease (after a 404)
    lease = stub.leases["sentinel-leader"]["spec"]
    assert lease["holderIdentity"] == "sentinel-a" and lease["leaseDurationSeconds"] == 15
    assert lease["leaseTransitions"] == 0 and b.holder == "sentinel-a"
    clock.t += 5
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # renewed: b saw the record change
    acquired = stub.leases["sentinel-leader"]["spec"]["acquireTime"]
    clock.t += 14  # a stops renewing; 14 s after b last saw a change the lease is still a's
    assert not b.try_acquire_or_renew()
    clock.t += 2  # now past the 15 s lease duration: b takes over
    assert b.try_acquire_or_renew()
    spec = stub.leases["sentinel-leader"]["spec"]
    assert spec["holderIdentity"] == "sentinel-b" and spec["leaseTransitions"] == 1 and spec["acquireTime"] != acquired
    assert not a.leading  # a could not renew within its 10 s renew deadline: it stepped down on its own
    assert not a.try_acquire_or_renew()
    b.release()  # a clean stop: a follower takes over at its next try, not after the expiry
    assert stub.leases["sentinel-leader"]["spec"].get("holderIdentity") is None
    assert a.try_acquire_or_renew() and stub.leases["sentinel-leader"]["spec"]["leaseTransitions"] == 2
    # a's step-down is noticed whenever anything asks a whether it leads (the gate before every action); its
    # 10 s renew deadline passed before b's 15 s expiry, so the two never both believed they led
    assert changes == [("sentinel-a", True), ("sentinel-b", True), ("sentinel-a", False), ("sentinel-b", False),
                       ("sentinel-a", True)]
    puts = [body for verb, _, body in stub.requests if verb == "PUT"]
    assert all(body["metadata"]["resourceVersion"] for body in puts)  # every replace is conditional


def test_a_concurrent_update_makes_one_winner(stub: KubeStub) -> None:
    clock = Clock()
    a, b = _elector(stub, "sentinel-a", clock), _elector(stub, "sentinel-b", clock)
    assert a.try_acquire_or_renew()
    a.release()
    # b reads the released lease, then a renews first: b's replace carries a stale resourceVersion → 409
    real_read = b.leases.read_namespaced_lease

    def read_then_race(*args: Any, **kw: Any) -> Any:
        got = real_read(*args, **kw)
        assert a.try_acquire_or_renew()
        return got

    b.leases.read_namespaced_lease = read_then_race  # type: ignore[method-assign]
    assert not b.try_acquire_or_renew()
    assert ("PUT", "/apis/coordination.k8s.io/v1/namespaces/inference/leases/sentinel-leader") in \
        [(v, p) for v, p, _ in stub.requests]
    assert stub.leases["sentinel-leader"]["spec"]["holderIdentity"] == "sentinel-a" and a.leading and not b.leading


def test_an_unreachable_api_keeps_the_leader_until_its_renew_deadline(stub: KubeStub) -> None:
    clock = Clock()
    a = _elector(stub, "sentinel-a", clock)
    assert a.try_acquire_or_renew()
    stub.fail_next[("GET", r".*/leases/sentinel-leader")] = 500
    clock.t += 5
    assert a.try_acquire_or_renew() and a.last_error is not None  # still within the deadline
    stub.fail_next[("GET", r".*/leases/sentinel-leader")] = 500
    clock.t += 6
    assert not a.try_acquire_or_renew()  # 11 s since the last renewal: stepped down


def test_a_wrong_token_is_refused(stub: KubeStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_TOKEN", "wrong")
    a = _elector(stub, "sentinel-a", Clock())
    assert not a.try_acquire_or_renew() and "401" in (a.last_error or "")


def _actuator(stub: KubeStub, **kw: Any) -> KubernetesActuator:
    api = api_client(KubernetesSettings(api_url=stub.url, namespace="inference"))
    return KubernetesActuator(api, "inference", "deepseek-inference", poll_s=0.05, **kw)


def test_restart_deletes_the_pod_and_verifies_the_rollout(stub: KubeStub) -> None:
    act = _actuator(stub)
    pods = act.targets()
    assert len(pods) == 2 and act.capacity() == (2, 1)
    victim = sorted(pods)[0]
    uid = stub.pods[victim]["metadata"]["uid"]
    assert act.incarnation(victim) is not None
    evidence = act.act("restart", victim)
    assert f"deleted pod {victim}" in evidence
    [delete] = [body for verb, path, body in stub.requests if verb == "DELETE"]
    assert delete["preconditions"]["uid"] == uid  # never deletes a same-named successor
    assert victim not in act.targets() and len(act.targets()) == 2  # replaced by its ReplicaSet
    assert act.verify(victim, 5)
    with pytest.raises(RemediationError, match="is not a pod of deployment"):
        act.act("restart", "kube-apiserver-node-1")  # an alert label never names another workload's pod
    assert not any(p.endswith("kube-apiserver-node-1") for v, p, _ in stub.requests if v == "DELETE")


def test_verify_waits_for_readiness(stub: KubeStub) -> None:
    act = _actuator(stub)
    stub.ready = False
    act.act("restart", sorted(act.targets())[0])
    assert not act.verify("x", 0.3)  # the replacement is not ready
    assert act.capacity() == (2, 1)


def test_scale_through_the_subresource_within_bounds(stub: KubeStub) -> None:
    act = _actuator(stub, min_replicas=1, max_replicas=3)
    assert "from 2 to 3" in act.act("scale_out", "x")
    patches = [(p, b) for v, p, b in stub.requests if v == "PATCH"]
    assert patches == [("/apis/apps/v1/namespaces/inference/deployments/deepseek-inference/scale",
                        {"spec": {"replicas": 3}})]
    assert len(act.targets()) == 3 and act.verify("x", 5)
    with pytest.raises(RemediationError, match="max_count=3"):
        act.act("scale_out", "x")
    assert "from 3 to 2" in act.act("scale_in", "x") and "from 2 to 1" in act.act("scale_in", "x")
    with pytest.raises(RemediationError, match="min_count=1"):
        act.act("scale_in", "x")
    stub.hpas.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                      "metadata": {"name": "deepseek-inference"},
                      "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                                  "name": "deepseek-inference"}, "maxReplicas": 4}})
    with pytest.raises(RemediationError, match="HorizontalPodAutoscaler deepseek-inference owns"):
        act.act("scale_out", "x")


def test_rollout_restart_and_cordon(stub: KubeStub) -> None:
    act = _actuator(stub)
    before = set(act.targets())
    assert "rollout restart" in act.act("rollout_restart", "x")
    annotations = stub.deployment["spec"]["template"]["metadata"]["annotations"]
    assert RESTARTED_AT in annotations and not (set(act.targets()) & before) and act.verify("x", 5)
    pod = sorted(act.targets())[0]
    assert "cordoned node gpu-node-1" in act.act("cordon", pod)
    assert stub.nodes["gpu-node-1"]["spec"]["unschedulable"] is True
    with pytest.raises(RemediationError, match="not supported on Kubernetes"):
        act.act("format_disk", pod)
