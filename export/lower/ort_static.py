"""`ort` with a static KV cache: the ort-lowered graph -> one shared, preallocated cache per layer.

A whole-graph pass run after the `ort` rules (it is not node-local: it removes the position_ids
input, changes the cache shapes, fuses three MatMuls and two rotary nodes into the attention node
and edits the LM head). Per layer

    x -> MatMul(Wq) -> ms.RotaryEmbedding(position_ids) -\\
    x -> MatMul(Wk) -> ms.RotaryEmbedding(position_ids) --> ms.GroupQueryAttention(+ attention bias,
    x -> MatMul(Wv) ---------------------------------------/        seqlens_k = T-1 for every row)

becomes

    x -> MatMul([Wq|Wk|Wv]) -> ms.GroupQueryAttention(packed, do_rotary=1, cos/sin caches,
                                                      seqlens_k = sum(mask)-1 per row, T = mask width)

The static contract (B rows, S new tokens this call, T tokens so far incl. these, M buffer slots):

  inputs   input_ids                 int64 [B, S]
           attention_mask            int64 [B, T]   RIGHT-padded: row b = len_b ones, then zeros
                                                    (only its row sums and its width are read)
           past_key_values.{i}.key   [B, Hkv, M, D]  the layer's whole cache buffer (M >= T), bound
           past_key_values.{i}.value [B, Hkv, M, D]  to the same memory as present (written in place)
           logits_to_keep            int64 [1] = K   also an initializer, 1: a caller that does not
                                                    feed it (onnxruntime-genai) gets one position
  outputs  logits                    float [B, K, V] each row's last K real positions (`last_logits`),
                                                    declared [B, 1, V] (what genai allocates)
                                     float [B, S, V] otherwise (no logits_to_keep input)
           present.{i}.key / .value  [B, Hkv, M, D]  the same buffer

Row b's tokens sit at cache slots 0..len_b-1 and at positions 0..len_b-1, so GroupQueryAttention
derives each row's positions from seqlens_k (its rotary runs inside, `do_rotary=1`) and writes a
row's new keys at its own seqlens_k: right padding is what its cache layout wants. No position_ids.
The last-position gather takes, for j < K, index clamp(seqlens_k[b] - (T - S) - (K - 1) + j, 0, S - 1):
K = 1 is the last real token of a right-padded first prompt, the only token of a decode step, the last
of a batch-1 chunk; K > 1 is what speculative decoding verifies (a K past a row's new tokens repeats
its first). The LM head runs on B*K hidden states, never on a whole prompt.

ORT 1.31 CPU, measured: past and present bound to one OrtValue are written in place; right-padded
batch prompts, per-row decode at seqlens_k and one-token prompts match a numpy reference; a
multi-token continuation with batch > 1 is refused by the kernel (as for the dynamic graph); a
seqlens_k past the buffer raises instead of writing past it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgellama.export.lower.engine import Context, static_dim
from edgellama.export.lower.ort_kernels import MS_DOMAIN, kernel_refusal

SEQLENS_K = "static/seqlens_k"
TOTAL_SEQUENCE_LENGTH = "static/total_sequence_length"
# The hidden state of each row's last real position, [B, 1, H]: parity swaps it back for the
# full hidden state to see every position's logits.
LAST_HIDDEN = "static/last_hidden"
LOGITS_TO_KEEP = "logits_to_keep"


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain != domain:
        return None
    return node


def _lm_head(graph: ir.Graph) -> ir.Node | None:
    """The MatMul that produces the logits (through the Cast to fp32 of an fp16 graph)."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    node = logits.producer() if logits is not None else None
    if node is not None and node.op_type == "Cast":
        node = node.inputs[0].producer()
    return node if node is not None and node.op_type == "MatMul" and node.domain == "" else None


def _gqas(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]


def _layer_refusal(gqa: ir.Node) -> str | None:
    """Why one lowered attention cannot take the packed, rotary-inside form (None when it can)."""
    q, k, v = gqa.inputs[:3]
    rq, rk = _producer(q, "RotaryEmbedding", MS_DOMAIN), _producer(k, "RotaryEmbedding", MS_DOMAIN)
    if rq is None or rk is None:
        return f"{gqa.name}: query/key do not come from com.microsoft.RotaryEmbedding nodes"
    mq, mk, mv = _producer(rq.inputs[0], "MatMul"), _producer(rk.inputs[0], "MatMul"), _producer(v, "MatMul")
    if mq is None or mk is None or mv is None:
        return f"{gqa.name}: query/key/value are not plain MatMul projections (quantize after lowering)"
    if not (mq.inputs[0] is mk.inputs[0] is mv.inputs[0]):
        return f"{gqa.name}: the q/k/v projections do not share one input"
    if any(m.inputs[1].const_value is None for m in (mq, mk, mv)):
        return f"{gqa.name}: a projection weight is not an initializer"
    if rk.inputs[2] is not rq.inputs[2] or rk.inputs[3] is not rq.inputs[3]:
        return f"{gqa.name}: query and key rotary read different cos/sin caches"
    if any((a := r.attributes.get("interleaved")) is not None and a.as_int() for r in (rq, rk)):
        return f"{gqa.name}: interleaved rotary"
    if len(gqa.inputs) > 7 and any(x is not None for x in gqa.inputs[7:10]):
        return f"{gqa.name}: attention already has rotary inputs"
    return None


class StaticKvCache:
    """The graph pass, with the engine's convention: `check` returns why it refuses (None when it
    accepts), `rewrite` edits the graph in place."""

    name = "static_kv_cache"

    def check(self, ir_model: ir.Model, ctx: Context) -> str | None:
        graph = ir_model.graph
        names = {v.name for v in graph.inputs}
        if not {"input_ids", "attention_mask"} <= names:
            return "the graph has no input_ids/attention_mask inputs"
        gqas = _gqas(graph)
        if not gqas:
            refusal = None
            for n in graph:
                if n.op_type == "GroupQueryAttention":
                    refusal = kernel_refusal("GroupQueryAttention", n.inputs[0].dtype, ctx)
                    break
            return refusal or "no com.microsoft.GroupQueryAttention node (lower to --target ort first)"
        if any(n.domain == "edgellama" for n in graph):
            return "some edgellama function nodes were not lowered (see the lowering report)"
        if (reason := kernel_refusal("GroupQueryAttention", gqas[0].inputs[0].dtype, ctx)) is not None:
            return reason
        for gqa in gqas:
            if (reason := _layer_refusal(gqa)) is not None:
                return reason
        head = _lm_head(graph)
        if head is None or static_dim(head.inputs[0], -1) is None:
            return "logits do not come from a MatMul (the LM head) with a static hidden size"
        return None

    def rewrite(self, ir_model: ir.Model, ctx: Context, *, last_logits: bool = True) -> None:
        graph = ir_model.graph
        inputs = {v.name: v for v in graph.inputs}
        seqlens_k = _lengths(graph, inputs["attention_mask"])
        for gqa in _gqas(graph):
            _packed(graph, gqa, ctx, seqlens_k)
        if last_logits:
            _last_position_logits(graph, inputs["input_ids"], inputs["attention_mask"], seqlens_k)
        RemoveUnusedNodesPass()(ir_model)   # rotary nodes, q/k/v MatMuls, the bias and old lengths
        position_ids = inputs.get("position_ids")
        if position_ids is not None and not position_ids.uses():
            graph.inputs.remove(position_ids)
        for v in [*graph.inputs, *graph.outputs]:
            if v.name.startswith(("past_key_values.", "present.")) and v.shape is not None:
                v.shape = ir.Shape([v.shape[0], v.shape[1], ir.SymbolicDim("max_sequence"), v.shape[3]])
        used = {id(v) for n in graph for v in n.inputs if v is not None}
        for name, v in list(graph.initializers.items()):
            if id(v) not in used and v not in graph.outputs:
                del graph.initializers[name]


def _const(nodes: list[ir.Node], name: str, array: np.ndarray) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(array)}, name=name)
    nodes.append(node)
    return node.outputs[0]


def _lengths(graph: ir.Graph, mask: ir.Value) -> ir.Value:
    """seqlens_k int32 [B] = row sums - 1 and total_sequence_length = the mask width, once (as
    onnxruntime-genai's builder does); returns seqlens_k (total is found by name)."""
    p = "static/lengths/"
    nodes: list[ir.Node] = []
    axis1 = _const(nodes, p + "axis1", np.array([1], np.int64))
    one = _const(nodes, p + "one", np.array(1, np.int64))
    nodes += [
        rows := ir.node("ReduceSum", [mask, axis1], {"keepdims": 0}, name=p + "row_lengths"),      # [B]
        last := ir.node("Sub", [rows.outputs[0], one], name=p + "last_slot"),
        seqlens := ir.node("Cast", [last.outputs[0]], {"to": ir.DataType.INT32}, name=p + "seqlens_k"),
        width := ir.node("Shape", [mask], {"start": 1, "end": 2}, name=p + "width"),                # [1]
        scalar := ir.node("Squeeze", [width.outputs[0]], name=p + "width_scalar"),
        total := ir.node("Cast", [scalar.outputs[0]], {"to": ir.DataType.INT32}, name=p + "total"),
    ]
    seqlens.outputs[0].name, total.outputs[0].name = SEQLENS_K, TOTAL_SEQUENCE_LENGTH
    graph.insert_before(next(iter(graph)), nodes)
    return seqlens.outputs[0]


def _packed(graph: ir.Graph, gqa: ir.Node, ctx: Context, seqlens_k: ir.Value) -> None:
    """One layer: packed QKV MatMul -> GroupQueryAttention with rotary inside, same outputs."""
    q, k, v, past_k, past_v = gqa.inputs[:5]
    rq, rk = q.producer(), k.producer()
    mq, mk, mv = rq.inputs[0].producer(), rk.inputs[0].producer(), v.producer()
    total = next(n.outputs[0] for n in graph if n.outputs and n.outputs[0].name == TOTAL_SEQUENCE_LENGTH)
    weights = [m.inputs[1].const_value for m in (mq, mk, mv)]
    layer = gqa.name.split("/")[0]
    name = f"{layer}.qkv_proj.weight"
    shape = ir.Shape([weights[0].shape[0], sum(w.shape[1] for w in weights)])
    # Concatenated when written, not here: the weights may be lazy (a streamed export), read one layer at a time.
    lazy = ir.LazyTensor(lambda: ir.tensor(np.concatenate([w.numpy() for w in weights], axis=1), name=name),
                         dtype=weights[0].dtype, shape=shape, name=name)
    packed = ir.Value(name=name, const_value=lazy)
    graph.register_initializer(packed)
    matmul = ir.node("MatMul", [mq.inputs[0], packed], name=f"{layer}.qkv_proj/MatMul")
    attrs = {a: gqa.attributes[a].value for a in ("num_heads", "kv_num_heads", "scale", "local_window_size")
             if a in gqa.attributes}   # a sliding window (Mistral) counts back from each row's own slot
    new = ir.node("GroupQueryAttention",
                  [matmul.outputs[0], None, None, past_k, past_v, seqlens_k, total, rq.inputs[2], rq.inputs[3]],
                  {**attrs, "do_rotary": 1, "rotary_interleaved": 0}, domain=MS_DOMAIN, num_outputs=3,
                  name=gqa.name)
    graph.insert_before(gqa, [matmul, new])
    ctx.rewire(list(gqa.outputs), list(new.outputs))
    graph.remove(gqa, safe=True)


def _last_position_logits(graph: ir.Graph, ids: ir.Value, mask: ir.Value, seqlens_k: ir.Value) -> None:
    """logits [B, K, V]: the LM head reads row b's hidden states at
    clamp(seqlens_k - (T - S) - (K - 1) + j, 0, S - 1) for j < K, K = `logits_to_keep` (default 1)."""
    logits = next(v for v in graph.outputs if v.name == "logits")
    head = _lm_head(graph)
    hidden = head.inputs[0]
    size = static_dim(hidden, -1)
    # A graph input that is also an initializer: ONNX Runtime lets a caller override it, and every
    # caller that does not (onnxruntime-genai, the plain decode step) reads the default.
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array([1], np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)
    p = "static/last_position/"
    nodes: list[ir.Node] = []
    one = _const(nodes, p + "one", np.array([1], np.int64))
    zero = _const(nodes, p + "zero", np.array([0], np.int64))
    zero_s = _const(nodes, p + "zero_s", np.array(0, np.int64))
    one_s = _const(nodes, p + "one_s", np.array(1, np.int64))
    flat_shape = _const(nodes, p + "flat_shape", np.array([-1, size], np.int64))
    minus_one = _const(nodes, p + "minus_one", np.array([-1], np.int64))
    size_1 = _const(nodes, p + "hidden_size", np.array([size], np.int64))
    nodes += [
        s := ir.node("Shape", [ids], {"start": 1, "end": 2}, name=p + "S"),                          # [1]
        t := ir.node("Shape", [mask], {"start": 1, "end": 2}, name=p + "T"),
        b := ir.node("Shape", [ids], {"start": 0, "end": 1}, name=p + "B"),
        past := ir.node("Sub", [t.outputs[0], s.outputs[0]], name=p + "T_minus_S"),
        sk := ir.node("Cast", [seqlens_k], {"to": ir.DataType.INT64}, name=p + "seqlens64"),
        last := ir.node("Sub", [sk.outputs[0], past.outputs[0]], name=p + "last_index"),              # [B]
        back := ir.node("Sub", [keep, one], name=p + "K_minus_1"),
        first := ir.node("Sub", [last.outputs[0], back.outputs[0]], name=p + "first_index"),
        col := ir.node("Unsqueeze", [first.outputs[0], one], name=p + "first_column"),                 # [B, 1]
        k0 := ir.node("Squeeze", [keep], name=p + "K_scalar"),
        steps := ir.node("Range", [zero_s, k0.outputs[0], one_s], name=p + "steps"),                   # [K]
        raw := ir.node("Add", [col.outputs[0], steps.outputs[0]], name=p + "raw_index"),             # [B, K]
        smax := ir.node("Sub", [s.outputs[0], one], name=p + "S_minus_1"),
        low := ir.node("Max", [raw.outputs[0], zero], name=p + "clamp_low"),
        idx := ir.node("Min", [low.outputs[0], smax.outputs[0]], name=p + "index"),
        b0 := ir.node("Squeeze", [b.outputs[0]], name=p + "B_scalar"),
        rows := ir.node("Range", [zero_s, b0.outputs[0], one_s], name=p + "rows"),
        offset := ir.node("Mul", [rows.outputs[0], s.outputs[0]], name=p + "row_offset"),
        row_col := ir.node("Unsqueeze", [offset.outputs[0], one], name=p + "row_offset_column"),      # [B, 1]
        flat_idx := ir.node("Add", [row_col.outputs[0], idx.outputs[0]], name=p + "flat_index"),     # [B, K]
        flat_list := ir.node("Reshape", [flat_idx.outputs[0], minus_one], name=p + "flat_indices"),  # [B*K]
        flat := ir.node("Reshape", [hidden, flat_shape], name=p + "flatten"),                         # [B*S, H]
        pick := ir.node("Gather", [flat.outputs[0], flat_list.outputs[0]], {"axis": 0}, name=p + "gather"),
        shape := ir.node("Concat", [minus_one, keep, size_1], {"axis": 0}, name=p + "out_shape"),
        # Reshape(Gather(Reshape(hidden))): check/parity_sides.full_logits walks back this chain.
        out := ir.node("Reshape", [pick.outputs[0], shape.outputs[0]], name=p + "unflatten"),        # [B, K, H]
    ]
    out.outputs[0].name = LAST_HIDDEN
    graph.insert_before(head, nodes)
    head.replace_input_with(0, out.outputs[0])
    # The output is declared [B, 1, V]: what a caller that never feeds logits_to_keep receives, and
    # what onnxruntime-genai sizes its logits buffer from (given a symbolic dim it allocates [B, S, V]
    # and ONNX Runtime refuses the [B, 1, V] result). A K > 1 run returns [B, K, V] all the same.
    if head.outputs[0] is not logits and head.outputs[0].shape is not None:
        head.outputs[0].shape = ir.Shape([logits.shape[0], ir.SymbolicDim(LOGITS_TO_KEEP), logits.shape[-1]])
    logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[-1]])
