"""The replica's FastAPI app: the guard in front of /v1/*, OpenAI's error shape for every error, the ops
and model routers, and the OpenAPI document's security and media types."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from inference_core.api.completions import completions_router
from inference_core.api.guard import Guard, GuardMiddleware
from inference_core.api.ops import ops_router
from inference_core.api.schemas import openai_error
from inference_core.api.slot import EngineSlot
from inference_core.apidoc import AllowHeader, document
from inference_core.engine import Engine
from inference_core.faults import FaultSwitch


async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
    """A body that does not validate, as OpenAI answers it: 400 naming the parameter."""
    assert isinstance(exc, RequestValidationError)
    # the deepest error: of a union's branches, the one that got furthest into the value (for prompt=[-1],
    # the token id, not "not a string"); pydantic's branch tags are left out of the parameter's name
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ".".join(str(p) for p in first["loc"] if p != "body" and (isinstance(p, int) or str(p).isidentifier()))
    got = first.get("input")
    shown = f" (got {got!r})" if isinstance(got, int | float | str) and len(repr(got)) <= 80 else ""
    return openai_error(400, f"{param}: {first['msg']}{shown}", "invalid_request_error", param)


async def http_error(_: Request, exc: Exception) -> JSONResponse:
    """OpenAI's error shape for every HTTPException (its headers kept: Retry-After, WWW-Authenticate)."""
    assert isinstance(exc, HTTPException)
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
    resp = openai_error(exc.status_code, str(exc.detail), kind)
    for k, v in (exc.headers or {}).items():
        resp.headers[k] = v
    return resp


def create_app(slot: EngineSlot | Engine, model_name: str, registry: CollectorRegistry,
               faults: FaultSwitch | None = None, admin_token: str | None = None,
               lifespan: Any = None, guard: Guard | None = None, tokens_as_token_ids: bool = False) -> FastAPI:
    holder = slot if isinstance(slot, EngineSlot) else EngineSlot(slot)
    app = FastAPI(title="inference_core", version="0.2.0", lifespan=lifespan)
    gate = guard or Guard()
    refused = Counter("inference_requests_refused_total", "Model API requests refused before reaching the engine.",
                      ["reason"], registry=registry)
    app.add_middleware(GuardMiddleware, gate=gate, refused=refused)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(ops_router(holder, registry, faults, admin_token))
    app.include_router(completions_router(holder, model_name, tokens_as_token_ids))

    def scope_of(method: str, path: str) -> list[dict[str, list[str]]] | None:
        if path.startswith("/admin/"):
            return [{"bearer": ["admin"]}]
        if path.startswith("/v1/"):
            return [{"bearer": ["infer"]}] if gate.auth.enabled else [{}, {"bearer": ["infer"]}]
        return None

    document(app, scope_of, media={("GET", "/metrics"): ["text/plain"],
                                   ("POST", "/v1/completions"): ["application/json", "text/event-stream"],
                                   ("POST", "/v1/chat/completions"): ["application/json", "text/event-stream"]},
             extra={"404": "the model named is not served", "413": "request body larger than --max-body-bytes",
                    "503": "draining, loading, or the engine failed (Retry-After when it will pass)"},
             description="OpenAI-compatible model API (completions, chat completions, models)")
    app.add_middleware(AllowHeader, routes_of=lambda: app.routes)
    return app
