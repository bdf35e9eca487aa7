"""A client for one replica's operational API: the types ``server.py`` answers ``/health``, ``/ready``,
``/load`` and ``/admin/drain`` with, and the calls every caller makes (sentinel's supervisor, liveness
probe, router, runbooks and chaos drills). One place reads those documents; no caller picks fields out
of raw JSON.

The types allow extra fields (a newer replica may say more than an older sentinel knows) and refuse a
document whose known fields have the wrong type, as :class:`ReplicaError` with the endpoint and the field.
Transport failures (refused, timed out, reset) are :class:`ReplicaUnreachable`, a subclass, so a caller
that only needs "did it answer well" catches one exception.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["AsyncReplicaClient", "Drain", "Health", "Load", "Ready", "ReplicaClient", "ReplicaError",
           "ReplicaUnreachable"]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def body(self) -> dict[str, Any]:
        """The JSON body the server sends: every field it set, and only those."""
        return self.model_dump(exclude_unset=True)


class Health(_Doc):
    """``GET /health``: 200 while alive (``ok``, or ``loading`` before the model is in), 503 once the load
    failed or the engine did (a CUDA error, a step loop that stopped making progress)."""

    status: Literal["ok", "loading", "unhealthy"]
    pid: int | None = None
    stage: str | None = None  # while loading: what the load is doing now
    layout: Literal["moving", "done"] | None = None  # the weights' move into huge pages after ready
    load_error: str | None = None
    cuda_error: str | None = None
    stalled: bool | None = None

    @property
    def problem(self) -> str | None:
        """Why it is not healthy, in the replica's words (None when it is)."""
        if self.status != "unhealthy":
            return None
        return self.load_error or self.cuda_error or ("engine stalled" if self.stalled else "unhealthy")


class Ready(_Doc):
    """``GET /ready``: 200 when it takes requests; 503 while loading, draining, or after a failure."""

    ready: bool
    loading: bool | None = None
    stage: str | None = None  # while loading: what the load is doing now
    load_error: str | None = None
    draining: bool | None = None
    healthy: bool | None = None


class Load(_Doc):
    """``GET /load``: what a load balancer needs, cheaply (503 when it should send nothing)."""

    ready: bool
    healthy: bool | None = None
    draining: bool | None = None
    loading: bool | None = None
    load_error: str | None = None
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    tokens: int = 0  # still to compute: prompts not yet prefilled plus completions not yet generated


class Drain(_Doc):
    """``POST /admin/drain``: admission stopped; how many requests are still in flight."""

    draining: bool
    in_flight: int


class ReplicaError(RuntimeError):
    """The replica answered something that is not the document its endpoint promises."""


class ReplicaUnreachable(ReplicaError):
    """No answer: refused, timed out, reset."""


D = TypeVar("D", bound=_Doc)


def parse(kind: type[D], resp: httpx.Response, ok: tuple[int, ...] = (200, 503)) -> D:
    """``resp``'s body as ``kind``; a status outside ``ok`` or a body that is not one is a ReplicaError."""
    where = f"{resp.request.method} {resp.request.url.path}"
    if resp.status_code not in ok:
        raise ReplicaError(f"{where}: HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return kind.model_validate(resp.json())
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError are both ValueErrors
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()) \
            if isinstance(exc, ValidationError) else f"not JSON ({exc})"
        raise ReplicaError(f"{where}: {detail}") from exc


class ReplicaClient:
    """One replica's operational endpoints over a (shared, keep-alive) httpx client."""

    def __init__(self, url: str, timeout_s: float = 2.0, admin_token: str | None = None,
                 http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.admin_token = admin_token
        self._http = http

    def _request(self, method: str, path: str, timeout_s: float | None = None, **kw: Any) -> httpx.Response:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self._http is not None:
                return self._http.request(method, self.url + path, timeout=timeout, **kw)
            return httpx.request(method, self.url + path, timeout=timeout, **kw)
        except httpx.HTTPError as exc:
            raise ReplicaUnreachable(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from exc

    def _admin(self) -> dict[str, str]:
        if not self.admin_token:
            raise ReplicaError(f"{self.url}: no admin token for the admin endpoints")
        return {"Authorization": f"Bearer {self.admin_token}"}

    def health(self, timeout_s: float | None = None) -> Health:
        return parse(Health, self._request("GET", "/health", timeout_s))

    def ready(self, timeout_s: float | None = None) -> Ready:
        return parse(Ready, self._request("GET", "/ready", timeout_s))

    def load(self, timeout_s: float | None = None) -> Load:
        return parse(Load, self._request("GET", "/load", timeout_s))

    def drain(self, timeout_s: float | None = None) -> Drain:
        """Stop admitting; the answer says how many requests are still in flight (poll until 0)."""
        return parse(Drain, self._request("POST", "/admin/drain", timeout_s, headers=self._admin()), ok=(200,))

    def arm_fault(self, fault: dict[str, Any], timeout_s: float | None = None) -> httpx.Response:
        """``POST /admin/faults`` (drills): the raw response, whose 404 (no fault switch) and 401 (wrong
        token) the caller turns into its own advice."""
        return self._request("POST", "/admin/faults", timeout_s, headers=self._admin(), json=fault)

    def metrics_text(self, timeout_s: float | None = None) -> str:
        resp = self._request("GET", "/metrics", timeout_s)
        if resp.status_code != 200:
            raise ReplicaError(f"GET {self.url}/metrics: HTTP {resp.status_code}")
        return resp.text

    def complete(self, body: dict[str, Any], timeout_s: float | None = None) -> httpx.Response:
        """``POST /v1/completions`` straight to this replica (drills drive a chosen replica, not the router)."""
        return self._request("POST", "/v1/completions", timeout_s, json=body)


class AsyncReplicaClient:
    """``/load`` for the router's poller, on its own async client (the one call on an event loop)."""

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self._http = http

    async def load(self, timeout_s: float) -> Load:
        try:
            resp = await self._http.get(self.url + "/load", timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ReplicaUnreachable(f"GET {self.url}/load: {type(exc).__name__}: {exc}") from exc
        return parse(Load, resp)
