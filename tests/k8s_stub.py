"""A stand-in for the Kubernetes API server, for tests only: no API server can run here.

It serves the few routes sentinel uses (leases; a Deployment, its scale subresource and its pods; nodes;
HorizontalPodAutoscalers) and checks each request as the API server would: the path and verb must be a
route of the Kubernetes API, writes must carry the right content type (JSON merge patch for patches),
every object written (and every object a patch produces) must validate strictly against the API schema of a
current release (kubernetes-validate), a replace must carry the ``resourceVersion`` it read (else 409
Conflict, as optimistic concurrency works), a delete's ``preconditions.uid`` must match, and with a token
configured every request must bear it. Anything else is recorded in ``unexpected`` and answered with the
API's own Status error. The Deployment controller is simulated: pods follow the replica count, a deleted
pod is replaced, a template change replaces every pod.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

import kubernetes_validate

from tests.httpserver import LoopbackServer

KUBERNETES = "1.33"
IMAGE = "deepseek-inference:0.1.0"
MERGE = "application/merge-patch+json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class KubeStub:
    def __init__(self, namespace: str = "default", deployment: str = "deepseek-inference", replicas: int = 2,
                 token: str | None = None, node: str = "gpu-node-1") -> None:
        self.namespace, self.token, self.node = namespace, token, node
        self.lock = threading.RLock()
        self.rv = itertools.count(1)
        self.requests: list[tuple[str, str, Any]] = []   # (verb, path, body)
        self.unexpected: list[str] = []
        self.leases: dict[str, dict[str, Any]] = {}
        self.hpas: list[dict[str, Any]] = []
        self.nodes: dict[str, dict[str, Any]] = {node: {"apiVersion": "v1", "kind": "Node",
                                                        "metadata": {"name": node, "resourceVersion": "1"},
                                                        "spec": {}}}
        self.labels = {"app.kubernetes.io/name": deployment}
        self.deployment: dict[str, Any] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": deployment, "namespace": namespace, "generation": 1, "resourceVersion": "1",
                         "uid": str(uuid.uuid4())},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(self.labels)},
                     "template": {"metadata": {"labels": dict(self.labels)},
                                  "spec": {"containers": [{"name": "inference", "image": IMAGE}]}}},
            "status": {}}
        self.pods: dict[str, dict[str, Any]] = {}
        self.ready = True       # new pods become ready at once
        self.fail_next: dict[tuple[str, str], int] = {}  # (verb, path regex) -> status to answer once
        self._reconcile()
        self.server = LoopbackServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KubeStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the simulated controller -------------------------------------------------------------------------
    def _new_pod(self) -> None:
        name = f"{self.deployment['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        self.pods[name] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()),
                         "labels": dict(self.labels), "resourceVersion": str(next(self.rv))},
            "spec": {"nodeName": self.node, "containers": [{"name": "inference", "image": IMAGE}]},
            "status": {"phase": "Running", "startTime": _now(),
                       "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}]}}

    def _reconcile(self, replace_all: bool = False) -> None:
        want = self.deployment["spec"]["replicas"]
        if replace_all:
            self.pods.clear()
        while len(self.pods) < want:
            self._new_pod()
        while len(self.pods) > want:
            self.pods.pop(sorted(self.pods)[-1])
        ready = sum(p["status"]["conditions"][0]["status"] == "True" for p in self.pods.values())
        self.deployment["status"] = {"observedGeneration": self.deployment["metadata"]["generation"],
                                     "replicas": len(self.pods), "updatedReplicas": len(self.pods),
                                     "readyReplicas": ready, "availableReplicas": ready}

    # -- requests -----------------------------------------------------------------------------------------
    def _validate(self, obj: Any) -> None:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise ApiError(422, "Invalid", f"{obj.get('kind')} is invalid: {exc}") from exc

    def handle(self, verb: str, path: str, query: dict[str, list[str]], headers: Any, body: Any) -> Any:
        ns = re.escape(self.namespace)
        with self.lock:
            for (v, pattern), code in list(self.fail_next.items()):
                if v == verb and re.fullmatch(pattern, path):
                    del self.fail_next[(v, pattern)]
                    raise ApiError(code, "InternalError" if code >= 500 else "Conflict", "injected failure")
            if m := re.fullmatch(rf"/apis/coordination\.k8s\.io/v1/namespaces/{ns}/leases(?:/([^/]+))?", path):
                return self._lease(verb, m[1], body)
            dep = self.deployment["metadata"]["name"]
            if re.fullmatch(rf"/apis/apps/v1/namespaces/{ns}/deployments/{re.escape(dep)}", path):
                if verb == "GET":
                    return self.deployment
                if verb == "PATCH":
                    self._need_merge(headers)
                    patched = merge_patch(self.deployment, body)
                    self._validate({k: v for k, v in patched.items() if k != "status"})
                    changed = patched["spec"]["template"] != self.deployment["spec"]["template"]
                    self.deployment = patched
                    if changed:
                        self.deployment["metadata"]["generation"] += 1
                    self._reconcile(replace_all=changed)
                    return self.deployment
            if re.fullmatch(rf"/apis/apps/v1/namespaces/{ns}/deployments/{re.escape(dep)}/scale", path):
                scale = {"apiVersion": "autoscaling/v1", "kind": "Scale",
                         "metadata": {"name": dep, "namespace": self.namespace},
                         "spec": {"replicas": self.deployment["spec"]["replicas"]},
                         "status": {"replicas": len(self.pods), "selector": "app.kubernetes.io/name=" + dep}}
                if verb == "GET":
                    return scale
                if verb == "PATCH":
                    self._need_merge(headers)
                    patched = merge_patch(scale, body)
                    self._validate(patched)
                    self.deployment["spec"]["replicas"] = patched["spec"]["replicas"]
                    self.deployment["metadata"]["generation"] += 1
                    self._reconcile()
                    return {**patched, "spec": {"replicas": self.deployment["spec"]["replicas"]}}
            if re.fullmatch(rf"/api/v1/namespaces/{ns}/pods", path) and verb == "GET":
                want = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                items = [p for p in self.pods.values() if all(p["metadata"]["labels"].get(k) == v
                                                                  for k, v in want.items())]
                return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if m := re.fullmatch(rf"/api/v1/namespaces/{ns}/pods/([^/]+)", path):
                pod = self.pods.get(m[1])
                if pod is None:
                    raise ApiError(404, "NotFound", f'pods "{m[1]}" not found')
                if verb == "GET":
                    return pod
                if verb == "DELETE":
                    uid = ((body or {}).get("preconditions") or {}).get("uid")
                    if uid is not None and uid != pod["metadata"]["uid"]:
                        raise ApiError(409, "Conflict", "Precondition failed: UID in precondition does not match")
                    del self.pods[m[1]]
                    self._reconcile()
                    # as the API server: the object as deleted (graceful deletion stamps it)
                    return {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": _now()}}
            if m := re.fullmatch(r"/api/v1/nodes/([^/]+)", path):
                node = self.nodes.get(m[1])
                if node is None:
                    raise ApiError(404, "NotFound", f'nodes "{m[1]}" not found')
                if verb == "PATCH":
                    self._need_merge(headers)
                    patched = merge_patch(node, body)
                    self._validate(patched)
                    self.nodes[m[1]] = patched
                    return patched
            if re.fullmatch(rf"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers", path) and verb == "GET":
                return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscalerList", "metadata": {},
                        "items": self.hpas}
        self.unexpected.append(f"{verb} {path}")
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({verb} {path})")

    @staticmethod
    def _need_merge(headers: Any) -> None:
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != MERGE:
            raise ApiError(415, "UnsupportedMediaType", f"the body of a patch here must be {MERGE}, not {ctype!r}")

    def _lease(self, verb: str, name: str | None, body: Any) -> Any:
        if name is None and verb == "POST":
            self._validate(body)
            n = body["metadata"]["name"]
            if n in self.leases:
                raise ApiError(409, "AlreadyExists", f'leases.coordination.k8s.io "{n}" already exists')
            body = json.loads(json.dumps(body))
            body["metadata"].update(resourceVersion=str(next(self.rv)), uid=str(uuid.uuid4()))
            self.leases[n] = body
            return body
        if name is None:
            raise ApiError(405, "MethodNotAllowed", verb)
        lease = self.leases.get(name)
        if lease is None:
            raise ApiError(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
        if verb == "GET":
            return lease
        if verb == "PUT":
            self._validate(body)
            if body["metadata"].get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            if body["metadata"].get("resourceVersion") != lease["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io '
                               f'"{name}": the object has been modified; please apply your changes to the latest '
                               "version")
            body = json.loads(json.dumps(body))
            body["metadata"].update(resourceVersion=str(next(self.rv)), uid=lease["metadata"]["uid"])
            self.leases[name] = body
            return body
        raise ApiError(405, "MethodNotAllowed", verb)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _serve(self, verb: str) -> None:
                url = urlparse(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    if stub.token is not None and self.headers.get("Authorization") != f"Bearer {stub.token}":
                        raise ApiError(401, "Unauthorized", "Unauthorized")
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError as exc:
                        raise ApiError(400, "BadRequest", f"body is not JSON: {exc}") from exc
                    with stub.lock:
                        stub.requests.append((verb, url.path, body))
                    out, code = stub.handle(verb, url.path, parse_qs(url.query), self.headers, body), 200
                    if verb == "POST":
                        code = 201
                except ApiError as exc:
                    out, code = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": exc.message, "reason": exc.reason, "code": exc.code}, exc.code
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler
