"""`onnx23`: edgellama RotaryEmbedding -> RotaryEmbedding-23(X, cos_cache, sin_cache, position_ids;
num_heads, interleaved=0, full rotation).

`ops.rotary_ref` is rotate-half RoPE of packed heads X [B, S, N*D] with cos/sin rows [P, D/2]
gathered by position_ids; the opset-23 op with a 3-D X, num_heads=N, interleaved=0 and full
rotation is the same. Its type constraint binds X and both caches to one type.
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.engine import Context, Rule, arity, int_attr, rank, static_dim
from edgellama.export.lower.onnx23_types import type_refusal


class RotaryEmbedding(Rule):
    name = "rotary_embedding"
    op_type = "RotaryEmbedding"

    def check(self, node: ir.Node, ctx: Context | None) -> str | None:
        if (reason := arity(node, ("X", "position_ids", "cos_cache", "sin_cache"), 1)) is not None:
            return reason
        x, pos, cos, sin = node.inputs
        num_heads = int_attr(node, "num_heads")
        if num_heads is None or num_heads <= 0:
            return "no positive num_heads attribute"
        if (reason := type_refusal("RotaryEmbedding", "T", x)) is not None:
            return reason
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            return f"cos/sin caches ({cos.dtype}/{sin.dtype}) differ in dtype from X ({x.dtype})"
        if pos.dtype != ir.DataType.INT64 or rank(pos) != 2:
            return "position_ids is not an int64 [batch, sequence] tensor"
        if rank(x) != 3:
            return "X is not [batch, sequence, heads*head_dim]"
        width = static_dim(x, -1)
        if width is None or width % num_heads:
            return f"num_heads {num_heads} does not divide X's last dim {width}"
        if rank(cos) != 2 or rank(sin) != 2:
            return "cos/sin caches are not [positions, head_dim/2]"
        head_dim = width // num_heads
        if head_dim % 2 or static_dim(cos, -1) != head_dim // 2 or static_dim(sin, -1) != head_dim // 2:
            return f"cache width {static_dim(cos, -1)} is not head_dim/2 ({head_dim}/2)"
        return None

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        x, pos, cos, sin = node.inputs
        # Opset 23 takes the caches before position_ids (ours: position_ids second).
        ctx.replace(node, ir.node("RotaryEmbedding", [x, cos, sin, pos],
                                  {"num_heads": int_attr(node, "num_heads"), "interleaved": 0,
                                   "rotary_embedding_dim": 0}, name=node.name))
