"""What the engine's parts share: its configuration, its errors, what a request streams back (``Delta``,
``Result``), and a live request's bookkeeping (``Live``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from inference_core.sampling import SamplingParams, TokenLogprob
from inference_core.scheduler import Request, ScheduledChunk
from inference_core.tokenizer import IncrementalDetokenizer


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
class Live:
    """A request between submit and its Result: where its output goes, and what has been sent."""

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


Row = tuple[ScheduledChunk, Live, list[int], list[int]]  # a chunk, its request, its tokens, its block table
Sampled = dict[str, tuple[int, TokenLogprob | None]]     # request id -> (the token, its log-probability)
FatalHook = Callable[[str], None]
