"""Continuous-batching scheduler: pure logic, no torch, no I/O.

Each step gets a token budget (``max_num_batched_tokens``). Running requests go first — decodes take
one token, unfinished prefills take the rest of their prompt (chunked by the budget) — then waiting
requests are admitted first-come-first-served while the budget, ``max_num_seqs`` and the KV cache
allow. When the KV cache cannot hold a running request's next tokens, the most recently arrived
running request is preempted by recompute: its blocks are freed and it goes back to the head of the
queue, to be prefilled again (prompt plus what it generated so far). The block manager owns real
blocks (the engine's KV pool is indexed by their ids) and caches full blocks by a hash of their prefix,
so a repeated system prompt is not computed again. Static batching is kept as a mode: a batch is
admitted only when nothing runs, and it runs to completion.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
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
    enable_prefix_caching: bool = True

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
    num_cached_tokens: int = 0     # prompt tokens found in the prefix cache at first admission
    use_prefix_cache: bool = True  # False when every prompt position's logits are needed

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """``all_ids[start:stop]`` without building the whole list (a hot path: every step, every request)."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p:stop - p]
        return self.prompt_ids[start:] + self.output_ids[:stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens_outstanding(self) -> int:
        """Still to compute: prompt tokens not yet prefilled plus completion tokens not yet generated."""
        return max(0, len(self.prompt_ids) - self.num_computed) + max(0, self.max_tokens - len(self.output_ids))


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
    """The KV cache's blocks: a free list, a block table per request, reference counts, and prefix caching.

    A block holds ``block_size`` tokens' keys and values in every layer. A request owns the blocks of its
    table; a block that fills up is registered under a hash of its tokens and of every token before it
    (a chain, so equal blocks after different prefixes never match). A new request whose prompt starts
    with registered blocks shares them (reference counted) instead of computing them again. Freed blocks
    that carry a hash stay cached, least recently freed evicted first, until their memory is needed.
    Only full blocks are shared and a shared block is never written again, so no copy-on-write is needed.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}                       # block id → its chained hash
        self.cached: dict[int, int] = {}                        # chained hash → block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds (LRU first)
        self.hashes: dict[str, list[int]] = {}                  # request → hashes of its full blocks
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def held(self) -> dict[str, int]:
        """Blocks per request (for accounting checks)."""
        return {rid: len(t) for rid, t in self.tables.items()}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix caching ------------------------------------------------------------------------------
    def _chain(self, prev: int | None, tokens: list[int]) -> int:
        return hash((prev, tuple(tokens)))

    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks that hold the first tokens of ``req``'s prompt (at least one token is left to compute,
        so the last position's logits come from a forward pass). No side effects."""
        if not self.enable_prefix_caching or not req.use_prefix_cache:
            return []
        bs, ids = self.block_size, req.all_ids
        found: list[int] = []
        prev: int | None = None
        for i in range((len(ids) - 1) // bs):
            prev = self._chain(prev, ids[i * bs:(i + 1) * bs])
            block = self.cached.get(prev)
            if block is None:
                break
            found.append(block)
        return found

    def can_admit(self, request_id: str, prefix: list[int], num_tokens: int) -> bool:
        """Room for a request that takes ``prefix`` from the cache and grows to ``num_tokens``."""
        reclaimed = sum(1 for b in prefix if b in self.evictable)  # taking them removes them from the free pool
        need = self.blocks_for(num_tokens) - len(prefix)
        return need <= self.num_free - reclaimed

    def admit(self, req: Request, prefix: list[int]) -> int:
        """Give ``req`` the cached ``prefix`` blocks; returns the number of tokens they hold."""
        assert req.request_id not in self.tables, f"{req.request_id} already holds blocks"
        table: list[int] = []
        for b in prefix:
            self.evictable.pop(b, None)
            self.refs[b] += 1
            table.append(b)
        self.tables[req.request_id] = table
        self.hashes[req.request_id] = [self.hash_of[b] for b in prefix]
        if self.enable_prefix_caching:
            self.num_queried_tokens += req.num_tokens
            self.num_hit_tokens += len(prefix) * self.block_size
        return len(prefix) * self.block_size

    def commit(self, req: Request) -> None:
        """Register every block of ``req`` that its computed tokens now fill."""
        if not self.enable_prefix_caching:
            return
        table, hashes, bs = self.tables.get(req.request_id), self.hashes.get(req.request_id), self.block_size
        if table is None or hashes is None:
            return
        while len(hashes) < min(req.num_computed // bs, len(table)):
            i = len(hashes)
            h = self._chain(hashes[-1] if hashes else None, req.tokens(i * bs, (i + 1) * bs))
            hashes.append(h)
            block = table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h

    # -- allocation ------------------------------------------------------------------------------------
    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self.tables.get(request_id, ())) <= self.num_free

    def grow(self, request_id: str, num_tokens: int) -> None:
        table = self.tables.setdefault(request_id, [])
        self.hashes.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        assert need <= self.num_free, "grow() without can_grow()"
        for _ in range(need):
            table.append(self._take())

    def _take(self) -> int:
        if self.free_ids:
            b = self.free_ids.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)  # the least recently freed cached block
            del self.cached[self.hash_of.pop(b)]
        self.refs[b] = 1
        return b

    def free(self, request_id: str) -> None:
        self.hashes.pop(request_id, None)
        for b in reversed(self.tables.pop(request_id, [])):  # tail blocks first: they are evicted first
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free_ids.append(b)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (after the cache's contents became invalid)."""
        for b in list(self.evictable):
            del self.cached[self.hash_of.pop(b)]
            self.free_ids.append(b)
        self.evictable.clear()

    @property
    def usage(self) -> float:
        """Blocks held by requests, as a fraction (cached blocks no request holds count as free)."""
        return 1.0 - self.num_free / self.num_blocks


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._batch_open = False  # static batching: the current batch still takes requests

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
        # Static batching: a batch opens when nothing runs and takes requests until the queue, max_num_seqs
        # or the memory stops it (the token budget only spreads the prefills over steps), then runs until
        # every member is done.
        if cfg.static and not self.running:
            self._batch_open = True
        admit = not preempted and (not cfg.static or self._batch_open)
        while admit and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            prefix = self.blocks.match_prefix(req)  # blocks another request already computed
            cached = len(prefix) * cfg.block_size
            n = min(req.num_tokens - cached, budget)
            if not self.blocks.can_admit(req.request_id, prefix, cached + n):
                break  # FCFS: never let a later request overtake the head of the queue
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            req.num_computed = self.blocks.admit(req, prefix)
            if not req.num_preemptions:
                req.num_cached_tokens = req.num_computed
            self.blocks.grow(req.request_id, req.num_computed + n)
            chunks.append(ScheduledChunk(req.request_id, req.num_computed, n))
            scheduled.add(req.request_id)
            budget -= n
        if admit and budget > 0:  # admission stopped for a reason other than this step's budget
            self._batch_open = False
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
            self.blocks.commit(req)
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
