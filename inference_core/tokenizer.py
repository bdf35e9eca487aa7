"""Tokenizer from ``tokenizer.json`` (the ``tokenizers`` library) and chat template rendering."""

from __future__ import annotations

import functools
import itertools
import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2 uses; rendered with jinja2 in a sandbox the way transformers does.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizerError(ValueError):
    """tokenizer.json or tokenizer_config.json is missing or malformed."""


def corpus_text() -> str:
    """The small corpus shipped in ``inference_core/data`` (the bundled tokenizer and model learn from it)."""
    return resources.files("inference_core").joinpath("data/corpus.txt").read_text()


def train_bundled_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a small byte-level BPE on the corpus shipped in ``inference_core/data``."""
    corpus = corpus_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with exactly ``vocab_size`` ids — the 256 byte symbols, then letter pairs and
    triples, the last three ids the special tokens — for checkpoints written locally without their own
    tokenizer (benchmarks, parity tests): every id decodes to its own text, so any generated id streams."""
    letters = string.ascii_letters + string.digits
    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab: dict[str, int] = {}
    for text in [*sorted(symbols), *("".join(p) for n in (2, 3) for p in itertools.product(letters, repeat=n))]:
        if len(vocab) >= vocab_size - 3:
            break
        vocab.setdefault(text, len(vocab))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


class TextTokenizer:
    """Encode/decode plus the chat template, loaded from a Hugging Face model directory."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.config = config
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._chat = env.from_string(config.get("chat_template") or DEFAULT_CHAT_TEMPLATE)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(f"tokenizer_config.json: chat_template:{exc.lineno}: {exc.message}") from exc

    @classmethod
    def from_dir(cls, model_dir: Path) -> TextTokenizer:
        path = model_dir / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load: {exc}") from exc
        cfg_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{cfg_path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        template_file = model_dir / "chat_template.jinja"  # transformers 5 keeps the template here
        if template_file.exists():
            config = {**config, "chat_template": template_file.read_text()}
            try:
                return cls(tok, config)
            except TokenizerError as exc:
                where = str(template_file)
                raise TokenizerError(str(exc).replace("tokenizer_config.json: chat_template", where)) from exc
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @functools.cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """Byte-level BPE (GPT-2, Qwen2, Llama 3): each vocabulary character stands for one byte."""
        doc = json.loads(self.tokenizer.to_str())
        dec = doc.get("decoder") or {}
        kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders") or []}
        return {ch: b for b, ch in _bytes_to_unicode().items()} if "ByteLevel" in kinds else None

    @functools.cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self.tokenizer.get_added_tokens_decoder())

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, as OpenAI's ``bytes`` field gives them: a token that is part of a multi-byte
        character has its part, not U+FFFD, so a client can join a character split across tokens. Byte-level
        vocabularies map each character back to its byte; SentencePiece's byte fallback ``<0xNN>`` is that
        byte and its ``▁`` a space; added tokens are their text."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added:
            return piece.encode()
        table = self._byte_decoder
        if table is not None and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._chat.render(messages=messages, add_generation_prompt=add_generation_prompt)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what byte-level BPE vocabularies use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


class IncrementalDetokenizer:
    """Text for one new token at a time (``tokenizers``' DecodeStream): the output is never decoded again
    as a whole. Primed with the prompt's last tokens, so a tokenizer whose decoder strips a leading
    space (SentencePiece's metaspace) joins the first output token as the full decode does. ``step``
    returns "" while a multi-byte character is still incomplete."""

    PRIME = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(prompt_ids[-self.PRIME:]) or None, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer, token_id) or ""
