"""`ort`: edgellama RotaryEmbedding -> com.microsoft.RotaryEmbedding.

Reference: `ops.rotary_ref` (transformers' `apply_rotary_pos_emb`, rotate-half layout, cos/sin
rows gathered per token by `position_ids`). ORT's kernel with `interleaved=0` rotates the two
halves of each head the same way and gathers cache rows by `position_ids` [B, S] per row, which
left-padded batches need (their rows start at different positions).

Why not GroupQueryAttention's own rotary (`do_rotary=1`): its position handling follows
`seqlens_k` (the first prompt reads only position_ids' first element), which cannot express
per-row positions of a left-padded batch (`ort_gqa.py` gives every row seqlens_k = T-1).
Measured on ORT 1.31.1 CPU, tiny model: left-padded batch logits off by 3.3 with do_rotary=1
(1e-5 with this node), and decode not faster (1.12 vs 0.98 ms/token).
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.engine import Context, Rule, inputs_refusal, static_dim
from edgellama.export.lower.ort_kernels import MS_DOMAIN, kernel_refusal


class MsRotaryEmbedding(Rule):
    name = "ms_rotary_embedding"
    op_type = "RotaryEmbedding"

    def check(self, node: ir.Node, ctx: Context) -> str | None:
        if (reason := inputs_refusal(node, ("X", "position_ids", "cos_cache", "sin_cache"))) is not None:
            return reason
        x, pos, cos, sin = node.inputs
        if "num_heads" not in node.attributes:
            return "no num_heads attribute"
        num_heads = node.attributes["num_heads"].as_int()
        if (reason := kernel_refusal("RotaryEmbedding", x.dtype, ctx)) is not None:
            return reason
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            # The kernel's type constraint T binds X and both caches to one type.
            return f"cos/sin caches ({cos.dtype}/{sin.dtype}) differ in dtype from X ({x.dtype})"
        if pos.dtype != ir.DataType.INT64:
            return f"position_ids has dtype {pos.dtype}, the kernel takes int64"
        if x.shape is None or len(x.shape) != 3:
            return "X is not [batch, sequence, heads*head_dim]"
        hidden, half = static_dim(x, -1), static_dim(cos, -1)
        if hidden is None or half is None or num_heads <= 0 or hidden % num_heads:
            return "X's last dim or the cache width is not static, or num_heads does not divide X"
        if 2 * half != hidden // num_heads:
            return f"cache width {half} is not head_dim/2 ({hidden // num_heads}/2): partial rotary is not ours"
        return None

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        x, pos, cos, sin = node.inputs
        num_heads = node.attributes["num_heads"].as_int()
        head_dim = static_dim(x, -1) // num_heads
        ctx.replace(node, ir.node("RotaryEmbedding", [x, pos, cos, sin],
                                  {"num_heads": num_heads, "rotary_embedding_dim": head_dim, "interleaved": 0},
                                  domain=MS_DOMAIN, name=node.name))
