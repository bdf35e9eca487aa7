"""The model runner: the weights on their devices (the CPU kernels, the move into huge pages while
serving), the memory plan that sizes the KV cache, the KV pool and CUDA graphs, and one forward pass over
a step's packed rows with sampling. It knows nothing of requests' streams or the scheduler's queues."""

from __future__ import annotations

import functools
import logging

import torch

from inference_core import kernels
from inference_core.cuda_graphs import DecodeGraphs
from inference_core.engine.types import EngineConfig, Live, Row, Sampled
from inference_core.faults import FaultSwitch
from inference_core.kv_cache import FlatBatch, PagedKVCache, SeqChunk
from inference_core.memory import KVPlan, PeakMemory, device_memory, kv_bytes_per_token, plan_kv_cache
from inference_core.model.transformer import Attention, CausalLM, device_of
from inference_core.model.weights import HugePageMove
from inference_core.sampling import sample_batch, token_logprobs
from inference_core.sizing import activation_estimate
from inference_core.telemetry import rss_bytes
from inference_core.tp_worker import Peers

log = logging.getLogger(__name__)


def accelerate_all(modules: list[torch.nn.Module]) -> None:
    """Layers fused after the start (a block moved into huge pages) onto the CPU kernels too."""
    for m in modules:
        kernels.accelerate(m)


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once). Per tensor, not per
    storage: the loaded weights are views of one memory map of the whole file."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.nbytes)
    return sum(seen.values())


class ModelRunner:
    """Built in start-up order: ``__init__`` lays the weights out, ``plan_memory`` sizes the KV cache,
    ``allocate`` creates the pool (and CUDA graphs); then ``forward`` runs each step."""

    def __init__(self, model: CausalLM, config: EngineConfig, peers: Peers | None = None,
                 faults: FaultSwitch | None = None) -> None:
        self.model = model
        self.config = config
        self.peers = peers  # tensor-parallel ranks 1..N-1, run in lockstep with this one
        attns: list[Attention] = [layer.self_attn for layer in model.model.layers]  # type: ignore[misc]
        self.devices = [device_of(a.k_proj) for a in attns]
        self.dtype = next(model.parameters()).dtype
        self.kv_heads, self.head_dim = attns[0].k, attns[0].d  # a tensor-parallel shard holds fewer heads
        self.plan: KVPlan | None = None
        self.graphs: DecodeGraphs | None = None  # set once the KV cache exists (the memory profile runs eagerly)
        self.cache: PagedKVCache | None = None
        accelerate = config.cpu_kernels and self.dtype == torch.bfloat16 and torch.device("cpu") in self.devices
        # the weights move into huge pages block by block from the step thread, while serving (HugePageMove)
        self.relayout: HugePageMove | None = None
        if config.hugepage_weights and all(d.type == "cpu" for d in self.devices):
            self.relayout = HugePageMove.plan(model)
            if self.relayout is not None and accelerate:
                self.relayout.on_fused = accelerate_all
                self.relayout.on_moved = functools.partial(self._pack_moved, model)  # each block once it has moved
        if accelerate:
            n = kernels.accelerate(model)
            # the packed layout where no move will read the weights from their file again (else block by block)
            packed = kernels.pack(model) if self.relayout is None else 0
            log.info("cpu kernels: %s (%d linear layers%s)", kernels.status(), n,
                     f", {packed / 2**20:.0f} MiB packed" if packed else "")
        if faults is not None:
            model.forward_hooks.append(faults.before_forward)

    @staticmethod
    def _pack_moved(model: CausalLM, block: torch.nn.Module) -> None:
        kernels.pack(model, block)

    # -- start-up ------------------------------------------------------------------------------------------
    def plan_memory(self) -> tuple[int, int]:
        """(KV blocks, max_model_len): the configured pool, else measured (``plan``) from the memory budget."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:  # an explicit pool (tests, benchmarks)
            limit = cfg.max_model_len or self.model.config.max_position_embeddings
            return cfg.num_kv_blocks, min(limit, cfg.num_kv_blocks * cfg.block_size)
        self.plan = self._plan_memory()
        log.info("%s", self.plan.describe())
        return self.plan.num_blocks, self.plan.max_model_len

    def allocate(self, num_blocks: int) -> PagedKVCache:
        """The KV pool; CUDA graphs for decode steps where one GPU holds every layer (one block more than
        the scheduler's, for the padding rows' scratch slot)."""
        cfg = self.config
        if self.peers is not None:
            self.peers.send("alloc", num_blocks, cfg.block_size)
        graphs = cfg.cuda_graphs and self.peers is None and {d.type for d in self.devices} == {"cuda"} \
            and len(set(self.devices)) == 1
        self.cache = PagedKVCache.allocate(num_blocks + int(graphs), cfg.block_size, self.kv_heads, self.head_dim,
                                           self.dtype, self.devices)
        self.graphs = DecodeGraphs(self.model, self.cache, num_blocks * cfg.block_size, cfg.max_num_seqs) \
            if graphs else None
        return self.cache

    def _plan_memory(self) -> KVPlan:
        """Measure weights and the activation peak of a full-budget prefill, then size the KV cache."""
        cfg, mcfg = self.config, self.model.config
        runtime = cfg.runtime_bytes
        weights = weights_bytes(self.model)
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
        self.run([SeqChunk([0], 0, table, True)], tmp)
        if measure:
            with PeakMemory(device) as peak:
                self.run([SeqChunk([0] * num_tokens, 0, table, True)], tmp)
            if peak.bytes is not None:
                return peak.bytes
        mc = self.model.config  # not measured, or the kernel would not reset the high-water mark: in float32
        return activation_estimate(num_tokens, mc.hidden_size, mc.intermediate_size, mc.num_attention_heads,
                                   mc.vocab_size)

    # -- the weights' move into huge pages, between steps ---------------------------------------------------
    @property
    def layout_pending(self) -> bool:
        """Weights are still moving into huge pages (decode runs ~15 % slower until they have)."""
        return self.relayout is not None

    def relayout_step(self) -> None:
        """One block of the move (the step thread calls it between steps, and block after block when idle)."""
        move = self.relayout
        if move is None:
            return
        move.step()
        self.model.drop_decode_plan()  # the plan holds the weights where they were
        if move.done:
            self.relayout = None
            if move.on_moved is not None:
                kernels.pack(self.model)  # what the move did not take (weights not mapped from a file)
            log.info("weights in transparent huge pages: %.1f MiB, moved in %.1f s while serving",
                     move.moved_bytes / 2**20, move.seconds)

    # -- a step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> Sampled:
        """One forward pass over the packed tokens of every row; sample where a sequence reached its end."""
        assert self.cache is not None, "forward before allocate"
        chunks = []
        for ch, live, toks, table in rows:
            prompt_lp = live.params.prompt_logprobs is not None and ch.start < len(live.req.prompt_ids) - 1
            chunks.append(SeqChunk(toks, ch.start, table, ch.start + len(toks) == live.req.num_tokens, prompt_lp))
        logits = self.run(chunks, self.cache)  # [M, V]
        samplers: list[Live] = []
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

    def run(self, chunks: list[SeqChunk], cache: PagedKVCache) -> torch.Tensor:
        """The logits of one packed pass (a CUDA graph's replay where one is captured for the shape)."""
        if self.graphs is not None and cache is self.cache:  # a decode step of a captured shape: one replay
            logits = self.graphs.run(chunks, cache.block_size)
            if logits is not None:
                return logits
        if self.peers is not None:  # the other ranks run the same pass; the all-reduces join us
            self.peers.send("forward", chunks)
        return self.model.forward_flat(FlatBatch(chunks, cache.block_size), cache)

    @staticmethod
    def _prompt_logprobs(live: Live, start: int, logits: torch.Tensor) -> None:
        """Logits at positions start.. predict prompt tokens start+1..; recorded once (a recompute after a
        preemption does not add them again)."""
        prompt = live.req.prompt_ids
        first = len(live.prompt_logprobs) + 1  # the next prompt position without a log-probability
        lo, hi = max(first, start + 1), min(len(prompt), start + 1 + logits.shape[0])
        if lo < hi:
            live.prompt_logprobs += token_logprobs(logits[lo - start - 1:hi - start - 1], prompt[lo:hi],
                                                   live.params.prompt_logprobs or 0)
