"""Int8 weight-only quantization: symmetric, per output channel (per row for embeddings), fp16 scales.
Layers that read one input (q, k, v; gate, up) are stacked into one matrix each, which they view.

Weights are stored as int8 plus one scale per row and dequantized on the fly in the forward pass; the
activations stay in the model's dtype. The deployment guide's budget: 25 % of the fp32 size within
1.2 % quality loss (``bench/quantize.py`` prints both).
"""

from __future__ import annotations

import mmap
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from inference_core.model.transformer import CausalLM

# up to here torch's int8 kernel (one row at a time, from the int8 weights) beats dequantizing the matrix for
# every call; past it dequantizing wins. Measured on AVX512-BF16 without AMX, 0.5B shape's layers (2 cores):
# 16 rows 1.0 ms vs 1.3 ms, 32 rows 1.9 vs 1.7 (4864x896). With AMX the int8 AMX kernel takes these rows first.
INT8_MM_MAX_ROWS = 16


CHUNK_ELEMENTS = 1 << 22  # rows are quantized in blocks of about this many elements (16 MiB of fp32)


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 rows and their fp16 scales (the scale is rounded to fp16 before quantizing, so the stored
    scale is exactly the one the int8 values were computed with). Block by block: the fp32 temporaries
    stay ~16 MiB whatever the matrix (a 151,936-row vocabulary is 0.9 GiB in fp32). A bf16 matrix on a CPU
    with the kernels goes through ``quantize_rows_int8``: the same bits in one pass (tested)."""
    from inference_core import kernels

    kernel = kernels.load() if w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2 else None
    if kernel is not None:
        q, scale = kernel.quantize_rows_int8(w.detach())
        return q, scale
    rows = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows, dtype=torch.float16, device=w.device)
    step = max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))
    for i in range(0, rows, step):
        block = w[i:i + step].detach().float()
        s = (block.abs().amax(dim=1) / 127.0).clamp(min=1e-6).half()  # [rows]
        q[i:i + step] = torch.round(block / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i:i + step] = s
    return q, scale


class Int8Linear(nn.Module):
    # the CPU kernels' module (inference_core.kernels.accelerate sets it): one bf16 row multiplies the int8
    # weights directly with AVX512 (linear_int8), and where AMX can take this layer's shape, rows up to its
    # AMX_MAX_ROWS do too, widened to bf16 tile by tile (linear_int8_amx); without AMX, linear_int8 takes
    # up to kernels.MAX_ROWS rows
    int8_kernel: Any = None
    int8_kernel_rows = 0
    int8_tiles = False

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = _quantize_rows(linear.weight)
        self.register_buffer("qweight", q)                     # [out, in] int8
        self.register_buffer("scale", scale)                   # [out] fp16
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    qweight: Tensor
    scale: Tensor
    bias: nn.Parameter | None

    @classmethod
    def stacked(cls, layers: list[Int8Linear]) -> Int8Linear | None:
        """One layer computing ``layers`` (which read the same input) at once, their rows stacked; each of
        ``layers`` then views its rows of it (no second copy). None where their inputs or biases differ."""
        if len(layers) < 2 or any(m.in_features != layers[0].in_features for m in layers) \
                or any((m.bias is None) != (layers[0].bias is None) for m in layers):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("qweight", torch.cat([m.qweight for m in layers]))
        fused.register_buffer("scale", torch.cat([m.scale for m in layers]))
        biases = [m.bias.detach() for m in layers if m.bias is not None]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if biases else None
        fused.in_features, fused.out_features = layers[0].in_features, int(fused.qweight.shape[0])
        first = 0
        for m in layers:
            rows = slice(first, first + m.out_features)
            m.qweight, m.scale = fused.qweight[rows], fused.scale[rows]
            if fused.bias is not None:
                m.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=False)
            first += m.out_features
        return fused

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if self.int8_kernel is not None and x.dtype == torch.bfloat16 and rows <= self.int8_kernel_rows \
                and x.device.type == "cpu":
            if rows == 1 or not self.int8_tiles:
                return self.int8_kernel.linear_int8(x, self.qweight, self.scale, self.bias)
            return self.int8_kernel.linear_int8_amx(x, self.qweight, self.scale, self.bias)
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and rows <= INT8_MM_MAX_ROWS:
            # torch's CPU kernel reads the int8 weights directly: half the bytes of bf16 for a decode step
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.qweight,
                                                     self.scale.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)


class Int8Embedding(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        q, scale = _quantize_rows(emb.weight)
        self.register_buffer("qweight", q)                     # [vocab, hidden] int8
        self.register_buffer("scale", scale)                   # [vocab]
        self.dtype = emb.weight.dtype

    qweight: Tensor
    scale: Tensor

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        return rows * F.embedding(ids, self.scale[:, None]).to(self.dtype)


def quantize_int8(model: CausalLM) -> CausalLM:
    """Replace every linear layer and the embedding in place; returns the model. A tied output head and
    embedding share one int8 matrix (the rows are quantized the same way for both, once).

    Layer by layer, from the checkpoint's memory maps: each weight's file pages are dropped from this
    process as soon as its int8 copy exists, and q, k, v and gate, up are stacked as each block is done,
    so the load peaks near the int8 model plus one layer, not the full-precision model plus the int8 one."""
    maps = [(torch.frombuffer(mm, dtype=torch.uint8).data_ptr(), len(mm), mm)
            for mm in getattr(model, "mmaps", []) if len(mm)]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied:  # the head first; the embedding then views its int8 rows (no second quantization)
        head = Int8Linear(model.lm_head)
        emb = Int8Embedding.__new__(Int8Embedding)
        nn.Module.__init__(emb)
        emb.register_buffer("qweight", head.qweight)
        emb.register_buffer("scale", head.scale)
        emb.dtype = model.model.embed_tokens.weight.dtype
        source = model.lm_head.weight
        model.lm_head, model.model.embed_tokens = head, emb  # type: ignore[assignment]
        _release(maps, source)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
                _release(maps, child.weight)
            elif isinstance(child, nn.Embedding):
                setattr(module, name, Int8Embedding(child))
                _release(maps, child.weight)
        # q, k, v and gate, up: one call each (as weights.move_to_hugepages does)
        for name, group in getattr(module, "fusion_groups", dict)().items():
            if all(isinstance(m, Int8Linear) for m in group) and (fused := Int8Linear.stacked(group)) is not None:
                vars(module)[name] = fused  # not a submodule: the state dict keeps the layers' names
    release_mapped_pages(model)
    return model


def _release(maps: list[tuple[int, int, mmap.mmap]], t: Tensor) -> None:
    """Drop the whole pages of ``t``'s bytes from this process where ``t`` views a checkpoint map (read-only
    file pages: they come back from the file if anything reads them again)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    for base, size, mm in maps:
        if base <= start < base + size:
            first = -(-(start - base) // page) * page
            last = min(end - base, size) // page * page
            if last > first:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def release_mapped_pages(model: CausalLM) -> None:
    """Drop the resident pages of the checkpoint's memory maps (the full-precision weights were read to
    quantize them and are no longer used); the few tensors that still view the maps fault back in."""
    for mm in getattr(model, "mmaps", []):
        mm.madvise(mmap.MADV_DONTNEED)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and weight buffer (RoPE frequencies excluded), shared tensors once."""
    seen: set[int] = set()
    total = 0
    tensors = [t for _, t in model.named_parameters()] + [b for n, b in model.named_buffers() if n != "inv_freq"]
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
