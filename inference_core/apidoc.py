"""What an API's OpenAPI document says beyond FastAPI's defaults, for both servers (the model API and
sentinel's): who may call each operation (a bearer scheme with the scope it needs), the answers every
operation can give before reaching its handler (400, 401, 403, 413, 429), and the media types of the
routes that do not answer JSON. Also a 405's ``Allow`` header listing every method of the path, not only
those of the first route that matched (Starlette's behaviour), as RFC 9110 asks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ERROR = {"content": {"application/json": {"schema": {"type": "object"}}}}
COMMON = {"400": "malformed request (unreadable body, a number out of range)",
          "401": "no credentials, or credentials that are not valid",
          "403": "valid credentials without the scope this operation needs",
          "429": "rate limit exceeded (Retry-After says when to come back)"}


def document(app: FastAPI, scope_of: Callable[[str, str], list[dict[str, list[str]]] | None],
             media: Mapping[tuple[str, str], list[str]] | None = None, extra: Mapping[str, str] | None = None,
             description: str = "") -> None:
    """Replace ``app.openapi`` by one that declares the bearer scheme, ``security`` from
    ``scope_of(method, path)`` (None: open), the common error answers, and ``media`` types of 200s."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes, description=description)
        spec.setdefault("components", {})["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT or API key",
            "description": "a JWT (HS256/RS256/ES256; the scopes in its `scope` claim) or a static API key"}}
        answers = {**COMMON, **(extra or {})}
        for path, ops in spec.get("paths", {}).items():
            for method, op in ops.items():
                security = scope_of(method.upper(), path)
                if security is not None:
                    op["security"] = security
                responses = op.setdefault("responses", {})
                for code, text in answers.items():
                    if code == "401" and security is None:
                        continue
                    responses.setdefault(code, {"description": text, **_ERROR})
                if "{" in path:
                    responses.setdefault("404", {"description": "no such item", **_ERROR})
                types = (media or {}).get((method.upper(), path))
                if types:
                    ok = responses.setdefault("200", {"description": "OK"})
                    ok["content"] = {t: ok.get("content", {}).get(t, {"schema": {}}) for t in types}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def flat_routes(routes: list[Any]) -> list[Any]:
    """The routes themselves, with each included router's (FastAPI includes routers lazily, as one entry
    that holds the router: ``original_router``). Included routers here take no prefix."""
    out: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(flat_routes(list(inner.routes)) if inner is not None else [route])
    return out


class AllowHeader:
    """ASGI middleware: a 405 answer's ``Allow`` names every method the path supports."""

    def __init__(self, app: ASGIApp, routes_of: Callable[[], list[Any]]) -> None:
        self.app = app
        self.routes_of = routes_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods: set[str] = set()
                for route in flat_routes(self.routes_of()):
                    match, _ = route.matches({**scope, "method": "GET"})
                    if match != Match.NONE and getattr(route, "methods", None):
                        methods |= set(route.methods)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                headers.append((b"allow", ", ".join(sorted(methods)).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_allow)
