"""The paged KV cache and the packed batch the engine hands the model each step.

The pool holds, per layer, keys and values for ``num_blocks * block_size`` token slots ([slots, K, D]);
block ``b`` owns slots ``b*block_size .. (b+1)*block_size-1``. A sequence's block table (from the
scheduler's block manager) maps its positions to slots, so sequences never need contiguous memory.

A ``FlatBatch`` packs the new tokens of every scheduled sequence into one row (decodes first, then
prefill chunks), with what attention needs to find each sequence's keys: the slot each new token is
written to, and for reads the slots of each sequence's whole context.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PagedKVCache:
    """Key and value pools, one pair per layer (on that layer's device): [num_blocks * block_size, K, D]."""

    keys: list[Tensor]
    values: list[Tensor]
    num_blocks: int
    block_size: int

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 devices: list[torch.device]) -> PagedKVCache:
        """Zero-filled. On a GPU the memory is really taken now (a budget that does not fit fails at start-up);
        on a CPU the pools are anonymous maps, zero pages the kernel commits as blocks are first written, so a
        start does not touch gigabytes it may never use (the plan has already checked that they fit)."""
        shape = (num_blocks * block_size, num_kv_heads, head_dim)

        def pool(d: torch.device) -> Tensor:
            if d.type != "cpu":
                return torch.zeros(shape, dtype=dtype, device=d)
            n = max(1, math.prod(shape) * dtype.itemsize)
            return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)  # keeps the map alive

        return cls([pool(d) for d in devices], [pool(d) for d in devices], num_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)


@dataclass(frozen=True)
class SeqChunk:
    """One scheduled sequence: compute tokens ``start .. start+len(token_ids)-1``; logits after the last
    (``sample``), or after every one of them (``all_logits``: prompt log-probabilities)."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool
    all_logits: bool = False


@dataclass
class _OnDevice:
    input_ids: Tensor                 # [N]
    positions: Tensor                 # [N]
    slot_mapping: Tensor              # [N]: where each new token's key/value is written
    num_decodes: int                  # the first num_decodes tokens are decodes (one per sequence)
    decode_slots: Tensor              # [Bd, T]: the context slots of each decode (padded with slot 0)
    decode_mask: Tensor | None        # [Bd, 1, 1, T]: True where a key is real (None: no padding)
    decode_lens: Tensor               # [Bd]: keys per decode (its context and the new token)
    prefills: list[tuple[int, int, Tensor | None, Tensor | None]]  # (first, end, context slots, mask)
    sample_idx: Tensor                # [M]: packed positions whose logits are needed


@dataclass
class FlatBatch:
    """The packed step input, built once on the CPU and copied once to each device that needs it."""

    chunks: list[SeqChunk]
    block_size: int
    _cache: dict[torch.device, _OnDevice] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert all(c.token_ids for c in self.chunks), "a scheduled chunk computes at least one token"
        assert all(len(c.token_ids) == 1 for c in self.chunks[:self.num_decodes])
        self._cache[torch.device("cpu")] = self._build()

    @property
    def num_decodes(self) -> int:
        n = 0
        while n < len(self.chunks) and len(self.chunks[n].token_ids) == 1:
            n += 1
        return n

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def _slots(self, table: list[int], start: int, stop: int) -> Tensor:
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def _build(self) -> _OnDevice:
        ids: list[int] = []
        positions: list[Tensor] = []
        slots: list[Tensor] = []
        sample: list[int] = []
        for c in self.chunks:
            end = c.start + len(c.token_ids)
            assert len(c.block_table) * self.block_size >= end, (
                f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
            ids.extend(c.token_ids)
            positions.append(torch.arange(c.start, end))
            slots.append(self._slots(c.block_table, c.start, end))
            if c.all_logits:
                sample.extend(range(len(ids) - len(c.token_ids), len(ids)))
            elif c.sample:
                sample.append(len(ids) - 1)
        nd = self.num_decodes
        decodes = self.chunks[:nd]
        width = max((c.start + 1 for c in decodes), default=0)
        decode_slots = torch.zeros(nd, width, dtype=torch.long)
        lens = torch.tensor([c.start + 1 for c in decodes], dtype=torch.long)
        for i, c in enumerate(decodes):
            decode_slots[i, :c.start + 1] = self._slots(c.block_table, 0, c.start + 1)
        mask = None
        if nd and bool((lens != width).any()):
            mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
        prefills = []
        first = nd
        for c in self.chunks[nd:]:
            end = first + len(c.token_ids)
            ctx = pmask = None
            if c.start > 0:  # earlier tokens are in the cache: read them (and the new ones) from the pool
                total = c.start + len(c.token_ids)
                ctx = self._slots(c.block_table, 0, total)
                pmask = torch.arange(total)[None, :] <= torch.arange(c.start, total)[:, None]  # [S, T]
            prefills.append((first, end, ctx, pmask))
            first = end
        return _OnDevice(torch.tensor(ids, dtype=torch.long), torch.cat(positions), torch.cat(slots), nd,
                         decode_slots, mask, lens, prefills, torch.tensor(sample, dtype=torch.long))

    def on(self, device: torch.device) -> _OnDevice:
        """The metadata on ``device`` (copied there once per step)."""
        got = self._cache.get(device)
        if got is None:
            cpu = self._cache[torch.device("cpu")]

            def mv(t: Tensor | None) -> Tensor | None:
                return None if t is None else t.to(device, non_blocking=True)

            got = _OnDevice(cpu.input_ids.to(device), cpu.positions.to(device), cpu.slot_mapping.to(device),
                            cpu.num_decodes, cpu.decode_slots.to(device), mv(cpu.decode_mask),
                            cpu.decode_lens.to(device), [(a, b, mv(c), mv(m)) for a, b, c, m in cpu.prefills],
                            cpu.sample_idx.to(device))
            self._cache[device] = got
        return got
