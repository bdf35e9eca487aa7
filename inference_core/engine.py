"""The step loop: schedule → forward → sample → stream, on one thread off the event loop.

Requests are submitted from the event loop and stream back through an asyncio queue each. Every step
runs one forward pass over a batch of chunks from the scheduler (decodes and prefill chunks of
different sequences, each in its own KV slot), samples the next token of every sequence that reached
its end, and hands the scheduler the result.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from inference_core.faults import FaultSwitch
from inference_core.model import Attention, CausalLM, SlotBatch, SlotCache
from inference_core.scheduler import FinishReason, Request, ScheduledChunk, Scheduler, SchedulerConfig
from inference_core.telemetry import BusyTracker, Metrics
from inference_core.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Base of the engine's errors."""


class EngineUnhealthy(EngineError):
    """The replica hit a CUDA error and refuses work until it is restarted."""


class QueueFull(EngineError):
    """More requests are waiting than ``max_num_waiting`` allows."""


class RequestFailed(EngineError):
    """The forward pass failed for this request (the message is the error)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int | None = None          # default: every slot can hold a full-length sequence
    mode: Literal["continuous", "static"] = "continuous"
    static_batch_wait_s: float = 0.05         # static mode: how long to wait for a full batch
    max_num_waiting: int = 256
    stall_timeout_s: float = 30.0             # /health fails when work waits and no step ran for this long


@dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclass
class Result:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    latency_s: float
    batch_size: float


@dataclass
class _Live:
    req: Request
    params: SamplingParams
    queue: asyncio.Queue[Delta | Result | BaseException]
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator | None
    arrival: float
    sent_chars: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    slot: int | None = None


Row = tuple[ScheduledChunk, _Live, list[int]]


def _deliver(items: list[tuple[asyncio.Queue[Delta | Result | BaseException], Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)  # a chunk, its request, the tokens it computes


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else top-k then nucleus sampling. logits: [V]."""
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(self, model: CausalLM, tokenizer: TextTokenizer, metrics: Metrics, logger: logging.Logger,
                 busy: BusyTracker, faults: FaultSwitch | None = None, config: EngineConfig | None = None,
                 log_text: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.logger = logger
        self.busy = busy
        self.faults = faults
        self.config = cfg = config or EngineConfig()
        self.log_text = log_text
        self.max_model_len = model.config.max_position_embeddings
        blocks = cfg.num_kv_blocks or cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                                   blocks, cfg.block_size, cfg.mode == "static"))
        dtype = next(model.parameters()).dtype
        attns: list[Attention] = [layer.self_attn for layer in model.model.layers]  # type: ignore[misc]
        devices = [a.k_proj.weight.device for a in attns]
        kv_heads = attns[0].k if attns else None  # a tensor-parallel shard holds fewer heads
        self.cache = SlotCache.allocate(model.config, cfg.max_num_seqs, self.max_model_len, dtype, devices, kv_heads)
        self.free_slots = list(range(cfg.max_num_seqs))
        self.live: dict[str, _Live] = {}
        self._streams: dict[str, _Live] = {}
        self.cuda_error: str | None = None
        self.draining = False
        self.last_step_at = time.monotonic()
        self._cv = threading.Condition()
        self._stop = False
        if faults is not None:
            model.forward_hooks.append(faults.before_forward)
        metrics.healthy.set(1)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.cuda_error is None and not self.stalled

    @property
    def stalled(self) -> bool:
        """Work is waiting but the step loop has not finished a step for ``stall_timeout_s`` (a hang)."""
        return self.scheduler.has_work and time.monotonic() - self.last_step_at > self.config.stall_timeout_s

    # -- the event-loop side ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if self.cuda_error is not None:
            raise EngineUnhealthy(f"replica is unhealthy after a CUDA error: {self.cuda_error}")
        rid = request_id or uuid.uuid4().hex
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = Request(rid, list(prompt_ids), params.max_tokens, frozenset(self.model.config.eos_ids),
                      arrival=time.monotonic())
        live = _Live(req, params, asyncio.Queue(), asyncio.get_running_loop(), gen, req.arrival)
        with self._cv:
            if len(self.scheduler.waiting) >= self.config.max_num_waiting:
                raise QueueFull(f"{len(self.scheduler.waiting)} requests waiting "
                                f"(max_num_waiting={self.config.max_num_waiting})")
            self.live[rid] = live
            self._streams[rid] = live  # the consumer's handle: a request may finish before it is read
            self.scheduler.add(req)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            self._cv.notify()
        return rid

    async def stream(self, request_id: str) -> AsyncIterator[Delta | Result]:
        live = self._streams.pop(request_id)
        try:
            while True:
                item = await live.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Result):
                    return
        finally:
            self.abort(request_id)  # a client that went away frees its slot; a no-op when finished

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Result:
        rid = self.submit(prompt_ids, params)
        async for item in self.stream(rid):
            if isinstance(item, Result):
                return item
        raise EngineError("stream ended without a result")

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._streams.pop(request_id, None)
            req = self.scheduler.abort(request_id)
            live = self.live.pop(request_id, None)
            if live is not None and live.slot is not None:
                self.free_slots.append(live.slot)
            if req is not None and live is not None:
                self._log(live, FinishReason.ABORT.value, None)
            self._gauges()

    def _gauges(self) -> None:
        self.metrics.requests_running.set(len(self.scheduler.running))
        self.metrics.requests_waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_cache_usage.set(self.scheduler.kv_usage)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    # -- the step thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.scheduler.has_work:
                    self._cv.wait()
                    self.last_step_at = time.monotonic()  # idle is not stalled
                if self._stop:
                    return
            if self.config.mode == "static" and not self.scheduler.running:
                self._wait_for_batch()
            self._step()
            self.last_step_at = time.monotonic()

    def _wait_for_batch(self) -> None:
        deadline = time.monotonic() + self.config.static_batch_wait_s
        with self._cv:
            while len(self.scheduler.waiting) < self.config.max_num_seqs and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())

    def _step(self) -> None:
        t0 = time.monotonic()
        with self._cv:
            out = self.scheduler.schedule()
            rows = []
            for rid in out.preempted:
                live = self.live.get(rid)
                if live is not None and live.slot is not None:
                    self.free_slots.append(live.slot)
                    live.slot = None
                self.metrics.preemptions.inc()
            for ch in out.chunks:
                live = self.live[ch.request_id]
                if live.slot is None:
                    live.slot = self.free_slots.pop()
                rows.append((ch, live, live.req.all_ids[ch.start:ch.start + ch.num_tokens]))
            self.metrics.requests_running.set(len(self.scheduler.running))
            self.metrics.requests_waiting.set(len(self.scheduler.waiting))
        if not rows:
            return
        try:
            sampled = self._forward(rows)
        except RuntimeError as exc:
            self._fail(rows, exc)
            return
        finally:
            self.busy.record(t0, time.monotonic())
        self.metrics.batch_size.observe(len(rows))
        with self._cv:
            stopped = self._emit(rows, sampled)
            finished = self.scheduler.update(out, sampled, stopped)
            for req in finished:
                self._finish(req)
            self._gauges()

    def _forward(self, rows: list[Row]) -> dict[str, int]:
        """Decodes and prefill chunks run as two forward passes, so one long prefill does not pad every
        decode row to its width (the batch is padded, not flattened)."""
        decodes = [r for r in rows if len(r[2]) == 1]
        prefills = [r for r in rows if len(r[2]) > 1]
        sampled: dict[str, int] = {}
        for part in (decodes, prefills):
            if part:
                sampled.update(self._forward_padded(part))
        return sampled

    @torch.inference_mode()
    def _forward_padded(self, rows: list[Row]) -> dict[str, int]:
        width = max(len(toks) for _, _, toks in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.zeros(len(rows), width, dtype=torch.long)
        starts, lens, slots = [], [], []
        for b, (ch, live, toks) in enumerate(rows):
            start = ch.start
            ids[b, :len(toks)] = torch.tensor(toks)
            pos[b] = torch.arange(start, start + width)
            starts.append(start)
            lens.append(len(toks))
            assert live.slot is not None
            slots.append(live.slot)
        logits = self.model(ids, pos, SlotBatch(self.cache, slots, starts, lens))
        sampled = {}
        for b, (ch, live, toks) in enumerate(rows):
            if ch.start + len(toks) == live.req.num_tokens:
                row = logits[b, len(toks) - 1].float().cpu()  # sampling (and its seeded generator) on the CPU
                sampled[live.req.request_id] = sample(row, live.params, live.generator)
        return sampled

    def _emit(self, rows: list[Row], sampled: dict[str, int]) -> set[str]:
        """Stream new text; returns the requests whose output now contains a stop string."""
        now = time.monotonic()
        stopped = set()
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta | Result | BaseException], Delta]]] = {}
        for _, live, _ in rows:
            live.batch_sizes.append(len(rows))
            tok = sampled.get(live.req.request_id)
            if tok is None or tok in live.req.eos_ids:
                continue
            if not live.first_token_at:
                live.first_token_at = now
                self.metrics.ttft.observe(now - live.arrival)
            else:
                self.metrics.tpot.observe(now - live.last_token_at)
            live.last_token_at = now
            self.metrics.generation_tokens.inc()
            text = self.tokenizer.decode([*live.req.output_ids, tok])
            cut = min((text.find(s) for s in live.params.stop if s in text), default=-1)
            if cut >= 0:
                stopped.add(live.req.request_id)
                text = text[:cut]
            hold = 0 if cut >= 0 else max((len(s) - 1 for s in live.params.stop), default=0)
            upto = max(live.sent_chars, len(text) - hold)
            if upto > live.sent_chars and not text.endswith("\ufffd"):
                out.setdefault(live.loop, []).append((live.queue, Delta(text[live.sent_chars:upto], [tok])))
                live.sent_chars = upto
        for loop, items in out.items():  # one wake-up of each event loop per step, not one per token
            loop.call_soon_threadsafe(_deliver, items)
        return stopped

    def _finish(self, req: Request) -> None:
        live = self.live.pop(req.request_id, None)
        if live is None:
            return
        if live.slot is not None:
            self.free_slots.append(live.slot)
        text = self.tokenizer.decode(req.output_ids)
        cut = min((text.find(s) for s in live.params.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        if len(text) > live.sent_chars:
            live.loop.call_soon_threadsafe(live.queue.put_nowait, Delta(text[live.sent_chars:], []))
        now = time.monotonic()
        reason = (req.finish_reason or FinishReason.STOP).value
        res = Result(req.request_id, text, list(req.output_ids), reason, len(req.prompt_ids),
                     (live.first_token_at or now) - live.arrival, now - live.arrival,
                     round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0.0)
        self.metrics.latency.observe(res.latency_s)
        self.metrics.requests.labels(status="ok").inc()
        live.loop.call_soon_threadsafe(live.queue.put_nowait, res)
        self._log(live, reason, None, res)

    def _fail(self, rows: list[Row], exc: RuntimeError) -> None:
        msg = str(exc)
        is_cuda = "CUDA" in msg
        sticky = "CUDA error" in msg  # an illegal access leaves the context unusable; OOM does not
        with self._cv:
            victims = [live for _, live, _ in rows]
            if sticky:
                self.cuda_error = msg
                self.metrics.healthy.set(0)
                victims += [self.live[r.request_id] for r in list(self.scheduler.waiting)
                            if r.request_id in self.live and self.live[r.request_id] not in victims]
            if is_cuda:
                self.metrics.cuda_errors.inc()
            for live in victims:
                self.scheduler.abort(live.req.request_id)
                self.live.pop(live.req.request_id, None)
                if live.slot is not None:
                    self.free_slots.append(live.slot)
                self.metrics.requests.labels(status="error").inc()
                self.metrics.latency.observe(time.monotonic() - live.arrival)
                live.loop.call_soon_threadsafe(live.queue.put_nowait, RequestFailed(msg))
                self._log(live, "error", msg if is_cuda else None, error=msg)

    def _log(self, live: _Live | None, reason: str, cuda_error: str | None, res: Result | None = None,
             error: str | None = None) -> None:
        if live is None:
            return
        now = time.monotonic()
        fields = {"request_id": live.req.request_id, "inference_time": round((now - live.arrival) * 1000, 3),
                  "batch_size": round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0,
                  "cuda_error": cuda_error, "prompt_tokens": len(live.req.prompt_ids),
                  "completion_tokens": len(live.req.output_ids), "finish_reason": reason,
                  "ttft_ms": round((live.first_token_at - live.arrival) * 1000, 3) if live.first_token_at else None,
                  "preemptions": live.req.num_preemptions}
        if error and not cuda_error:
            fields["error"] = error
        if self.log_text and res is not None:
            fields["completion"] = res.text
        failed = cuda_error is not None or error is not None
        self.logger.log(logging.ERROR if failed else logging.INFO,
                        "inference request failed" if failed else "inference request completed",
                        extra={"fields": fields})
