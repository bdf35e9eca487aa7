"""The engine core: requests in from the event loop, the step loop on its own thread (schedule → run →
process outputs), health. ``ModelRunner`` (runner.py) owns the model and the KV pool; ``OutputProcessor``
(output.py) turns sampled tokens into what each request's stream receives.

Requests are submitted from the event loop and stream back through an asyncio queue each. Every step
runs one forward pass over the packed tokens of every chunk the scheduler chose (decodes and prefill
chunks of different sequences together, no padding; keys and values in the paged KV cache), samples
the next token of every sequence that reached its end, and hands the scheduler the result.

At start-up the runner measures the model (weights, the activation peak of a profiling step) and sizes
the KV cache from the memory budget (``inference_core.memory``), printing the plan.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

import torch

from inference_core.engine.output import OutputProcessor
from inference_core.engine.runner import ModelRunner
from inference_core.engine.types import (
    Delta,
    EngineConfig,
    EngineError,
    EngineUnhealthy,
    FatalHook,
    InvalidRequest,
    Live,
    QueueFull,
    RequestFailed,
    Result,
    Row,
)
from inference_core.faults import FaultSwitch
from inference_core.model.transformer import CausalLM
from inference_core.sampling import SamplingParams
from inference_core.scheduler import FinishReason, Request, Scheduler, SchedulerConfig
from inference_core.telemetry import BusyTracker, Metrics
from inference_core.tokenizer import TextTokenizer
from inference_core.tp_worker import Peers

log = logging.getLogger(__name__)


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """InvalidRequest where a request cannot be served as asked."""
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"stop_token_ids: {bad} is outside the vocabulary (0..{vocab_size - 1})")
    if not prompt_ids or len(prompt_ids) >= max_model_len:
        raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens: must be 1..{max_model_len - 1}")


class SchedulerGauges:
    """The scheduler's state as metrics: requests running and waiting, KV cache use, prefix-cache hits."""

    def __init__(self, metrics: Metrics, scheduler: Scheduler) -> None:
        self.metrics, self.scheduler = metrics, scheduler
        self._seen = (0, 0)  # prefix-cache (queried, hit) tokens already counted in the metrics

    def update(self, prefix: bool = False) -> None:
        m, sched = self.metrics, self.scheduler
        m.requests_running.set(len(sched.running))
        m.requests_waiting.set(len(sched.waiting))
        if not prefix:
            m.kv_cache_usage.set(sched.kv_usage)
            return
        q, h = sched.blocks.num_queried_tokens, sched.blocks.num_hit_tokens
        m.prefix_cache_queries.inc(q - self._seen[0])
        m.prefix_cache_hits.inc(h - self._seen[1])
        self._seen = (q, h)
        if q:
            m.prefix_cache_hit_rate.set(h / q)


class Engine:
    def __init__(self, model: CausalLM, tokenizer: TextTokenizer, metrics: Metrics, logger: logging.Logger,
                 busy: BusyTracker, faults: FaultSwitch | None = None, config: EngineConfig | None = None,
                 log_text: bool = False, on_fatal: FatalHook | None = None, peers: Peers | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.busy = busy
        self.faults = faults
        self.config = cfg = config or EngineConfig()
        self.on_fatal = on_fatal
        self.peers = peers  # tensor-parallel ranks 1..N-1, run in lockstep with this one
        self.vocab_size = model.config.vocab_size
        self.startup: dict[str, float] = {}  # seconds per start-up stage, for the server's one-line breakdown
        mark = time.monotonic()

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.startup[stage] = now - mark
            mark = now

        self.runner = runner = ModelRunner(model, cfg, peers, faults)
        lap("layout")
        num_blocks, self.max_model_len = runner.plan_memory()
        self.plan = runner.plan
        lap("memory profile")
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                                   num_blocks, cfg.block_size, cfg.mode == "static",
                                                   cfg.enable_prefix_caching))
        self.cache = runner.allocate(num_blocks)
        self.graphs = runner.graphs
        lap("KV pool")
        metrics.kv_cache_blocks.set(num_blocks)
        metrics.kv_cache_block_size.set(cfg.block_size)
        metrics.kv_cache_bytes.set(self.cache.nbytes)
        metrics.max_model_len.set(self.max_model_len)
        self.output = OutputProcessor(metrics, logger, log_text)
        self.live: dict[str, Live] = {}
        self._streams: dict[str, Live] = {}
        self.cuda_error: str | None = None
        self.fatal_error: str | None = None
        self.draining = False
        self.last_step_at = time.monotonic()
        self._cv = threading.Condition()
        self._stop = False
        self.gauges = SchedulerGauges(metrics, self.scheduler)
        metrics.healthy.set(1)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- health --------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.cuda_error is None and self.fatal_error is None and not self.stalled

    @property
    def stalled(self) -> bool:
        """Work is waiting but the step loop has not finished a step for ``stall_timeout_s`` (a hang)."""
        return self.scheduler.has_work and time.monotonic() - self.last_step_at > self.config.stall_timeout_s

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished (what a drain waits for)."""
        return len(self.live)

    def load(self) -> dict[str, int]:
        """The work outstanding, for a load balancer: requests, and tokens still to compute (prompt tokens
        not yet prefilled plus completion tokens not yet generated, at most ``max_tokens``)."""
        lives = list(self.live.values())  # one C-level copy: safe against the step thread's changes
        tokens = sum(lv.req.tokens_outstanding for lv in lives)
        return {"in_flight": len(lives), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "tokens": tokens}

    # -- the event-loop side ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if self.cuda_error is not None:
            raise EngineUnhealthy(f"replica is unhealthy after a CUDA error: {self.cuda_error}")
        if self.fatal_error is not None:
            raise EngineUnhealthy(f"the engine stopped: {self.fatal_error}")
        check_request(prompt_ids, params, self.vocab_size, self.max_model_len)
        rid = request_id or uuid.uuid4().hex
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        eos = frozenset(() if params.ignore_eos else self.model.config.eos_ids) | frozenset(params.stop_token_ids)
        req = Request(rid, list(prompt_ids), params.max_tokens, eos, arrival=time.monotonic(),
                      use_prefix_cache=params.prompt_logprobs is None)
        live = Live(req, params, asyncio.Queue(), asyncio.get_running_loop(), gen, req.arrival,
                     self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens))
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
            self.abort(request_id)  # a client that went away frees its blocks; a no-op when finished

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
            if req is not None and live is not None:
                self.output.log(live, FinishReason.ABORT.value, None)
            self.gauges.update()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    # -- the step thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self.scheduler.has_work and self.runner.relayout is None:
                        self._cv.wait()
                        self.last_step_at = time.monotonic()  # idle is not stalled
                    if self._stop:
                        return
                    work = self.scheduler.has_work
                if work:
                    if self.config.mode == "static" and not self.scheduler.running:
                        self._wait_for_batch()
                    self._step()
                    self.last_step_at = time.monotonic()
                if self.runner.relayout is not None:  # one block between steps; block after block while idle
                    self.runner.relayout_step()
                    self.last_step_at = time.monotonic()
        except BaseException as exc:  # a bug in the bookkeeping: fail loudly, never hang
            self._die(exc)

    @property
    def layout_pending(self) -> bool:
        """Weights are still moving into huge pages (decode runs ~15 % slower until they have)."""
        return self.runner.layout_pending

    def _die(self, exc: BaseException) -> None:
        """Every request gets an error now, /health fails, and the owner is told (the server exits)."""
        msg = f"{type(exc).__name__}: {exc}"
        log.exception("engine step loop failed: %s", msg)
        with self._cv:
            self.fatal_error = msg
            self.metrics.healthy.set(0)
            for live in list(self.live.values()):
                self.live.pop(live.req.request_id, None)
                self.metrics.requests.labels(status="error").inc()
                live.loop.call_soon_threadsafe(live.queue.put_nowait, RequestFailed(f"engine failed: {msg}"))
                self.output.log(live, "error", None, error=msg)
        if self.on_fatal is not None:
            self.on_fatal(msg)

    def _wait_for_batch(self) -> None:
        deadline = time.monotonic() + self.config.static_batch_wait_s
        with self._cv:
            while len(self.scheduler.waiting) < self.config.max_num_seqs and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())

    def _step(self) -> None:
        t0 = time.monotonic()
        if self.faults is not None:
            self.faults.before_step()
        with self._cv:
            out = self.scheduler.schedule()
            for _ in out.preempted:
                self.metrics.preemptions.inc()
            rows: list[Row] = []
            for ch in out.chunks:
                live = self.live[ch.request_id]
                if not live.scheduled_at:
                    live.scheduled_at = t0
                    self.metrics.queue_time.observe(t0 - live.arrival)
                rows.append((ch, live, live.req.tokens(ch.start, ch.start + ch.num_tokens),
                             list(self.scheduler.blocks.tables[ch.request_id])))
            self.gauges.update(prefix=True)
        if not rows:
            return
        rows.sort(key=lambda r: len(r[2]) > 1)  # decodes first, then prefill chunks (stable)
        try:
            sampled = self.runner.forward(rows)
        except Exception as exc:  # the requests in this batch fail; the engine goes on (unless CUDA is gone)
            if self.peers is not None:  # the other ranks may be inside the pass: the group cannot go on
                raise
            self._fail(rows, exc)
            return
        finally:
            self.busy.record(t0, time.monotonic())
        self.metrics.batch_size.observe(len(rows))
        with self._cv:
            stopped = self.output.emit(rows, sampled)
            finished = self.scheduler.update(out, {rid: tok for rid, (tok, _) in sampled.items()}, stopped)
            for req in finished:
                self._finish(req)
            self.gauges.update()

    def _finish(self, req: Request) -> None:
        live = self.live.pop(req.request_id, None)
        if live is not None:
            self.output.finish(live, req)

    def _fail(self, rows: list[Row], exc: Exception) -> None:
        msg = f"{exc}" if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        is_cuda = "CUDA" in msg
        sticky = "CUDA error" in msg  # an illegal access leaves the context unusable; OOM does not
        if not isinstance(exc, RuntimeError) or not is_cuda:
            log.error("forward pass failed for %d requests: %s", len(rows), msg)
        with self._cv:
            victims = [live for _, live, _, _ in rows]
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
                self.output.fail(live, RequestFailed(msg), msg if is_cuda else None)
            # The failed pass may have written some of its keys: cached blocks can no longer be trusted.
            self.scheduler.blocks.reset_prefix_cache()
            self.gauges.update()
