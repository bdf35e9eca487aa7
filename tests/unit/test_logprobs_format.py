"""Log-probabilities in OpenAI's shapes with byte-level tokens: the legacy top_logprobs keyed by text never
loses an entry (two byte tokens of one character both read U+FFFD), `token_id:N` keys on request, and the
chat API's `bytes` are the token's own bytes (not the encoding of U+FFFD)."""

from __future__ import annotations

from pathlib import Path

from inference_core.openai_format import chat_logprobs, completion_logprobs
from inference_core.sampling import TokenLogprob
from inference_core.tokenizer import TextTokenizer


def test_token_bytes_put_a_split_character_back_together(tiny_model_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_model_dir)
    text = "中文模型 hello <|im_end|>"
    ids = list(tok.tokenizer.encode(text, add_special_tokens=False).ids)
    assert tok.decode(ids[:1], skip_special_tokens=False) == "\ufffd"  # a part of 中, alone
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text
    assert tok.token_bytes(ids[0]) == "中".encode()[:1]


def test_colliding_top_logprobs_keep_every_entry(tiny_model_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_model_dir)
    a, b, c = tok.encode("中")  # three byte tokens, each decoding alone to U+FFFD
    hello = tok.encode(" he")[0]
    top = ((a, -0.1), (b, -0.2), (hello, -0.3), (c, -0.4))
    lp, end = completion_logprobs(tok, [(a, -0.1, top)], 0)
    assert lp["top_logprobs"] == [{"\ufffd": -0.1, f"token_id:{b}": -0.2, " he": -0.3, f"token_id:{c}": -0.4}]
    assert lp["tokens"] == ["\ufffd"] and end == 1
    ids, end = completion_logprobs(tok, [(a, -0.1, top)], 5, as_ids=True)
    assert ids["tokens"] == [f"token_id:{a}"] and ids["text_offset"] == [5] and end == 6  # offsets count text
    assert list(ids["top_logprobs"][0]) == [f"token_id:{t}" for t, _ in top]


def test_chat_bytes_are_the_tokens_own(tiny_model_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_model_dir)
    ids = tok.encode("中")
    doc = chat_logprobs(tok, [TokenLogprob(i, -0.5, ((i, -0.5),)) for i in ids])
    assert b"".join(bytes(e["bytes"]) for e in doc["content"]).decode() == "中"
    assert all(e["bytes"] != [239, 191, 189] for e in doc["content"])  # never U+FFFD's encoding
    assert chat_logprobs(tok, [TokenLogprob(ids[0], -0.5, ())], as_ids=True)["content"][0]["token"] == \
        f"token_id:{ids[0]}"
