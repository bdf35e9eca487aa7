"""Model configuration read from a Hugging Face ``config.json`` (Qwen2 and Llama architectures)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


class ModelConfigError(ValueError):
    """config.json is missing, malformed, or names an architecture we do not run."""


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a transformers config that the forward pass needs."""

    model_type: str = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2: q/k/v have bias; Llama: none
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    explicit_head_dim: int | None = None  # config.json "head_dim", when it is not hidden / heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2/V3 MLA + MoE are not yet supported)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        model_type = raw.get("model_type")
        if model_type is None:
            raise ModelConfigError("config.json has no model_type")
        if "attention_bias" not in raw:
            kwargs["attention_bias"] = model_type == "qwen2"
        if "num_key_value_heads" not in raw and "num_attention_heads" in raw:
            kwargs["num_key_value_heads"] = raw["num_attention_heads"]
        if raw.get("head_dim") and raw.get("num_attention_heads") and raw.get("hidden_size") and \
                raw["head_dim"] != raw["hidden_size"] // raw["num_attention_heads"]:
            kwargs["explicit_head_dim"] = int(raw["head_dim"])
        if "torch_dtype" not in raw and isinstance(raw.get("dtype"), str):  # transformers 5 renamed it
            kwargs["torch_dtype"] = raw["dtype"]
        rp = raw.get("rope_parameters")  # transformers 5 writes rope_theta and the scaling here
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kwargs["rope_theta"] = float(rp["rope_theta"])
            if rp.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        scaling = kwargs.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ModelConfigError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                                   "supported (supported: llama3)")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelConfigError(f"{path}: not found") from exc
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        try:
            return cls.from_dict(raw)
        except (TypeError, ModelConfigError) as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named presets. "tiny" is the bundled model; the DeepSeek distill is listed for planning and tests of
# the config reader (its weights are never downloaded).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=151646,
        eos_token_id=151643,
    ),
}
