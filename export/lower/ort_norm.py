"""`ort`: edgellama RMSNorm -> ONNX Runtime's SkipSimplifiedLayerNormalization / SimplifiedLayerNormalization.

Reference: `ops.rms_norm_ref` (transformers' LlamaRMSNorm: statistics in fp32, no mean
subtraction, `weight * x_normalized`). ORT's kernels compute the same with fp32 statistics
(`stash_type=1` for SimplifiedLayerNormalization; SkipSimplifiedLayerNormalization always
accumulates in fp32).

Not at fp32 on the CPU: there SkipSimplifiedLayerNormalization sums the squares one element after
another in an fp32 scalar, and its output is measurably further from the fp64 answer than torch's
or than Add + SimplifiedLayerNormalization (`tests/export/lower/test_kernel_accuracy.py` measures
both). fp32 is the precision a user picks for faithfulness, so it keeps the unfused Add; fp16 (whose
own rounding dwarfs that sum's) and CUDA (a tree reduction) take the fused kernel.

A Llama layer feeds each norm `residual + branch` and uses that same sum as the next residual,
so the Skip variant replaces both the Add and the norm: its output 3 (`input_skip_bias_sum`)
takes over every other use of the Add's result. The two rules share one check, so they live in
one file; the Skip one is preferred, the plain one takes the norms it refuses.
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.engine import Context, Rule, inputs_refusal
from edgellama.export.lower.ort_kernels import MS_DOMAIN, kernel_refusal


def _norm_reason(node: ir.Node, op_type: str, ctx: Context) -> str | None:
    if (reason := inputs_refusal(node, ("X", "scale"))) is not None:
        return reason
    x, scale = node.inputs
    if "epsilon" not in node.attributes:
        return "no epsilon attribute"
    if (reason := kernel_refusal(op_type, x.dtype, ctx)) is not None:
        return reason
    if scale.dtype != x.dtype:
        return f"scale dtype {scale.dtype} differs from X dtype {x.dtype}"
    if scale.shape is None or len(scale.shape) != 1:
        return "scale is not 1-D"
    return None


def skip_kernel_is_accurate(dtype: ir.DataType | None, provider: str) -> bool:
    """Whether ORT's SkipSimplifiedLayerNormalization is as accurate as Add + SimplifiedLayerNormalization
    for `dtype` on `provider` (see the module docstring)."""
    return not (provider == "cpu" and dtype == ir.DataType.FLOAT)


def _plain_norm(inputs: list[ir.Value], epsilon: float, name: str | None) -> ir.Node:
    return ir.node("SimplifiedLayerNormalization", inputs,
                   {"epsilon": epsilon, "axis": -1, "stash_type": int(ir.DataType.FLOAT)}, name=name)


# The fused node keeps the name of the Add it absorbed, so `split_skip_norm` can give it back.
_ADD_NAME = "edgellama.residual_add"


def split_skip_norm(node: ir.Node, graph: ir.Graph) -> None:
    """Undo SkipSimplifiedLayerNorm's rewrite of `node` in place: the residual Add and a plain
    SimplifiedLayerNormalization, named and ordered as the plain lowering leaves them (quant/widen.py
    calls it when an fp16 graph becomes the fp32 graph, where the Skip kernel is refused)."""
    residual, branch, scale = node.inputs[:3]
    add = ir.node("Add", [residual, branch], name=node.metadata_props.get(_ADD_NAME))
    norm = _plain_norm([add.outputs[0], scale], node.attributes["epsilon"].as_float(), node.name)
    graph.insert_before(node, [add, norm])
    for old, new in ((node.outputs[3], add.outputs[0]), (node.outputs[0], norm.outputs[0])):
        name, shape, dtype = old.name, old.shape, old.dtype
        ir.convenience.replace_all_uses_with(old, new)
        old.name = None
        new.name, new.shape, new.dtype = name, shape, dtype
    graph.remove(node, safe=True)


def _residual_reason(norm: ir.Node) -> str | None:
    """Why the Add feeding `norm` is not a residual sum the Skip kernel can take (None when it is)."""
    add = norm.inputs[0].producer()
    if add is None or add.domain != "" or add.op_type != "Add":
        return "input is not produced by an Add (no residual to fuse)"
    if len(add.inputs) != 2 or any(v is None for v in add.inputs):
        return "the Add does not have two inputs"
    a, b = add.inputs
    if not _same_shape(a, b) or len(a.shape) not in (2, 3):
        # A broadcasting Add (e.g. a bias) is not a residual sum; the kernel wants equal shapes.
        return "the Add's inputs are not two tensors of one known rank-2/3 shape"
    if a.dtype != norm.inputs[0].dtype or b.dtype != norm.inputs[0].dtype:
        return "the Add's inputs differ in dtype from the norm's"
    return None


def _fuse(norm: ir.Node, ctx: Context) -> None:
    """Add + `norm` (an edgellama RMSNorm or a SimplifiedLayerNormalization) -> one Skip node."""
    add = norm.inputs[0].producer()
    residual, branch = add.inputs
    fused = ir.node("SkipSimplifiedLayerNormalization", [residual, branch, norm.inputs[1]],
                    {"epsilon": norm.attributes["epsilon"].as_float()}, domain=MS_DOMAIN,
                    num_outputs=4, name=norm.name)
    # Outputs 1 and 2 (mean, inverse std-var) are for training: the empty name omits them, so the
    # saver does not invent names that make ORT compute and keep them.
    fused.outputs[1].name = fused.outputs[2].name = ""
    fused.metadata_props[_ADD_NAME] = add.name
    # At the Add's place: its inputs are defined there, and every use of the sum comes after it.
    ctx.graph.insert_before(add, fused)
    ctx.rewire([norm.outputs[0], add.outputs[0]], [fused.outputs[0], fused.outputs[3]])
    ctx.graph.remove([norm, add], safe=True)


def join_skip_norm(node: ir.Node, graph: ir.Graph) -> str | None:
    """The plain lowering's Add + SimplifiedLayerNormalization `node` fused into the Skip kernel in
    place, as the Skip rule would have lowered it (the inverse of `split_skip_norm`; quant/skip_norm.py
    calls it where the kernel's fp32 accuracy no longer matters). Returns why it refuses, else None."""
    if (node.domain, node.op_type) != ("", "SimplifiedLayerNormalization") or len(node.inputs) != 2:
        return "not a SimplifiedLayerNormalization of (X, scale)"
    if len(node.outputs) != 1 or "epsilon" not in node.attributes:
        return "not the plain lowering's norm (one output, an epsilon)"
    if (reason := _residual_reason(node)) is not None:
        return reason
    _fuse(node, Context(graph))
    return None


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    # Symbolic dims compare by name: the exporter names batch/sequence dims consistently.
    return (a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
            and all(str(x) == str(y) for x, y in zip(a.shape, b.shape)))


class SkipSimplifiedLayerNorm(Rule):
    """RMSNorm(Add(residual, branch)) -> com.microsoft.SkipSimplifiedLayerNormalization."""

    name = "skip_simplified_layer_norm"
    op_type = "RMSNorm"

    def check(self, node: ir.Node, ctx: Context) -> str | None:
        if (reason := _norm_reason(node, "SkipSimplifiedLayerNormalization", ctx)) is not None:
            return reason
        if not skip_kernel_is_accurate(node.inputs[0].dtype, ctx.provider):
            return ("ONNX Runtime's fp32 CPU kernel sums the squares serially in fp32, less accurate than "
                    "torch; Add + SimplifiedLayerNormalization is not")
        return _residual_reason(node)

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        _fuse(node, ctx)


class SimplifiedLayerNorm(Rule):
    """RMSNorm(x) -> SimplifiedLayerNormalization (ORT registers it in the ai.onnx domain)."""

    name = "simplified_layer_norm"
    op_type = "RMSNorm"

    def check(self, node: ir.Node, ctx: Context) -> str | None:
        return _norm_reason(node, "SimplifiedLayerNormalization", ctx)

    def rewrite(self, node: ir.Node, ctx: Context) -> None:
        ctx.replace(node, _plain_norm(list(node.inputs), node.attributes["epsilon"].as_float(), node.name))
