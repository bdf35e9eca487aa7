"""OpenAI's shapes for log-probabilities: the completions API's parallel lists and the chat API's
per-token objects. Token strings are each id decoded alone (special tokens included), as vLLM does."""

from __future__ import annotations

from typing import Any

from inference_core.sampling import TokenLogprob
from inference_core.tokenizer import TextTokenizer

# (token id, its log-probability, the best alternatives) — None for the first prompt token (echo).
Entry = tuple[int, float | None, tuple[tuple[int, float], ...] | None]


def entries(lps: list[TokenLogprob]) -> list[Entry]:
    return [(lp.token_id, lp.logprob, lp.top) for lp in lps]


def echo_entries(prompt_ids: list[int], prompt_lps: list[TokenLogprob] | None) -> list[Entry]:
    """The prompt's tokens: the first has no log-probability; the others have theirs when computed."""
    rest: list[Entry] = entries(prompt_lps) if prompt_lps else [(t, None, None) for t in prompt_ids[1:]]
    return [(prompt_ids[0], None, None), *rest]


def completion_logprobs(tok: TextTokenizer, items: list[Entry], offset: int) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; offsets start at ``offset``."""
    tokens, offsets = [], []
    for token_id, _, _ in items:
        text = tok.decode([token_id], skip_special_tokens=False)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [None if t is None else {tok.decode([i], skip_special_tokens=False): v for i, v in t}
           for _, _, t in items]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in items], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tok: TextTokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**one(lp.token_id, lp.logprob), "top_logprobs": [one(i, v) for i, v in lp.top]}
                        for lp in lps]}
