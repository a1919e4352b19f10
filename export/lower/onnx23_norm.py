"""`onnx23`: edgellama RMSNorm -> RMSNormalization(X, scale; axis=-1, epsilon, stash_type=1).

`ops.rms_norm_ref` is `scale * CastLike(x32 * rsqrt(mean(x32^2) + eps), x)`; RMSNormalization with
axis=-1 and stash_type=1 computes that when scale is [hidden] (it only broadcasts scale one way).
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.engine import Context, Rule, arity, float_attr, rank, static_dim
from edgellama.export.lower.onnx23_types import type_refusal


class RMSNormalization(Rule):
    name = "rms_normalization"
    op_type = "RMSNorm"

    def check(self, node: ir.Node, ctx: Context | None) -> str | None:
        if (reason := arity(node, ("X", "scale"), 1)) is not None:
            return reason
        x, scale = node.inputs
        if float_attr(node, "epsilon") is None:
            return "no float epsilon attribute"
        for param, value in (("T", x), ("V", scale)):
            if (reason := type_refusal("RMSNormalization", param, value)) is not None:
                return reason
        if scale.dtype != x.dtype:
            return f"scale dtype {scale.dtype} differs from X dtype {x.dtype}"
        if rank(x) is None or rank(x) < 1:
            return "X has no known rank"
        hidden = static_dim(x, -1)
        if rank(scale) != 1 or hidden is None or static_dim(scale, 0) != hidden:
            return f"scale is not a 1-D [hidden] tensor (shape {scale.shape}, X {x.shape})"
        return None

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        ctx.replace(node, ir.node("RMSNormalization", list(node.inputs),
                                  {"axis": -1, "epsilon": float_attr(node, "epsilon"),
                                   "stash_type": int(ir.DataType.FLOAT)}, name=node.name))
