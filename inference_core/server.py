"""OpenAI-compatible HTTP API with /health, /ready and /metrics.

Run: ``python -m inference_core.server --model-dir DIR --port 8000 [--log-dir DIR] [--enable-faults]``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from inference_core.engine import Engine, EngineUnhealthy, GenerationRequest, QueueFull
from inference_core.faults import FaultSwitch
from inference_core.telemetry import BusyTracker, Metrics, request_logger
from inference_core.tokenizer import TextTokenizer
from inference_core.weights import load_model

ADMIN_TOKEN_ENV = "INFERENCE_ADMIN_TOKEN"


class CompletionRequest(BaseModel):
    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: Literal[False] = False
    n: Literal[1] = 1


class FaultRequest(BaseModel):
    cuda_error: bool | None = None
    latency_ms: float | None = Field(None, ge=0.0, le=600_000.0)


def openai_error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": None}})


def create_app(engine: Engine, model_name: str, registry: CollectorRegistry,
               faults: FaultSwitch | None = None, admin_token: str | None = None) -> FastAPI:
    app = FastAPI(title="inference_core", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return openai_error(400, f"{param}: {first['msg']}", "invalid_request_error", param)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok", "pid": os.getpid()})
        return JSONResponse({"status": "unhealthy", "cuda_error": engine.cuda_error, "pid": os.getpid()},
                            status_code=503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return await health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "inference_core"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> JSONResponse:
        if body.model != model_name:
            return openai_error(404, f"model {body.model!r} not found; served: {model_name!r}",
                                "invalid_request_error", "model")
        ids = engine.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        if len(ids) + body.max_tokens > engine.max_model_len:
            return openai_error(400, f"prompt ({len(ids)} tokens) plus max_tokens ({body.max_tokens}) exceeds "
                                f"the context length {engine.max_model_len}", "invalid_request_error", "prompt")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        req = GenerationRequest(ids, body.max_tokens, body.temperature, body.top_p, body.seed, stop)
        try:
            res = await engine.generate(req)
        except QueueFull as exc:
            return openai_error(429, str(exc), "rate_limit_error")
        except EngineUnhealthy as exc:
            return openai_error(503, str(exc), "server_error")
        except RuntimeError as exc:
            return openai_error(500, f"inference failed: {exc}", "server_error")
        return JSONResponse({
            "id": f"cmpl-{res.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}],
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                      "total_tokens": res.prompt_tokens + len(res.token_ids)},
        })

    if faults is not None:
        @app.post("/admin/faults")
        async def set_faults(body: FaultRequest,
                             authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
            expected = f"Bearer {admin_token}" if admin_token else None
            if expected is None or not hmac.compare_digest((authorization or "").encode(), expected.encode()):
                raise HTTPException(401, "fault switch needs 'Authorization: Bearer <admin token>'")
            state = faults.arm(cuda_error=body.cuda_error, latency_ms=body.latency_ms)
            return {"cuda_error": state.cuda_error, "latency_ms": state.latency_ms}

    return app


def build(model_dir: Path, log_dir: Path | None, enable_faults: bool, admin_token: str | None,
          served_name: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    busy = BusyTracker()
    metrics = Metrics(registry, busy)
    t0 = time.monotonic()
    model = load_model(model_dir)
    tokenizer = TextTokenizer.from_dir(model_dir)
    metrics.model_load.set(time.monotonic() - t0)
    faults = FaultSwitch() if enable_faults else None
    engine = Engine(model, tokenizer, metrics, request_logger(log_dir), busy, faults)
    return create_app(engine, served_name or model_dir.name, registry, faults, admin_token)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="inference_core.server", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-dir", type=Path, default=None, help="JSON request logs (default: stderr)")
    p.add_argument("--enable-faults", action="store_true",
                   help=f"expose POST /admin/faults (needs {ADMIN_TOKEN_ENV})")
    args = p.parse_args(argv)
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    if args.enable_faults and not token:
        p.error(f"--enable-faults needs the {ADMIN_TOKEN_ENV} environment variable")
    app = build(args.model_dir, args.log_dir, args.enable_faults, token, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
