"""The three function ops as torch custom ops: RMSNorm, RoPE and GQA.

Eager calls run the small reference functions below; `torch.onnx.export` sees one opaque
`edgellama::*` call per block and `export/onnx_functions.py` translates each into one node of the
`edgellama` ONNX domain whose function body is standard ONNX.

Layouts are the ones ONNX Runtime's fused kernels take, so lowering is one node for one node:
    hidden states   x: [B, S, H*D]           (H heads of size D, packed per token)
    rotary caches   cos, sin: [P, D/2]       (P = max positions)
    KV cache        k, v: [B, H_kv, T, D]    (T = past + current sequence)
    attention mask  mask: [B, T]             (1 = real token, 0 = padding; left padding allowed)
"""

from __future__ import annotations

import torch


# -- reference functions ----------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in fp32, no mean subtraction, then `weight * x`."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))    # fp32, or fp64 for an fp64 reference run
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama `rotate_half`: cat(-x2, x1) of the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` (rotate-half layout) on packed heads.

    cos/sin rows are gathered by `position_ids`, as LlamaRotaryEmbedding computes them from positions.
    """
    b, s, hd = x.shape
    d = hd // num_heads
    xh = x.view(b, s, num_heads, d)                            # [B, S, H, D]
    cos = cos_cache[position_ids].unsqueeze(2)                 # [B, S, 1, D/2]
    sin = sin_cache[position_ids].unsqueeze(2)
    cos = torch.cat((cos, cos), dim=-1).to(x.dtype)            # [B, S, 1, D]: emb = cat(freqs, freqs)
    sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
    return (xh * cos + rotate_half(xh) * sin).reshape(b, s, hd)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=1, repeats=n_rep) for x: [B, H_kv, T, D]."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention_bias(attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """Causal + padding mask as an additive bias [B, 1, S, T], transformers' finite `min` for masked.

    Query i sits at absolute slot T - S + i; it sees key j when j <= that slot and mask[b, j] == 1,
    and with a sliding window > 0 only when j > slot - window (transformers' sliding_window_overlay,
    on cache slots, so padding counts inside the window as it does there).
    A finite minimum (not -inf) keeps fully masked padding rows finite, so no NaN reaches the cache.
    """
    t = attention_mask.shape[-1]
    q_slot = torch.arange(t - q_len, t, device=attention_mask.device)[:, None]   # [S, 1]
    k_slot = torch.arange(t, device=attention_mask.device)[None, :]              # [1, T]
    causal = k_slot <= q_slot
    if window > 0:
        causal = causal & (k_slot > q_slot - window)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def gqa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
            past_v: torch.Tensor, attention_mask: torch.Tensor, num_heads: int,
            kv_num_heads: int, scale: float, window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' `eager_attention_forward` with `repeat_kv`, over past + current keys.

    Returns the attention output [B, S, H*D] and the present cache [B, H_kv, T, D] (past ++ current).
    `window` > 0 is a sliding window (see `attention_bias`); the cache keeps every key regardless.
    """
    b, s, hd = q.shape
    d = hd // num_heads
    q = q.view(b, s, num_heads, d).transpose(1, 2)                             # q: [B, H, S, D]
    k = k.view(b, s, kv_num_heads, d).transpose(1, 2)                          # k: [B, H_kv, S, D]
    v = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    present_k = torch.cat((past_k, k), dim=2)                                  # [B, H_kv, T, D]
    present_v = torch.cat((past_v, v), dim=2)
    kk = repeat_kv(present_k, num_heads // kv_num_heads)                       # [B, H, T, D]
    vv = repeat_kv(present_v, num_heads // kv_num_heads)
    scores = torch.matmul(q, kk.transpose(2, 3)) * scale                       # [B, H, S, T]
    scores = scores + attention_bias(attention_mask, s, scores.dtype, window)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = torch.matmul(probs, vv)                                              # [B, H, S, D]
    return out.transpose(1, 2).reshape(b, s, hd), present_k, present_v


# -- custom ops: one opaque call per block for the exporter ---------------------------------------
@torch.library.custom_op("edgellama::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("edgellama::rotary", mutates_args=())
def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    return rotary_ref(x, position_ids, cos_cache, sin_cache, num_heads)


@rotary.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("edgellama::gqa", mutates_args=())
def gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
        attention_mask: torch.Tensor, num_heads: int, kv_num_heads: int,
        scale: float, window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gqa_ref(q, k, v, past_k, past_v, attention_mask, num_heads, kv_num_heads, scale, window)


@gqa.register_fake
def _(q, k, v, past_k, past_v, attention_mask, num_heads, kv_num_heads, scale, window=0):
    b, s, _ = q.shape
    d = past_k.shape[-1]
    t = past_k.shape[2] + s
    present = past_k.new_empty((b, kv_num_heads, t, d))
    return q.new_empty(q.shape), present, present.new_empty(present.shape)
