"""Greedy picks: the CPU kernel's argmax is torch's, and the batch sampler's shortcuts change no choice."""

from __future__ import annotations

import pytest
import torch

from inference_core import kernels
from inference_core.sampling import SamplingParams, argmax, sample_batch


def _rows(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ties = torch.randint(-3, 3, (40, 37), generator=gen).float()  # many ties: the first index wins
    inf = torch.full((4, 50), float("-inf"))
    inf[1, 33] = -1e30
    inf[2, 49] = float("inf")
    nan = torch.randn(3, 70, generator=gen)
    nan[0, 5], nan[0, 60], nan[1, 69] = float("nan"), float("nan"), float("nan")  # the first NaN wins
    return [torch.randn(16, 151936, generator=gen), ties, inf, nan, torch.randn(5, 1, generator=gen),
            torch.randn(2, 15, generator=gen), torch.randn(1, 17, generator=gen)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_is_torchs_choice(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and kernels.load() is None:
        pytest.skip(f"the CPU kernels are not available here ({kernels.status()}): torch's argmax serves")
    for x in _rows(0):
        x = x.to(dtype)
        assert torch.equal(argmax(x), x.argmax(dim=-1)), x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_batches_pick_the_argmax_and_bans_stay_local(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen).to(dtype)
    best = logits.float().argmax(-1).tolist()
    greedy = SamplingParams(temperature=0.0)
    ids, lps = sample_batch(logits, [greedy] * 6, [None] * 6)
    assert ids == best and lps == [None] * 6
    # EOS before min_tokens: row 2's best is banned there, and only there; the caller's logits are untouched
    before = logits.clone()
    banned = [frozenset(), frozenset(), frozenset({best[2]}), frozenset(), frozenset(), frozenset()]
    ids, _ = sample_batch(logits, [greedy] * 6, [None] * 6, banned)
    assert ids[:2] + ids[3:] == best[:2] + best[3:] and ids[2] != best[2]
    masked = logits[2].float().clone()
    masked[best[2]] = float("-inf")
    assert ids[2] == int(masked.argmax()) and torch.equal(logits, before)
    # greedy rows next to sampled rows and rows asking for log-probabilities choose the same tokens
    mixed = [greedy, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, logprobs=2)] * 2
    ids, lps = sample_batch(logits, mixed, [torch.Generator().manual_seed(i) for i in range(6)])
    assert [ids[i] for i in (0, 2, 3, 5)] == [best[i] for i in (0, 2, 3, 5)]
    assert lps[2] is not None and lps[2].token_id == best[2] and len(lps[2].top) == 2 and lps[0] is None
