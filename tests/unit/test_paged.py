"""The packed forward over a paged KV cache equals the padded reference forward; the memory plan's
arithmetic; the AVX512-BF16 and AMX kernels against torch's linear."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from inference_core import kernels
from inference_core.kv_cache import FlatBatch, PagedKVCache, SeqChunk
from inference_core.memory import GiB, KVCacheTooSmall, PeakMemory, parse_bytes, plan_kv_cache
from inference_core.model.config import ModelConfig
from inference_core.model.transformer import CausalLM
from inference_core.model.weights import load_model


def _pool(model: CausalLM, blocks: int, bs: int) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache.allocate(blocks, bs, cfg.num_key_value_heads, cfg.head_dim, next(model.parameters()).dtype,
                                 [torch.device("cpu")] * cfg.num_hidden_layers)


@torch.inference_mode()
def test_packed_steps_over_scattered_blocks_equal_the_full_forward(tiny_model_dir: Path) -> None:
    """Three sequences in scattered, interleaved blocks: a chunked prefill, decodes of different lengths
    batched together, a prefill on top of a cached past — each logit equals the plain forward's."""
    model = load_model(tiny_model_dir)
    bs = 4
    pool = _pool(model, 32, bs)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (13, 6, 9)]
    tables = [[7, 2, 30, 11], [5, 19], [0, 28, 14]]  # not contiguous, not ordered
    ref = [model(torch.tensor([s]), torch.arange(len(s))[None])[0] for s in seqs]  # [T, V] each

    def run(chunks: list[SeqChunk]) -> torch.Tensor:
        return model.forward_flat(FlatBatch(chunks, bs), pool)

    # step 1: seq 0 prefills 7 tokens (chunked), seq 1 prefills 5, seq 2 prefills 8 — all in one packed pass
    out = run([SeqChunk(seqs[0][:7], 0, tables[0], True), SeqChunk(seqs[1][:5], 0, tables[1], True),
               SeqChunk(seqs[2][:8], 0, tables[2], True)])
    for row, (i, n) in enumerate([(0, 7), (1, 5), (2, 8)]):
        assert torch.allclose(out[row], ref[i][n - 1], atol=1e-4)
    # step 2: seq 1 and seq 2 decode (different context lengths: padded gather), seq 0's next chunk reads its past
    out = run([SeqChunk(seqs[1][5:6], 5, tables[1], True), SeqChunk(seqs[2][8:9], 8, tables[2], True),
               SeqChunk(seqs[0][7:13], 7, tables[0], True)])
    for row, (i, n) in enumerate([(1, 6), (2, 9), (0, 13)]):
        assert torch.allclose(out[row], ref[i][n - 1], atol=1e-4)
    # only the rows asked for are projected to the vocabulary
    assert run([SeqChunk([seqs[0][0]], 0, [3], False), SeqChunk([1, 2], 0, [4], True)]).shape == \
        (1, model.config.vocab_size)


def test_flat_batch_refuses_a_table_too_short() -> None:
    with pytest.raises(AssertionError, match="cannot hold"):
        FlatBatch([SeqChunk([1, 2, 3, 4, 5], 0, [0], True)], 4)


def plan(**kw: object) -> object:
    base: dict[str, object] = dict(device="cpu", total_bytes=24 * GiB, available_bytes=20 * GiB,
                                   weights_bytes=GiB, activation_bytes=GiB // 10, runtime_bytes=GiB // 2,
                                   bytes_per_token=12288, block_size=16, max_num_seqs=32, config_max_len=32768)
    return plan_kv_cache(**{**base, **kw})  # type: ignore[arg-type]


def test_plan_sizes_the_pool_from_the_budget_and_caps_it() -> None:
    p = plan(memory_utilization=0.5)  # 12 GiB budget - 1.6 GiB used = 10.4 GiB for the KV cache
    assert p.kv_budget_bytes == int(0.5 * 24 * GiB) - GiB - GiB // 10 - GiB // 2  # type: ignore[attr-defined]
    assert p.num_blocks == p.kv_budget_bytes // (12288 * 16) and p.max_model_len == 32768  # type: ignore[attr-defined]
    capped = plan(memory_utilization=0.9)  # more than 32 full-length sequences can use
    assert capped.num_blocks == 32 * 32768 // 16 and "capped" in capped.describe()  # type: ignore[attr-defined]


def test_plan_lowers_the_default_length_and_refuses_an_explicit_one() -> None:
    small = plan(kv_cache_memory=12288 * 1000)
    assert small.max_model_len == 992 and "lowered" in small.describe()  # type: ignore[attr-defined]
    with pytest.raises(KVCacheTooSmall, match=r"--max-model-len 4096 .* lower --max-model-len or raise "
                                              r"--kv-cache-memory"):
        plan(kv_cache_memory=12288 * 1000, max_model_len=4096)
    with pytest.raises(KVCacheTooSmall, match=r"no room for a KV cache: budget 2.16 GiB .* weights 3.00 GiB"):
        plan(weights_bytes=3 * GiB, memory_utilization=0.09)
    with pytest.raises(KVCacheTooSmall, match="exceeds the model's context length"):
        plan(max_model_len=65536)


def test_plan_respects_what_the_host_has_free() -> None:
    p = plan(available_bytes=4 * GiB, memory_utilization=0.9)
    assert p.kv_budget_bytes == 4 * GiB - GiB // 10 and "available now" in p.describe()  # type: ignore[attr-defined]
    small = plan(available_bytes=GiB // 2)  # the CPU default, lowered to what is free
    assert small.kv_budget_bytes == GiB // 2 - GiB // 10 and "available now" in small.describe()  # type: ignore


@pytest.mark.parametrize(("bpt", "seqs", "context", "kv_bytes", "max_len"), [
    (12288, 32, 32768, 32 * 2048 * 12288, 32768),        # 0.5B (Qwen2.5): 768 MiB, the full context still fits
    (28672, 32, 131072, 32 * 2048 * 28672, 65536),       # 1.5B (R1-Distill-Qwen): 1.75 GiB, 128k lowered to 64k
    (28672, 256, 131072, 4 * GiB, 131072),              # many sequences: the 4 GiB cap
])
def test_a_cpu_host_gets_a_kv_cache_sized_for_its_sequences_not_the_host(bpt: int, seqs: int, context: int,
                                                                       kv_bytes: int, max_len: int) -> None:
    """vLLM's CPU backend: max_num_seqs sequences of a realistic length (2048 tokens), at most 4 GiB, never 90 %
    of a 24 GiB host that also runs other replicas, Prometheus and sentinel. A GPU keeps the 0.9 share."""
    p = plan(bytes_per_token=bpt, max_num_seqs=seqs, config_max_len=context)
    assert p.kv_budget_bytes == kv_bytes and p.max_model_len == max_len  # type: ignore[attr-defined]
    assert "CPU default" in p.describe()  # type: ignore[attr-defined]
    gpu = plan(device="cuda:0", bytes_per_token=bpt, max_num_seqs=seqs, config_max_len=context)
    assert gpu.kv_budget_bytes == int(0.9 * 24 * GiB) - GiB - GiB // 10 - GiB // 2 or "lowered" in gpu.describe()


def test_parse_bytes() -> None:
    assert parse_bytes("4GiB") == 4 * GiB and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000


def test_peak_memory_sees_a_temporary_allocation() -> None:
    with PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    if peak.bytes is None:
        pytest.skip("this kernel does not let /proc/self/clear_refs reset the peak RSS")
    assert peak.bytes >= 60 * 2**20


needs_kernel = pytest.mark.skipif(kernels.load() is None, reason=f"no CPU kernel here: {kernels.status()}")


def _kernel_case(m: int, n: int, k: int, int8: bool = False) -> tuple[Any, Tensor, Tensor, Tensor, Tensor | None]:
    """The kernels' module and seeded operands: x [m, k] bf16, weights [n, k] (bf16, or int8 with their
    per-row scales), a bf16 bias."""
    from inference_core.model.quantize import _quantize_rows

    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen).bfloat16()
    mod = kernels.load()
    assert mod is not None
    if int8:
        q, scale = _quantize_rows(w)
        return mod, x, q, b, scale
    return mod, x, w.bfloat16(), b, None


def _close(got: Tensor, ref: Tensor) -> bool:
    return bool((got - ref).abs().max() <= 0.01 * ref.abs().max() + 1e-2)  # bf16 rounding of the output only


@needs_kernel
@pytest.mark.parametrize(("m", "n", "k"), [(1, 101, 77), (3, 64, 896), (4, 130, 64), (16, 33, 1000), (7, 5, 31),
                                           (1, 1003, 896), (2, 515, 300)])
def test_bf16_kernel_matches_a_float32_reference(m: int, n: int, k: int) -> None:
    mod, x, w, b, _ = _kernel_case(m, n, k)
    got = mod.linear_bf16(x, w, b).float()
    assert got.shape == (m, n)
    assert _close(got, F.linear(x.float(), w.float(), b.float()))
    assert mod.linear_bf16(x.view(1, m, k), w, None).shape == (1, m, n)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        mod.linear_bf16(torch.zeros(17, k).bfloat16(), w, None)


@needs_kernel
@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 2), (3, 64, 896), (8, 48, 64), (9, 80, 96), (16, 272, 130),
                                           (17, 32, 50), (100, 2048, 64), (1, 4864, 896)])
def test_packed_kernel_matches_a_float32_reference(m: int, n: int, k: int) -> None:
    """``pack_bf16_`` lays a matrix out in place per block of 16 rows, each pair of k side by side, and
    ``unpack_bf16`` gives the bits back; ``linear_packed`` over it agrees with float32 at every row count (tails
    of the 8-row groups and of the 3-block tiles included), with and without a bias, and refuses what it
    cannot take."""
    mod, x, w, b, _ = _kernel_case(m, n, k)
    packed = mod.pack_bf16_(w.clone())
    assert packed.shape == (n // 16, k // 2, 16, 2)
    assert torch.equal(packed[n // 16 - 1, k // 2 - 1, 15], w[n - 1, k - 2:])  # the last block's last pair
    assert torch.equal(mod.unpack_bf16(packed), w)
    ids = torch.tensor([0, n - 1, n // 2, 3 % n])
    assert torch.equal(mod.embedding_packed(ids, packed), w[ids])  # rows back, as a tied embedding reads them
    with pytest.raises(RuntimeError, match="out of the table"):
        mod.embedding_packed(torch.tensor([n]), packed)
    for bias in (b, None):
        got = mod.linear_packed(x, packed, bias).float()
        assert got.shape == (m, n)
        assert _close(got, F.linear(x.float(), w.float(), None if bias is None else bias.float()))
    assert mod.linear_packed(x.view(1, m, k), packed, None).shape == (1, m, n)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        mod.pack_bf16_(torch.zeros(n + 8, k).bfloat16())
    with pytest.raises(RuntimeError, match="in-features"):
        mod.linear_packed(torch.zeros(m, k + 2).bfloat16(), packed, None)


@needs_kernel
@torch.inference_mode()
def test_packed_layers_give_the_row_kernels_tokens_with_a_tied_head(tmp_path: Path) -> None:
    """``kernels.pack`` after the move (not before: on the file's map it packs nothing): every layer's weights
    packed in place (a fused layer and its parts view the same packed bytes), prefill and decode through
    ``linear_packed``, the same greedy tokens as the row kernels and logits within bf16 rounding; a head tied
    to the embedding packs with it (the table reads the packed rows, bit for bit), unless the table is a plain
    ``nn.Embedding``; a layer whose out-features are not a multiple of 16 is left alone; the decode plan takes
    every decode batch."""
    from inference_core.model.transformer import DecodePlan, _fused
    from inference_core.model.weights import hugepages_available, move_to_hugepages

    if kernels.amx():
        pytest.skip("AMX host: its kernels read the rows in place, nothing is packed")
    cfg = ModelConfig(vocab_size=304, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, attention_bias=True, tie_word_embeddings=True)
    if not hugepages_available():
        pytest.skip("transparent huge pages are off: the weights stay on their file maps, which are not packed")
    model_dir = _checkpoint(tmp_path / "m", cfg, torch.bfloat16)
    mapped = load_model(model_dir)
    kernels.accelerate(mapped)
    assert kernels.pack(mapped) == 0  # still viewing the file: packing would copy it page by page
    models = [load_model(model_dir), load_model(model_dir), load_model(model_dir)]
    for m in models:
        move_to_hugepages(m)
        kernels.accelerate(m)
    rows_ref, packed, plain_table = models
    plain_table.model.embed_tokens.__class__ = torch.nn.Embedding  # a table that cannot read the packed rows
    assert kernels.pack(plain_table) > 0 and plain_table.lm_head.weight.dim() == 2
    models = models[:2]
    assert kernels.pack(packed) > 0 and kernels.pack(packed) == 0  # once
    attn, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (128 // 16, 64, 16, 2) and mlp.down_proj.weight.dim() == 4
    assert packed.lm_head.weight.dim() == 4 and packed.lm_head.weight is packed.model.embed_tokens.weight
    ids = torch.tensor([[0, 5, 303], [17, 16, 15]])
    assert torch.equal(packed.model.embed_tokens(ids), rows_ref.model.embed_tokens(ids))
    qkv = _fused(attn, "fused_qkv", attn.q_proj)  # fused over adjacent weights: it views its parts' packed blocks
    assert qkv is not None and qkv.weight.shape == ((128 + 2 * 64) // 16, 64, 16, 2)
    toks = {id(m): [5, 6, 7, 8, 9, 10, 11] for m in models}
    logits = {}
    for m in models:
        pool = _pool(m, 8, 16)
        seq = toks[id(m)]
        out = m.forward_flat(FlatBatch([SeqChunk(list(seq), 0, [0, 1], True)], 16), pool)
        for _ in range(10):
            seq.append(int(out[0].argmax()))
            out = m.forward_flat(FlatBatch([SeqChunk([seq[-1]], len(seq) - 1, [0, 1], True)], 16), pool)
        logits[id(m)] = out.float()
    assert toks[id(rows_ref)] == toks[id(packed)]
    want, got = logits[id(rows_ref)], logits[id(packed)]
    assert (got - want).abs().max() <= 0.02 * want.abs().max() + 2e-2
    assert isinstance(packed.decode_plan, DecodePlan) and packed.decode_plan.max_rows == kernels.PACKED_MAX_ROWS
    odd = torch.nn.Sequential(torch.nn.Linear(64, 40)).bfloat16()  # 40 rows: not whole blocks of 16
    kernels.accelerate(odd)
    assert kernels.pack(odd) == 0 and odd[0].weight.dim() == 2


@needs_kernel
@pytest.mark.parametrize(("m", "n", "k"), [(1, 101, 77), (1, 896, 896), (1, 13, 4864), (2, 64, 96), (5, 130, 33),
                                           (16, 40, 200)])
def test_int8_row_kernel_matches_the_dequantized_product(m: int, n: int, k: int) -> None:
    """Weight-only int8 for a decode step's row (and up to 16): (x @ q^T) * scale + b against float32 over
    the same int8 values, for widths off the vector width and a short last block of weight rows."""
    mod, x, q, b, scale = _kernel_case(m, n, k, int8=True)
    assert scale is not None
    got = mod.linear_int8(x, q, scale, b).float()
    assert got.shape == (m, n)
    assert _close(got, (x.float() @ q.float().T) * scale.float() + b.float())
    assert torch.equal(mod.linear_int8(x.view(1, m, k), q, scale, None),
                       mod.linear_int8(x, q, scale, None).view(1, m, n))
    with pytest.raises(RuntimeError, match="int8 weights"):
        mod.linear_int8(x, q.bfloat16(), scale, b)
    with pytest.raises(RuntimeError, match="scale has"):
        mod.linear_int8(x, q, scale[:-1], b)


@needs_kernel
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_int8_row_kernel_carries_an_infinity_or_a_nan(bad: float) -> None:
    """A row with an infinity or a NaN is not quantized (its scale would be infinite): the products are the
    float32 ones, which carry it, as bf16's kernel and torch's do."""
    mod, x, q, _, scale = _kernel_case(1, 40, 77, int8=True)
    assert scale is not None
    q[:8, 50] = 0  # eight output rows meet the bad value with a zero weight ...
    q[8:, 50] = 3  # ... the rest with a non-zero weight
    x[0, 50] = bad
    got = mod.linear_int8(x, q, scale, None).float()
    want = (x.float() @ q.float().T) * scale.float()
    assert torch.equal(got[0, 8:].isnan(), want[0, 8:].isnan())
    assert torch.equal(got[0, 8:].isinf(), want[0, 8:].isinf())
    assert not got[0, 8:].isfinite().any()
    assert got[0, :8].isnan().all() and want[0, :8].isnan().all()  # inf * 0 is NaN in IEEE arithmetic


needs_amx = pytest.mark.skipif(not kernels.amx(), reason=f"no AMX kernel here: {kernels.status()}")


@needs_amx
@pytest.mark.parametrize(("m", "n", "k"), [(2, 64, 896), (5, 48, 64), (16, 128, 896), (16, 4864, 96),
                                           (17, 80, 128), (32, 96, 4864), (31, 16, 32), (9, 224, 160),
                                           (33, 48, 96), (64, 128, 896), (130, 80, 4864), (512, 32, 64)])
def test_amx_kernel_matches_a_float32_reference(m: int, n: int, k: int) -> None:
    """Full groups of 4 (up to 16 rows) and 2 (more rows) weight tiles and the short last group, partial and
    odd row tiles, long and short K; the bias is added; leading dimensions are kept; bad shapes are refused."""
    mod, x, w, b, _ = _kernel_case(m, n, k)
    got = mod.linear_amx(x, w, b).float()
    assert got.shape == (m, n)
    assert _close(got, F.linear(x.float(), w.float(), b.float()))
    assert _close(got, F.linear(x, w, b).float())  # torch's own bf16 linear rounds the same way
    assert torch.equal(mod.linear_amx(x.view(1, m, k), w, None), mod.linear_amx(x, w, None).view(1, m, n))
    with pytest.raises(RuntimeError, match="1..512 rows"):
        mod.linear_amx(torch.zeros(513, k).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.linear_amx(torch.zeros(m, k + 1).bfloat16(), torch.zeros(n, k + 1).bfloat16(), None)


@needs_amx
@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 896), (3, 48, 64), (16, 4864, 96), (17, 80, 128), (100, 32, 4864)])
def test_int8_amx_kernel_matches_the_dequantized_product(m: int, n: int, k: int) -> None:
    """int8 weights widened in the kernel: (x @ q^T) * scale + b, against float32 over the same int8 values."""
    mod, x, q, b, scale = _kernel_case(m, n, k, int8=True)
    assert scale is not None
    got = mod.linear_int8_amx(x, q, scale, b).float()
    assert _close(got, (x.float() @ q.float().T) * scale.float() + b.float())
    with pytest.raises(RuntimeError, match="int8 weights"):
        mod.linear_int8_amx(x, q.float(), scale, b)
    with pytest.raises(RuntimeError, match="scale has"):
        mod.linear_int8_amx(x, q, scale[:-1], b)


@needs_amx
@torch.inference_mode()
def test_int8_model_on_the_kernel_gives_the_library_paths_logits(tiny_model_dir: Path) -> None:
    """The bundled model quantized to int8 in bf16: accelerated (one row on the int8 row kernel, more on the
    AMX kernel where the layer's shape fits its tiles) and not (torch's int8 kernel, dequantization) agree on
    a prefill, a batch of decodes and a single decode."""
    from inference_core.model.quantize import Int8Linear, quantize_int8

    fast = quantize_int8(load_model(tiny_model_dir).bfloat16().eval())
    lib = quantize_int8(load_model(tiny_model_dir).bfloat16().eval())
    kernels.accelerate(fast)
    layers = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    fits = [m.in_features % 32 == 0 and m.out_features % 16 == 0 for m in layers]  # down_proj's 176 does not
    assert any(fits) and not all(fits)
    assert all(m.int8_kernel is not None for m in layers)
    assert [m.int8_kernel_rows for m in layers] == [kernels.AMX_MAX_ROWS if f else 1 for f in fits]
    for ids in ([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]], [[5], [20]], [[7]]):
        t = torch.tensor(ids)
        pos = torch.arange(t.shape[1])[None].expand(*t.shape)
        got, want = fast(t, pos).float(), lib(t, pos).float()
        assert (got - want).abs().mean() <= 0.02 * want.abs().mean()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@needs_amx
def test_fast_linear_routes_rows_to_the_kernels_and_agrees_with_torch() -> None:
    """After ``accelerate``: 1 row, 2..128 rows and a prefill's 300 rows all agree with nn.Linear's output, also
    when the kernel's tile use and oneDNN's (which configures the same tiles its own way) alternate;
    a layer whose shape AMX tiles cannot take keeps the row kernel and torch's linear."""
    gen = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 40)).bfloat16()
    ref = [torch.nn.Linear(128, 96).bfloat16(), torch.nn.Linear(96, 40).bfloat16()]
    for r, m in zip(ref, model, strict=True):
        r.load_state_dict(m.state_dict())
    assert kernels.accelerate(model) == 2
    assert model[0].amx_rows == kernels.AMX_MAX_ROWS and model[1].amx_rows == 0  # 40 is not a multiple of 16
    for rows in (1, 2, 16, 32, 100, 300, 16, 300, 2, 129, 128):  # AMX and oneDNN's own AMX code, interleaved
        x = torch.randn(rows, 128, generator=gen).bfloat16()
        got, want = model(x).float(), ref[1](ref[0](x)).float()
        assert (got - want).abs().max() <= 0.02 * want.abs().max() + 2e-2, rows


@needs_kernel
@pytest.mark.parametrize("hidden", [896, 100, 13])
def test_fused_rms_norm_gives_torchs_bits(hidden: int) -> None:
    """The one-pass RMSNorm against the module's torch ops in bf16 (float32 inside, rounded before the
    weight): bit for bit, including widths off the vector width; the model's RMSNorm takes it."""
    from inference_core.model.transformer import RMSNorm

    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, hidden, generator=gen) * 3).bfloat16()
    norm = RMSNorm(hidden, 1e-6).bfloat16().requires_grad_(False)
    norm.weight.copy_(torch.randn(hidden, generator=gen).bfloat16())
    want = norm(x)
    mod = kernels.load()
    assert mod is not None
    assert torch.equal(mod.rms_norm_bf16(x, norm.weight, 1e-6), want)
    vars(norm)["fused_kernel"] = mod
    assert torch.equal(norm(x.view(1, 37, hidden)), want.view(1, 37, hidden))
    with pytest.raises(RuntimeError, match="weight of"):
        mod.rms_norm_bf16(x, norm.weight[:-1], 1e-6)


@needs_kernel
@pytest.mark.parametrize("shape", [(16, 4864), (3, 33)])
def test_fused_silu_mul_matches_torch(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    gate = (torch.randn(*shape, generator=gen) * 4).bfloat16()
    up = torch.randn(*shape, generator=gen).bfloat16()
    mod = kernels.load()
    assert mod is not None
    got, want = mod.silu_mul_bf16(gate, up).float(), (F.silu(gate) * up).float()
    # its own exp: at most one bf16 rounding step apart where torch's exp lands on the other side
    assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-30).all()
    assert (got != want).float().mean() < 0.01
    # over a fused gate/up projection's rows [gate | up]: the same bits as the two halves apart
    halves = mod.silu_mul_halves_bf16(torch.cat([gate, up], dim=-1))
    assert halves.shape == gate.shape and torch.equal(halves, mod.silu_mul_bf16(gate, up))
    with pytest.raises(RuntimeError, match=r"\[..., 2I\]"):
        mod.silu_mul_halves_bf16(gate[:, :-1] if shape[1] % 2 == 0 else gate)


@needs_kernel
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "dim"), [(16, 14, 2, 64), (5, 4, 4, 24), (3, 2, 1, 128)])
def test_fused_rope_gives_torchs_bits(tokens: int, heads: int, kv_heads: int, dim: int) -> None:
    from inference_core.model.transformer import _rotate

    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(tokens, heads, dim, generator=gen).bfloat16()
    k = torch.randn(tokens, kv_heads, dim, generator=gen).bfloat16()
    angle = torch.randn(tokens, 1, dim // 2, generator=gen) * 10
    angle = torch.cat([angle, angle], -1)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    want_q, want_k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
    mod = kernels.load()
    assert mod is not None
    mod.rope_bf16_(q, k, cos, sin)  # in place
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    with pytest.raises(RuntimeError, match="one row per token"):
        mod.rope_bf16_(q, k, cos[:-1], sin[:-1])


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 64), (14, 2, 64), (8, 8, 128), (12, 2, 128),
                                                       (16, 2, 96), (6, 3, 24)])
def test_paged_decode_attention_reads_through_the_slots(heads: int, kv_heads: int, dim: int) -> None:
    """The kernel against SDPA over keys and values gathered into a padded tensor (the library path): scattered
    slots, sequences of different lengths (one key, many; whole and partial blocks of 16 keys), grouped-query
    heads in groups of 4, 2 and 1 (7 and 6 per kv head), head dims of 64 and 128 (values summed in registers),
    96 (pairs of dims, values in memory) and 24 (the scalar path); and bad slots or lengths are refused."""
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    slots_in_pool = 512
    k_pool = torch.randn(slots_in_pool, kv_heads, dim, generator=gen).bfloat16()
    v_pool = torch.randn(slots_in_pool, kv_heads, dim, generator=gen).bfloat16()
    lens = torch.tensor([1, 37, 200, 5, 129, 16])
    width = int(lens.max())
    slots = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = torch.randperm(slots_in_pool, generator=gen)[:n]
    q = torch.randn(len(lens), heads, dim, generator=gen).bfloat16()
    mod = kernels.load()
    assert mod is not None
    got = mod.paged_decode_attention(q, k_pool, v_pool, slots, lens, dim ** -0.5).float()
    mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.float()[:, :, None], k_pool.float()[slots].transpose(1, 2),
                                         v_pool.float()[slots].transpose(1, 2), attn_mask=mask,
                                         enable_gqa=True)[:, :, 0]
    assert got.shape == (len(lens), heads, dim)
    assert (got - ref).abs().max() <= 0.02, (got - ref).abs().max()  # bf16 rounding of the output
    with pytest.raises(RuntimeError, match="outside the pool"):
        mod.paged_decode_attention(q, k_pool, v_pool, slots + slots_in_pool, lens, 1.0)
    with pytest.raises(RuntimeError, match="keys; slots hold"):
        mod.paged_decode_attention(q, k_pool, v_pool, slots, lens + width, 1.0)


@needs_kernel
@torch.inference_mode()
def test_accelerated_bf16_model_decodes_the_same_tokens() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2)
    model = CausalLM(cfg).bfloat16().eval()
    twin = CausalLM(cfg).bfloat16().eval()
    twin.load_state_dict(model.state_dict())
    assert kernels.accelerate(model) == 2 * 7 + 1 and kernels.accelerate(twin.float()) == 0
    twin = twin.bfloat16()  # torch's linear layers; the same decode attention (its own test is below)
    assert all(layer.self_attn.decode_kernel is not None for layer in model.model.layers)
    assert all(layer.self_attn.decode_kernel is None for layer in twin.model.layers)
    for layer in twin.model.layers:
        vars(layer.self_attn)["decode_kernel"] = kernels.load()
    pool_a, pool_b = _pool(model, 8, 16), _pool(twin, 8, 16)
    toks_a, toks_b = [5, 6, 7], [5, 6, 7]
    for toks, m, pool in ((toks_a, model, pool_a), (toks_b, twin, pool_b)):
        logits = m.forward_flat(FlatBatch([SeqChunk(list(toks), 0, [0, 1], True)], 16), pool)
        for _ in range(12):
            toks.append(int(logits[0].argmax()))
            logits = m.forward_flat(FlatBatch([SeqChunk([toks[-1]], len(toks) - 1, [0, 1], True)], 16), pool)
    assert toks_a == toks_b


@needs_kernel
@torch.inference_mode()
def test_decode_attention_kernel_in_the_model_is_as_close_to_fp32_as_the_gather(tiny_model_dir: Path) -> None:
    """Two bf16 copies of the bundled model decode the same forced tokens in three sequences of different
    lengths, one accelerated (keys read through the slots by the kernel; the three-row linear layers on AMX
    where the CPU has it), one on the library path (keys gathered for SDPA, oneDNN's linear); against the fp32
    model's logits, the kernels' mean error is the library path's (both are bf16 rounding), within 25 %."""
    ref = load_model(tiny_model_dir).eval()
    fast, lib = load_model(tiny_model_dir).bfloat16().eval(), load_model(tiny_model_dir).bfloat16().eval()
    assert kernels.accelerate(fast) > 0
    assert all(layer.self_attn.decode_kernel is not None for layer in fast.model.layers)
    assert all(layer.mlp.fused_kernel is not None and layer.input_layernorm.fused_kernel is not None
               for layer in fast.model.layers)
    if kernels.amx():
        assert fast.model.layers[0].mlp.gate_proj.amx_rows == kernels.AMX_MAX_ROWS  # the bundled shapes fit tiles
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31], [40, 41, 42, 43, 44]]
    tables = [[0, 1, 2], [3, 4], [5, 6]]  # scattered blocks of 16
    errors: dict[str, float] = {}
    for name, m in (("ref", ref), ("kernel", fast), ("gather", lib)):
        pool = _pool(m, 8, 16)
        seqs = [list(p) for p in prompts]
        m.forward_flat(FlatBatch([SeqChunk(list(p), 0, t, True) for p, t in zip(prompts, tables, strict=True)], 16),
                       pool)
        steps = []
        for step in range(10):
            chunks = [SeqChunk([(7 * step + i) % 200], len(s), t, True) for i, (s, t) in
                      enumerate(zip(seqs, tables, strict=True))]
            for s_, c in zip(seqs, chunks, strict=True):
                s_.append(c.token_ids[0])
            steps.append(m.forward_flat(FlatBatch(chunks, 16), pool).float())
        out = torch.stack(steps)
        if name == "ref":
            want = out
        else:
            errors[name] = float((out - want).abs().mean())
    assert errors["kernel"] <= 1.25 * errors["gather"], errors  # measured: 0.0162 and 0.0154


@torch.inference_mode()
def test_weights_moved_to_huge_pages_give_the_same_logits(tiny_model_dir: Path) -> None:
    from inference_core.model.weights import hugepages_available, move_to_hugepages

    model = load_model(tiny_model_dir)
    ids, pos = torch.tensor([[5, 6, 7, 8, 9]]), torch.arange(5)[None]
    before = model(ids, pos)
    file_map = torch.frombuffer(model.mmaps[0], dtype=torch.uint8)
    lo, hi = file_map.data_ptr(), file_map.data_ptr() + file_map.numel()
    moved = move_to_hugepages(model)
    if not hugepages_available():
        assert moved == 0
        pytest.skip("transparent huge pages are off on this machine: the weights stay in the file map")
    assert moved >= sum(p.nbytes for p in model.parameters()) // 2
    assert not any(lo <= p.data_ptr() < hi for p in model.parameters())  # nothing views the file any more
    # the same logits: q, k, v and gate, up now run as one matrix each, which torch's fp32 kernel blocks
    # differently (the sums' order: fp32 rounding only)
    torch.testing.assert_close(model(ids, pos), before, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings



def _checkpoint(out: Path, cfg: ModelConfig, dtype: torch.dtype) -> Path:
    """A random checkpoint in ``dtype`` (what load_model maps without a copy)."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(3)
    out.mkdir(parents=True)
    model = CausalLM(dataclasses.replace(cfg, torch_dtype=str(dtype).removeprefix("torch."))).to(dtype)
    state = model.state_dict()
    if cfg.tie_word_embeddings:  # as Qwen2.5-0.5B's checkpoint: the head is the embedding, stored once
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_projections_reading_one_input_run_fused_after_the_move(tmp_path: Path, dtype: torch.dtype) -> None:
    """move_to_hugepages lays q, k, v (with their biases) and gate, up back to back, so each group runs as
    one matrix: views of the same weights (no copy; the state dict keeps the checkpoint's names). A packed
    step (decodes and a prefill chunk) gives the unfused model's logits: bit for bit in bf16 (the CPU
    kernels, where built), to fp32 rounding in fp32. Layers that are not adjacent are never fused."""
    from inference_core.model.transformer import _fused, fuse_linears
    from inference_core.model.weights import hugepages_available, move_to_hugepages

    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, attention_bias=True)
    apart = CausalLM(cfg).model.layers[0]
    assert fuse_linears([apart.self_attn.q_proj, apart.self_attn.k_proj, apart.self_attn.v_proj]) is None
    assert fuse_linears([apart.mlp.gate_proj, apart.mlp.up_proj]) is None
    if not hugepages_available():
        pytest.skip("transparent huge pages are off on this machine: no move, no fusion")
    model_dir = _checkpoint(tmp_path / "m", cfg, dtype)
    fused, plain = load_model(model_dir), load_model(model_dir)
    names = sorted(fused.state_dict())
    move_to_hugepages(fused)
    assert sorted(fused.state_dict()) == names
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = vars(attn)["fused_qkv"], vars(mlp)["fused_gate_up"]
        assert qkv.weight.data_ptr() == attn.q_proj.weight.data_ptr()  # a view, not a copy
        assert qkv.bias.data_ptr() == attn.q_proj.bias.data_ptr()
        assert torch.equal(qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert torch.equal(qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert torch.equal(gate_up.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    if dtype == torch.bfloat16 and kernels.load() is not None:
        assert kernels.accelerate(fused) == kernels.accelerate(plain) + 2 * 2  # the fused layers too
        assert type(vars(fused.model.layers[0].mlp)["fused_gate_up"]) is kernels.FastLinear
    outs = []
    for m in (fused, plain):
        pool = _pool(m, 8, 16)
        first = m.forward_flat(FlatBatch([SeqChunk([5, 6, 7, 8, 9, 10, 11, 12, 13], 0, [0], True),
                                          SeqChunk([30, 31, 32], 0, [2], True)], 16), pool)
        step = m.forward_flat(FlatBatch([SeqChunk([40], 9, [0], True), SeqChunk([41], 3, [2], True),
                                         SeqChunk([50, 51, 52, 53], 0, [4], True)], 16), pool)
        outs.append((first, step))
    for a, b in zip(*outs, strict=True):
        if dtype == torch.bfloat16:  # the kernels compute each output column alone: the same bits
            assert torch.equal(a, b)
        else:  # torch's fp32 kernel blocks a wider matrix differently (the sums' order)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a layer replaced afterwards (as quantization does) is no longer fused over
    fused.model.layers[0].self_attn.q_proj = torch.nn.Linear(128, 128, bias=True).to(dtype)
    assert _fused(fused.model.layers[0].self_attn, "fused_qkv", fused.model.layers[0].self_attn.q_proj) is None


@torch.inference_mode()
def test_int8_projections_reading_one_input_are_stacked(tmp_path: Path) -> None:
    """quantize_int8 stacks q, k, v (with biases) and gate, up into one int8 matrix each, which the layers
    view (no second copy; the state dict keeps their names); a packed step gives the logits of the same
    model run layer by layer: bit for bit on the CPU kernels (each output row alone), to rounding on
    torch's paths."""
    from inference_core.model.quantize import Int8Linear, quantize_int8
    from inference_core.model.transformer import _fused

    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, attention_bias=True)
    model_dir = _checkpoint(tmp_path / "m", cfg, torch.bfloat16)
    fused = quantize_int8(load_model(model_dir))
    names = sorted(quantize_int8(load_model(model_dir)).state_dict())
    assert sorted(fused.state_dict()) == names
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = _fused(attn, "fused_qkv", attn.q_proj), _fused(mlp, "fused_gate_up", mlp.gate_proj)
        assert isinstance(qkv, Int8Linear) and isinstance(gate_up, Int8Linear)
        assert qkv.qweight.data_ptr() == attn.q_proj.qweight.data_ptr()  # a view, not a copy
        assert attn.v_proj.qweight.data_ptr() == qkv.qweight[-attn.v_proj.out_features:].data_ptr()
        assert torch.equal(qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert torch.equal(gate_up.scale, torch.cat([mlp.gate_proj.scale, mlp.up_proj.scale]))
    plain = quantize_int8(load_model(model_dir))
    for m in plain.modules():
        for name in getattr(m, "fusion_groups", dict)():
            vars(m).pop(name, None)
    exact = kernels.load() is not None
    if exact:
        kernels.accelerate(fused)
        kernels.accelerate(plain)
    for rows in ([SeqChunk([5], 0, [0], True)], [SeqChunk([5, 6, 7, 8, 9, 10], 0, [0], True),
                                                 SeqChunk([30, 31, 32], 0, [2], True)]):
        got, want = (m.forward_flat(FlatBatch(rows, 16), _pool(m, 8, 16)) for m in (fused, plain))
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@torch.inference_mode()
def test_blocks_move_into_huge_pages_one_at_a_time_while_the_model_serves(tmp_path: Path) -> None:
    """The engine moves the weights block by block between steps (HugePageMove.step): after every block
    the model gives the same logits (bit for bit in bf16 on the CPU kernels), each moved block's q, k, v
    and gate, up are fused and switched to the kernels, and at the end nothing views the file."""
    from inference_core.model.transformer import _fused
    from inference_core.model.weights import HugePageMove, hugepages_available

    if not hugepages_available():
        pytest.skip("transparent huge pages are off on this machine: no move, no fusion")
    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, attention_bias=True)
    model = load_model(_checkpoint(tmp_path / "m", cfg, torch.bfloat16))
    exact = kernels.load() is not None
    if exact:
        kernels.accelerate(model)
    rows = [SeqChunk([5, 6, 7, 8, 9, 10], 0, [0], True), SeqChunk([30, 31, 32], 0, [2], True)]
    want = model.forward_flat(FlatBatch(rows, 16), _pool(model, 8, 16))
    move = HugePageMove.plan(model)
    assert move is not None and len(move.blocks) >= 3 + 2  # embedding, 3 layers, norm (and the head)
    from inference_core.engine import accelerate_all as _accelerate_all

    fused: list[torch.nn.Module] = []

    def on_fused(modules: list[torch.nn.Module]) -> None:  # as the engine: onto the kernels
        fused.extend(modules)
        if exact:
            _accelerate_all(modules)

    move.on_fused = on_fused
    file_map = torch.frombuffer(model.mmaps[0], dtype=torch.uint8)
    lo, hi = file_map.data_ptr(), file_map.data_ptr() + file_map.numel()
    layers = list(model.model.layers)
    while not move.done:
        assert move.step() > 0
        got = model.forward_flat(FlatBatch(rows, 16), _pool(model, 8, 16))
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for layer in layers:  # a layer is fused exactly when its block has moved
            moved = not lo <= layer.mlp.gate_proj.weight.data_ptr() < hi
            assert (_fused(layer.mlp, "fused_gate_up", layer.mlp.gate_proj) is not None) == moved
    assert move.step() == 0 and move.moved_bytes >= sum(p.nbytes for p in model.parameters()) // 2
    assert not any(lo <= p.data_ptr() < hi for p in model.parameters())
    assert len(fused) == 2 * len(layers)
    if exact:
        assert all(type(f) is kernels.FastLinear for f in fused)


@needs_kernel
@pytest.mark.parametrize("quant", ["bf16", "int8", "packed"])
@torch.inference_mode()
def test_a_decode_step_runs_the_whole_stack_in_one_call_with_the_layers_bits(tmp_path: Path, quant: str) -> None:
    """A decode-only step goes through ``decode_layers`` (every layer in one native call); its logits and the
    keys and values it writes are the bits of the layers' own forward, one row and several; a step with a
    prefill chunk takes the layers' path. A model whose layers do not qualify has no plan."""
    from inference_core.model.quantize import quantize_int8
    from inference_core.model.transformer import DecodePlan
    from inference_core.model.weights import hugepages_available, move_to_hugepages

    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, attention_bias=True)
    model_dir = _checkpoint(tmp_path / "m", cfg, torch.bfloat16)
    models = [load_model(model_dir), load_model(model_dir)]
    if quant == "int8":
        models = [quantize_int8(m) for m in models]
    elif hugepages_available():
        for m in models:
            move_to_hugepages(m)  # q, k, v and gate, up fused: what the plan needs in bf16
    else:
        pytest.skip("transparent huge pages are off: bf16 layers are not fused here, so no plan")
    planned, layered = models
    for m in models:
        kernels.accelerate(m)
        if quant == "packed" and not kernels.pack(m):
            pytest.skip("nothing packed on this CPU (AMX reads the rows in place)")
    layered.decode_plan = False  # the layers' own forward, always
    pools = [_pool(m, 8, 16) for m in models]
    steps = [[SeqChunk([5, 6, 7, 8, 9], 0, [0], True), SeqChunk([30, 31], 0, [2], True)],
             [SeqChunk([40], 5, [0], True)],
             [SeqChunk([41], 6, [0], True), SeqChunk([42], 2, [2], True)],
             [SeqChunk([43], 7, [0], True), SeqChunk([60, 61, 62], 0, [4], True)],  # a prefill: the layers
             [SeqChunk([44], 8, [0], True), SeqChunk([45], 3, [2], True), SeqChunk([63], 3, [4], True)]]
    for chunks in steps:
        got, want = (m.forward_flat(FlatBatch(chunks, 16), pool) for m, pool in zip(models, pools, strict=True))
        assert torch.equal(got, want)
    assert isinstance(planned.decode_plan, DecodePlan)
    assert planned.decode_plan.max_rows == (kernels.PACKED_MAX_ROWS if quant == "packed" else 1 if kernels.amx()
                                            else kernels.MAX_ROWS)  # AMX takes 2.. rows
    for a, b in zip([*pools[0].keys, *pools[0].values], [*pools[1].keys, *pools[1].values], strict=True):
        assert torch.equal(a, b)
    planned.drop_decode_plan()
    assert planned.decode_plan is None
    plain = load_model(model_dir)
    kernels.accelerate(plain)  # not fused: no plan, and the step is the layers' as before
    plain.forward_flat(FlatBatch([SeqChunk([5], 0, [0], True)], 16), _pool(plain, 8, 16))
    assert plain.decode_plan is False


@needs_kernel
def test_the_quantization_kernel_gives_the_torch_paths_bits() -> None:
    """quantize_rows_int8 (the load-time int8 quantization of bf16 weights) against the torch computation it
    replaces: the same int8 values and fp16 scales, ties to even included, a zero row's floor scale, and
    rows whose length is not a multiple of the vector width."""
    from inference_core.model import quantize

    torch.manual_seed(5)
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]], dtype=torch.bfloat16)
    for w in (torch.randn(67, 896).bfloat16(), torch.randn(5, 37).bfloat16() * 1e-3, torch.zeros(2, 19).bfloat16(),
              ties, torch.randn(3, 4864).bfloat16() * 40):
        got_q, got_s = kernels.load().quantize_rows_int8(w)  # type: ignore[union-attr]
        want_q = torch.empty(w.shape, dtype=torch.int8)
        want_s = torch.empty(w.shape[0], dtype=torch.float16)
        block = w.float()  # the torch path of _quantize_rows, as it runs without the kernel
        s = (block.abs().amax(dim=1) / 127.0).clamp(min=1e-6).half()
        want_q[:] = torch.round(block / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
        want_s[:] = s
        assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
        q, scale = quantize._quantize_rows(w)  # the model's quantization takes the kernel for bf16
        assert torch.equal(q, want_q) and torch.equal(scale, want_s)
    assert ties_q(ties) == [127, 0, 2, 2, 0, -2, 4, -126]


def ties_q(w: Tensor) -> list[int]:
    return [int(v) for v in kernels.load().quantize_rows_int8(w)[0][0]]  # type: ignore[union-attr]
