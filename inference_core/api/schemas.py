"""The model API's request bodies (OpenAI's, with vLLM's extensions), the drill switch's, and the error and
server-sent-event shapes every route answers in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StringConstraints

from inference_core.sampling import SamplingParams


class CommonRequest(BaseModel):
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


class CompletionRequest(CommonRequest):
    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]],
                                                                        Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(CommonRequest):
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
class Shape:
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


def sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"
