"""Continuous-batching scheduler: pure logic, no torch, no I/O.

Each step gets a token budget (``max_num_batched_tokens``). Running requests go first — decodes take
one token, unfinished prefills take the rest of their prompt (chunked by the budget) — then waiting
requests are admitted first-come-first-served while the budget, ``max_num_seqs`` and the KV cache
allow. When the KV cache cannot hold a running request's next tokens, the most recently arrived
running request is preempted by recompute: its blocks are freed and it goes back to the head of the
queue, to be prefilled again (prompt plus what it generated so far). Static batching is kept as a
mode: a batch is admitted only when nothing runs, and it runs to completion.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"          # EOS or a stop string
    LENGTH = "length"      # max_tokens or the context length
    ABORT = "abort"        # cancelled (client went away)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 512
    num_kv_blocks: int = 1024
    block_size: int = 16
    static: bool = False

    def __post_init__(self) -> None:
        assert self.max_num_seqs >= 1 and self.block_size >= 1
        assert self.max_num_batched_tokens >= 1, "a step needs a token budget of at least 1"
        assert self.num_kv_blocks * self.block_size >= self.max_model_len, (
            f"the KV cache ({self.num_kv_blocks} blocks x {self.block_size}) cannot hold one full-length "
            f"sequence ({self.max_model_len} tokens)")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    eos_ids: frozenset[int] = frozenset()
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    start: int                     # position of the first token to compute
    num_tokens: int                # tokens to compute this step (1 for a decode)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[str]
    num_batched_tokens: int


class BlockManager:
    """Exact KV accounting: a request holds ceil(tokens / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.held: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return self.num_blocks - sum(self.held.values())

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - self.held.get(request_id, 0) <= self.num_free

    def grow(self, request_id: str, num_tokens: int) -> None:
        need = self.blocks_for(num_tokens)
        assert need - self.held.get(request_id, 0) <= self.num_free, "grow() without can_grow()"
        self.held[request_id] = max(need, self.held.get(request_id, 0))

    def free(self, request_id: str) -> None:
        self.held.pop(request_id, None)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- intake --------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        assert req.request_id not in self.requests, f"duplicate request id {req.request_id}"
        assert 0 < len(req.prompt_ids) < self.config.max_model_len, "prompt must fit the context (checked at the API)"
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.status == Status.FINISHED:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, FinishReason.ABORT)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        scheduled: set[str] = set()
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.status != Status.RUNNING or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.blocks.can_grow(req.request_id, req.num_computed + n):
                victim = max((r for r in self.running if r.request_id not in scheduled), key=lambda r: r.arrival)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != Status.RUNNING:
                continue
            self.blocks.grow(req.request_id, req.num_computed + n)
            chunks.append(ScheduledChunk(req.request_id, req.num_computed, n))
            scheduled.add(req.request_id)
            budget -= n
        admit = not preempted and (not cfg.static or not self.running)
        while admit and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.blocks.can_grow(req.request_id, req.num_computed + n):
                break  # FCFS: never let a later request overtake the head of the queue
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            self.blocks.grow(req.request_id, req.num_computed + n)
            chunks.append(ScheduledChunk(req.request_id, req.num_computed, n))
            scheduled.add(req.request_id)
            budget -= n
        return SchedulerOutput(chunks, preempted, cfg.max_num_batched_tokens - budget)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], stopped: Iterable[str] = ()) -> list[Request]:
        """Advance after a forward pass. ``sampled`` holds the next token of every chunk that reached
        the end of its sequence; ``stopped`` names requests the caller ended (a stop string).
        Returns the requests that finished in this step."""
        stop = set(stopped)
        done: list[Request] = []
        for ch in out.chunks:
            req = self.requests.get(ch.request_id)
            if req is None or req.status != Status.RUNNING:  # aborted since it was scheduled
                continue
            req.num_computed = ch.start + ch.num_tokens
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk that has more prompt to go
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            if tok in req.eos_ids:
                self._finish(req, FinishReason.STOP)
            else:
                req.output_ids.append(tok)
                if req.request_id in stop:
                    self._finish(req, FinishReason.STOP)
                elif len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
                    self._finish(req, FinishReason.LENGTH)
            if req.status == Status.FINISHED:
                done.append(req)
        return done

    # -- internals ---------------------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
        self.blocks.free(req.request_id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage
