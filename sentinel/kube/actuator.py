"""The Kubernetes actuator: remediation through the API, on the pods of one Deployment.

- ``restart`` of a replica (a pod, the ``replica`` label the generated ServiceMonitor gives its series):
  delete the pod; its ReplicaSet starts a new one. Verified when the Deployment is fully available again
  and the old pod is gone.
- ``rollout_restart``: the whole Deployment, as ``kubectl rollout restart`` (the pod template's
  ``kubectl.kubernetes.io/restartedAt`` annotation), verified when the rollout has finished.
- ``scale_out`` / ``scale_in``: the Deployment's scale subresource, one replica at a time, within
  ``replicas.min_count`` .. ``replicas.max_count``; refused while a HorizontalPodAutoscaler owns the
  Deployment's replica count (the two would fight).
- ``cordon``: mark the node the pod runs on unschedulable (as ``kubectl cordon``).

Every write is a JSON merge patch (``application/merge-patch+json``) or a delete; nothing is applied
server-side. The RBAC this needs is generated with sentinel's own manifests (``sentinel deploy kubernetes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sentinel.errors import RemediationError

MERGE = "application/merge-patch+json"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


class KubernetesActuator:
    actions = frozenset({"restart", "rollout_restart", "scale_out", "scale_in", "cordon"})  # no GPU reset here

    def __init__(self, api: k8s.ApiClient, namespace: str, deployment: str, min_replicas: int = 1,
                 max_replicas: int = 4, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = k8s.CoreV1Api(api)
        self.apps = k8s.AppsV1Api(api)
        self.autoscaling = k8s.AutoscalingV2Api(api)
        self.namespace, self.deployment = namespace, deployment
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.poll_s = poll_s
        self.clock = clock
        self._deleted: tuple[str, Any] | None = None  # the pod the last restart deleted (name, uid)

    @property
    def service(self) -> str:
        """What a scale action acts on (its target in the audit and its cooldown): the Deployment."""
        return f"deployment/{self.deployment}"

    # -- reading ----------------------------------------------------------------------------------------
    def _deployment(self) -> k8s.V1Deployment:
        try:
            return self.apps.read_namespaced_deployment(self.deployment, self.namespace)
        except ApiException as exc:
            raise RemediationError(f"cannot read deployment {self.namespace}/{self.deployment}: "
                                   f"{exc.status} {exc.reason}") from exc

    def _selector(self) -> str:
        labels = (self._deployment().spec.selector.match_labels or {})
        if not labels:
            raise RemediationError(f"deployment {self.deployment} has no matchLabels selector")
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    def pods(self) -> list[k8s.V1Pod]:
        """The Deployment's pods, without those already being deleted."""
        got = self.core.list_namespaced_pod(self.namespace, label_selector=self._selector())
        return [p for p in got.items if meta(p).deletion_timestamp is None]

    def targets(self) -> set[str]:
        try:
            return {meta(p).name or "" for p in self.pods()} - {""}
        except (ApiException, RemediationError):
            return set()  # unknown targets: the policy refuses to act, and says so

    def incarnation(self, target: str) -> float | None:
        try:
            pod = self.core.read_namespaced_pod(target, self.namespace)
        except ApiException:
            return None
        start = pod.status.start_time if pod.status is not None else None
        return start.timestamp() if start is not None else None

    def capacity(self) -> tuple[int, int]:
        """(replicas, ready replicas left if a scale-in removed one): a ReplicaSet removes a not-ready pod
        first, so a ready one is lost only when every pod is ready."""
        pods = self.pods()
        ready = sum(_ready(p) for p in pods)
        return len(pods), ready - int(bool(pods) and ready == len(pods))

    # -- acting -----------------------------------------------------------------------------------------
    def act(self, action: str, target: str) -> str:
        if action == "restart":
            return self.delete_pod(target)
        if action == "rollout_restart":
            return self.rollout_restart()
        if action in ("scale_out", "scale_in"):
            return self.scale(+1 if action == "scale_out" else -1)
        if action == "cordon":
            return self.cordon(target)
        raise RemediationError(f"action {action!r} is not supported on Kubernetes")

    def _known(self, pod: str) -> k8s.V1Pod:
        for p in self.pods():
            if meta(p).name == pod:
                return p
        raise RemediationError(f"{pod!r} is not a pod of deployment {self.namespace}/{self.deployment}")

    def delete_pod(self, pod: str) -> str:
        p = self._known(pod)  # never a name from an alert label that is not one of ours
        try:
            self.core.delete_namespaced_pod(pod, self.namespace,
                                            body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(
                                                uid=meta(p).uid)))
        except ApiException as exc:
            raise RemediationError(f"deleting pod {pod}: {exc.status} {exc.reason}") from exc
        self._deleted = (pod, meta(p).uid)
        return f"deleted pod {pod} (uid {meta(p).uid}); its ReplicaSet starts a replacement"

    def rollout_restart(self) -> str:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        try:
            self.apps.patch_namespaced_deployment(self.deployment, self.namespace, body, _content_type=MERGE)
        except ApiException as exc:
            raise RemediationError(f"rollout restart of {self.deployment}: {exc.status} {exc.reason}") from exc
        return f"rollout restart of deployment {self.deployment} ({RESTARTED_AT}={stamp})"

    def _autoscaler(self) -> str | None:
        hpas = self.autoscaling.list_namespaced_horizontal_pod_autoscaler(self.namespace).items
        for h in hpas:
            ref = h.spec.scale_target_ref
            if ref.kind == "Deployment" and ref.name == self.deployment:
                return meta(h).name
        return None

    def scale(self, delta: int) -> str:
        try:
            owner = self._autoscaler()
            if owner is not None:
                raise RemediationError(f"HorizontalPodAutoscaler {owner} owns the replica count of {self.deployment}; "
                                       "sentinel does not scale it (remove remediation: scale_* or the autoscaler)")
            got = self.apps.read_namespaced_deployment_scale(self.deployment, self.namespace)
            current = (got.spec.replicas if got.spec is not None else None) or 0
        except ApiException as exc:
            raise RemediationError(f"reading the scale of {self.deployment}: {exc.status} {exc.reason}") from exc
        want = current + delta
        if want > self.max_replicas:
            raise RemediationError(f"already at replicas.max_count={self.max_replicas}: a human must add capacity")
        if want < self.min_replicas:
            raise RemediationError(f"at replicas.min_count={self.min_replicas}: not scaling in")
        try:
            self.apps.patch_namespaced_deployment_scale(self.deployment, self.namespace,
                                                        {"spec": {"replicas": want}}, _content_type=MERGE)
        except ApiException as exc:
            raise RemediationError(f"scaling {self.deployment} to {want}: {exc.status} {exc.reason}") from exc
        return f"scaled deployment {self.deployment} from {current} to {want} replicas"

    def cordon(self, pod: str) -> str:
        node = (self._known(pod).spec or k8s.V1PodSpec(containers=[])).node_name
        if not node:
            raise RemediationError(f"pod {pod} is not scheduled on a node")
        try:
            self.core.patch_node(node, {"spec": {"unschedulable": True}}, _content_type=MERGE)
        except ApiException as exc:
            raise RemediationError(f"cordoning node {node}: {exc.status} {exc.reason}") from exc
        return f"cordoned node {node} (where {pod} runs): no new pods are scheduled there"

    # -- verifying --------------------------------------------------------------------------------------
    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        """The Deployment has finished rolling out: every desired replica updated and available, none of
        the old ones left, and a deleted pod gone (the same check after every action)."""
        deadline = self.clock() + timeout_s
        deleted = self._deleted
        while True:
            try:
                if self._rolled_out() and (deleted is None or self._gone(*deleted)):
                    self._deleted = None
                    return True
            except ApiException:
                pass
            if self.clock() >= deadline:
                return False
            time.sleep(self.poll_s)

    def _rolled_out(self) -> bool:
        d = self._deployment()
        want = d.spec.replicas if d.spec.replicas is not None else 1
        st = d.status or k8s.V1DeploymentStatus()
        return ((st.observed_generation or 0) >= (meta(d).generation or 0)
                and (st.updated_replicas or 0) == want and (st.available_replicas or 0) == want
                and (st.replicas or 0) == want)

    def _gone(self, pod: str, uid: Any) -> bool:
        try:
            p = self.core.read_namespaced_pod(pod, self.namespace)
        except ApiException as exc:
            return exc.status == 404
        return meta(p).uid != uid


def meta(obj: Any) -> k8s.V1ObjectMeta:
    """An object's metadata (the typed client makes every field optional)."""
    return obj.metadata if obj.metadata is not None else k8s.V1ObjectMeta()


def _ready(p: k8s.V1Pod) -> bool:
    conds = (p.status.conditions or []) if p.status is not None else []
    return any(c.type == "Ready" and c.status == "True" for c in conds)
