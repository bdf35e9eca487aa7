"""Sampling parameters and next-token choice for a whole batch at once.

Greedy rows take one ``argmax`` over the batch (on the CPU kernel for bf16 logits); the others are
scaled by their temperature, cut to their top-k and nucleus (top-p) together, and drawn with
``torch.multinomial`` — one draw for every unseeded row, one per seeded row (its own generator, so a
seed reproduces a choice exactly).
Log-probabilities, when asked, come from the same logits (before temperature, as OpenAI reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inference_core import kernels


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
    prompt_logprobs: int | None = None     # the same for every prompt token after the first (echo)
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
    greedy = [i for i, p in enumerate(params) if p.temperature < SAMPLING_EPS]
    rand = [i for i, p in enumerate(params) if p.temperature >= SAMPLING_EPS]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    chosen = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if banned and any(banned):
        logits = logits.to(torch.float32, copy=True)  # the bans never reach the caller's logits
        for i, ban in enumerate(banned):
            if ban:
                logits[i, list(ban)] = float("-inf")
    elif greedy and not rand and not want:  # the common greedy batch: no float copy of [M, V]
        chosen[:] = argmax(logits)
        return chosen.tolist(), [None] * len(params)
    logits = logits.float()
    if greedy:
        chosen[greedy] = argmax(logits if len(greedy) == len(params) else logits[greedy])
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
    if want:
        top_n = max(params[i].logprobs or 0 for i in want)
        for i, lp in zip(want, token_logprobs(logits[want], [ids[i] for i in want], top_n), strict=True):
            n = params[i].logprobs or 0
            lps[i] = TokenLogprob(lp.token_id, lp.logprob, lp.top[:n])
    return ids, lps


def argmax(logits: Tensor) -> Tensor:
    """Each row's index of its maximum, as ``torch.argmax`` chooses (the first of ties, the first NaN): on
    the CPU kernel for bf16 rows (torch's takes ~6 ms over 16 rows of a 152k vocabulary on 2 cores, the
    kernel ~0.4 ms), else torch's."""
    if logits.dtype == torch.bfloat16 and logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1]:
        if (mod := kernels.load()) is not None:
            return mod.argmax_bf16(logits)
    return logits.argmax(dim=-1)


def token_logprobs(logits: Tensor, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """Log-probabilities of ``token_ids`` (one per row of logits [R, V]) and each row's ``top_n`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(token_ids)), torch.tensor(token_ids, dtype=torch.long)].tolist()
    if top_n:
        top_v, top_i = logp.topk(top_n, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops, strict=True)]


# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing by a tinier one overflows the
# logits to inf and the probabilities to NaN.
SAMPLING_EPS = 1e-5


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature, then top-k and top-p, per row, vectorized: [R, V] → probabilities."""
    temp = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    logits = logits.float() / temp  # in float32: a small temperature must not overflow half precision
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
        sorted_l, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
        drop = ranks >= top_k[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
        sp = torch.softmax(sorted_l.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (sp.cumsum(dim=-1) - sp) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[:, 0] = False  # and always the most likely token (a top_p that rounds to 0 in float32 keeps one)
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_l)
    return torch.softmax(logits, dim=-1)
