"""The `onnx23` lowering pass: edgellama function ops -> the standard ai.onnx opset-23 ops.

Input is the portable model of `onnx_export.export_onnx(..., opset=23)` (one `edgellama` node per
block); output keeps the graph contract (same input/output names, dtypes and dynamic dims) with:

    RMSNorm              ->  RMSNormalization(X, scale; axis=-1, epsilon, stash_type=1)
    RotaryEmbedding      ->  RotaryEmbedding(X, cos_cache, sin_cache, position_ids; num_heads,
                             interleaved=0, full rotation)
    GroupQueryAttention  ->  Attention(Q, K, V, attn_mask, past_key, past_value; q_num_heads,
                             kv_num_heads, scale, is_causal=0, softmax_precision=1)

The reference semantics are `ops.rms_norm_ref`, `ops.rotary_ref` and `ops.gqa_ref` (transformers'
LlamaForCausalLM). One rewrite per block kind, each a `check` (the reason it refuses a node, or
None) and a `rewrite`. A refused node keeps its edgellama function node, whose standard-ONNX body
every runtime inlines, so a refusal costs speed, never validity; `lower_onnx23_with_report`
returns the refusals.

Left padding: `is_causal` aligns query i with key i + past_length for every row alike and knows
nothing of padding, so the Attention nodes get an explicit additive mask [B, 1, S, T] built like
`ops.attention_bias` (query i at absolute slot T-S+i; causal AND attention_mask; the dtype's finite
minimum where masked). It is built once in the graph and shared by every layer.

ONNX Runtime 1.31 CPU runs all three as kernels (not function expansions) in fp32 and fp16. One
difference from the reference that no caller sees: for a query whose keys are all masked (a
padding position of a left-padded prompt), ORT's Attention returns a zero row where the reference
softmax spreads evenly; both are finite, and padding positions are masked for every real query.
Unlike com.microsoft.GroupQueryAttention, Attention takes several new tokens on top of a cache at
any batch size (chunked prefill of a left-padded batch). CUDA: the installed
libonnxruntime_providers_cuda.so (1.31.1) instantiates onnxruntime::cuda::Attention<float|MLFloat16|
BFloat16>, RotaryEmbedding<float|MLFloat16|BFloat16> and RMSNorm (fp32 statistics), so no dtype is
refused for CUDA here; that was read from the library's type names, not run (no GPU in our tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from edgellama.errors import ExportError

EDGELLAMA = "edgellama"
OPSET = 23


@dataclasses.dataclass(frozen=True)
class Refusal:
    node: str      # node name, e.g. "model.layers.0.input_layernorm/RMSNorm"
    rewrite: str   # e.g. "rms_normalization"
    reason: str


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One node-level rewrite: `check(node, ctx) -> reason | None`, `rewrite(node, ctx) -> None`."""

    name: str
    op_type: str   # the edgellama op it lowers
    check: Callable[[ir.Node, "_Context"], str | None]
    rewrite: Callable[[ir.Node, "_Context"], None]


class _Context:
    """The graph being rewritten and the graph-wide values built once (the attention mask)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.cache: dict[Any, ir.Value] = {}

    def replace(self, old: ir.Node, new: ir.Node) -> None:
        """Put `new` in the place of `old`: every use of old's outputs (graph outputs included) goes to
        new's, which take old's names, shapes and types, so the graph contract does not change."""
        self.graph.insert_before(old, new)
        for old_v, new_v in zip(old.outputs, new.outputs):
            name, shape, type_ = old_v.name, old_v.shape, old_v.type
            old_v.name = None
            ir.convenience.replace_all_uses_with(old_v, new_v, replace_graph_outputs=True)
            new_v.name, new_v.shape, new_v.type = name, shape, type_
        self.graph.remove(old, safe=True)


# -- checks shared by the rewrites ---------------------------------------------------------------------
def _static(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _type_refusal(op_type: str, param: str, value: ir.Value) -> str | None:
    """Why `value` may not bind type parameter `param` of the opset-23 `op_type` (None when it may);
    read from onnx's own schema, so the lowered graph is valid for the checker."""
    import onnx.defs

    schema = onnx.defs.get_schema(op_type, OPSET, "")
    allowed = next(tc.allowed_type_strs for tc in schema.type_constraints if tc.type_param_str == param)
    if value.dtype is None:
        return f"{value.name} has no known dtype"
    # onnx spells tensor types by the lower-case TensorProto name: tensor(float), tensor(float16), ...
    if f"tensor({value.dtype.name.lower()})" not in allowed:
        return f"{op_type}-{OPSET} does not take {value.dtype.name.lower()} for {param} (allowed: {', '.join(allowed)})"
    return None


def _arity(node: ir.Node, inputs: tuple[str, ...], outputs: int) -> str | None:
    if len(node.inputs) != len(inputs) or any(v is None for v in node.inputs):
        return f"expected inputs ({', '.join(inputs)}), got {len(node.inputs)}"
    if len(node.outputs) != outputs:
        return f"expected {outputs} outputs, got {len(node.outputs)}"
    return None


def _int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None and attr.type == ir.AttributeType.INT else None


def _float_attr(node: ir.Node, name: str) -> float | None:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None and attr.type == ir.AttributeType.FLOAT else None


# -- RMSNorm -> RMSNormalization ------------------------------------------------------------------------
def check_norm(node: ir.Node, ctx: _Context) -> str | None:
    """`ops.rms_norm_ref` is `scale * CastLike(x32 * rsqrt(mean(x32^2) + eps), x)`; RMSNormalization with
    axis=-1 and stash_type=1 computes that when scale is [hidden] (it only broadcasts scale one way)."""
    if (reason := _arity(node, ("X", "scale"), 1)) is not None:
        return reason
    x, scale = node.inputs
    if _float_attr(node, "epsilon") is None:
        return "no float epsilon attribute"
    for param, value in (("T", x), ("V", scale)):
        if (reason := _type_refusal("RMSNormalization", param, value)) is not None:
            return reason
    if scale.dtype != x.dtype:
        return f"scale dtype {scale.dtype} differs from X dtype {x.dtype}"
    if _rank(x) is None or _rank(x) < 1:
        return "X has no known rank"
    hidden = _static(x, -1)
    if _rank(scale) != 1 or hidden is None or _static(scale, 0) != hidden:
        return f"scale is not a 1-D [hidden] tensor (shape {scale.shape}, X {x.shape})"
    return None


def rewrite_norm(node: ir.Node, ctx: _Context) -> None:
    new = ir.node("RMSNormalization", list(node.inputs),
                  {"axis": -1, "epsilon": _float_attr(node, "epsilon"), "stash_type": int(ir.DataType.FLOAT)},
                  name=node.name)
    ctx.replace(node, new)


# -- RotaryEmbedding -> RotaryEmbedding (opset 23) ------------------------------------------------------
def check_rotary(node: ir.Node, ctx: _Context) -> str | None:
    """`ops.rotary_ref` is rotate-half RoPE of packed heads X [B, S, N*D] with cos/sin rows [P, D/2]
    gathered by position_ids; the opset-23 op with a 3-D X, num_heads=N, interleaved=0 and full
    rotation is the same. Its type constraint binds X and both caches to one type."""
    if (reason := _arity(node, ("X", "position_ids", "cos_cache", "sin_cache"), 1)) is not None:
        return reason
    x, pos, cos, sin = node.inputs
    num_heads = _int_attr(node, "num_heads")
    if num_heads is None or num_heads <= 0:
        return "no positive num_heads attribute"
    if (reason := _type_refusal("RotaryEmbedding", "T", x)) is not None:
        return reason
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        return f"cos/sin caches ({cos.dtype}/{sin.dtype}) differ in dtype from X ({x.dtype})"
    if pos.dtype != ir.DataType.INT64 or _rank(pos) != 2:
        return "position_ids is not an int64 [batch, sequence] tensor"
    if _rank(x) != 3:
        return "X is not [batch, sequence, heads*head_dim]"
    width = _static(x, -1)
    if width is None or width % num_heads:
        return f"num_heads {num_heads} does not divide X's last dim {width}"
    if _rank(cos) != 2 or _rank(sin) != 2:
        return "cos/sin caches are not [positions, head_dim/2]"
    head_dim = width // num_heads
    if head_dim % 2 or _static(cos, -1) != head_dim // 2 or _static(sin, -1) != head_dim // 2:
        return f"cache width {_static(cos, -1)} is not head_dim/2 ({head_dim}/2)"
    return None


def rewrite_rotary(node: ir.Node, ctx: _Context) -> None:
    x, pos, cos, sin = node.inputs
    # Opset 23 takes the caches before position_ids (ours: position_ids second).
    new = ir.node("RotaryEmbedding", [x, cos, sin, pos],
                  {"num_heads": _int_attr(node, "num_heads"), "interleaved": 0, "rotary_embedding_dim": 0},
                  name=node.name)
    ctx.replace(node, new)


# -- GroupQueryAttention -> Attention (opset 23) --------------------------------------------------------
def check_attention(node: ir.Node, ctx: _Context) -> str | None:
    """`ops.gqa_ref`: grouped-query attention of 3-D packed heads over past ++ current keys, present
    caches [B, Nkv, T, D]; the opset-23 Attention with 3-D Q/K/V, q_num_heads/kv_num_heads and
    4-D past/present computes that, the mask coming in as an additive bias."""
    inputs = ("query", "key", "value", "past_key", "past_value", "attention_mask")
    if (reason := _arity(node, inputs, 3)) is not None:
        return reason
    q, k, v, past_k, past_v, mask = node.inputs
    nq, nkv, scale = _int_attr(node, "num_heads"), _int_attr(node, "kv_num_heads"), _float_attr(node, "scale")
    if nq is None or nkv is None or scale is None:
        return "needs int num_heads, int kv_num_heads and float scale attributes"
    if nq <= 0 or nkv <= 0 or nq % nkv:
        return f"kv_num_heads {nkv} does not divide num_heads {nq}"
    for param, value in (("T1", q), ("T2", v)):
        if (reason := _type_refusal("Attention", param, value)) is not None:
            return reason
    if {k.dtype, v.dtype, past_k.dtype, past_v.dtype} != {q.dtype}:
        return "query, key, value and the past caches do not share one dtype"
    if mask.dtype != ir.DataType.INT64 or _rank(mask) != 2:
        return "attention_mask is not an int64 [batch, total_sequence] tensor"
    if any(_rank(t) != 3 for t in (q, k, v)) or any(_rank(t) != 4 for t in (past_k, past_v)):
        return "query/key/value are not 3-D or the past caches are not 4-D"
    dims = [_static(q, -1), _static(k, -1), _static(v, -1), _static(past_k, -1), _static(past_v, -1)]
    if None in dims:
        return "head widths are not static"
    wq, wk, wv, dk, dv = dims
    if wq % nq or wk % nkv or wv % nkv:
        return f"widths {wq}/{wk}/{wv} are not multiples of num_heads {nq} / kv_num_heads {nkv}"
    if not wq // nq == wk // nkv == dk or wv // nkv != dv:
        return "query, key and past head sizes differ"
    return None


def _attention_bias(node: ir.Node, ctx: _Context) -> ir.Value:
    """Additive bias [B, 1, S, T] in the query's dtype, 0 where `ops.attention_bias` lets query i (at
    absolute slot T-S+i) see key j (j <= T-S+i and attention_mask[b, j] == 1), the dtype's finite
    minimum elsewhere. Built once, before the first Attention, and shared by every layer: all layers
    read the same attention_mask and have the same query length."""
    q, mask = node.inputs[0], node.inputs[5]
    key = ("attention_bias", id(mask), q.dtype)
    if key in ctx.cache:
        return ctx.cache[key]
    p = "onnx23/attention_bias/"
    np_dtype = q.dtype.numpy()

    def const(name, array):
        return ir.node("Constant", [], {"value": ir.tensor(array, name=p + name)}, name=p + name)

    nodes = [
        t1 := ir.node("Shape", [mask], {"start": 1, "end": 2}, name=p + "T"),
        s1 := ir.node("Shape", [q], {"start": 1, "end": 2}, name=p + "S"),
        t := ir.node("Squeeze", [t1.outputs[0]], name=p + "T_scalar"),
        start := ir.node("Sub", [t1.outputs[0], s1.outputs[0]], name=p + "past"),
        start0 := ir.node("Squeeze", [start.outputs[0]], name=p + "past_scalar"),
        zero := const("zero", np.array(0, np.int64)),
        one := const("one", np.array(1, np.int64)),
        q_slot := ir.node("Range", [start0.outputs[0], t.outputs[0], one.outputs[0]], name=p + "query_slots"),
        k_slot := ir.node("Range", [zero.outputs[0], t.outputs[0], one.outputs[0]], name=p + "key_slots"),
        axis1 := const("axis1", np.array([1], np.int64)),
        q_col := ir.node("Unsqueeze", [q_slot.outputs[0], axis1.outputs[0]], name=p + "query_column"),
        causal := ir.node("LessOrEqual", [k_slot.outputs[0], q_col.outputs[0]], name=p + "causal"),      # [S, T]
        keep := ir.node("Cast", [mask], {"to": ir.DataType.BOOL}, name=p + "keep"),                      # [B, T]
        axes12 := const("axes12", np.array([1, 2], np.int64)),
        keep4 := ir.node("Unsqueeze", [keep.outputs[0], axes12.outputs[0]], name=p + "keep_b11t"),     # [B,1,1,T]
        allowed := ir.node("And", [keep4.outputs[0], causal.outputs[0]], name=p + "allowed"),          # [B,1,S,T]
        zero_f := const("zero_f", np.array(0, np_dtype)),
        # Finite, not -inf: a fully masked (padding) query row stays finite, as in the reference.
        min_f := const("min_f", np.array(np.finfo(np_dtype).min, np_dtype)),
        bias := ir.node("Where", [allowed.outputs[0], zero_f.outputs[0], min_f.outputs[0]], name=p + "bias"),
    ]
    bias.outputs[0].name = "onnx23/attention_bias"
    bias.outputs[0].dtype = q.dtype
    bias.outputs[0].shape = ir.Shape([mask.shape[0], 1, q.shape[1], mask.shape[1]])
    ctx.graph.insert_before(node, nodes)
    ctx.cache[key] = bias.outputs[0]
    return bias.outputs[0]


def rewrite_attention(node: ir.Node, ctx: _Context) -> None:
    q, k, v, past_k, past_v, _mask = node.inputs
    bias = _attention_bias(node, ctx)
    attrs = {"q_num_heads": _int_attr(node, "num_heads"), "kv_num_heads": _int_attr(node, "kv_num_heads"),
             "scale": _float_attr(node, "scale"), "is_causal": 0,
             "softmax_precision": int(ir.DataType.FLOAT)}   # softmax in fp32, as the reference
    new = ir.node("Attention", [q, k, v, bias, past_k, past_v], attrs, num_outputs=3, name=node.name)
    ctx.replace(node, new)


REWRITES = (
    Rewrite("rms_normalization", "RMSNorm", check_norm, rewrite_norm),
    Rewrite("rotary_embedding", "RotaryEmbedding", check_rotary, rewrite_rotary),
    Rewrite("attention", "GroupQueryAttention", check_attention, rewrite_attention),
)


# -- the pass -------------------------------------------------------------------------------------------
def lower_onnx23_with_report(ir_model: ir.Model) -> tuple[ir.Model, list[Refusal]]:
    """`lower_onnx23`, plus every refusal (node, rewrite, reason). Edits `ir_model` in place."""
    opset = ir_model.opset_imports.get("")
    if opset != OPSET:
        raise ExportError(f"the onnx23 target needs a model exported at opset {OPSET} (this one is opset {opset})")
    ctx = _Context(ir_model.graph)
    by_op = {rw.op_type: rw for rw in REWRITES}
    refusals: list[Refusal] = []
    for node in list(ir_model.graph):
        rw = by_op.get(node.op_type) if node.domain == EDGELLAMA else None
        if rw is None:
            continue
        reason = rw.check(node, ctx)
        if reason is None:
            rw.rewrite(node, ctx)
        else:
            refusals.append(Refusal(node.name or node.op_type, rw.name, reason))
    _prune_functions(ir_model)
    return ir_model, refusals


def lower_onnx23(ir_model: ir.Model) -> ir.Model:
    """The portable model (opset 23) with its blocks as the standard opset-23 ops RMSNormalization,
    RotaryEmbedding and Attention; semantics those of `ops.rms_norm_ref`, `ops.rotary_ref` and
    `ops.gqa_ref` (transformers' LlamaForCausalLM), left-padded batches included."""
    return lower_onnx23_with_report(ir_model)[0]


def _prune_functions(ir_model: ir.Model) -> None:
    """Drop the function bodies no node calls any more, and the edgellama opset once nothing uses it."""
    used = {(n.domain, n.op_type, n.overload) for n in ir.traversal.RecursiveGraphIterator(ir_model.graph)}
    for fn in ir_model.functions.values():
        if fn.identifier() in used:
            used |= {(n.domain, n.op_type, n.overload) for n in ir.traversal.RecursiveGraphIterator(fn)}
    for key in list(ir_model.functions):
        if key not in used:
            del ir_model.functions[key]
    if not any(domain == EDGELLAMA for domain, _, _ in used):
        ir_model.opset_imports.pop(EDGELLAMA, None)
