"""Model configuration: one dataclass, named presets, invariants checked once in `validate`.

`LlamaConfig.from_hf` reads a transformers `config.json` as 4.x writes it (`rope_theta` and
`rope_scaling`) and as 5.x writes it (`rope_parameters`); `to_hf` writes what transformers'
`LlamaConfig` reads, so the same weights can be loaded by the reference implementation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edgellama.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None or {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}: the keys transformers uses.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # -- invariants -------------------------------------------------------------------------
    def validate(self) -> None:
        """Every invariant the blocks rely on, checked here once and nowhere else."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config: num_key_value_heads ({self.num_key_value_heads}) does not divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config: rope_theta must be positive, got {self.rope_theta!r}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"config: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        needed = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [k for k in needed.get(rope_type, ()) if k not in (self.rope_scaling or {})]
        if missing:
            raise ConfigError(f"config: rope type {rope_type!r} needs {', '.join(missing)}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    # -- transformers' config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From a transformers config dict (4.x `rope_scaling` or 5.x `rope_parameters`)."""
        arch = d.get("model_type")
        archs = d.get("architectures") or []
        if arch not in (None, "llama") or (archs and not any(a.startswith("Llama") for a in archs)):
            raise ConfigError(f"config: unsupported architecture {arch or archs!r}; edgellama exports Llama models")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("config: attention_bias / mlp_bias are not supported (Llama has no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config: unsupported hidden_act {d.get('hidden_act')!r}; Llama uses silu")
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        if params:
            # transformers 5.x: theta and scaling live together; "default" means no scaling.
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            rope_type = params.get("rope_type", params.get("type", "default"))
            rope_scaling = None if rope_type == "default" else params
        if rope_scaling:
            rope_scaling = dict(rope_scaling)
            if "type" in rope_scaling and "rope_type" not in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")
            if rope_scaling.get("rope_type") == "default":
                rope_scaling = None
        n_heads = d.get("num_attention_heads", 32)
        return cls(
            vocab_size=d.get("vocab_size", 32000),
            hidden_size=d.get("hidden_size", 4096),
            intermediate_size=d.get("intermediate_size", 11008),
            num_hidden_layers=d.get("num_hidden_layers", 32),
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `LlamaConfig` (4.x and 5.x) reads."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


# -- presets ----------------------------------------------------------------------------------
def tiny(**overrides: Any) -> LlamaConfig:
    """A random-weight tiny Llama for tests: 2 layers, 4 query / 2 KV heads, head_dim 16."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)


def llama3_2_1b_shape(**overrides: Any) -> LlamaConfig:
    """Llama-3.2-1B's shape (random weights in benchmarks): 16 layers, 32/8 heads, llama3 rope."""
    base = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    base.update(overrides)
    return LlamaConfig(**base)


PRESETS = {"tiny": tiny, "llama3.2-1b-shape": llama3_2_1b_shape}
