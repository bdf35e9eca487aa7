"""OpenAI's shapes for log-probabilities: the completions API's parallel lists and the chat API's
per-token objects. Token strings are each id decoded alone (special tokens included), as vLLM does.

The legacy completions API keys ``top_logprobs`` by token string, and byte-level tokens that are parts of
one character all decode to U+FFFD, so two of the top N can share a key (vLLM loses entries there). Here
none is lost: the likelier token keeps the text key and any later token whose text is taken is keyed
``token_id:N``. ``return_tokens_as_token_ids`` (a request field, or the server's flag) keys every token
``token_id:N`` in both APIs, as vLLM does. The chat API's ``bytes`` are the token's own bytes
(``TextTokenizer.token_bytes``), so a client joins a character split across tokens."""

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


def _label(tok: TextTokenizer, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else tok.decode([token_id], skip_special_tokens=False)


def _top(tok: TextTokenizer, top: tuple[tuple[int, float], ...], as_ids: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, logprob in top:  # best first: on a collision the likelier token keeps the text key
        key = _label(tok, token_id, as_ids)
        out[key if key not in out else f"token_id:{token_id}"] = logprob
    return out


def completion_logprobs(tok: TextTokenizer, items: list[Entry], offset: int,
                        as_ids: bool = False) -> tuple[dict[str, Any], int]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` with offsets from ``offset``, and the
    offset after the last token (the next chunk's start)."""
    tokens, offsets = [], []
    for token_id, _, _ in items:
        text = tok.decode([token_id], skip_special_tokens=False)
        tokens.append(f"token_id:{token_id}" if as_ids else text)
        offsets.append(offset)
        offset += len(text)
    top = [None if t is None else _top(tok, t, as_ids) for _, _, t in items]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in items], "top_logprobs": top,
            "text_offset": offsets}, offset


def chat_logprobs(tok: TextTokenizer, lps: list[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": _label(tok, token_id, as_ids), "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}

    return {"content": [{**one(lp.token_id, lp.logprob), "top_logprobs": [one(i, v) for i, v in lp.top]}
                        for lp in lps]}
