"""The router: one OpenAI-compatible endpoint in front of the replicas, so clients never talk to a replica
that is restarting.

- **Load-aware.** Every ``poll_interval`` the router reads each replica's ``GET /load`` (its own
  accounting: whether it takes requests, and the tokens still to compute for the requests it holds). A
  request goes to the ready replica with the least outstanding work: the polled tokens plus what the
  router itself sent there since that poll (the request's ``max_tokens`` and prompt length estimate), so a
  burst between two polls spreads out instead of piling onto the replica that looked idle. Ties (idle
  replicas, light load) go round-robin, so a replica that was just added gets work at once rather than
  only when the others are busy.
- **Only replicas that can serve.** Unhealthy, draining, loading and unreachable replicas (``/load`` not
  200) get nothing; when none can serve, 503 with ``Retry-After``.
- **Retry before the first byte.** A request whose replica cannot be reached or answers with a 5xx status
  (503: it began draining since the last poll; 500: its forward pass failed, e.g. a CUDA error) is sent once
  more to another replica: nothing has reached the client yet, and a completion has no side effect. A 4xx
  answer is the client's and passes through; once bytes have gone to the client nothing is retried.
- **Streams pass through** chunk by chunk with back-pressure (the next chunk is read from the replica only
  when the client has taken the last one); a client that goes away closes the upstream connection, and the
  replica aborts the request.
- **Client identity.** The router sets ``X-Forwarded-For`` to the client's address (any the client sent is
  dropped) and proves itself with ``X-Sentinel-Proxy``; replicas started by sentinel trust that header only
  with the token, so their per-client rate limits still apply per client. ``Authorization`` passes through.

Metrics on sentinel's registry: ``sentinel_router_requests_total{replica,code}``,
``sentinel_router_in_flight{replica}``, ``sentinel_router_retries_total{reason}``,
``sentinel_router_upstream_errors_total{replica,kind}``, ``sentinel_router_unavailable_total`` and
``sentinel_router_upstream_seconds`` (request received → the replica's response headers: routing plus the
replica's time to answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from inference_core.client import AsyncReplicaClient, ReplicaError

log = logging.getLogger(__name__)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
DROP_FROM_CLIENT = HOP_BY_HOP | {"x-forwarded-for", "x-sentinel-proxy", "x-real-ip", "forwarded"}
REPLICA_HEADER = "X-Sentinel-Replica"


@dataclass
class Upstream:
    name: str
    url: str
    ready: bool = False
    tokens: int = 0          # outstanding work at the last poll (the replica's own accounting)
    pending: int = 0         # tokens the router sent since that poll began
    in_flight: int = 0       # requests the router has open there
    polled_at: float = 0.0

    @property
    def score(self) -> tuple[int, int]:
        return self.tokens + self.pending, self.in_flight


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("sentinel_router_requests_total", "Requests the router answered, by replica and "
                                "status code (replica \"none\": no replica could serve).", ["replica", "code"],
                                registry=registry)
        self.in_flight = Gauge("sentinel_router_in_flight", "Requests open through the router, per replica.",
                               ["replica"], registry=registry)
        self.retries = Counter("sentinel_router_retries_total", "Requests sent to a second replica after the first "
                               "failed before answering.", ["reason"], registry=registry)
        self.upstream_errors = Counter("sentinel_router_upstream_errors_total", "Replicas that failed a request "
                                       "before answering.", ["replica", "kind"], registry=registry)
        self.unavailable = Counter("sentinel_router_unavailable_total", "Requests answered 503 because no replica "
                                   "could serve.", registry=registry)
        self.upstream_seconds = Histogram("sentinel_router_upstream_seconds", "Request received to the replica's "
                                          "response headers.", ["replica"], registry=registry,
                                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


def _estimate(body: bytes) -> int:
    """Tokens the request may cost: prompt length / 4 + max_tokens (16 when not given, as OpenAI's default)."""
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        return 0
    if not isinstance(doc, dict):
        return 0
    prompt = doc.get("prompt", doc.get("messages", ""))
    size = len(json.dumps(prompt)) // 4 if prompt else 0
    max_tokens = doc.get("max_tokens") or doc.get("max_completion_tokens") or 16
    return size + (max_tokens if isinstance(max_tokens, int) else 16)


class Router:
    def __init__(self, replicas: Callable[[], list[tuple[str, str]]], registry: CollectorRegistry,
                 proxy_token: str | None = None, poll_interval_s: float = 0.25, timeout_s: float = 600.0) -> None:
        self.replicas = replicas
        self.proxy_token = proxy_token
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.metrics = RouterMetrics(registry)
        self.upstreams: dict[str, Upstream] = {}
        self.client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._turn = 0  # round-robin among the least-loaded replicas
        self.app = Starlette(routes=[Route("/v1/{path:path}", self.handle, methods=["GET", "POST"]),
                                     Route("/router/status", self.status, methods=["GET"])],
                             lifespan=self._lifespan)

    # -- replica state ----------------------------------------------------------------------------------
    def _sync(self) -> None:
        want = dict(self.replicas())
        for name in list(self.upstreams):
            if name not in want:
                del self.upstreams[name]
        for name, url in want.items():
            up = self.upstreams.get(name)
            if up is None or up.url != url:
                self.upstreams[name] = Upstream(name, url)

    async def poll_once(self) -> None:
        self._sync()
        client = self.client
        assert client is not None
        ups = list(self.upstreams.values())
        timeout = min(2.0, 4 * self.poll_interval_s + 0.5)

        async def one(up: Upstream) -> None:
            sent = up.pending
            try:
                load = await AsyncReplicaClient(up.url, client).load(timeout)
                up.ready, up.tokens = load.ready, load.tokens
            except ReplicaError:
                up.ready = False
            up.pending = max(0, up.pending - sent)  # what was sent before the poll is in its answer
            up.polled_at = time.monotonic()

        await asyncio.gather(*(one(u) for u in ups))

    async def _poll_forever(self) -> None:
        while True:  # the lifespan has just polled: the next round is one interval later, not at once
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - a poll round must never stop the poller
                log.exception("router poll failed")

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=2.0),
                                        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever())
        try:
            yield
        finally:
            self._poller.cancel()
            await self.client.aclose()

    def pick(self, exclude: set[str]) -> Upstream | None:
        ready = [u for u in self.upstreams.values() if u.ready and u.name not in exclude]
        if not ready:
            return None
        best = min(u.score for u in ready)
        tied = sorted((u for u in ready if u.score == best), key=lambda u: u.name)
        self._turn += 1
        return tied[self._turn % len(tied)]

    # -- requests ---------------------------------------------------------------------------------------
    async def status(self, request: Request) -> JSONResponse:
        return JSONResponse({"replicas": [{"name": u.name, "url": u.url, "ready": u.ready, "tokens": u.tokens,
                                           "pending": u.pending, "inFlight": u.in_flight}
                                          for u in sorted(self.upstreams.values(), key=lambda u: u.name)]})

    def _headers(self, request: Request) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in DROP_FROM_CLIENT}
        out["x-forwarded-for"] = request.client.host if request.client else "unknown"
        if self.proxy_token:
            out["x-sentinel-proxy"] = self.proxy_token
        return out

    async def handle(self, request: Request) -> Response:
        assert self.client is not None
        t0 = time.monotonic()
        body = await request.body()
        cost = _estimate(body)
        headers = self._headers(request)
        tried: set[str] = set()
        last: str = "no replica is ready"
        for attempt in range(2):
            up = self.pick(tried)
            if up is None:
                break
            tried.add(up.name)
            if attempt:
                self.metrics.retries.labels(last.split(":")[0]).inc()
            up.pending += cost
            up.in_flight += 1
            self.metrics.in_flight.labels(up.name).inc()
            upstream_req = self.client.build_request(request.method, f"{up.url}{request.url.path}",
                                                     params=request.url.query or None, headers=headers, content=body)
            try:
                resp = await self.client.send(upstream_req, stream=True)
            except httpx.HTTPError as exc:
                self._done(up)
                kind = "connect" if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) else "transport"
                self.metrics.upstream_errors.labels(up.name, kind).inc()
                up.ready = False  # until the next poll says otherwise
                last = f"{kind}: {up.name}: {type(exc).__name__}"
                continue
            if resp.status_code >= 500 and attempt == 0:
                # nothing has reached the client yet: a replica that is draining or failed since the last poll
                # (503), or whose forward pass failed (a CUDA error: 500), costs the client nothing but a retry
                await resp.aclose()
                self._done(up)
                kind = "unavailable" if resp.status_code == 503 else "error"
                self.metrics.upstream_errors.labels(up.name, kind).inc()
                up.ready = False
                last = f"{kind}: {up.name} answered {resp.status_code}"
                continue
            self.metrics.upstream_seconds.labels(up.name).observe(time.monotonic() - t0)
            self.metrics.requests.labels(up.name, str(resp.status_code)).inc()
            out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                           if k.lower() not in HOP_BY_HOP]
            out_headers.append((REPLICA_HEADER.lower().encode(), up.name.encode()))
            return _Relay(resp, out_headers, functools.partial(self._done, up))
        self.metrics.unavailable.inc()
        self.metrics.requests.labels("none", "503").inc()
        return JSONResponse({"error": {"message": f"no replica can serve this request now ({last}); retry",
                                       "type": "service_unavailable", "param": None, "code": 503}},
                            status_code=503, headers={"Retry-After": "1"})

    def _done(self, up: Upstream) -> None:
        if up.in_flight > 0:
            up.in_flight -= 1
            self.metrics.in_flight.labels(up.name).dec()


class _Relay(Response):
    """The replica's response, passed through as it arrives. The next chunk is read from the replica only
    after the client took the last one (back-pressure); a client that goes away (its disconnect, or a failed
    send) ends the relay at once and closes the upstream connection, so the replica aborts the request; the
    router's accounting is settled whatever happens."""

    def __init__(self, upstream: httpx.Response, headers: list[tuple[bytes, bytes]], done: Callable[[], None]
                 ) -> None:
        self.upstream, self.raw_headers, self.done = upstream, headers, done
        self.status_code = upstream.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def relay() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            async with anyio.create_task_group() as tg:
                async def first(fn: Callable[[], Awaitable[None]]) -> None:
                    await fn()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, relay)
                tg.start_soon(first, disconnected)
        except (OSError, httpx.HTTPError):  # the client, or the replica, went away mid-stream
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.done()
