"""Decode steps replayed as CUDA graphs, as vLLM does by default (``--enforce-eager`` turns it off).

A decode step launches a few hundred small kernels (24 layers of projections, norms, rotary embedding,
attention); on a GPU the launches, not the arithmetic, bound a small batch. A CUDA graph records the
step's kernels once and replays them with one launch. A graph fixes every shape, so a decode-only step
is padded to a captured shape:

- the batch to the next capture size: 1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs`` (vLLM's
  sizes);
- the context width (the slots a decode's attention reads) to the next power of two from 256 slots, up
  to ``MAX_CAPTURE_LEN`` (vLLM's ``max_seq_len_to_capture``, 8192). A step with a longer context, a
  prefill chunk, a request for prompt log-probabilities or more sequences than the largest size runs
  eagerly.

Padding rows decode token 0 at position 0; they write their key and value to a scratch slot outside
the scheduler's blocks (the engine allocates one block more than it plans) and attend to that slot only,
so they never touch a sequence's cache. The real rows' keys beyond their length are masked out, exactly
as the eager path masks a batch of unequal lengths, so a replay computes the eager step's logits.

A shape is captured the first time a step needs it (after two warm-up runs on a side stream), into one
memory pool that every graph shares: steps run one at a time and each step's logits are read before the
next replay. Shapes whose padded gather (batch x width slots) exceeds the KV pool are not captured: the
memory plan reserves one layer's gather of the whole pool, and a graph must stay inside that. If a
capture fails, the engine logs why and decodes eagerly from then on.

``DecodeGraphs(..., capture=False)`` runs the same padded static step without a graph: the tests check on
a CPU that the padding computes the eager step's logits (the capture itself needs a GPU: the ``gpu``
tests).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from inference_core.kv_cache import FlatBatch, PagedKVCache, SeqChunk, _OnDevice
from inference_core.model.transformer import CausalLM

log = logging.getLogger(__name__)

MAX_CAPTURE_LEN = 8192
MIN_WIDTH = 256


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to pad to: 1, 2, 4, 8, then multiples of 8 until one holds ``max_num_seqs``."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8)
    return [s for s in sizes if s < max_num_seqs] + [min(s for s in sizes if s >= max_num_seqs)]


def capture_widths(max_len: int = MAX_CAPTURE_LEN) -> list[int]:
    widths = [MIN_WIDTH]
    while widths[-1] < max_len:
        widths.append(widths[-1] * 2)
    return widths


def _bucket(n: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class _StaticBatch(FlatBatch):
    """A FlatBatch whose metadata lives in fixed tensors (a graph's inputs), refilled before each replay."""

    def __init__(self, meta: _OnDevice) -> None:  # no chunks: forward_flat reads only ``on()``
        self.chunks = []
        self.block_size = 0
        self._cache = {meta.input_ids.device: meta}

    def on(self, device: torch.device) -> _OnDevice:
        return self._cache[device]


@dataclass
class _Shape:
    batch: int
    width: int
    meta: _OnDevice
    graph: torch.cuda.CUDAGraph | None = None
    out: Tensor | None = None  # the captured step's logits [batch, V] (a graph's static output)


class DecodeGraphs:
    """Padded decode steps, one static shape per (batch size, width); captured as CUDA graphs on a GPU."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, scratch_slot: int, max_num_seqs: int,
                 capture: bool = True) -> None:
        self.model, self.cache, self.scratch = model, cache, scratch_slot
        self.device = cache.keys[0].device
        assert all(t.device == self.device for t in cache.keys), "one device: graphs do not span devices"
        assert 0 <= scratch_slot < cache.keys[0].shape[0]
        self.sizes = capture_sizes(max_num_seqs)
        self.widths = capture_widths()
        self.pool_slots = cache.keys[0].shape[0]
        self.capture = capture and self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.replays = 0
        self.failed: str | None = None  # why capturing stopped (the engine then decodes eagerly)

    def shape_for(self, chunks: list[SeqChunk]) -> tuple[int, int] | None:
        """The padded (batch, width) this step would replay, or None where it must run eagerly."""
        if self.failed is not None or not chunks:
            return None
        if any(len(c.token_ids) != 1 or c.all_logits or not c.sample for c in chunks):
            return None
        b = _bucket(len(chunks), self.sizes)
        w = _bucket(max(c.start + 1 for c in chunks), self.widths)
        if b is None or w is None or b * w > self.pool_slots:
            return None
        return b, w

    def run(self, chunks: list[SeqChunk], block_size: int) -> Tensor | None:
        """The step's logits [len(chunks), V] from a replay (or the static step, without capture); None
        where the step does not fit a captured shape or capturing failed (run it eagerly)."""
        key = self.shape_for(chunks)
        if key is None:
            return None
        shape = self.shapes.get(key)
        if shape is None:
            shape = self._new_shape(*key)
            self._fill(shape, chunks, block_size)
            if self.capture and not self._capture(shape):
                return None
            self.shapes[key] = shape
        else:
            self._fill(shape, chunks, block_size)
        for hook in self.model.forward_hooks:  # fault drills raise here, as at the start of an eager pass
            hook()
        if shape.graph is not None:
            shape.graph.replay()
        else:
            shape.out = self._forward(shape)
        self.replays += 1
        assert shape.out is not None
        return shape.out[:len(chunks)]

    # -- static tensors ------------------------------------------------------------------------------------
    def _new_shape(self, b: int, w: int) -> _Shape:
        dev = self.device
        mask = torch.zeros(b, 1, 1, w, dtype=torch.bool, device=dev)
        mask[:, :, :, 0] = True  # a padding row attends to its scratch slot only
        meta = _OnDevice(
            input_ids=torch.zeros(b, dtype=torch.long, device=dev),
            positions=torch.zeros(b, dtype=torch.long, device=dev),
            slot_mapping=torch.full((b,), self.scratch, dtype=torch.long, device=dev),
            num_decodes=b,
            decode_slots=torch.full((b, w), self.scratch, dtype=torch.long, device=dev),
            decode_mask=mask,
            decode_lens=torch.ones(b, dtype=torch.long, device=dev),
            prefills=[],
            sample_idx=torch.arange(b, device=dev),
        )
        return _Shape(b, w, meta)

    def _fill(self, shape: _Shape, chunks: list[SeqChunk], block_size: int) -> None:
        """Copy this step's metadata into the shape's tensors; padding rows keep the scratch slot."""
        n, b, w = len(chunks), shape.batch, shape.width
        cpu = FlatBatch(chunks, block_size).on(torch.device("cpu"))
        ids = torch.zeros(b, dtype=torch.long)
        pos = torch.zeros(b, dtype=torch.long)
        slots = torch.full((b,), self.scratch, dtype=torch.long)
        ctx = torch.full((b, w), self.scratch, dtype=torch.long)
        lens = torch.ones(b, dtype=torch.long)
        ids[:n], pos[:n], slots[:n] = cpu.input_ids, cpu.positions, cpu.slot_mapping
        ctx[:n, :cpu.decode_slots.shape[1]] = cpu.decode_slots
        lens[:n] = cpu.decode_lens
        mask = (torch.arange(w)[None, :] < lens[:, None])[:, None, None, :]
        m = shape.meta
        for dst, src in ((m.input_ids, ids), (m.positions, pos), (m.slot_mapping, slots), (m.decode_slots, ctx),
                         (m.decode_lens, lens), (m.decode_mask, mask)):
            assert dst is not None
            dst.copy_(src, non_blocking=True)

    def _forward(self, shape: _Shape) -> Tensor:
        hooks, self.model.forward_hooks = self.model.forward_hooks, []  # run outside the graph, per replay
        try:
            with torch.inference_mode():
                return self.model.forward_flat(_StaticBatch(shape.meta), self.cache)
        finally:
            self.model.forward_hooks = hooks

    def _capture(self, shape: _Shape) -> bool:
        t0 = time.monotonic()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation and autotuning stay out of the graph
                    self._forward(shape)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                shape.out = self._forward(shape)
            shape.graph = graph
        except Exception as exc:  # noqa: BLE001 — any failure: decode eagerly from now on, and say why
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed for batch %d x width %d (%s); decoding eagerly from now on",
                        shape.batch, shape.width, self.failed)
            return False
        log.info("captured a decode graph: batch %d, width %d slots, in %.0f ms", shape.batch, shape.width,
                 1000 * (time.monotonic() - t0))
        return True
