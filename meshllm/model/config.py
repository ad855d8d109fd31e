"""ModelConfig: the shape of a Llama-family model, from config.json or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, ModelFileError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' `rope_parameters`, normalised)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs`: per-frequency divisors (llama.cpp's llama3)


@dataclass(frozen=True)
class ModelConfig:
    """The numbers that define a Llama decoder; everything else is derived."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # the checkpoint's own dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_group(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for hashing a model and for the wire."""
        d = dict(self.__dict__)
        d["rope"] = dict(self.rope.__dict__)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        rope = dict(d["rope"])
        if rope.get("freq_factors") is not None:
            rope["freq_factors"] = tuple(rope["freq_factors"])
        d["rope"] = RopeConfig(**rope)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json (transformers 4 or 5 key layout)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            shown = ", ".join(archs) or model_type or "none given"
            raise UnsupportedModelError(
                f"{source}: architecture {shown!r} is not supported; meshllm runs Llama-architecture models "
                f"(model_type 'llama', LlamaForCausalLM)"
            )

        def need(key: str, kind: type = int) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            value = raw[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{source}: {key!r} must be {kind.__name__}, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"{source}: pretraining_tp > 1 is not supported")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        config = cls(
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_rope_from_hf(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
            eos_token_ids=eos_ids,
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` from a file path."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ModelFileError(
                f"{path} not found: a Hugging Face model folder needs config.json next to its *.safetensors"
            ) from e
        except OSError as e:
            raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        return cls.from_hf(raw, str(path))

    def validate(self, source: str) -> None:
        """Reject shapes the math cannot run, naming the key."""
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "vocab_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{source}: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: rope type {self.rope.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )


def _rope_from_hf(raw: Mapping[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); transformers 4 writes top-level
    # `rope_theta` and an optional `rope_scaling` dict (whose type key was once `type`, later `rope_type`).
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    merged: dict[str, Any] = {}
    if isinstance(scaling, Mapping):
        merged.update(scaling)
    if isinstance(params, Mapping):
        merged.update(params)
    elif params is not None:
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type=str(rope_type),
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=(
                int(merged["original_max_position_embeddings"])
                if merged.get("original_max_position_embeddings") is not None
                else None
            ),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: malformed rope parameters {merged!r}: {e}") from e
