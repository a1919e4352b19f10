"""The Llama blocks in PyTorch, named as transformers' `LlamaForCausalLM` names its weights.

The other families are the same blocks under the config's switches (`config.py`): q/k/v biases
(Qwen2), per-head q_norm/k_norm before rotary (Qwen3), a sliding window in attention (Mistral),
named as `Qwen2ForCausalLM`, `Qwen3ForCausalLM` and `MistralForCausalLM` name theirs.

One small class per block; each block's math is a reference function in `ops.py` behind a custom
op, so that `torch.onnx.export` emits one RMSNorm, RoPE and GQA node per call. Positions and the
KV cache are tensors (graph inputs after export), never Python ints.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from edgellama.export import ops
from edgellama.export.config import LlamaConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def yarn_attention_factor(config: LlamaConfig) -> float:
    """transformers' yarn `attention_factor` (the cos/sin scale); 1 for every other rope type."""
    scaling = config.rope_scaling or {}
    if config.rope_type != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def _yarn_inv_freq(inv_freq: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """transformers' `_compute_yarn_parameters`: interpolated (1/factor) low frequencies, extrapolated
    high ones, a linear ramp between the correction dims of beta_fast and beta_slow rotations."""
    scaling, d, base = config.rope_scaling, config.head_dim, config.rope_theta
    old_ctx = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high          # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return inv_freq / scaling["factor"] * (1 - extrapolation) + inv_freq * extrapolation


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """transformers' `ROPE_INIT_FUNCTIONS[rope_type]` for default, linear, llama3 and yarn (whose
    attention factor `rope_cache` applies)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) * ~(wavelen > old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif config.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, config)
    return inv_freq


def rope_cache(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim/2], fp32, one row per absolute position (scaled by
    yarn's attention factor, as transformers scales its cos and sin)."""
    pos = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
    freqs = torch.outer(pos, rope_inv_freq(config))            # the product LlamaRotaryEmbedding forms
    scale = yarn_attention_factor(config)
    if scale == 1.0:
        return freqs.cos(), freqs.sin()
    return freqs.cos() * scale, freqs.sin() * scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.scale = config.num_attention_heads, config.num_key_value_heads, d ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.window = config.sliding_window or 0          # 0: no window
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def rotated_qkv(self, x, position_ids, cos, sin):
        """q [B, S, H*D] and k [B, S, H_kv*D] rotated to their positions, v [B, S, H_kv*D]
        (parity's localization probes recompute attention from these)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            # Qwen3: each head normalized over its own D before rotary, as [B, S, H, D]
            q = self.q_norm(q.unflatten(-1, (self.n_heads, -1))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (self.n_kv_heads, -1))).flatten(-2)
        return (ops.rotary(q, position_ids, cos, sin, self.n_heads),
                ops.rotary(k, position_ids, cos, sin, self.n_kv_heads), v)

    def forward(self, x, position_ids, cos, sin, past_k, past_v, attention_mask):
        q, k, v = self.rotated_qkv(x, position_ids, cos, sin)
        # attend over past + current keys; present caches: [B, H_kv, T, D]
        out, present_k, present_v = ops.gqa(q, k, v, past_k, past_v, attention_mask,
                                            self.n_heads, self.n_kv_heads, self.scale, self.window)
        return self.o_proj(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwiGLU: down(silu(gate(x)) * up(x))
        return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, cos, sin, past_k, past_v, attention_mask):
        # pre-norm attention with residual
        a, present_k, present_v = self.self_attn(self.input_layernorm(x), position_ids, cos, sin,
                                                 past_k, past_v, attention_mask)
        x = x + a
        # pre-norm SwiGLU MLP with residual
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


class LlamaBody(nn.Module):
    """transformers' `LlamaModel`: embeddings, layers, final norm (named `model.*` in checkpoints)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """Causal LM: `forward(input_ids, attention_mask, position_ids, past) -> (logits, present)`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(config)
        self.register_buffer("rope_cos", cos, persistent=False)   # [P, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """The first call's past: every layer [B, H_kv, 0, D]."""
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        shape = (batch, c.num_key_value_heads, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: KVCache) -> tuple[torch.Tensor, KVCache]:
        # tokens to hidden states: x [B, S, hidden]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        present: KVCache = []
        # decoder layers, each appending its current keys and values to the cache
        for layer, (past_k, past_v) in zip(self.model.layers, past):
            x, k, v = layer(x, position_ids, cos, sin, past_k, past_v, attention_mask)
            present.append((k, v))
        # final norm and vocabulary projection: logits [B, S, vocab]
        return self.lm_head(self.model.norm(x)), present


def positions_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions of the last `q_len` slots as transformers derives them for left padding:
    `cumsum(mask) - 1`, with padding slots set to 1 (any valid row of the rope cache)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -q_len:]


@torch.no_grad()
def greedy_generate(model: Llama, input_ids: torch.Tensor, max_new_tokens: int,
                    attention_mask: torch.Tensor | None = None,
                    eos_token_ids: list[int] | None = None) -> torch.Tensor:
    """Greedy decoding through the KV cache; returns the new tokens [B, N] (stops early when every row hit EOS)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    past = model.empty_cache(input_ids.shape[0])
    ids, out, done = input_ids, [], torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits, past = model(ids, attention_mask, positions_from_mask(attention_mask, ids.shape[1]), past)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        done |= torch.isin(nxt, torch.tensor(eos_token_ids or [], dtype=nxt.dtype))
        if done.all():
            break
        ids = nxt[:, None]
        attention_mask = torch.cat((attention_mask, torch.ones_like(ids)), dim=1)
    return torch.stack(out, dim=1)
