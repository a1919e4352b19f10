"""fp16: weights and activations in float16, precision-sensitive statistics in float32.

What changes (main graph only; function bodies are dtype-polymorphic and already keep RMSNorm
statistics and softmax in fp32 when given fp16, see export/functions.py):
- every float32 initializer and Constant becomes float16; every Cast to float32 becomes a Cast
  to float16 (they exist only to meet other float tensors, which are fp16 now);
- past/present KV inputs and outputs become float16 (half the cache memory);
- `logits` stays float32: the last node writes `logits_fp16` and a Cast produces `logits`
  (sampling and parity want full precision; the exporter's fp16 export does the same);
- the onnx23 target's standard ops keep fp32 where it matters through their own attributes:
  RMSNormalization `stash_type=1` (its default, set explicitly) and Attention
  `softmax_precision=1`; ONNX Runtime's fused ops (ort target) accumulate in fp32 on their own;
- ops ONNX Runtime's CPU provider has no float16 kernel for (FP32_ONLY_OPS) run in fp32 between
  Casts, so the model runs on CPU (slowly: fp16 is meant for CUDA) as well as on CUDA.

Reference for the numerics: transformers' LlamaForCausalLM in torch.float16 (RMSNorm variance in
fp32, softmax in fp32 under sdpa/eager upcast).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellama.quant import common

# Standard ops of our graphs without a float16 kernel in ONNX Runtime's CPU provider: none in
# onnxruntime 1.31 (tests/test_quant_fp16.py checks that each fp16 model opens on CPU and that
# every op listed here really lacks the kernel). Kept as the place to add one if a lowering
# starts emitting such an op.
FP32_ONLY_OPS: tuple[str, ...] = ()
LOGITS = "logits"


def _to_fp16(t: onnx.TensorProto) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    if np.isfinite(arr).all() and np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
        # A finite fp32 constant past fp16's range (a mask minimum, say) saturates instead of
        # becoming inf, which would turn `x * 0` into NaN.
        arr = np.clip(arr, np.finfo(np.float16).min, np.finfo(np.float16).max)
    return numpy_helper.from_array(arr.astype(np.float16), t.name)


def _convert_constants(graph: onnx.GraphProto) -> int:
    n = 0
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_to_fp16(t))
            n += 1
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_to_fp16(a.t))
                elif a.name == "value_float":
                    value = float(np.float16(np.clip(a.f, -65504, 65504)))
                    node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute(
                        "value", numpy_helper.from_array(np.array(value, np.float16))))
                    break
        elif node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        elif node.op_type == "RMSNormalization" and node.domain in ("", "ai.onnx"):
            _set_int(node, "stash_type", TensorProto.FLOAT)
        elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            _set_int(node, "softmax_precision", TensorProto.FLOAT)
    return n


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _fp32_islands(graph: onnx.GraphProto, ops: Sequence[str]) -> int:
    """Run `ops` in fp32: Cast their float inputs up and their outputs back down."""
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        mod = common.module_name(node)
        new = []
        for j, x in enumerate(node.input):
            up = common.unique_name(graph, f"{x}_fp32")
            new.append(helper.make_node("Cast", [x], [up], to=TensorProto.FLOAT, name=f"{mod}/Cast_in{j}"))
            node.input[j] = up
        outs = list(node.output)
        for j, y in enumerate(outs):
            node.output[j] = f"{y}_fp32"
        new.append(node)
        for j, y in enumerate(outs):
            new.append(helper.make_node("Cast", [f"{y}_fp32"], [y], to=TensorProto.FLOAT16,
                                        name=f"{mod}/Cast_out{j}"))
        replacements[node.output[0]] = new   # replace_nodes keys on the (renamed) first output
    common.replace_nodes(graph, replacements)
    return len(replacements)


def _convert_io(graph: onnx.GraphProto) -> None:
    for v in list(graph.input) + list(graph.output):
        tt = v.type.tensor_type
        if tt.elem_type == TensorProto.FLOAT and v.name != LOGITS:
            tt.elem_type = TensorProto.FLOAT16
    for v in graph.value_info:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    producer = next((n for n in graph.node if LOGITS in n.output), None)
    if producer is None:
        return
    half = common.unique_name(graph, f"{LOGITS}_fp16")
    producer.output[list(producer.output).index(LOGITS)] = half
    graph.node.append(helper.make_node("Cast", [half], [LOGITS], to=TensorProto.FLOAT, name="logits/Cast"))


def apply(model: onnx.ModelProto, *, target: str, exclude: Sequence[str] = ()) -> dict:
    """Convert `model` in place; returns the manifest's record of the pass."""
    if exclude:
        # Mixed fp32/fp16 graphs need a Cast at every boundary; not worth it for one MatMul.
        from edgellama.errors import QuantError

        raise QuantError("--exclude is not supported by fp16 (every tensor of the graph becomes fp16)")
    graph = model.graph
    n = _convert_constants(graph)
    islands = _fp32_islands(graph, FP32_ONLY_OPS)
    _convert_io(graph)
    return {"pass": "fp16", "initializers": n, "fp32_ops": list(FP32_ONLY_OPS), "fp32_islands": islands,
            "logits": "float32", "kv_cache": "float16",
            "statistics": "fp32 (function bodies / stash_type / softmax_precision)", "target": target}
