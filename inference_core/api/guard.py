"""Who may call the model API (/v1/*), and how often: authentication, a rate and a concurrency limit per
client, and a body size limit, as plain ASGI middleware in front of the routes."""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response
from prometheus_client import Counter

from inference_core.api.schemas import openai_error
from inference_core.security import Authenticator, AuthError, RateLimiter


@dataclass
class Guard:
    """Who may call the model API (/v1/*), and how often: authentication with the ``infer`` scope, then a
    token bucket per client (the token's subject, else the peer address), then a body size limit."""

    auth: Authenticator = field(default_factory=Authenticator)
    limiter: RateLimiter | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_concurrent: int = 0  # requests (streams included) in flight per client; 0: no limit
    # a load balancer (sentinel's router) proves itself with this token in X-Sentinel-Proxy; only then is its
    # X-Forwarded-For the client's address (for the rate limits). Without it, the header is ignored.
    proxy_token: str | None = None


class GuardMiddleware:
    """``Guard`` as plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would hide a client's
    disconnect from streaming responses): before anything is read, authentication, the client's rate and
    the body's declared size."""

    def __init__(self, app: Any, gate: Guard, refused: Counter) -> None:
        self.app, self.gate, self.refused = app, gate, refused
        self.in_flight: dict[str, int] = {}  # per client; only the event loop's thread touches it

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        who, response = self.check(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        limit = self.gate.max_concurrent
        if limit and self.in_flight.get(who, 0) >= limit:
            self.refused.labels("concurrency").inc()
            resp = openai_error(429, f"{limit} requests of this client are already in flight", "rate_limit_error")
            resp.headers["Retry-After"] = "1"
            await resp(scope, receive, send)
            return
        self.in_flight[who] = self.in_flight.get(who, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight[who] -= 1
                if not self.in_flight[who]:
                    del self.in_flight[who]

        # A stream may outlive the app's own call: the request counts until its last body message is sent,
        # or the client goes away.
        async def send_counted(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()

        async def receive_counted() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect":
                release()
            return message

        try:
            await self.app(scope, receive_counted, send_counted)
        except BaseException:
            release()
            raise

    def check(self, scope: dict[str, Any]) -> tuple[str, Response | None]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        gate = self.gate
        try:
            who = gate.auth.authenticate(headers.get("authorization"), "infer")
        except AuthError as exc:
            self.refused.labels("unauthenticated" if exc.status == 401 else "forbidden").inc()
            resp = openai_error(exc.status, str(exc), "authentication_error" if exc.status == 401
                                else "permission_error")
            if exc.status == 401:
                resp.headers["WWW-Authenticate"] = "Bearer"
            return "", resp
        if who == "anonymous":
            client = scope.get("client")
            addr = client[0] if client else "?"
            forwarded = headers.get("x-forwarded-for")
            proof = headers.get("x-sentinel-proxy")
            if forwarded and proof and gate.proxy_token and hmac.compare_digest(proof.encode(),
                                                                                gate.proxy_token.encode()):
                addr = forwarded.split(",")[0].strip() or addr  # the router sets it to its own peer
            who = f"addr:{addr}"
        if gate.limiter is not None:
            wait = gate.limiter.take(who)
            if wait > 0:
                self.refused.labels("rate_limited").inc()
                resp = openai_error(429, f"rate limit exceeded ({gate.limiter.rate:g} requests/s, bursts of "
                                    f"{gate.limiter.burst}); retry in {wait:.1f}s", "rate_limit_error")
                resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return who, resp
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > gate.max_body_bytes):
            self.refused.labels("too_large").inc()
            return who, openai_error(413, f"request body over {gate.max_body_bytes} bytes", "invalid_request_error")
        return who, None
