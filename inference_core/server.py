"""OpenAI-compatible HTTP API (completions and chat completions, streaming or not), /health, /ready,
/metrics, and — only when started with faults enabled — the fault switch for drills.

Run: ``python -m inference_core.server --model-dir DIR --port 8000 [--log-dir DIR] [--enable-faults]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, StringConstraints

from inference_core.apidoc import AllowHeader, document
from inference_core.client import Drain, Health, Load, Ready
from inference_core.engine import (
    Delta,
    Engine,
    EngineConfig,
    EngineUnhealthy,
    InvalidRequest,
    QueueFull,
    RequestFailed,
    Result,
)
from inference_core.faults import FaultSwitch
from inference_core.integrity import MANIFEST, default_cache_dir, verify_cached
from inference_core.memory import KVCacheTooSmall, parse_bytes
from inference_core.openai_format import chat_logprobs, completion_logprobs, echo_entries, entries
from inference_core.placement import apply, parse_budgets, plan
from inference_core.quantize import quantize_int8
from inference_core.sampling import SamplingParams, TokenLogprob
from inference_core.security import Authenticator, AuthError, RateLimiter, server_config
from inference_core.telemetry import BusyTracker, Metrics, request_logger, rss_bytes
from inference_core.tokenizer import TextTokenizer
from inference_core.tp_worker import Peers, load_shard
from inference_core.weights import load_model

ADMIN_TOKEN_ENV = "INFERENCE_ADMIN_TOKEN"
PROXY_TOKEN_ENV = "INFERENCE_PROXY_TOKEN"  # a trusted load balancer's token (X-Sentinel-Proxy)


class _Common(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**53 - 1)  # the largest integer every JSON client sends exactly
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=16)
    user: str | None = None
    # vLLM's extensions
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # vLLM: each choice carries prompt_token_ids and token_ids
    return_tokens_as_token_ids: bool | None = None  # vLLM: tokens as "token_id:N" (default: the server's flag)

    def params(self, i: int, default_max: int, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + i
        return SamplingParams(self.max_tokens or default_max, self.temperature, self.top_p, self.top_k, seed,
                              tuple(s for s in stop if s), tuple(self.stop_token_ids or ()), self.ignore_eos,
                              self.min_tokens, logprobs, prompt_logprobs, self.skip_special_tokens)


class CompletionRequest(_Common):
    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]],
                                                                        Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class FaultRequest(BaseModel):
    cuda_error: bool | None = None
    latency_ms: float | None = Field(None, ge=0.0, le=600_000.0)
    hang: bool | None = None
    crash: bool | None = None
    oom: bool | None = None
    leak_mb_per_step: float | None = Field(None, ge=0.0, le=1024.0)
    leak_mb_per_s: float | None = Field(None, ge=0.0, le=1024.0)
    step_error: bool | None = None
    engine_bug: bool | None = None


@dataclass(frozen=True)
class _Shape:
    """How the answer is shaped: chat or completion, log-probabilities (top-N), echo of the prompt."""

    chat: bool
    logprobs: int | None
    echo: bool
    prompt_text: str
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # logprobs' tokens as "token_id:N"


def openai_error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": None}})


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


class EngineSlot:
    """The engine once the model has loaded. Until then (or after a failed load) every use of it answers
    503, while /health stays up (liveness) and /ready says why it is not ready."""

    def __init__(self, engine: Engine | None = None) -> None:
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "load_error", None)

    @property
    def loading(self) -> bool:
        return self.engine is None and self.load_error is None

    def __getattr__(self, name: str) -> Any:
        raise HTTPException(503, f"model failed to load: {self.load_error}" if self.load_error else
                            "model is loading")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("engine", "load_error"):
            object.__setattr__(self, name, value)
        elif self.engine is not None:
            setattr(self.engine, name, value)
        else:
            raise HTTPException(503, "model is loading")


class _Proxy:
    """Forwards to the slot's engine (so the routes below read like they hold the engine itself)."""

    def __init__(self, slot: EngineSlot) -> None:
        object.__setattr__(self, "_slot", slot)

    def __getattr__(self, name: str) -> Any:
        slot: EngineSlot = object.__getattribute__(self, "_slot")
        return getattr(slot.engine, name) if slot.engine is not None else getattr(slot, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_slot"), name, value)


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


def create_app(slot: EngineSlot | Engine, model_name: str, registry: CollectorRegistry,
               faults: FaultSwitch | None = None, admin_token: str | None = None,
               lifespan: Any = None, guard: Guard | None = None, tokens_as_token_ids: bool = False) -> FastAPI:
    holder = slot if isinstance(slot, EngineSlot) else EngineSlot(slot)

    def as_ids(body: _Common) -> bool:
        return tokens_as_token_ids if body.return_tokens_as_token_ids is None else body.return_tokens_as_token_ids

    engine: Any = _Proxy(holder)
    app = FastAPI(title="inference_core", version="0.2.0", lifespan=lifespan)
    gate = guard or Guard()

    refused = Counter("inference_requests_refused_total", "Model API requests refused before reaching the engine.",
                      ["reason"], registry=registry)
    app.add_middleware(GuardMiddleware, gate=gate, refused=refused)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # the deepest error: of a union's branches, the one that got furthest into the value (for prompt=[-1],
        # the token id, not "not a string"); pydantic's branch tags are left out of the parameter's name
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = ".".join(str(p) for p in first["loc"] if p != "body" and (isinstance(p, int) or str(p).isidentifier()))
        got = first.get("input")
        shown = f" (got {got!r})" if isinstance(got, int | float | str) and len(repr(got)) <= 80 else ""
        return openai_error(400, f"{param}: {first['msg']}{shown}", "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:  # OpenAI's error shape for every error
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
        resp = openai_error(exc.status_code, str(exc.detail), kind)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.get("/health")
    async def health() -> JSONResponse:
        if holder.engine is None:  # alive while loading; a failed load is not healthy
            if holder.load_error:
                return JSONResponse(Health(status="unhealthy", load_error=holder.load_error).body(), status_code=503)
            return JSONResponse(Health(status="loading", pid=os.getpid()).body())
        if engine.healthy:  # layout: "moving" while the weights move into huge pages after ready, then "done"
            return JSONResponse(Health(status="ok", pid=os.getpid(),
                                       layout="moving" if engine.layout_pending else "done").body())
        return JSONResponse(Health(status="unhealthy", cuda_error=engine.cuda_error, stalled=engine.stalled,
                                   pid=os.getpid()).body(), status_code=503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if holder.engine is None:
            return JSONResponse(Ready(ready=False, loading=holder.loading, load_error=holder.load_error).body(),
                                status_code=503)
        if not engine.healthy or engine.draining:
            return JSONResponse(Ready(ready=False, draining=engine.draining, healthy=engine.healthy).body(),
                                status_code=503)
        return JSONResponse(Ready(ready=True).body())

    @app.get("/load")
    async def load() -> JSONResponse:
        """What a load balancer needs, cheaply: whether to send anything, and the work outstanding here
        (tokens still to compute: prompts not yet prefilled plus completions not yet generated)."""
        if holder.engine is None:
            return JSONResponse(Load(ready=False, loading=holder.loading, load_error=holder.load_error).body(),
                                status_code=503)
        doc = Load(ready=engine.healthy and not engine.draining, healthy=engine.healthy,
                   draining=engine.draining, **engine.load())
        return JSONResponse(doc.body(), status_code=200 if doc.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "inference_core", "max_model_len": engine.max_model_len}]}

    def check(body: _Common, ids: list[int], max_tokens: int | None) -> JSONResponse | None:
        if body.model != model_name:
            return openai_error(404, f"model {body.model!r} not found; served: {model_name!r}", "invalid_request_error",
                                "model")
        if engine.draining:
            return openai_error(503, "replica is draining", "server_error")
        want = max_tokens or 16
        if not ids:
            return openai_error(400, "prompt is empty", "invalid_request_error", "prompt")
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            return openai_error(400, f"token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})",
                                "invalid_request_error", "prompt")
        bad = next((t for t in body.stop_token_ids or () if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            return openai_error(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{engine.vocab_size - 1})",
                                "invalid_request_error", "stop_token_ids")
        if len(ids) + want > engine.max_model_len:
            return openai_error(400, f"prompt ({len(ids)} tokens) plus max_tokens ({want}) exceeds the context "
                                f"length {engine.max_model_len}", "invalid_request_error", "prompt")
        return None

    async def run(body: _Common, ids: list[int], max_tokens: int, out: _Shape, raw: Request) -> Response:
        rid = uuid.uuid4().hex
        created = int(time.time())
        ids_per_choice: list[str] = []
        prompt_lp = out.logprobs if out.echo and out.logprobs is not None else None
        try:
            for i in range(body.n):
                ids_per_choice.append(engine.submit(ids, body.params(i, max_tokens, out.logprobs, prompt_lp),
                                                    f"{rid}-{i}"))
        except (QueueFull, EngineUnhealthy, InvalidRequest) as exc:
            for r in ids_per_choice:  # all choices or none
                engine.abort(r)
            if isinstance(exc, QueueFull):
                return openai_error(429, str(exc), "rate_limit_error")
            if isinstance(exc, InvalidRequest):
                return openai_error(400, str(exc), "invalid_request_error", "prompt")
            return openai_error(503, str(exc), "server_error")
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(ids_per_choice, rid, created, out, ids, include_usage),
                                     media_type="text/event-stream")
        gathered = asyncio.ensure_future(asyncio.gather(*(_collect(r) for r in ids_per_choice)))
        while not gathered.done():
            await asyncio.wait({gathered}, timeout=0.25)
            if not gathered.done() and await raw.is_disconnected():
                gathered.cancel()  # the client went away: cancelling the streams aborts the requests
                gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
                return Response(status_code=499)
        try:
            results = gathered.result()
        except RequestFailed as exc:
            return openai_error(500, f"inference failed: {exc}", "server_error")
        completion = sum(len(r.token_ids) for r in results)
        usage: dict[str, Any] = {"prompt_tokens": len(ids), "completion_tokens": completion,
                                 "total_tokens": len(ids) + completion}
        cached = max(r.cached_tokens for r in results)
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        tok = engine.tokenizer

        def ids_of(token_ids: list[int]) -> dict[str, Any]:
            return {"prompt_token_ids": ids, "token_ids": token_ids} if body.return_token_ids else {}

        if out.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": chat_logprobs(tok, r.logprobs, out.tokens_as_ids) if out.logprobs is not None
                        else None,
                        "finish_reason": r.finish_reason, **ids_of(r.token_ids)} for i, r in enumerate(results)]
            return JSONResponse({"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created,
                                 "model": model_name, "choices": choices, "usage": usage})
        head = out.prompt_text if out.echo else ""
        texts = []
        for i, res in enumerate(results):
            lp = None
            if out.logprobs is not None:
                items = (echo_entries(ids, res.prompt_logprobs) if out.echo else []) + entries(res.logprobs)
                lp, _ = completion_logprobs(tok, items, 0, out.tokens_as_ids)
            texts.append({"index": i, "text": head + res.text, "logprobs": lp, "finish_reason": res.finish_reason,
                          **ids_of(res.token_ids)})
        return JSONResponse({"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model_name,
                             "choices": texts, "usage": usage})

    async def _collect(request_id: str) -> Result:
        async for item in engine.stream(request_id):
            if isinstance(item, Result):
                return item
        raise RequestFailed("stream ended without a result")

    async def _stream(request_ids: list[str], rid: str, created: int, out: _Shape, prompt_ids: list[int],
                      include_usage: bool) -> AsyncIterator[str]:
        chat = out.chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        ident = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"
        tok = engine.tokenizer
        offsets = [0] * len(request_ids)  # completions: text_offset continues across chunks
        sent_prompt_ids = [False] * len(request_ids)

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False,
                  lps: list[TokenLogprob] | None = None, echo: Delta | Result | None = None,
                  token_ids: list[int] | None = None) -> str:
            lp: dict[str, Any] | None = None
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {})
                if out.logprobs is not None and lps:
                    lp = chat_logprobs(tok, lps, out.tokens_as_ids)
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                if out.logprobs is not None and (lps or echo is not None):
                    items = entries(lps or [])
                    if echo is not None:
                        items = echo_entries(prompt_ids, echo.prompt_logprobs) + items
                    lp, offsets[i] = completion_logprobs(tok, items, offsets[i], out.tokens_as_ids)
                choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            if out.return_token_ids and token_ids is not None:
                choice["token_ids"] = token_ids
                if not sent_prompt_ids[i]:
                    sent_prompt_ids[i] = True
                    choice["prompt_token_ids"] = prompt_ids
            return _sse({"id": ident, "object": obj, "created": created, "model": model_name, "choices": [choice]})

        queue: asyncio.Queue[tuple[int, Delta | Result | BaseException]] = asyncio.Queue()

        async def pump(i: int, request_id: str) -> None:
            try:
                async for item in engine.stream(request_id):
                    await queue.put((i, item))
            except BaseException as exc:  # forwarded to the client as an error event
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(request_ids)]
        completion = 0
        echoed = [not out.echo] * len(request_ids)
        try:
            if chat:
                for i in range(len(request_ids)):
                    yield chunk(i, None, None, first=True)
            pending = len(request_ids)
            while pending:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    err = {"message": f"inference failed: {item}", "type": "server_error", "param": None, "code": None}
                    yield _sse({"error": err})
                    pending -= 1
                    continue
                if not echoed[i]:  # the prompt first, with its log-probabilities when asked
                    echoed[i] = True
                    yield chunk(i, out.prompt_text, None, echo=item)
                if isinstance(item, Delta):
                    yield chunk(i, item.text, None, lps=item.logprobs, token_ids=item.token_ids)
                else:
                    completion += len(item.token_ids)
                    yield chunk(i, None if chat else "", item.finish_reason)
                    pending -= 1
            if include_usage:
                yield _sse({"id": ident, "object": obj, "created": created, "model": model_name, "choices": [],
                            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                                      "total_tokens": len(prompt_ids) + completion}})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()  # the client went away: engine.stream's cleanup aborts the requests

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        if isinstance(body.prompt, str):
            ids, text = engine.tokenizer.encode(body.prompt), body.prompt
        else:
            ids = list(body.prompt)
            text = ""
        if bad := check(body, ids, body.max_tokens):
            return bad
        if body.echo and not isinstance(body.prompt, str):
            text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        shape = _Shape(False, body.logprobs, body.echo, text, body.return_token_ids, as_ids(body))
        return await run(body, ids, body.max_tokens or 16, shape, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, raw: Request) -> Response:
        prompt = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        ids = engine.tokenizer.encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if bad := check(body, ids, max_tokens):
            return bad
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            return openai_error(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
        return await run(body, ids, max_tokens or min(256, engine.max_model_len - len(ids)),
                         _Shape(True, logprobs, False, "", body.return_token_ids, as_ids(body)), raw)

    def authorize(authorization: str | None) -> None:
        expected = f"Bearer {admin_token}" if admin_token else None
        if expected is None or not hmac.compare_digest((authorization or "").encode(), expected.encode()):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <admin token>'")

    @app.post("/admin/drain")
    async def drain(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        authorize(authorization)
        engine.draining = True  # new requests get 503 (and /ready 503, so balancers stop sending)
        return Drain(draining=True, in_flight=engine.in_flight).body()

    if faults is not None:
        @app.post("/admin/faults")
        async def set_faults(body: FaultRequest,
                             authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
            authorize(authorization)
            return vars(faults.arm(**body.model_dump()))

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


class IntegrityError(RuntimeError):
    """A model file does not match the directory's integrity manifest."""


def process_age(proc_root: Path = Path("/proc")) -> float:
    """Seconds since this process started (its imports included), from /proc; 0.0 where unreadable."""
    try:
        start_ticks = int((proc_root / "self" / "stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float((proc_root / "uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _exit_soon(reason: str) -> None:
    """The engine's step loop died: /health already answers 503; leave so a supervisor restarts us."""
    print(f"engine failed, exiting: {reason}", file=sys.stderr, flush=True)
    threading.Timer(0.5, os._exit, (70,)).start()  # EX_SOFTWARE, after in-flight answers are written


def build(model_dir: Path, log_dir: Path | None, enable_faults: bool, admin_token: str | None,
          served_name: str | None = None, config: EngineConfig | None = None, log_text: bool = False,
          max_memory: str | None = None, offload_folder: Path | None = None, verify_integrity: bool = True,
          quantization: str | None = None, tensor_parallel_size: int = 1, guard: Guard | None = None,
          integrity_cache: Path | None = None, tokens_as_token_ids: bool = False) -> FastAPI:
    """The app starts serving at once; the model loads in the background (/ready is 503 until then)."""
    registry = CollectorRegistry()
    busy = BusyTracker()
    limit = config.memory_limit if config is not None else None
    metrics = Metrics(registry, busy, memory_limit=limit)
    faults = FaultSwitch(memory_limit=limit) if enable_faults else None
    slot = EngineSlot()

    def load() -> None:
        t0 = time.monotonic()
        runtime = rss_bytes()  # the process before the weights: part of the memory plan
        stages: dict[str, float] = {"process start": process_age()}
        mark = t0

        def lap(stage: str) -> None:
            nonlocal mark
            stages[stage] = time.monotonic() - mark
            mark = time.monotonic()

        try:
            if verify_integrity and (model_dir / MANIFEST).exists():  # the seed's MD5 check, before serving
                problems, unchanged = verify_cached(model_dir, integrity_cache)
                if unchanged:
                    print(f"integrity: {model_dir} unchanged since its last verification (inode, size, mtime, "
                          "ctime); hashes skipped", file=sys.stderr, flush=True)
                mismatched = [p for p in problems if not p.endswith("not in the manifest")]
                for p in problems:
                    print(f"integrity: {model_dir}/{p}", file=sys.stderr, flush=True)
                if mismatched:
                    raise IntegrityError(f"{model_dir}/{MANIFEST}: {'; '.join(mismatched)} "
                                         "(--skip-integrity-check serves it anyway)")
            lap("integrity")
            peers = None
            if tensor_parallel_size > 1:  # start ranks 1..N-1, then keep this rank's shard
                peers = Peers(model_dir, tensor_parallel_size, quantization)
                peers.watch(_exit_soon)
                model = load_shard(model_dir, 0, tensor_parallel_size, quantization)
            else:
                model = load_model(model_dir)
                if quantization == "int8":
                    quantize_int8(model)
            if max_memory:
                placement = plan(model.config, parse_budgets(max_memory), next(model.parameters()).element_size(),
                                 offload=offload_folder is not None)
                print(f"device map for {model_dir}:\n{placement.describe()}", file=sys.stderr, flush=True)
                apply(model, placement, offload_folder)
            lap("weights")
            tokenizer = TextTokenizer.from_dir(model_dir)
            lap("tokenizer")
            cfg = dataclasses.replace(config or EngineConfig(), runtime_bytes=runtime)
            engine = Engine(model, tokenizer, metrics, request_logger(log_dir), busy, faults, cfg, log_text,
                            on_fatal=_exit_soon, peers=peers)
        except KVCacheTooSmall as exc:  # the flags cannot work on this machine: refuse to start
            slot.load_error = f"{type(exc).__name__}: {exc}"
            print(f"cannot serve {model_dir}: {exc}", file=sys.stderr, flush=True)
            threading.Timer(0.2, os._exit, (2,)).start()
            return
        except Exception as exc:  # any other load failure is reported by /health and /ready, not a crash loop
            slot.load_error = f"{type(exc).__name__}: {exc}"
            metrics.model_load_failed.set(1)
            print(f"model load failed: {slot.load_error}", file=sys.stderr, flush=True)
            return
        if engine.plan is not None:
            print(engine.plan.describe(), file=sys.stderr, flush=True)
        stages |= engine.startup
        total = stages["process start"] + time.monotonic() - t0
        print(f"ready {total:.1f}s after the process started: " + ", ".join(
            f"{k} {v:.2f}s" for k, v in stages.items()), file=sys.stderr, flush=True)
        metrics.model_load.set(time.monotonic() - t0)
        metrics.model_info.info({"model": served_name or model_dir.name, "model_type": model.config.model_type,
                                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                                 "quantization": quantization or "none",
                                 "tensor_parallel_size": str(tensor_parallel_size)})
        slot.engine = engine

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield

    return create_app(slot, served_name or model_dir.name, registry, faults, admin_token, lifespan, guard,
                      tokens_as_token_ids)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="inference_core.server", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-dir", type=Path, default=None, help="JSON request logs (default: stderr)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + output); default: the config's, lowered to what the KV cache holds")
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="share of the device's memory for weights, activations and KV cache (default 0.9 on a GPU; "
                   "on a CPU the default KV cache is what --max-num-seqs sequences of 2048 tokens need, at most "
                   "4 GiB, as vLLM's CPU backend)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size (e.g. 4GiB), instead of sizing it from --memory-utilization")
    p.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="on a CPU, the memory this replica may use (e.g. 8GiB), when the container's cgroup does not "
                   "say: reported as memory_limit_bytes and planned against; default: the cgroup's limit, else "
                   "the host's memory")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of repeated prompt prefixes")
    p.add_argument("--quantization", choices=["int8"], default=None,
                   help="int8: weight-only, per-row int8 with fp16 scales (the seed's 25%% size)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard every layer over N processes (gloo on a CPU, nccl on GPUs)")
    p.add_argument("--skip-integrity-check", action="store_true",
                   help="serve even if files differ from the model directory's integrity.json (MD5/SHA-256)")
    p.add_argument("--integrity-cache", type=Path, default=default_cache_dir(),
                   help="remember a passed verification here and skip the hashes while the files are unchanged "
                   "(inode, size, mtime, ctime): a restart does not rehash the checkpoint (default: %(default)s)")
    p.add_argument("--no-integrity-cache", dest="integrity_cache", action="store_const", const=None,
                   help="hash every file at every start")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens 'token_id:N' (vLLM's flag; a request's return_tokens_as_token_ids "
                   "overrides it): byte tokens that are parts of one character all read as U+FFFD otherwise")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run decode steps eagerly (default: replay them as CUDA graphs, padded to captured "
                   "batch sizes and context widths up to 8192 slots)")
    p.add_argument("--max-num-waiting", type=int, default=256, help="queue length before 429")
    p.add_argument("--stall-timeout", type=float, default=30.0, help="seconds without a step before /health fails")
    p.add_argument("--log-text", action="store_true", help="log completion text (off: never logged)")
    p.add_argument("--max-memory", default=None,
                   help="device budgets, e.g. cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB: layers fill them in order")
    p.add_argument("--offload-folder", type=Path, default=None, help="layers that fit no budget go here (disk)")
    sec = p.add_argument_group("security (the seed's section 5)")
    sec.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS, TLS 1.3 only, with this certificate")
    sec.add_argument("--tls-key", type=Path, default=None)
    sec.add_argument("--tls-client-ca", type=Path, default=None, help="mutual TLS: clients need a certificate "
                     "signed by this CA")
    sec.add_argument("--api-key-hash", action="append", default=[], metavar="SHA256",
                     help="accept the API key with this SHA-256 (hex; repeatable; `sentinel token hash` makes one)")
    sec.add_argument("--jwt-secret-env", default=None, metavar="VAR",
                     help="accept HS256 tokens signed with the secret in this environment variable")
    sec.add_argument("--jwt-public-key", type=Path, default=None, help="accept RS256/ES256 tokens (PEM)")
    sec.add_argument("--jwt-jwks", type=Path, default=None, help="accept RS256/ES256 tokens (a JWKS file)")
    sec.add_argument("--jwt-audience", default=None)
    sec.add_argument("--jwt-issuer", default=None)
    sec.add_argument("--rate-limit", type=float, default=0.0,
                     help="requests/s per client on /v1/* (the seed: 10; 0: none; sentinel starts replicas with 10)")
    sec.add_argument("--rate-burst", type=int, default=20)
    sec.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    sec.add_argument("--max-concurrent-per-client", type=int, default=0,
                     help="requests (streams included) in flight per client; 0: no limit")
    p.add_argument("--enable-faults", action="store_true",
                   help=f"expose POST /admin/faults (needs {ADMIN_TOKEN_ENV})")
    args = p.parse_args(argv)
    if args.memory_utilization is not None and not 0.0 < args.memory_utilization <= 1.0:
        p.error(f"--memory-utilization {args.memory_utilization}: must be in (0, 1]")
    if args.memory_limit is not None and args.memory_limit <= 0:
        p.error(f"--memory-limit {args.memory_limit}: must be a positive size such as 8GiB")
    for flag in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.tensor_parallel_size < 1:
        p.error("--tensor-parallel-size must be at least 1")
    if args.tensor_parallel_size > 1 and args.max_memory:
        p.error("--tensor-parallel-size and --max-memory cannot be combined")
    if args.max_model_len is not None and args.max_model_len < 2:
        p.error("--max-model-len must be at least 2")
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    if args.enable_faults and not token:
        p.error(f"--enable-faults needs the {ADMIN_TOKEN_ENV} environment variable")
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       mode=args.batching, max_num_waiting=args.max_num_waiting, stall_timeout_s=args.stall_timeout,
                       block_size=args.block_size, max_model_len=args.max_model_len,
                       memory_utilization=args.memory_utilization, kv_cache_memory=args.kv_cache_memory,
                       enable_prefix_caching=args.enable_prefix_caching, memory_limit=args.memory_limit,
                       cuda_graphs=not args.enforce_eager)
    secret = None
    if args.jwt_secret_env:
        secret = os.environ.get(args.jwt_secret_env)
        if not secret:
            p.error(f"--jwt-secret-env {args.jwt_secret_env}: that environment variable is empty")
    try:
        auth = Authenticator.from_files(args.api_key_hash, secret, args.jwt_public_key, args.jwt_jwks,
                                        args.jwt_audience, args.jwt_issuer)
        limiter = RateLimiter(args.rate_limit, args.rate_burst) if args.rate_limit > 0 else None
    except (OSError, ValueError) as exc:
        p.error(f"security settings: {exc}")
    guard = Guard(auth, limiter, args.max_body_bytes, max(0, args.max_concurrent_per_client),
                  os.environ.get(PROXY_TOKEN_ENV) or None)
    app = build(args.model_dir, args.log_dir, args.enable_faults, token, args.served_model_name, cfg, args.log_text,
                args.max_memory, args.offload_folder, not args.skip_integrity_check, args.quantization,
                args.tensor_parallel_size, guard, args.integrity_cache, args.return_tokens_as_token_ids)
    try:
        config = server_config(app, args.host, args.port, args.tls_cert, args.tls_key, args.tls_client_ca,
                               log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    except ValueError as exc:
        p.error(str(exc))
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
