"""`onnx23`: edgellama GroupQueryAttention -> Attention-23(Q, K, V, attn_mask, past_key, past_value;
q_num_heads, kv_num_heads, scale, is_causal=0, softmax_precision=1).

`ops.gqa_ref`: grouped-query attention of 3-D packed heads over past ++ current keys, present
caches [B, Nkv, T, D]; the opset-23 Attention with 3-D Q/K/V, q_num_heads/kv_num_heads and 4-D
past/present computes that, the mask coming in as an additive bias.

Left padding: `is_causal` aligns query i with key i + past_length for every row alike and knows
nothing of padding, so the Attention nodes get an explicit additive mask [B, 1, S, T]
(`attention_bias.py`, as `ops.attention_bias`), built once in the graph and shared by every layer.
One difference from the reference that no caller sees: for a query whose keys are all masked (a
padding position of a left-padded prompt), ORT's Attention returns a zero row where the reference
softmax spreads evenly; both are finite, and padding positions are masked for every real query.
Unlike com.microsoft.GroupQueryAttention, Attention takes several new tokens on top of a cache at
any batch size (chunked prefill of a left-padded batch).
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.attention_bias import attention_bias
from edgellama.export.lower.engine import Context, Rule, arity, float_attr, int_attr, rank, static_dim
from edgellama.export.lower.onnx23_types import type_refusal


class Attention(Rule):
    name = "attention"
    op_type = "GroupQueryAttention"

    def check(self, node: ir.Node, ctx: Context | None) -> str | None:
        inputs = ("query", "key", "value", "past_key", "past_value", "attention_mask")
        if (reason := arity(node, inputs, 3)) is not None:
            return reason
        q, k, v, past_k, past_v, mask = node.inputs
        nq, nkv, scale = int_attr(node, "num_heads"), int_attr(node, "kv_num_heads"), float_attr(node, "scale")
        if nq is None or nkv is None or scale is None:
            return "needs int num_heads, int kv_num_heads and float scale attributes"
        if nq <= 0 or nkv <= 0 or nq % nkv:
            return f"kv_num_heads {nkv} does not divide num_heads {nq}"
        for param, value in (("T1", q), ("T2", v)):
            if (reason := type_refusal("Attention", param, value)) is not None:
                return reason
        if {k.dtype, v.dtype, past_k.dtype, past_v.dtype} != {q.dtype}:
            return "query, key, value and the past caches do not share one dtype"
        if mask.dtype != ir.DataType.INT64 or rank(mask) != 2:
            return "attention_mask is not an int64 [batch, total_sequence] tensor"
        if any(rank(t) != 3 for t in (q, k, v)) or any(rank(t) != 4 for t in (past_k, past_v)):
            return "query/key/value are not 3-D or the past caches are not 4-D"
        dims = [static_dim(t, -1) for t in (q, k, v, past_k, past_v)]
        if None in dims:
            return "head widths are not static"
        wq, wk, wv, dk, dv = dims
        if wq % nq or wk % nkv or wv % nkv:
            return f"widths {wq}/{wk}/{wv} are not multiples of num_heads {nq} / kv_num_heads {nkv}"
        if not wq // nq == wk // nkv == dk or wv // nkv != dv:
            return "query, key and past head sizes differ"
        return None

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        q, k, v, past_k, past_v, mask = node.inputs
        # Attention-23 has no window attribute: a sliding window goes into the explicit mask
        bias = attention_bias(node, ctx, query=q, mask=mask, prefix="onnx23/",
                              window=int_attr(node, "sliding_window") or 0)
        attrs = {"q_num_heads": int_attr(node, "num_heads"), "kv_num_heads": int_attr(node, "kv_num_heads"),
                 "scale": float_attr(node, "scale"), "is_causal": 0,
                 "softmax_precision": int(ir.DataType.FLOAT)}   # softmax in fp32, as the reference
        ctx.replace(node, ir.node("Attention", [q, k, v, bias, past_k, past_v], attrs,
                                  num_outputs=3, name=node.name))
