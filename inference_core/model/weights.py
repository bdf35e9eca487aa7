"""Safetensors loading (single file or sharded index), validated, built on the meta device.

Also makes the bundled tiny checkpoint: a Qwen2-architecture model with fixed-seed weights and a
locally trained byte-level BPE tokenizer, written in Hugging Face layout so the default path runs
exactly the real loading code.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from inference_core.integrity import write_manifest
from inference_core.model.checkpoint import SINGLE_FILE, WeightsError, checkpoint_files, validate_safetensors_header
from inference_core.model.config import PRESETS, ModelConfig
from inference_core.model.transformer import CausalLM, fuse_linears, rope_inv_freq
from inference_core.tokenizer import DEFAULT_CHAT_TEMPLATE, corpus_text, train_bundled_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def mmap_tensors(path: Path, keep: list[mmap.mmap]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a copy-on-write memory map (no read, no copy)."""
    header = validate_safetensors_header(path)
    with path.open("rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    keep.append(mm)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        dtype = ST_DTYPES.get(str(info["dtype"]))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name}: unsupported dtype {info['dtype']}")
        start, end = (8 + n + int(o) for o in info["data_offsets"])  # type: ignore[attr-defined]
        chunk = raw[start:end]
        if start % dtype.itemsize:  # misaligned for its dtype: a copy is the only way
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).view(*[int(d) for d in info["shape"]])  # type: ignore[attr-defined]
    return out


def load_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """Build on the meta device, then assign memory-mapped tensors: no second copy in RAM."""
    cfg = ModelConfig.from_file(model_dir / "config.json")
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files = checkpoint_files(model_dir)
    for f in set(files.values()):
        validate_safetensors_header(f)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise WeightsError(f"{model_dir}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    state: dict[str, torch.Tensor] = {}
    maps: list[mmap.mmap] = []
    for fname in sorted(set(files.values())):
        for name, t in mmap_tensors(fname, maps).items():
            if name not in expected:
                continue
            if tuple(t.shape) != tuple(expected[name]):
                raise WeightsError(
                    f"{fname}: tensor {name}: shape {tuple(t.shape)} != expected {tuple(expected[name])}")
            state[name] = t.to(device=device, dtype=dtype)  # a no-op (no copy) for same dtype on the CPU
    model.load_state_dict(state, strict=False, assign=True)
    model.mmaps.extend(maps)  # keep the mappings alive as long as the parameters that view them
    model.mmap_paths.update({id(mm): f for mm, f in zip(maps, sorted(set(files.values())), strict=True)})
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers built on the meta device hold no data: recompute the RoPE frequencies for real.
    model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
    return model.eval()


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def hugepages_available(setting: Path = THP_SETTING) -> bool:
    """Transparent huge pages can back memory that asks for them (``[always]`` or ``[madvise]``)."""
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def _release(mm: mmap.mmap, start: int, nbytes: int, page: int) -> None:
    """Drop a copied tensor's pages of the file map: read again only if touched again."""
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page  # whole pages inside
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class HugePageMove:
    """The weights that view the checkpoint's memory maps, copied into one anonymous mapping backed by
    transparent huge pages, one block at a time (the embedding, each decoder layer, the final norm, the
    head), each tensor's file pages released as soon as it is copied (the weights stay in memory once, as
    with zero-copy loading). A decode step streams every weight: with 2 MiB pages instead of 4 KiB ones
    the TLB stops being a bottleneck (measured: single-stream decode +15-20 % on the 0.5B shape).

    Within a block, the layers that read one input (q, k, v; gate, up) get their weights back to back and
    then their biases, and are fused as soon as the block has moved (``model.fuse_linears``: views, no
    copy); ``on_fused`` is told of each fused layer (the engine switches it to the CPU kernels), then
    ``on_moved`` of the block (the engine packs its weights for the CPU kernels: ``kernels.pack``).

    The engine moves the blocks from its step thread while it already serves (``step``): the copy (about
    1 GiB at the 0.5B shape, seconds where the kernel must first reclaim page cache for it) is not on the
    way to ready. ``run`` moves everything at once."""

    def __init__(self, model: CausalLM, blocks: list[tuple[nn.Module, list[torch.Tensor]]], total: int,
                 on_fused: Callable[[list[nn.Module]], None] | None = None,
                 on_moved: Callable[[nn.Module], None] | None = None) -> None:
        self.model = model
        self.blocks = blocks
        self.total = total
        self.on_fused = on_fused
        self.on_moved = on_moved
        self.moved_bytes = 0
        self.seconds = 0.0
        self._arena: mmap.mmap | None = None
        self._offset = 0
        self._next = 0
        maps: list[mmap.mmap] = model.mmaps
        self._bases = [(torch.frombuffer(mm, dtype=torch.uint8).data_ptr(), len(mm), mm) for mm in maps if len(mm)]

    ALIGN = 64

    @classmethod
    def plan(cls, model: CausalLM) -> HugePageMove | None:
        """None where huge pages are unavailable, nothing is mapped, or a device map placed layers
        elsewhere (offloaded layers must stay on disk)."""
        maps: list[mmap.mmap] = model.mmaps
        if not maps or model.placement is not None or not hugepages_available():
            return None
        bases = [(torch.frombuffer(mm, dtype=torch.uint8).data_ptr(), len(mm)) for mm in maps if len(mm)]

        def mapped(t: torch.Tensor) -> bool:
            return t.device.type == "cpu" and t.is_contiguous() and any(
                base <= t.data_ptr() < base + size for base, size in bases)

        seen: set[int] = set()
        blocks: list[tuple[nn.Module, list[torch.Tensor]]] = []
        parts = [*model.model.children(), *[m for n, m in model.named_children() if n != "model"]]
        units: list[nn.Module] = []
        for part in parts:  # the decoder layers one by one; every other block whole
            units.extend(part.children() if isinstance(part, nn.ModuleList) else [part])
        for unit in [*units, model]:  # the model last: whatever sits directly on it (buffers)
            grouped: list[torch.Tensor] = []
            for module in unit.modules():
                for group in getattr(module, "fusion_groups", dict)().values():
                    if all(isinstance(m, nn.Linear) for m in group):
                        grouped += [m.weight for m in group]
                        grouped += [m.bias for m in group if m.bias is not None]
            own = [*unit.parameters(), *unit.buffers()] if unit is not model else \
                [*model.parameters(recurse=False), *model.buffers(recurse=False)]
            block = []
            for t in [*grouped, *own]:
                if mapped(t) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    block.append(t)
            if block:
                blocks.append((unit, block))
        total = sum(-(-t.nbytes // cls.ALIGN) * cls.ALIGN for _, b in blocks for t in b)
        return cls(model, blocks, total) if total else None

    @property
    def done(self) -> bool:
        return self._next >= len(self.blocks)

    def run(self) -> int:
        while not self.done:
            self.step()
        return self.moved_bytes

    def step(self) -> int:
        """Move the next block; returns its bytes (0 when everything has moved)."""
        if self.done:
            return 0
        t0 = time.monotonic()
        if self._arena is None:  # faulted in block by block as it is written
            self._arena = mmap.mmap(-1, self.total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._arena.madvise(mmap.MADV_HUGEPAGE)
            self.model.arenas.append(self._arena)  # lives as long as the model; the file maps keep the rest
        arena = self._arena
        raw = torch.frombuffer(arena, dtype=torch.uint8)
        unit, block = self.blocks[self._next]
        self._next += 1
        page = mmap.PAGESIZE
        moved: dict[int, torch.Tensor] = {}
        fds: dict[int, int] = {}
        try:
            for t in block:
                ptr = t.data_ptr()
                base, mm = next((b, m) for b, size, m in self._bases if b <= ptr < b + size)
                dst = raw[self._offset:self._offset + t.nbytes].view(t.dtype).view(t.shape)
                # read straight from the file into the arena: the kernel copies from its page cache, with no
                # fault per 4 KiB page of the map (a restart finds the weights there: about 3x faster than a copy)
                path = self.model.mmap_paths.get(id(mm))
                done = 0
                if path is not None:
                    fd = fds[id(mm)] = fds.get(id(mm)) or os.open(path, os.O_RDONLY)
                    with memoryview(arena)[self._offset:self._offset + t.nbytes] as view:
                        while done < t.nbytes and (n := os.preadv(fd, [view[done:]], ptr - base + done)) > 0:
                            done += n
                if done != t.nbytes:
                    dst.copy_(t)
                moved[ptr] = dst
                self._offset += -(-t.nbytes // self.ALIGN) * self.ALIGN
                _release(mm, ptr - base, t.nbytes, page)
        finally:
            for fd in fds.values():
                os.close(fd)
        fused: list[nn.Module] = []
        with torch.no_grad():
            for module in self.model.modules():  # every module that holds one of them (a tied head too)
                for p in module.parameters(recurse=False):
                    if p.data_ptr() in moved:
                        p.data = moved[p.data_ptr()]
                for name, buf in list(module.named_buffers(recurse=False)):
                    if buf.data_ptr() in moved:
                        module._buffers[name] = moved[buf.data_ptr()]
            for module in unit.modules() if unit is not self.model else []:  # this block's layers, now adjacent
                for gname, group in getattr(module, "fusion_groups", dict)().items():
                    if (f := fuse_linears(group)) is not None:
                        vars(module)[gname] = f  # not a submodule: the state dict keeps the checkpoint's names
                        fused.append(f)
        if fused and self.on_fused is not None:
            self.on_fused(fused)
        if self.on_moved is not None:
            self.on_moved(unit)
        nbytes = sum(t.nbytes for t in moved.values())
        self.moved_bytes += nbytes
        self.seconds += time.monotonic() - t0
        return nbytes


def move_to_hugepages(model: CausalLM) -> int:
    """Move every weight into huge pages now (``HugePageMove``); returns the bytes moved (0 where huge
    pages are unavailable, nothing is mapped, or a device map placed layers elsewhere)."""
    mover = HugePageMove.plan(model)
    return mover.run() if mover is not None else 0


def fit_to_corpus(model: CausalLM, ids: torch.Tensor, steps: int, seed: int, seq: int = 64, batch: int = 16) -> float:
    """A few hundred AdamW steps on the bundled corpus, single-threaded so the result is the same on
    every machine: the bundled model then writes corpus-like text with confident next-token choices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        pos = torch.arange(seq).expand(batch, seq)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
            x = torch.stack([ids[s:s + seq] for s in starts])
            y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
            logits = model(x, pos)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())
    finally:
        torch.set_num_threads(threads)


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, preset: str = "tiny", train_steps: int = 150,
                         corpus: str | None = None) -> Path:
    """Write the bundled model (fixed seed, fitted to the bundled corpus, or to ``corpus``: the tokenizer is
    the bundled one either way) in Hugging Face layout; idempotent for a given seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = PRESETS[preset]
    tok = train_bundled_tokenizer(base.vocab_size)
    eos = tok.token_to_id("<|endoftext|>")
    im_end = tok.token_to_id("<|im_end|>")
    cfg = ModelConfig(**{**base.to_dict(), "vocab_size": tok.get_vocab_size(), "eos_token_id": [eos, im_end],
                         "bos_token_id": None})
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.normal_(0.0, 0.08)
    if train_steps:
        fit_to_corpus(model, torch.tensor(tok.encode(corpus or corpus_text()).ids), train_steps, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / SINGLE_FILE),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": DEFAULT_CHAT_TEMPLATE, "eos_token": "<|endoftext|>", "model_max_length":
        cfg.max_position_embeddings}, indent=2) + "\n")
    write_manifest(out_dir)
    return out_dir
