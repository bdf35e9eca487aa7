"""Decode steps padded to captured shapes (inference_core.cuda_graphs). The padding logic runs here on a CPU,
without capture (``capture=False`` runs the same static step the graph would record); the capture itself
and the engine's replays need a GPU: tests/gpu/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_core import kernels
from inference_core.cuda_graphs import MAX_CAPTURE_LEN, DecodeGraphs, capture_sizes, capture_widths
from inference_core.kv_cache import FlatBatch, PagedKVCache, SeqChunk
from inference_core.model.transformer import CausalLM
from inference_core.model.weights import load_model

BS = 16


def _pool(model: CausalLM, blocks: int) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache.allocate(blocks, BS, cfg.num_key_value_heads, cfg.head_dim, next(model.parameters()).dtype,
                                 [torch.device("cpu")] * cfg.num_hidden_layers)


def test_capture_sizes_follow_vllms_and_hold_max_num_seqs() -> None:
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(1) == [1]
    assert capture_widths() == [256, 512, 1024, 2048, 4096, 8192] and capture_widths()[-1] == MAX_CAPTURE_LEN


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_a_padded_decode_step_gives_the_eager_steps_logits_and_leaves_the_cache_alone(
        tiny_model_dir: Path, dtype: str) -> None:
    """Three decodes of different lengths padded to a batch of 4 and a width of 256 slots: the logits equal
    the eager packed step's (float32: the gather with a mask; bf16: the CPU kernels read the lengths); the
    padding row writes only the scratch slot; a second step of the same shape reuses it."""
    model = load_model(tiny_model_dir).to(getattr(torch, dtype)).eval()
    if dtype == "bfloat16":
        kernels.accelerate(model)
    blocks = 64  # 1024 slots: a batch of 4 padded to 256 slots each fits the pool's gather reserve
    eager_pool, pool = _pool(model, blocks + 1), _pool(model, blocks + 1)  # + the scratch block
    scratch = blocks * BS
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (11, 5, 17)]
    tables = [[3, 9], [7], [30, 12]]
    for p in (eager_pool, pool):
        model.forward_flat(FlatBatch([SeqChunk(s[:-2], 0, t, True) for s, t in zip(seqs, tables, strict=True)],
                                     BS), p)
    graphs = DecodeGraphs(model, pool, scratch, max_num_seqs=8, capture=False)
    tol = 1e-4 if dtype == "float32" else 2e-2  # a batch of 4 rows may take another matmul blocking than 3
    for step in (2, 1):  # two decode steps of the same shape
        chunks = [SeqChunk([s[-step]], len(s) - step, t, True) for s, t in zip(seqs, tables, strict=True)]
        assert graphs.shape_for(chunks) == (4, 256)
        before = [k.clone() for k in pool.keys]
        got = graphs.run(chunks, BS)
        want = model.forward_flat(FlatBatch(chunks, BS), eager_pool)
        assert got is not None and got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), atol=tol), step
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        written = {tables[i][(len(s) - step) // BS] * BS + (len(s) - step) % BS for i, s in enumerate(seqs)}
        for layer, (k, old) in enumerate(zip(pool.keys, before, strict=True)):
            changed = set((k != old).flatten(1).any(1).nonzero().flatten().tolist())
            assert changed <= written | {scratch}, layer
            rows = sorted(written)  # the decodes' keys, as the eager step wrote them
            assert torch.allclose(k[rows].float(), eager_pool.keys[layer][rows].float(), atol=tol), layer
    assert graphs.replays == 2 and list(graphs.shapes) == [(4, 256)]


@torch.inference_mode()
def test_steps_that_do_not_fit_a_captured_shape_run_eagerly(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir).eval()
    pool = _pool(model, 129)
    graphs = DecodeGraphs(model, pool, 128 * BS, max_num_seqs=4, capture=False)
    one = SeqChunk([5], 3, [0], True)
    assert graphs.shape_for([one]) == (1, 256)
    assert graphs.shape_for([one] * 3) == (4, 256)
    assert graphs.shape_for([one] * 5) is None                                    # more than the largest size
    assert graphs.shape_for([SeqChunk([5, 6], 0, [0], True)]) is None            # a prefill chunk
    assert graphs.shape_for([SeqChunk([5], 3, [0], True, all_logits=True)]) is None  # prompt log-probabilities
    assert graphs.shape_for([SeqChunk([5], 3, [0], False)]) is None              # nothing sampled
    long = SeqChunk([5], MAX_CAPTURE_LEN, list(range(MAX_CAPTURE_LEN // BS + 1)), True)
    assert graphs.shape_for([long]) is None                                       # context beyond 8192
    wide = SeqChunk([5], 300, list(range(19)), True)
    small = DecodeGraphs(model, _pool(model, 41), 40 * BS, max_num_seqs=4, capture=False)  # 656 slots
    assert small.shape_for([wide]) == (1, 512) and small.shape_for([wide] * 2) is None  # 2 x 512 > 656
    assert graphs.run([SeqChunk([5, 6], 0, [0], True)], BS) is None and graphs.replays == 0


@torch.inference_mode()
def test_forward_hooks_run_before_every_replay(tiny_model_dir: Path) -> None:
    """Fault drills raise from the model's forward hooks: a replay runs them first, as an eager pass does."""
    model = load_model(tiny_model_dir).eval()
    pool = _pool(model, 65)
    graphs = DecodeGraphs(model, pool, 64 * BS, max_num_seqs=2, capture=False)
    model.forward_flat(FlatBatch([SeqChunk([5, 6, 7], 0, [0], True)], BS), pool)
    calls: list[int] = []
    model.forward_hooks.append(lambda: calls.append(1))
    assert graphs.run([SeqChunk([8], 3, [0], True)], BS) is not None and calls == [1]

    def boom() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.forward_hooks.append(boom)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        graphs.run([SeqChunk([9], 4, [0], True)], BS)
    assert model.forward_hooks[-1] is boom  # the hooks are back in place after each static step
