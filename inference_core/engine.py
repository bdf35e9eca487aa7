"""The step loop: prefill, then decode token by token with a KV cache, off the event loop.

This first engine runs one sequence at a time (batch size 1); the continuous-batching scheduler
replaces its queue without changing the interface.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from inference_core.faults import FaultSwitch
from inference_core.model import CausalLM, KVCache
from inference_core.telemetry import BusyTracker, Metrics
from inference_core.tokenizer import TextTokenizer


class EngineError(RuntimeError):
    """Base of the engine's errors."""


class EngineUnhealthy(EngineError):
    """The replica hit a CUDA error and refuses work until it is restarted."""


class QueueFull(EngineError):
    """More requests are waiting than ``max_num_waiting`` allows."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    inference_time_ms: float
    batch_size: int


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling. logits: [V]."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Owns the model; runs requests on one worker thread and reports telemetry for each."""

    def __init__(self, model: CausalLM, tokenizer: TextTokenizer, metrics: Metrics, logger: logging.Logger,
                 busy: BusyTracker, faults: FaultSwitch | None = None, max_num_waiting: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.logger = logger
        self.busy = busy
        self.faults = faults
        self.max_num_waiting = max_num_waiting
        self.max_model_len = model.config.max_position_embeddings
        self.cuda_error: str | None = None
        self._waiting = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        if faults is not None:
            model.forward_hooks.append(faults.before_forward)
        metrics.healthy.set(1)

    @property
    def healthy(self) -> bool:
        return self.cuda_error is None

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        with self._lock:
            if self._waiting >= self.max_num_waiting:
                raise QueueFull(f"{self._waiting} requests waiting (max_num_waiting={self.max_num_waiting})")
            self._waiting += 1
            self.metrics.requests_waiting.set(self._waiting)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, req)

    def _run(self, req: GenerationRequest) -> GenerationResult:
        with self._lock:
            self._waiting -= 1
            self.metrics.requests_waiting.set(self._waiting)
        self.metrics.requests_running.set(1)
        start = time.monotonic()
        error: str | None = None
        try:
            if self.cuda_error is not None:
                error = self.cuda_error
                raise EngineUnhealthy(f"replica is unhealthy after a CUDA error: {self.cuda_error}")
            ids, reason = self._decode(req)
            return GenerationResult(req.request_id, ids, self.tokenizer.decode(ids), reason, len(req.prompt_ids),
                                    (time.monotonic() - start) * 1000.0, 1)
        except RuntimeError as exc:
            if "CUDA error" in str(exc) and not isinstance(exc, EngineUnhealthy):
                error = str(exc)
                self.cuda_error = error
                self.metrics.cuda_errors.inc()
                self.metrics.healthy.set(0)
            raise
        finally:
            end = time.monotonic()
            self.busy.record(start, end)
            self.metrics.requests_running.set(0)
            self._log(req, (end - start) * 1000.0, error)

    def _log(self, req: GenerationRequest, ms: float, cuda_error: str | None) -> None:
        self.metrics.latency.observe(ms / 1000.0)
        self.metrics.batch_size.observe(1)
        self.metrics.requests.labels(status="error" if cuda_error else "ok").inc()
        self.logger.log(
            logging.ERROR if cuda_error else logging.INFO,
            "inference request failed" if cuda_error else "inference request completed",
            extra={"fields": {"request_id": req.request_id, "inference_time": round(ms, 3), "batch_size": 1,
                              "cuda_error": cuda_error, "prompt_tokens": len(req.prompt_ids)}},
        )

    @torch.inference_mode()
    def _decode(self, req: GenerationRequest) -> tuple[list[int], str]:
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        cache = KVCache.empty(self.model.config.num_hidden_layers)
        ids = torch.tensor([req.prompt_ids])
        pos = torch.arange(len(req.prompt_ids))[None]
        out: list[int] = []
        eos = set(self.model.config.eos_ids)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        reason = "length"
        start = time.monotonic()
        capacity = self.max_model_len  # one sequence at a time: the cache holds at most the context
        for step in range(req.max_tokens):
            t0 = time.monotonic()
            logits = self.model(ids, pos, cache)[0, -1]
            tok = sample(logits, req.temperature, req.top_p, gen)
            if step == 0:
                self.metrics.ttft.observe(time.monotonic() - start)
            else:
                self.metrics.tpot.observe(time.monotonic() - t0)
            self.metrics.kv_cache_usage.set(cache.length / capacity)
            if tok in eos:
                reason = "stop"
                break
            out.append(tok)
            self.metrics.generation_tokens.inc()
            if req.stop and any(s in self.tokenizer.decode(out) for s in req.stop):
                reason = "stop"
                break
            if cache.length + 1 >= self.max_model_len:
                break
            ids = torch.tensor([[tok]])
            pos = torch.tensor([[cache.length]])
        self.metrics.kv_cache_usage.set(0.0)
        if req.stop and reason == "stop":
            text = self.tokenizer.decode(out)
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:
                while out and len(self.tokenizer.decode(out)) > cut:
                    out.pop()
        return out, reason

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
