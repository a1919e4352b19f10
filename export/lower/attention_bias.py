"""Which keys each query may see, written once for the GQA function body and every lowering.

`ops.attention_bias` is the reference: query i of S sits at absolute slot T-S+i of the T = past +
current keys and sees key j when j <= T-S+i and attention_mask[b, j] == 1 (and, with a sliding
window w > 0, j > T-S+i-w). `allowed_keys` builds
that [B, 1, S, T] boolean through an `emit(op_type, *inputs, name=..., **attrs) -> output`
callback, so the same steps go into the function body (onnx protos, `functions.py`) and into a
lowered graph (onnx_ir nodes, `attention_bias`); tensor attributes are numpy arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from edgellama.export.lower.engine import Context

Emit = Callable[..., Any]


def allowed_keys(emit: Emit, query: Any, mask: Any, *, window: Any = None) -> Any:
    """bool [B, 1, S, T]: key j visible to query i (causal AND not padding AND inside the window).

    `window`: None or 0 for no window, an int > 0, or an int64 scalar value already in the graph
    (a function attribute, where 0 means no window and is tested in the graph)."""
    t1 = emit("Shape", mask, start=1, end=2, name="T")                     # [1]
    s1 = emit("Shape", query, start=1, end=2, name="S")
    t = emit("Squeeze", t1, name="T_scalar")
    past = emit("Squeeze", emit("Sub", t1, s1, name="past"), name="past_scalar")
    zero = emit("Constant", value=np.array(0, np.int64), name="zero")
    one = emit("Constant", value=np.array(1, np.int64), name="one")
    q_slot = emit("Range", past, t, one, name="query_slots")
    k_slot = emit("Range", zero, t, one, name="key_slots")
    q_col = emit("Unsqueeze", q_slot, emit("Constant", value=np.array([1], np.int64), name="axis1"),
                 name="query_column")
    causal = emit("LessOrEqual", k_slot, q_col, name="causal")                     # [S, T]
    if window is not None and not (isinstance(window, int) and window <= 0):
        size = emit("Constant", value=np.array(window, np.int64), name="window") if isinstance(window, int) else window
        inside = emit("Greater", k_slot, emit("Sub", q_col, size, name="window_start"), name="inside_window")
        if not isinstance(window, int):
            off = emit("LessOrEqual", size, zero, name="no_window")
            inside = emit("Or", inside, off, name="inside_or_no_window")
        causal = emit("And", causal, inside, name="causal_window")
    keep = emit("Cast", mask, to=ir.DataType.BOOL, name="keep")                    # [B, T]
    keep4 = emit("Unsqueeze", keep, emit("Constant", value=np.array([1, 2], np.int64), name="axes12"),
                 name="keep_b11t")                                                 # [B, 1, 1, T]
    return emit("And", keep4, causal, name="allowed")                              # [B, 1, S, T]


class _Nodes:
    """`emit` for onnx_ir: collects nodes named `prefix + name`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[ir.Node] = []

    def __call__(self, op_type: str, *inputs: ir.Value, name: str, **attrs) -> ir.Value:
        attrs = {k: ir.tensor(v, name=self.prefix + name) if isinstance(v, np.ndarray) else v
                 for k, v in attrs.items()}
        node = ir.node(op_type, list(inputs), attrs, name=self.prefix + name)
        self.nodes.append(node)
        return node.outputs[0]


def attention_bias(node: ir.Node, ctx: Context, *, query: ir.Value, mask: ir.Value, prefix: str,
                   window: int = 0) -> ir.Value:
    """Additive bias [B, 1, S, T] in the query's dtype: 0 where a key is allowed, the dtype's finite
    minimum elsewhere (a fully masked padding row stays finite, as in the reference). Built once,
    before the first `node` that asks, and shared by every layer: all layers read the same
    attention_mask and have the same query length. Named `prefix + "attention_bias"` (with a
    sliding window w, `prefix + "attention_bias_window{w}"`)."""
    key = ("attention_bias", id(mask), query.dtype, window)
    if key not in ctx.cache:
        name = "attention_bias" if window <= 0 else f"attention_bias_window{window}"
        emit = _Nodes(prefix + name + "/")
        np_dtype = query.dtype.numpy()
        bias = emit("Where", allowed_keys(emit, query, mask, window=window),
                    emit("Constant", value=np.array(0, np_dtype), name="zero_f"),
                    emit("Constant", value=np.array(np.finfo(np_dtype).min, np_dtype), name="min_f"),
                    name="bias")
        bias.name = prefix + name
        bias.dtype = query.dtype
        if query.shape is not None and mask.shape is not None:
            bias.shape = ir.Shape([mask.shape[0], 1, query.shape[1], mask.shape[1]])
        ctx.graph.insert_before(node, emit.nodes)
        ctx.cache[key] = bias
    return ctx.cache[key]
