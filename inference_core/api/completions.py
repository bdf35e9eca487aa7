"""OpenAI's model API: /v1/models, /v1/completions and /v1/chat/completions, streamed or not, with vLLM's
extensions (token ids in and out, ignore_eos, min_tokens, stop_token_ids). Requests go to the engine as
``n`` engine requests (all or none); answers are shaped here: text, log-probabilities, usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from inference_core.api.schemas import (
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    Shape,
    openai_error,
    sse,
)
from inference_core.api.slot import EngineSlot
from inference_core.engine import Delta, Engine, EngineUnhealthy, InvalidRequest, QueueFull, RequestFailed, Result
from inference_core.openai_format import chat_logprobs, completion_logprobs, echo_entries, entries
from inference_core.sampling import TokenLogprob


def check(engine: Engine, model_name: str, body: CommonRequest, ids: list[int],
          max_tokens: int | None) -> JSONResponse | None:
    """The OpenAI error for a request this replica cannot take as asked, or None."""
    if body.model != model_name:
        return openai_error(404, f"model {body.model!r} not found; served: {model_name!r}", "invalid_request_error",
                            "model")
    if engine.draining:
        return openai_error(503, "replica is draining", "server_error")
    want = max_tokens or 16
    if not ids:
        return openai_error(400, "prompt is empty", "invalid_request_error", "prompt")
    top = engine.vocab_size - 1
    bad = next((t for t in ids if not 0 <= t <= top), None)
    if bad is not None:
        return openai_error(400, f"token id {bad} is outside the vocabulary (0..{top})", "invalid_request_error",
                            "prompt")
    bad = next((t for t in body.stop_token_ids or () if not 0 <= t <= top), None)
    if bad is not None:
        return openai_error(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{top})",
                            "invalid_request_error", "stop_token_ids")
    if len(ids) + want > engine.max_model_len:
        return openai_error(400, f"prompt ({len(ids)} tokens) plus max_tokens ({want}) exceeds the context "
                            f"length {engine.max_model_len}", "invalid_request_error", "prompt")
    return None


class _Chunks:
    """The server-sent events of one streamed answer: each choice's chunks, in chat's or completions' shape."""

    def __init__(self, engine: Engine, model_name: str, rid: str, created: int, out: Shape, prompt_ids: list[int],
                 choices: int) -> None:
        self.tok = engine.tokenizer
        self.out, self.prompt_ids, self.model_name, self.created = out, prompt_ids, model_name, created
        self.obj = "chat.completion.chunk" if out.chat else "text_completion"
        self.ident = f"chatcmpl-{rid}" if out.chat else f"cmpl-{rid}"
        self.offsets = [0] * choices  # completions: text_offset continues across chunks
        self.sent_prompt_ids = [False] * choices

    def event(self, doc: dict[str, Any]) -> str:
        return sse({"id": self.ident, "object": self.obj, "created": self.created, "model": self.model_name, **doc})

    def chunk(self, i: int, text: str | None, finish: str | None, first: bool = False,
              lps: list[TokenLogprob] | None = None, echo: Delta | Result | None = None,
              token_ids: list[int] | None = None) -> str:
        out = self.out
        lp: dict[str, Any] | None = None
        if out.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            if out.logprobs is not None and lps:
                lp = chat_logprobs(self.tok, lps, out.tokens_as_ids)
            choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            if out.logprobs is not None and (lps or echo is not None):
                items = entries(lps or [])
                if echo is not None:
                    items = echo_entries(self.prompt_ids, echo.prompt_logprobs) + items
                lp, self.offsets[i] = completion_logprobs(self.tok, items, self.offsets[i], out.tokens_as_ids)
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if out.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
            if not self.sent_prompt_ids[i]:
                self.sent_prompt_ids[i] = True
                choice["prompt_token_ids"] = self.prompt_ids
        return self.event({"choices": [choice]})

    def usage(self, completion: int) -> str:
        n = len(self.prompt_ids)
        return self.event({"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": completion,
                                                    "total_tokens": n + completion}})


class Completions:
    """The routes' work, on the slot's engine: admission, the engine requests, and the answer's shape."""

    def __init__(self, slot: EngineSlot, model_name: str, tokens_as_token_ids: bool = False) -> None:
        self.slot, self.model_name, self.tokens_as_token_ids = slot, model_name, tokens_as_token_ids

    def as_ids(self, body: CommonRequest) -> bool:
        flag = body.return_tokens_as_token_ids
        return self.tokens_as_token_ids if flag is None else flag

    def submit(self, engine: Engine, body: CommonRequest, ids: list[int], max_tokens: int, out: Shape,
               rid: str) -> list[str] | JSONResponse:
        """``body.n`` engine requests, all or none (the error answer when none)."""
        submitted: list[str] = []
        prompt_lp = out.logprobs if out.echo and out.logprobs is not None else None
        try:
            for i in range(body.n):
                params = body.params(i, max_tokens, out.logprobs, prompt_lp)
                submitted.append(engine.submit(ids, params, f"{rid}-{i}"))
        except (QueueFull, EngineUnhealthy, InvalidRequest) as exc:
            for r in submitted:
                engine.abort(r)
            if isinstance(exc, QueueFull):
                return openai_error(429, str(exc), "rate_limit_error")
            if isinstance(exc, InvalidRequest):
                return openai_error(400, str(exc), "invalid_request_error", "prompt")
            return openai_error(503, str(exc), "server_error")
        return submitted

    async def run(self, engine: Engine, body: CommonRequest, ids: list[int], max_tokens: int, out: Shape,
                  raw: Request) -> Response:
        rid = uuid.uuid4().hex
        created = int(time.time())
        submitted = self.submit(engine, body, ids, max_tokens, out, rid)
        if isinstance(submitted, JSONResponse):
            return submitted
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            chunks = _Chunks(engine, self.model_name, rid, created, out, ids, len(submitted))
            return StreamingResponse(self.stream(engine, submitted, chunks, include_usage),
                                     media_type="text/event-stream")
        gathered = asyncio.ensure_future(asyncio.gather(*(self.collect(engine, r) for r in submitted)))
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
        return JSONResponse(self.answer(engine, body, ids, out, rid, created, results))

    def answer(self, engine: Engine, body: CommonRequest, ids: list[int], out: Shape, rid: str, created: int,
               results: list[Result]) -> dict[str, Any]:
        """The whole (not streamed) answer's document."""
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
            return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created,
                    "model": self.model_name, "choices": choices, "usage": usage}
        head = out.prompt_text if out.echo else ""
        texts = []
        for i, res in enumerate(results):
            lp = None
            if out.logprobs is not None:
                items = (echo_entries(ids, res.prompt_logprobs) if out.echo else []) + entries(res.logprobs)
                lp, _ = completion_logprobs(tok, items, 0, out.tokens_as_ids)
            texts.append({"index": i, "text": head + res.text, "logprobs": lp, "finish_reason": res.finish_reason,
                          **ids_of(res.token_ids)})
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": self.model_name,
                "choices": texts, "usage": usage}

    @staticmethod
    async def collect(engine: Engine, request_id: str) -> Result:
        async for item in engine.stream(request_id):
            if isinstance(item, Result):
                return item
        raise RequestFailed("stream ended without a result")

    async def stream(self, engine: Engine, request_ids: list[str], chunks: _Chunks,
                     include_usage: bool) -> AsyncIterator[str]:
        out = chunks.out
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
            if out.chat:
                for i in range(len(request_ids)):
                    yield chunks.chunk(i, None, None, first=True)
            pending = len(request_ids)
            while pending:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    err = {"message": f"inference failed: {item}", "type": "server_error", "param": None, "code": None}
                    yield sse({"error": err})
                    pending -= 1
                    continue
                if not echoed[i]:  # the prompt first, with its log-probabilities when asked
                    echoed[i] = True
                    yield chunks.chunk(i, out.prompt_text, None, echo=item)
                if isinstance(item, Delta):
                    yield chunks.chunk(i, item.text, None, lps=item.logprobs, token_ids=item.token_ids)
                else:
                    completion += len(item.token_ids)
                    yield chunks.chunk(i, None if out.chat else "", item.finish_reason)
                    pending -= 1
            if include_usage:
                yield chunks.usage(completion)
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()  # the client went away: engine.stream's cleanup aborts the requests

    async def completion(self, body: CompletionRequest, raw: Request) -> Response:
        engine = self.slot.require()
        if isinstance(body.prompt, str):
            ids, text = engine.tokenizer.encode(body.prompt), body.prompt
        else:
            ids = list(body.prompt)
            text = ""
        if bad := check(engine, self.model_name, body, ids, body.max_tokens):
            return bad
        if body.echo and not isinstance(body.prompt, str):
            text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        shape = Shape(False, body.logprobs, body.echo, text, body.return_token_ids, self.as_ids(body))
        return await self.run(engine, body, ids, body.max_tokens or 16, shape, raw)

    async def chat(self, body: ChatRequest, raw: Request) -> Response:
        engine = self.slot.require()
        prompt = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        ids = engine.tokenizer.encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if bad := check(engine, self.model_name, body, ids, max_tokens):
            return bad
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            return openai_error(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
        shape = Shape(True, logprobs, False, "", body.return_token_ids, self.as_ids(body))
        return await self.run(engine, body, ids, max_tokens or min(256, engine.max_model_len - len(ids)), shape, raw)


def completions_router(slot: EngineSlot, model_name: str, tokens_as_token_ids: bool = False) -> APIRouter:
    router = APIRouter()
    api = Completions(slot, model_name, tokens_as_token_ids)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = slot.require()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "inference_core", "max_model_len": engine.max_model_len}]}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await api.completion(body, raw)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, raw: Request) -> Response:
        return await api.chat(body, raw)

    return router
