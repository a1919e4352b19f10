"""Model configuration: one dataclass, named presets, invariants checked once in `validate`.

`LlamaConfig.from_hf` reads a transformers `config.json` as 4.x writes it (`rope_theta` and
`rope_scaling`) and as 5.x writes it (`rope_parameters`); `to_hf` writes what transformers'
config class of the family reads, so the same weights can be loaded by the reference implementation.

Families are Llama blocks with switches, not copies of the model: `model_type` names the family
(llama, mistral, qwen2, qwen3) and three switches carry what differs:
    attention_bias   bias on the q/k/v projections (Qwen2; o_proj never has one)
    qk_norm          per-head RMSNorm of q and k before rotary (Qwen3's q_norm / k_norm)
    sliding_window   each query sees the last `sliding_window` keys, itself included (Mistral; None = off)
RoPE scaling in these families' released configs: none in their config.json (Qwen2.5 and Qwen3 model
cards suggest adding `yarn` for long context; Mistral uses rope_theta only). default, linear, llama3
and yarn are supported; dynamic (its frequencies depend on the sequence length, which a fixed
cos/sin table cannot follow), longrope and the rest are refused with one line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from edgellama.errors import ConfigError, SourceError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# model_type -> the transformers class name of the family (config.json's "architectures")
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Upper bounds far above any released Llama: a config past them is damaged or hostile, and refusing
# it here keeps a loader from looping over 10^12 layers or sizing a rope table of 10^12 rows.
MAX_POSITIONS = 1 << 20
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
               "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10,
               "head_dim": 1 << 12, "max_position_embeddings": MAX_POSITIONS}


def _check_size(name: str, value: Any, *, limit: int | None = None) -> None:
    limit = SIZE_LIMITS[name] if limit is None else limit
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise ConfigError(f"config: {name} must be a positive integer up to {limit}, got {_short(value)}")


def _positive_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _short(value: Any) -> str:
    """A value for a one-line message: hostile input can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    model_type: str = "llama"               # a key of FAMILIES
    attention_bias: bool = False            # q/k/v projection biases (Qwen2)
    qk_norm: bool = False                   # per-head RMSNorm of q and k before rotary (Qwen3)
    sliding_window: int | None = None       # keys visible to a query, itself included (Mistral); None = all

    def __post_init__(self) -> None:
        # the sizes are checked before head_dim is derived from them (a string would raise TypeError)
        for name in SIZE_LIMITS:
            if name != "head_dim":
                _check_size(name, getattr(self, name))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # -- invariants -------------------------------------------------------------------------
    def validate(self) -> None:
        """Every invariant the blocks rely on, checked here once and nowhere else: types, bounds
        (so nothing absurd is allocated or looped over), and the rope parameters' arithmetic."""
        for name in SIZE_LIMITS:
            _check_size(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config: num_key_value_heads ({self.num_key_value_heads}) does not divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not _positive_real(self.rms_norm_eps):
            raise ConfigError(f"config: rms_norm_eps must be a positive number, got {_short(self.rms_norm_eps)}")
        # the frequencies are theta ** -(2i/d): a base of 1 or less makes them all 1 or overflow to inf
        if not (_positive_real(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"config: rope_theta must be a number greater than 1, got {_short(self.rope_theta)}")
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config: {name} must be true or false, got {_short(getattr(self, name))}")
        if not isinstance(self.model_type, str) or self.model_type not in FAMILIES:
            raise ConfigError(f"config: unsupported model_type {_short(self.model_type)}; "
                              f"supported: {', '.join(FAMILIES)}")
        if self.sliding_window is not None:
            _check_size("sliding_window", self.sliding_window, limit=MAX_POSITIONS)
        # each switch is what its family's transformers class does, so `to_hf` can always say it:
        # Qwen2 always has q/k/v biases (and Llama's attention_bias would add one to o_proj too)
        if self.attention_bias != (self.model_type == "qwen2"):
            raise ConfigError(f"config: attention_bias (q/k/v biases) is {self.attention_bias} but "
                              f"model_type is {self.model_type}; only qwen2 has them")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ConfigError(f"config: qk_norm is {self.qk_norm} but model_type is {self.model_type}; "
                              "only qwen3 has q_norm/k_norm")
        if self.sliding_window is not None and self.model_type == "llama":
            raise ConfigError("config: a sliding window needs model_type mistral, qwen2 or qwen3")
        for name in ("bos_token_id", "pad_token_id"):
            self._check_token(name, getattr(self, name))
        eos = self.eos_token_id
        for token in (eos if isinstance(eos, (list, tuple)) else [eos]):
            self._check_token("eos_token_id", token)
        self._check_rope()

    def _check_token(self, name: str, token: Any) -> None:
        if token is None:
            return
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
            raise ConfigError(f"config: {name} must be a token id in 0..{self.vocab_size - 1}, got {_short(token)}")

    def _check_rope(self) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"config: rope_scaling must be an object, got {type(self.rope_scaling).__name__}")
        rope_type = self.rope_type
        if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
            raise ConfigError(f"config: unsupported rope type {_short(rope_type)}; supported: {', '.join(ROPE_TYPES)}")
        needed = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("factor", "original_max_position_embeddings")}
        scaling = self.rope_scaling or {}
        missing = [k for k in needed.get(rope_type, ()) if k not in scaling]
        if missing:
            raise ConfigError(f"config: rope type {rope_type!r} needs {', '.join(missing)}")
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key in needed.get(rope_type, ()) and not _positive_real(scaling[key]):
                raise ConfigError(f"config: rope {key} must be a positive number, got {_short(scaling[key])}")
        # a factor below 1 would shrink the context it is meant to stretch (and a tiny one overflows)
        if rope_type != "default" and scaling["factor"] < 1:
            raise ConfigError(f"config: rope factor must be at least 1, got {_short(scaling['factor'])}")
        if rope_type == "llama3":
            # the smoothing between the two wavelength bounds divides by high - low
            if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
                raise ConfigError(f"config: rope high_freq_factor ({_short(scaling['high_freq_factor'])}) must be greater "
                                  f"than low_freq_factor ({_short(scaling['low_freq_factor'])})")
            _check_size("original_max_position_embeddings", scaling["original_max_position_embeddings"],
                        limit=MAX_POSITIONS)
        if rope_type == "yarn":
            _check_size("original_max_position_embeddings", scaling["original_max_position_embeddings"],
                        limit=MAX_POSITIONS)
            for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if scaling.get(key) is not None and not _positive_real(scaling[key]):
                    raise ConfigError(f"config: rope {key} must be a positive number, got {_short(scaling[key])}")
            if not isinstance(scaling.get("truncate", True), bool):
                raise ConfigError(f"config: rope truncate must be true or false, got {_short(scaling['truncate'])}")

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
        layer += (self.num_attention_heads + 2 * self.num_key_value_heads) * d if self.attention_bias else 0
        layer += 2 * d if self.qk_norm else 0
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    # -- transformers' config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From a transformers config dict (4.x `rope_scaling` or 5.x `rope_parameters`): the one
        boundary for config.json, every field type-checked here or in `validate`."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: not a JSON object ({type(d).__name__})")
        arch = d.get("model_type")
        archs = d.get("architectures") or []
        if not isinstance(arch, (str, type(None))) or not isinstance(archs, list) \
                or not all(isinstance(a, str) for a in archs):
            raise ConfigError("config: model_type must be a string and architectures a list of strings")
        family = arch or next((f for f, cls in FAMILIES.items() if cls in archs), "llama")
        if family not in FAMILIES or (archs and FAMILIES[family] not in archs):
            raise ConfigError(f"config: unsupported architecture {_short(arch or archs)}; "
                              f"edgellama exports {', '.join(FAMILIES.values())}")
        for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if not isinstance(d.get(key, False), (bool, type(None))):
                raise ConfigError(f"config: {key} must be true or false, got {_short(d[key])}")
        if d.get("mlp_bias"):
            raise ConfigError("config: mlp_bias is not supported (bias on the MLP projections)")
        # Qwen2 always has q/k/v biases (its config has no switch); elsewhere attention_bias also
        # puts one on o_proj, which the blocks do not have.
        if family != "qwen2" and d.get("attention_bias"):
            raise ConfigError(f"config: attention_bias is not supported for {family} (bias on o_proj)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config: unsupported hidden_act {_short(d.get('hidden_act'))}; these families use silu")
        window = _sliding_window(d, family)
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        for key, value in (("rope_scaling", rope_scaling), ("rope_parameters", params)):
            if not isinstance(value, (dict, type(None))):
                raise ConfigError(f"config: {key} must be an object, got {type(value).__name__}")
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
            model_type=family,
            attention_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=window,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `LlamaConfig` (4.x and 5.x) reads."""
        d = {
            "architectures": [FAMILIES[self.model_type]],
            "model_type": self.model_type,
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
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            # one window for every layer: transformers windows layers from max_window_layers on
            d.update(use_sliding_window=self.sliding_window is not None, max_window_layers=0)
            del d["mlp_bias"]
            if self.model_type == "qwen2":
                del d["attention_bias"]
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From `to_dict`'s output (a manifest's config): unknown keys ignored, the rest validated."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: not an object ({type(d).__name__})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The one window every layer uses (None: no window), as transformers reads it: Mistral's
    `sliding_window`; Qwen's only when `use_sliding_window`, on layers from `max_window_layers` on;
    5.x's `layer_types` where present. A window on some layers only is refused."""
    window = d.get("sliding_window")
    if family == "llama" or window is None:
        return None
    if family in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window"):
            return None
        first = d.get("max_window_layers", 0)
        layers = d.get("num_hidden_layers", 32)
        if isinstance(first, int) and isinstance(layers, int) and first >= layers:
            return None
        if first != 0:
            raise ConfigError(f"config: a sliding window on layers {_short(first)}.. only is not supported "
                              "(one window for every layer or none)")
    types = d.get("layer_types")
    if isinstance(types, list) and len(set(map(str, types))) > 1:
        raise ConfigError("config: layer_types mixing sliding and full attention is not supported "
                          "(one window for every layer or none)")
    if isinstance(types, list) and types and types[0] == "full_attention":
        return None
    return window


# -- the config against the weights a checkpoint holds -------------------------------------------
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight `Llama(config)` has, under transformers' names (lm_head only when untied)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def check_shapes(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], *, where: str) -> list[str]:
    """The names of the weights to load, after checking the checkpoint's tensor names and shapes (read
    from its header: nothing is loaded yet) against the config; a tied checkpoint's redundant lm_head
    is left out. SourceError names what is wrong.

    The layer count and the embedding are compared first, against what the weights hold, so a config
    that claims 10^12 layers is refused before the names it implies are listed."""
    if config.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    layers = {m.group(1) for m in map(_LAYER_NAME.match, shapes) if m}
    if config.num_hidden_layers != len(layers):
        raise SourceError(f"{where}: the config says {config.num_hidden_layers} layers; the weights hold {len(layers)}")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and tuple(embed) != (config.vocab_size, config.hidden_size):
        raise SourceError(f"{where}: the embedding is {_short(tuple(embed))}; the config says vocab_size "
                          f"{config.vocab_size} x hidden_size {config.hidden_size}")
    want = expected_shapes(config)
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    wrong = [f"{k} {_short(tuple(shapes[k]))} (config wants {want[k]})"
             for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if wrong:
        problems.append(f"shape mismatch: {_some(wrong)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some([_clip(k) for k in unexpected])}")
    if problems:
        raise SourceError(f"{where}: weights do not match the config; " + "; ".join(problems))
    return list(want)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _some(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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
