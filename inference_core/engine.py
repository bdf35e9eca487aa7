"""The step loop: schedule → forward → sample → stream, on one thread off the event loop.

Requests are submitted from the event loop and stream back through an asyncio queue each. Every step
runs one forward pass over the packed tokens of every chunk the scheduler chose (decodes and prefill
chunks of different sequences together, no padding; keys and values in the paged KV cache), samples
the next token of every sequence that reached its end, and hands the scheduler the result.

At start-up the engine measures the model (weights, the activation peak of a profiling step) and
sizes the KV cache from the memory budget (``inference_core.memory``), printing the plan.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from inference_core import kernels
from inference_core.cuda_graphs import DecodeGraphs
from inference_core.faults import FaultSwitch
from inference_core.kv_cache import FlatBatch, PagedKVCache, SeqChunk
from inference_core.memory import KVPlan, PeakMemory, device_memory, kv_bytes_per_token, plan_kv_cache
from inference_core.model import Attention, CausalLM, device_of
from inference_core.redaction import redact_text
from inference_core.sampling import SamplingParams, TokenLogprob, sample_batch, token_logprobs
from inference_core.scheduler import FinishReason, Request, ScheduledChunk, Scheduler, SchedulerConfig
from inference_core.sizing import activation_estimate
from inference_core.telemetry import BusyTracker, Metrics, rss_bytes
from inference_core.tokenizer import IncrementalDetokenizer, TextTokenizer
from inference_core.tp_worker import Peers
from inference_core.weights import HugePageMove

log = logging.getLogger(__name__)


def _accelerate_all(modules: list[torch.nn.Module]) -> None:
    """Layers fused after the start (a block moved into huge pages) onto the CPU kernels too."""
    for m in modules:
        kernels.accelerate(m)


class EngineError(RuntimeError):
    """Base of the engine's errors."""


class EngineUnhealthy(EngineError):
    """The replica hit a CUDA error and refuses work until it is restarted."""


class QueueFull(EngineError):
    """More requests are waiting than ``max_num_waiting`` allows."""


class RequestFailed(EngineError):
    """The forward pass failed for this request (the message is the error)."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked (a token id outside the vocabulary, a prompt too long)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int | None = None          # default: sized from the memory budget (see memory.py)
    max_model_len: int | None = None          # default: the config's context, lowered to what the budget holds
    memory_utilization: float | None = None   # share of the device's memory for everything (default: 0.9 on a
    #                                           GPU; on a CPU the KV cache is sized for max_num_seqs, see sizing.py)
    kv_cache_memory: int | None = None        # bytes for the KV cache, instead of memory_utilization
    memory_limit: int | None = None           # --memory-limit: on a CPU, the memory this replica may use
    enable_prefix_caching: bool = True
    runtime_bytes: int | None = None          # the process's footprint before the weights (default: measured now)
    cpu_kernels: bool = True                  # bf16 decode matrix-vector products on the AVX512-BF16 kernel
    cuda_graphs: bool = True                  # decode steps replayed as CUDA graphs on one GPU (--enforce-eager)
    hugepage_weights: bool = True             # CPU weights copied from the file map into huge pages at start
    mode: Literal["continuous", "static"] = "continuous"
    static_batch_wait_s: float = 0.05         # static mode: how long to wait for a full batch
    max_num_waiting: int = 256
    stall_timeout_s: float = 30.0             # /health fails when work waits and no step ran for this long


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first delta, when asked for


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
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Live:
    req: Request
    params: SamplingParams
    queue: asyncio.Queue[Delta | Result | BaseException]
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator | None
    arrival: float
    detok: IncrementalDetokenizer
    text: str = ""                 # output text so far (incrementally detokenized)
    sent_chars: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    scheduled_at: float = 0.0      # first scheduled (the end of its queue time)
    batch_sizes: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent (text held back)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # prompt tokens 1.. (echo)
    pending_ids: list[int] = field(default_factory=list)                # tokens whose text is not sent yet
    sent_any: bool = False


Row = tuple[ScheduledChunk, _Live, list[int], list[int]]  # a chunk, its request, its tokens, its block table


def _deliver(items: list[tuple[asyncio.Queue[Delta | Result | BaseException], Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)  # a chunk, its request, the tokens it computes


FatalHook = Callable[[str], None]


class Engine:
    def __init__(self, model: CausalLM, tokenizer: TextTokenizer, metrics: Metrics, logger: logging.Logger,
                 busy: BusyTracker, faults: FaultSwitch | None = None, config: EngineConfig | None = None,
                 log_text: bool = False, on_fatal: FatalHook | None = None, peers: Peers | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.logger = logger
        self.busy = busy
        self.faults = faults
        self.config = cfg = config or EngineConfig()
        self.log_text = log_text
        self.on_fatal = on_fatal
        self.peers = peers  # tensor-parallel ranks 1..N-1, run in lockstep with this one
        self.vocab_size = model.config.vocab_size
        attns: list[Attention] = [layer.self_attn for layer in model.model.layers]  # type: ignore[misc]
        self.devices = [device_of(a.k_proj) for a in attns]
        self.dtype = next(model.parameters()).dtype
        self.kv_heads, self.head_dim = attns[0].k, attns[0].d  # a tensor-parallel shard holds fewer heads
        self.plan: KVPlan | None = None
        self.graphs: DecodeGraphs | None = None  # set once the KV cache exists (the memory profile runs eagerly)
        self.startup: dict[str, float] = {}  # seconds per start-up stage, for the server's one-line breakdown
        mark = time.monotonic()

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.startup[stage] = now - mark
            mark = now

        accelerate = cfg.cpu_kernels and self.dtype == torch.bfloat16 and torch.device("cpu") in self.devices
        # the weights move into huge pages block by block from the step thread, while serving (HugePageMove)
        self.relayout: HugePageMove | None = None
        if cfg.hugepage_weights and all(d.type == "cpu" for d in self.devices):
            self.relayout = HugePageMove.plan(model)
            if self.relayout is not None and accelerate:
                self.relayout.on_fused = _accelerate_all
        if accelerate:
            n = kernels.accelerate(model)
            log.info("cpu kernels: %s (%d linear layers)", kernels.status(), n)
        lap("layout")
        if cfg.num_kv_blocks is not None:  # an explicit pool (tests, benchmarks)
            num_blocks = cfg.num_kv_blocks
            self.max_model_len = min(cfg.max_model_len or model.config.max_position_embeddings,
                                     num_blocks * cfg.block_size)
        else:
            self.plan = self._plan_memory()
            num_blocks, self.max_model_len = self.plan.num_blocks, self.plan.max_model_len
            log.info("%s", self.plan.describe())
        lap("memory profile")
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                                   num_blocks, cfg.block_size, cfg.mode == "static",
                                                   cfg.enable_prefix_caching))
        if peers is not None:
            peers.send("alloc", num_blocks, cfg.block_size)
        # CUDA graphs for decode steps (one GPU holding every layer): one block more than the scheduler's,
        # for the padding rows' scratch slot
        graphs = cfg.cuda_graphs and peers is None and {d.type for d in self.devices} == {"cuda"} \
            and len(set(self.devices)) == 1
        self.cache = PagedKVCache.allocate(num_blocks + int(graphs), cfg.block_size, self.kv_heads, self.head_dim,
                                           self.dtype, self.devices)
        self.graphs = DecodeGraphs(model, self.cache, num_blocks * cfg.block_size, cfg.max_num_seqs) \
            if graphs else None
        lap("KV pool")
        metrics.kv_cache_blocks.set(num_blocks)
        metrics.kv_cache_block_size.set(cfg.block_size)
        metrics.kv_cache_bytes.set(self.cache.nbytes)
        metrics.max_model_len.set(self.max_model_len)
        self.live: dict[str, _Live] = {}
        self._streams: dict[str, _Live] = {}
        self.cuda_error: str | None = None
        self.fatal_error: str | None = None
        self.draining = False
        self.last_step_at = time.monotonic()
        self._cv = threading.Condition()
        self._stop = False
        self._seen = (0, 0)  # prefix-cache (queried, hit) tokens already counted in the metrics
        if faults is not None:
            model.forward_hooks.append(faults.before_forward)
        metrics.healthy.set(1)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- memory --------------------------------------------------------------------------------------------
    def _plan_memory(self) -> KVPlan:
        """Measure weights and the activation peak of a full-budget prefill, then size the KV cache."""
        cfg, mcfg = self.config, self.model.config
        runtime = cfg.runtime_bytes
        weights = _weights_bytes(self.model)
        device = self.devices[0] if self.devices else torch.device("cpu")
        if runtime is None:  # the weights are resident after the warm-up below: the rest is the runtime's
            runtime = max(0, rss_bytes() - weights) if device.type == "cpu" else 0
        want = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        n = max(1, min(cfg.max_num_batched_tokens, want - 1))
        # On a CPU host with the default KV cache the budget does not depend on the activation peak: the
        # engine estimates it rather than running a full-size prefill at start (seconds on one core)
        activation = self._profile(n, device, measure=device.type != "cpu" or cfg.memory_utilization is not None)
        total, available = device_memory(device, limit=cfg.memory_limit)
        if self.peers is not None and device.type == "cpu":  # the ranks share this host's memory
            total, available = total // self.peers.world, available // self.peers.world
        bpt = kv_bytes_per_token(len(self.devices), self.kv_heads, self.head_dim, self.dtype.itemsize)
        # A decode step gathers one layer's keys and values of every running sequence (padded): reserve that.
        gather = -(-2 * bpt // max(len(self.devices), 1))
        return plan_kv_cache(device=str(device), total_bytes=total, available_bytes=available, weights_bytes=weights,
                             activation_bytes=activation, runtime_bytes=runtime, bytes_per_token=bpt,
                             reserve_per_token=gather, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                             config_max_len=mcfg.max_position_embeddings, max_model_len=cfg.max_model_len,
                             memory_utilization=cfg.memory_utilization, kv_cache_memory=cfg.kv_cache_memory)

    @torch.inference_mode()
    def _profile(self, num_tokens: int, device: torch.device, measure: bool = True) -> int:
        """Peak memory of one prefill of ``num_tokens`` (after a one-token warm-up that pages the weights in);
        without ``measure``, the warm-up and an upper-bound estimate."""
        bs = self.config.block_size
        blocks = -(-num_tokens // bs)
        tmp = PagedKVCache.allocate(blocks, bs, self.kv_heads, self.head_dim, self.dtype, self.devices)
        if self.peers is not None:
            self.peers.send("alloc", blocks, bs)
        table = list(range(blocks))
        self._run_forward([SeqChunk([0], 0, table, True)], tmp)
        if measure:
            with PeakMemory(device) as peak:
                self._run_forward([SeqChunk([0] * num_tokens, 0, table, True)], tmp)
            if peak.bytes is not None:
                return peak.bytes
        mc = self.model.config  # not measured, or the kernel would not reset the high-water mark: in float32
        return activation_estimate(num_tokens, mc.hidden_size, mc.intermediate_size, mc.num_attention_heads,
                                   mc.vocab_size)

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
        tokens = 0
        for lv in lives:
            r = lv.req
            tokens += max(0, len(r.prompt_ids) - r.num_computed) + max(0, r.max_tokens - len(r.output_ids))
        return {"in_flight": len(lives), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "tokens": tokens}

    # -- the event-loop side ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        if self.cuda_error is not None:
            raise EngineUnhealthy(f"replica is unhealthy after a CUDA error: {self.cuda_error}")
        if self.fatal_error is not None:
            raise EngineUnhealthy(f"the engine stopped: {self.fatal_error}")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"stop_token_ids: {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if not prompt_ids or len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens: must be 1..{self.max_model_len - 1}")
        rid = request_id or uuid.uuid4().hex
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        eos = frozenset(() if params.ignore_eos else self.model.config.eos_ids) | frozenset(params.stop_token_ids)
        req = Request(rid, list(prompt_ids), params.max_tokens, eos, arrival=time.monotonic(),
                      use_prefix_cache=params.prompt_logprobs is None)
        live = _Live(req, params, asyncio.Queue(), asyncio.get_running_loop(), gen, req.arrival,
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
        try:
            while True:
                with self._cv:
                    while not self._stop and not self.scheduler.has_work and self.relayout is None:
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
                if self.relayout is not None:  # one block between steps; block after block while idle
                    self._relayout_step(self.relayout)
        except BaseException as exc:  # a bug in the bookkeeping: fail loudly, never hang
            self._die(exc)

    def _relayout_step(self, move: HugePageMove) -> None:
        move.step()
        self.last_step_at = time.monotonic()
        if move.done:
            self.relayout = None
            log.info("weights in transparent huge pages: %.1f MiB, moved in %.1f s while serving",
                     move.moved_bytes / 2**20, move.seconds)

    @property
    def layout_pending(self) -> bool:
        """Weights are still moving into huge pages (decode runs ~15 % slower until they have)."""
        return self.relayout is not None

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
                self._log(live, "error", None, error=msg)
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
            self._prefix_metrics()
            self.metrics.requests_running.set(len(self.scheduler.running))
            self.metrics.requests_waiting.set(len(self.scheduler.waiting))
        if not rows:
            return
        rows.sort(key=lambda r: len(r[2]) > 1)  # decodes first, then prefill chunks (stable)
        try:
            sampled = self._forward(rows)
        except Exception as exc:  # the requests in this batch fail; the engine goes on (unless CUDA is gone)
            if self.peers is not None:  # the other ranks may be inside the pass: the group cannot go on
                raise
            self._fail(rows, exc)
            return
        finally:
            self.busy.record(t0, time.monotonic())
        self.metrics.batch_size.observe(len(rows))
        with self._cv:
            stopped = self._emit(rows, sampled)
            finished = self.scheduler.update(out, {rid: tok for rid, (tok, _) in sampled.items()}, stopped)
            for req in finished:
                self._finish(req)
            self._gauges()

    def _prefix_metrics(self) -> None:
        b = self.scheduler.blocks
        q, h = b.num_queried_tokens, b.num_hit_tokens
        self.metrics.prefix_cache_queries.inc(q - self._seen[0])
        self.metrics.prefix_cache_hits.inc(h - self._seen[1])
        self._seen = (q, h)
        if q:
            self.metrics.prefix_cache_hit_rate.set(h / q)

    @torch.inference_mode()
    def _forward(self, rows: list[Row]) -> dict[str, tuple[int, TokenLogprob | None]]:
        """One forward pass over the packed tokens of every row; sample where a sequence reached its end."""
        chunks = []
        for ch, live, toks, table in rows:
            prompt_lp = live.params.prompt_logprobs is not None and ch.start < len(live.req.prompt_ids) - 1
            chunks.append(SeqChunk(toks, ch.start, table, ch.start + len(toks) == live.req.num_tokens, prompt_lp))
        logits = self._run_forward(chunks, self.cache)  # [M, V]
        samplers: list[_Live] = []
        picks: list[int] = []
        row = 0
        for (ch, live, toks, _), c in zip(rows, chunks, strict=True):
            if c.all_logits:
                self._prompt_logprobs(live, ch.start, logits[row:row + len(toks)])
                row += len(toks)
            elif c.sample:
                row += 1
            if c.sample:
                samplers.append(live)
                picks.append(row - 1)
        if not samplers:
            return {}
        banned = [live.req.eos_ids if len(live.req.output_ids) < live.params.min_tokens else frozenset()
                  for live in samplers]
        chosen = logits if len(picks) == logits.shape[0] else logits[picks]
        ids, lps = sample_batch(chosen, [lv.params for lv in samplers], [lv.generator for lv in samplers], banned)
        return {lv.req.request_id: (tok, lp) for lv, tok, lp in zip(samplers, ids, lps, strict=True)}

    def _run_forward(self, chunks: list[SeqChunk], cache: PagedKVCache) -> torch.Tensor:
        if self.graphs is not None and cache is self.cache:  # a decode step of a captured shape: one replay
            logits = self.graphs.run(chunks, cache.block_size)
            if logits is not None:
                return logits
        if self.peers is not None:  # the other ranks run the same pass; the all-reduces join us
            self.peers.send("forward", chunks)
        return self.model.forward_flat(FlatBatch(chunks, cache.block_size), cache)

    def _prompt_logprobs(self, live: _Live, start: int, logits: torch.Tensor) -> None:
        """Logits at positions start.. predict prompt tokens start+1..; recorded once (a recompute after a
        preemption does not add them again)."""
        prompt = live.req.prompt_ids
        first = len(live.prompt_logprobs) + 1  # the next prompt position without a log-probability
        lo, hi = max(first, start + 1), min(len(prompt), start + 1 + logits.shape[0])
        if lo < hi:
            live.prompt_logprobs += token_logprobs(logits[lo - start - 1:hi - start - 1], prompt[lo:hi],
                                                   live.params.prompt_logprobs or 0)

    def _emit(self, rows: list[Row], sampled: dict[str, tuple[int, TokenLogprob | None]]) -> set[str]:
        """Stream new text; returns the requests whose output now contains a stop string."""
        now = time.monotonic()
        stopped = set()
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta | Result | BaseException], Delta]]] = {}
        for _, live, _, _ in rows:
            live.batch_sizes.append(len(rows))
            got = sampled.get(live.req.request_id)
            if got is None:
                continue
            tok, lp = got
            if tok in live.req.eos_ids:
                continue
            if not live.first_token_at:
                live.first_token_at = now
                self.metrics.ttft.observe(now - live.arrival)
            else:
                self.metrics.tpot.observe(now - live.last_token_at)
            live.last_token_at = now
            self.metrics.generation_tokens.inc()
            if lp is not None:
                live.logprobs.append(lp)
                live.pending_logprobs.append(lp)
            live.pending_ids.append(tok)
            new = live.detok.step(tok)
            stops = live.params.stop
            cut = -1
            if new and stops and len(live.req.output_ids) + 1 >= live.params.min_tokens:
                tail_from = max(0, len(live.text) - max(len(x) for x in stops) + 1)
                tail = live.text[tail_from:] + new  # a stop string can only end inside the new text
                hits = [tail.find(x) for x in stops if x in tail]
                cut = tail_from + min(hits) if hits else -1
            live.text += new
            if cut >= 0:
                stopped.add(live.req.request_id)
                live.text = live.text[:cut]
            hold = 0 if cut >= 0 else max((len(x) - 1 for x in stops), default=0)
            upto = max(live.sent_chars, len(live.text) - hold)
            if upto > live.sent_chars or (live.pending_ids and not stops):
                delta = Delta(live.text[live.sent_chars:upto], live.pending_ids, live.pending_logprobs,
                              None if live.sent_any else live.prompt_logprobs)
                live.sent_any = True
                out.setdefault(live.loop, []).append((live.queue, delta))
                live.sent_chars = upto
                live.pending_logprobs, live.pending_ids = [], []
        for loop, items in out.items():  # one wake-up of each event loop per step, not one per token
            loop.call_soon_threadsafe(_deliver, items)
        return stopped

    def _finish(self, req: Request) -> None:
        live = self.live.pop(req.request_id, None)
        if live is None:
            return
        text = live.text
        if len(text) > live.sent_chars or live.pending_logprobs or live.pending_ids:
            live.loop.call_soon_threadsafe(live.queue.put_nowait,
                                           Delta(text[live.sent_chars:], live.pending_ids, live.pending_logprobs,
                                                 None if live.sent_any else live.prompt_logprobs))
        now = time.monotonic()
        reason = (req.finish_reason or FinishReason.STOP).value
        res = Result(req.request_id, text, list(req.output_ids), reason, len(req.prompt_ids),
                     (live.first_token_at or now) - live.arrival, now - live.arrival,
                     round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0.0,
                     live.logprobs, req.num_cached_tokens, live.prompt_logprobs)
        self.metrics.latency.observe(res.latency_s)
        self.metrics.requests.labels(status="ok").inc()
        live.loop.call_soon_threadsafe(live.queue.put_nowait, res)
        self._log(live, reason, None, res)

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
                self.metrics.requests.labels(status="error").inc()
                self.metrics.latency.observe(time.monotonic() - live.arrival)
                live.loop.call_soon_threadsafe(live.queue.put_nowait, RequestFailed(msg))
                self._log(live, "error", msg if is_cuda else None, error=msg)
            # The failed pass may have written some of its keys: cached blocks can no longer be trusted.
            self.scheduler.blocks.reset_prefix_cache()
            self._gauges()

    def _log(self, live: _Live | None, reason: str, cuda_error: str | None, res: Result | None = None,
             error: str | None = None) -> None:
        if live is None:
            return
        now = time.monotonic()
        fields = {"request_id": live.req.request_id, "inference_time": round((now - live.arrival) * 1000, 3),
                  "batch_size": round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0,
                  "cuda_error": cuda_error, "prompt_tokens": len(live.req.prompt_ids),
                  "completion_tokens": len(live.req.output_ids), "finish_reason": reason,
                  "cached_tokens": live.req.num_cached_tokens,
                  "ttft_ms": round((live.first_token_at - live.arrival) * 1000, 3) if live.first_token_at else None,
                  "queue_ms": round((live.scheduled_at - live.arrival) * 1000, 3) if live.scheduled_at else None,
                  "preemptions": live.req.num_preemptions}
        if error and not cuda_error:
            fields["error"] = error
        if self.log_text and res is not None:  # asked for; personal data redacted before the line is written
            fields["completion"] = redact_text(res.text)
        failed = cuda_error is not None or error is not None
        self.logger.log(logging.ERROR if failed else logging.INFO,
                        "inference request failed" if failed else "inference request completed",
                        extra={"fields": fields})


def _weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once). Per tensor, not per
    storage: the loaded weights are views of one memory map of the whole file."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.nbytes)
    return sum(seen.values())
