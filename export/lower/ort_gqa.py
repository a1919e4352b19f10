"""`ort`: edgellama GroupQueryAttention -> com.microsoft.GroupQueryAttention.

Reference: `ops.gqa_ref` (transformers' eager attention with `repeat_kv`): query i of S sits at
absolute slot T-S+i of the T = past + current keys and sees key j when j <= T-S+i and
attention_mask[b, j] == 1; present = past ++ current, [B, kv_heads, T, D].

ORT's kernel derives each row's causal window from `seqlens_k[b]` (= total length - 1) and
assumes a row's padding sits at its END. Our batches are padded at the START, so every row gets
`seqlens_k = T - 1` (the full window, which makes ORT's causal mask and cache append match ours
exactly: past length T - S, new keys appended after it) and the left padding goes in as an
additive `attention_bias` [B, 1, S, T] (`attention_bias.py`, as `ops.attention_bias`). Past and
present are separate tensors (no shared buffer), as the graph contract wants.

Kernel limit (ORT 1.31, CPU): several new tokens on top of a non-empty cache (S > 1, past > 0) are
refused for batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is given");
prefill (past 0) and one-token decode work at any batch size, chunked prefill at batch 1.

Provider/dtype: ORT 1.31's CUDA GroupQueryAttention kernel is registered for float16 and
bfloat16 only (onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc; the installed
libonnxruntime_providers_cuda.so instantiates GroupQueryAttention<MLFloat16|BFloat16, ...> and no
float one), so for provider "cuda" with fp32 the check refuses and the edgellama function node
stays: ORT inlines its standard-ONNX body (MatMul/Softmax/..., all with fp32 CUDA kernels).
MultiHeadAttention (fp32 on CUDA) is not used instead: it needs as many KV heads as query heads,
which would change the present cache's shape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgellama.export.lower.attention_bias import attention_bias
from edgellama.export.lower.engine import Context, Rule, int_attr, inputs_refusal
from edgellama.export.lower.ort_kernels import MS_DOMAIN, kernel_refusal


def _lengths(node: ir.Node, ctx: Context) -> tuple[ir.Value, ir.Value]:
    """seqlens_k int32 [B] = T - 1 for every row, total_sequence_length int32 scalar = T."""
    mask = node.inputs[5]
    key = ("gqa_lengths", id(mask))
    if key not in ctx.cache:
        p = "ort/gqa_lengths/"
        nodes = [
            total := ir.node("Shape", [mask], {"start": 1, "end": 2}, name=p + "total"),            # [1]
            batch := ir.node("Shape", [mask], {"start": 0, "end": 1}, name=p + "batch"),            # [1]
            one := ir.node("Constant", [], {"value": ir.tensor(np.array([1], np.int64))}, name=p + "one"),
            last := ir.node("Sub", [total.outputs[0], one.outputs[0]], name=p + "last"),
            rows := ir.node("Expand", [last.outputs[0], batch.outputs[0]], name=p + "rows"),       # [B]
            seqlens := ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.INT32}, name=p + "seqlens_k"),
            scalar := ir.node("Squeeze", [total.outputs[0]], name=p + "scalar"),
            total32 := ir.node("Cast", [scalar.outputs[0]], {"to": ir.DataType.INT32},
                               name=p + "total_sequence_length"),
        ]
        seqlens.outputs[0].name = "ort/seqlens_k"
        total32.outputs[0].name = "ort/total_sequence_length"
        ctx.graph.insert_before(node, nodes)
        ctx.cache[key] = (seqlens.outputs[0], total32.outputs[0])
    return ctx.cache[key]


class MsGroupQueryAttention(Rule):
    name = "ms_group_query_attention"
    op_type = "GroupQueryAttention"

    def check(self, node: ir.Node, ctx: Context) -> str | None:
        if (reason := inputs_refusal(node, ("query", "key", "value", "past_key", "past_value",
                                            "attention_mask"))) is not None:
            return reason
        q, k, v, past_k, past_v, mask = node.inputs
        if len(node.outputs) != 3:
            return f"expected outputs (output, present_key, present_value), got {len(node.outputs)}"
        for attr in ("num_heads", "kv_num_heads", "scale"):
            if attr not in node.attributes:
                return f"no {attr} attribute"
        if (reason := kernel_refusal("GroupQueryAttention", q.dtype, ctx)) is not None:
            return reason + "; the edgellama function node stays and ORT inlines its standard-op body"
        if {k.dtype, v.dtype, past_k.dtype, past_v.dtype} != {q.dtype}:
            return "query, key, value and the past caches do not share one dtype"
        if mask.dtype != ir.DataType.INT64 or mask.shape is None or len(mask.shape) != 2:
            return "attention_mask is not an int64 [batch, total_sequence] tensor"
        if any(x.shape is None or len(x.shape) != 3 for x in (q, k, v)):
            return "query/key/value are not [batch, sequence, heads*head_dim]"
        if any(x.shape is None or len(x.shape) != 4 for x in (past_k, past_v)):
            return "past caches are not [batch, kv_heads, past_sequence, head_dim]"
        return None

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        q, k, v, past_k, past_v, mask = node.inputs
        seqlens_k, total = _lengths(node, ctx)
        bias = attention_bias(node, ctx, query=q, mask=mask, prefix="ort/")
        attrs = {name: node.attributes[name].value for name in ("num_heads", "kv_num_heads", "scale")}
        if (window := int_attr(node, "sliding_window") or 0) > 0:
            # the kernel's window counts back from each query's own slot, itself included, as ours
            attrs["local_window_size"] = window
        # Inputs 7-9 (cos_cache, sin_cache, position_ids) stay empty: rotary is its own node.
        ctx.replace(node, ir.node("GroupQueryAttention",
                                  [q, k, v, past_k, past_v, seqlens_k, total, None, None, None, bias],
                                  attrs, domain=MS_DOMAIN, num_outputs=3, name=node.name))
