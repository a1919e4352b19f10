"""fp16 -> fp32: the graph an fp32 export of the same (fp16-rounded) weights would have, so the
int8, int4 and int8-dynamic passes run unchanged on an fp16 folder.

An fp16 export (`export --dtype fp16`) is the fp32 trace with float16 in place of float32
everywhere (export/onnx_export.py traces the model in torch.float16; quant/fp16.py does the same
to a graph): float16 initializers, Constants and Casts to float16, float16 KV cache inputs and
outputs, and one Cast at the end because `logits` always leaves in float32. Undone here:
- every float16 initializer becomes a lazy float32 tensor, widened exactly when read (and readable
  in parts, common.part: an 8B model's lm_head is never widened whole);
- float16 Constant / ConstantOfShape values become float32; the float16 extremes +-65504, where
  the fp16 graph saturates float32's (the attention bias's "minus infinity", quant/fp16.py's
  clipping), become float32's extremes again, as the fp32 export has them;
- Cast to float16 becomes Cast to float32; every float16 value (graph inputs and outputs: the KV
  cache) becomes float32;
- Casts that now cast float32 to float32 are removed (the logits Cast: lm_head writes `logits`);
- a SkipSimplifiedLayerNormalization the fp32 lowering refuses for the folder's provider (fp32 on
  the CPU: export/lower/ort_norm.py) is split back into the residual Add and a plain norm.
Function bodies are dtype-polymorphic (export/functions.py) and are left as they are.

The weights are the fp16 ones widened, so the result is the fp32 export of the fp16-rounded
weights, not of the original checkpoint (tests/quant/test_quant_widen.py holds it node for node).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgellama.export.lower import ort_norm
from edgellama.quant import common

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_F16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)


def _widened_constant(t: ir.TensorProtocol) -> ir.Tensor:
    arr = np.asarray(t.numpy()).astype(np.float32)
    arr = np.where(arr == _F16_MAX, _F32_MAX, np.where(arr == -_F16_MAX, -_F32_MAX, arr)).astype(np.float32)
    return ir.tensor(arr, name=t.name)


def _widen_initializer(value: ir.Value) -> None:
    source = value.const_value

    def part(axis: int, index: common.Index, source=source) -> np.ndarray:
        return common.part(source, axis, index).astype(np.float32)

    whole = None if len(source.shape) else (lambda source=source: common.read(source).astype(np.float32))
    value.const_value = common.lazy(whole, dtype=FLOAT, shape=list(source.shape), name=value.name, part=part)


def is_fp16(model: ir.Model) -> bool:
    """True for a model with float16 weights or float16 graph inputs/outputs."""
    g = model.graph
    return any(v.const_value is not None and v.const_value.dtype == FLOAT16 for v in g.initializers.values()) or \
        any(v.dtype == FLOAT16 for v in [*g.inputs, *g.outputs])


def apply(model: ir.Model, *, provider: str = "cpu") -> dict:
    """Widen the fp16 `model` (exported for `provider`) to fp32 in place; returns a record of what
    was changed."""
    graph = model.graph
    n_init = 0
    for v in graph.initializers.values():
        if v.const_value is not None and v.const_value.dtype == FLOAT16:
            _widen_initializer(v)
            n_init += 1
    n_const = n_cast = 0
    for node in graph:
        attrs = node.attributes
        if common.is_op(node, "Cast") and attrs["to"].as_int() == FLOAT16:
            attrs["to"] = ir.AttrInt64("to", FLOAT)
            n_cast += 1
        elif (common.is_op(node, "Constant") or common.is_op(node, "ConstantOfShape")) and "value" in attrs \
                and attrs["value"].as_tensor().dtype == FLOAT16:
            attrs["value"] = ir.AttrTensor("value", _widened_constant(attrs["value"].as_tensor()))
            n_const += 1
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
    for v in values:
        if v.dtype == FLOAT16:
            v.type = ir.TensorType(FLOAT)   # a new type: values may share one type object
    removed = 0
    for node in list(graph):
        if common.is_op(node, "Cast") and node.attributes["to"].as_int() == FLOAT and node.inputs[0].dtype == FLOAT:
            src, out = node.inputs[0], node.outputs[0]
            if src.is_graph_output() or src.is_graph_input() or src.is_initializer():
                if not out.is_graph_output():
                    ir.convenience.replace_all_uses_with(out, src)
                    graph.remove(node, safe=True)
                    removed += 1
                continue
            name, shape, meta = out.name, out.shape, dict(out.metadata_props)
            ir.convenience.replace_all_uses_with(out, src, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            # `logits` keeps its name and declared shape (the static contract declares [B, 1, V]),
            # written by lm_head as in an fp32 export
            src.name = name
            if shape is not None:
                src.shape = shape
            src.metadata_props.update(meta)
            removed += 1
    split = 0
    if not ort_norm.skip_kernel_is_accurate(FLOAT, provider):
        for node in list(graph):
            if (node.domain, node.op_type) == (ort_norm.MS_DOMAIN, "SkipSimplifiedLayerNormalization"):
                ort_norm.split_skip_norm(node, graph)
                split += 1
    return {"from": "fp16", "initializers": n_init, "constants": n_const, "casts": n_cast,
            "identity_casts_removed": removed, "skip_norms_split": split}
