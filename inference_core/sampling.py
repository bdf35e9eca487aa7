"""Sampling parameters and next-token choice for a whole batch at once.

Greedy rows take one ``argmax`` over the batch; the others are scaled by their temperature, cut to
their top-k and nucleus (top-p) together, and drawn with ``torch.multinomial`` — one draw for every
unseeded row, one per seeded row (its own generator, so a seed reproduces a choice exactly).
Log-probabilities, when asked, come from the same logits (before temperature, as OpenAI reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None            # top-N alternatives per token (0: only the chosen token's)
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]    # (token id, logprob), best first


def sample_batch(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 banned: list[frozenset[int]] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [M, V], one row per sequence. ``banned`` ids get no probability (EOS before min_tokens)."""
    assert logits.shape[0] == len(params) == len(generators), "one parameter set and generator per row"
    logits = logits.float()
    if banned and any(banned):
        logits = logits.clone()
        for i, ban in enumerate(banned):
            if ban:
                logits[i, list(ban)] = float("-inf")
    chosen = torch.empty(len(params), dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        chosen[greedy] = logits[greedy].argmax(dim=-1)
    rand = [i for i, p in enumerate(params) if p.temperature > 0]
    if rand:
        probs = _filtered_probs(logits[rand], [params[i] for i in rand])
        free = [j for j, i in enumerate(rand) if generators[i] is None]
        if free:
            chosen[[rand[j] for j in free]] = torch.multinomial(probs[free], 1)[:, 0]
        for j, i in enumerate(rand):
            gen = generators[i]
            if gen is not None:  # seeded: its own generator (on the CPU, where seeded draws are reproducible)
                chosen[i] = int(torch.multinomial(probs[j].cpu(), 1, generator=gen))
    ids: list[int] = chosen.tolist()
    lps: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)) if top_i is not None \
                and top_v is not None else ()
            lps[i] = TokenLogprob(ids[i], float(logp[j, ids[i]]), top)
    return ids, lps


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature, then top-k and top-p, per row, vectorized: [R, V] → probabilities."""
    temp = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    logits = logits / temp
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
        sorted_l, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
        drop = ranks >= top_k[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
        sp = torch.softmax(sorted_l.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (sp.cumsum(dim=-1) - sp) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_l)
    return torch.softmax(logits, dim=-1)
