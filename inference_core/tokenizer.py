"""Tokenizer from ``tokenizer.json`` (the ``tokenizers`` library) and chat template rendering."""

from __future__ import annotations

import itertools
import json
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

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._chat.render(messages=messages, add_generation_prompt=add_generation_prompt)


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
