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
import onnx_ir as ir

from edgellama.quant import common
from edgellama.quant.registry import Settings

# Standard ops of our graphs without a float16 kernel in ONNX Runtime's CPU provider: none in
# onnxruntime 1.31 (tests/quant/test_quant_fp16.py checks that each fp16 model opens on CPU and
# that every op listed here really lacks the kernel). Kept as the place to add one if a lowering
# starts emitting such an op.
FP32_ONLY_OPS: tuple[str, ...] = ()
LOGITS = "logits"
FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _to_fp16(arr: np.ndarray, name: str | None) -> ir.Tensor:
    if np.isfinite(arr).all() and np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
        # A finite fp32 constant past fp16's range (a mask minimum, say) saturates instead of
        # becoming inf, which would turn `x * 0` into NaN.
        arr = np.clip(arr, np.finfo(np.float16).min, np.finfo(np.float16).max)
    return ir.tensor(arr.astype(np.float16), name=name)


def _convert_constants(graph: ir.Graph) -> int:
    n = 0
    for v in graph.initializers.values():
        if v.const_value.dtype == FLOAT:
            # Converted when written (streaming, see common.py), one initializer at a time.
            source = v.const_value
            v.const_value = common.lazy(lambda source=source, name=v.name: _to_fp16(common.read(source), name).numpy(),
                                        dtype=FLOAT16, shape=list(source.shape), name=v.name)
            n += 1
    for node in graph:
        attrs = node.attributes
        if common.is_op(node, "Constant"):
            if "value" in attrs and attrs["value"].as_tensor().dtype == FLOAT:
                t = attrs["value"].as_tensor()
                attrs["value"] = ir.AttrTensor("value", _to_fp16(t.numpy(), t.name))
            elif "value_float" in attrs:
                value = float(np.float16(np.clip(attrs.pop("value_float").as_float(), -65504, 65504)))
                attrs["value"] = ir.AttrTensor("value", ir.tensor(np.array(value, np.float16)))
        elif common.is_op(node, "Cast") and attrs["to"].as_int() == FLOAT:
            attrs["to"] = ir.AttrInt64("to", FLOAT16)
        elif common.is_op(node, "RMSNormalization"):
            attrs["stash_type"] = ir.AttrInt64("stash_type", FLOAT)
        elif common.is_op(node, "Attention"):
            attrs["softmax_precision"] = ir.AttrInt64("softmax_precision", FLOAT)
    return n


def _fp32_islands(graph: ir.Graph, ops: Sequence[str]) -> int:
    """Run `ops` in fp32: Cast their float inputs up and their outputs back down."""
    names = common.Names(graph)
    nodes = [n for n in graph if n.op_type in ops and n.domain in ("", "ai.onnx")]
    for node in nodes:
        mod = common.module_name(node)
        ups = [common.op("Cast", [x], [names(f"{x.name}_fp32")], to=FLOAT, name=f"{mod}/Cast_in{j}")
               for j, x in enumerate(node.inputs)]
        inner = common.op(node.op_type, [c.outputs[0] for c in ups], [f"{y.name}_fp32" for y in node.outputs],
                          name=node.name, **{k: a.value for k, a in node.attributes.items()})
        outs = [common.output_like(y) for y in node.outputs]
        downs = [common.op("Cast", [y32], [y], to=FLOAT16, name=f"{mod}/Cast_out{j}")
                 for j, (y32, y) in enumerate(zip(inner.outputs, outs))]
        common.replace(graph, [node], [*ups, inner, *downs], outs)
    return len(nodes)


def _convert_values(graph: ir.Graph) -> None:
    """Every float value of the main graph (I/O, initializers, typed intermediates) becomes
    float16, except `logits`: its producer writes `logits_fp16` and a Cast writes `logits`."""
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
    for v in values:
        if v.dtype == FLOAT and v.name != LOGITS:
            v.type = ir.TensorType(FLOAT16)   # a new type: values may share one type object
    logits = next((v for v in graph.outputs if v.name == LOGITS), None)
    if logits is None or logits.producer() is None:
        return
    out = common.output_like(logits)
    logits.name = common.Names(graph)(f"{LOGITS}_fp16")
    logits.type = ir.TensorType(FLOAT16)
    ir.convenience.replace_all_uses_with(logits, out, replace_graph_outputs=True)
    graph.append(common.op("Cast", [logits], [out], to=FLOAT, name="logits/Cast"))


def apply(model: ir.Model, *, target: str, settings: Settings) -> dict:
    """Convert `model` in place; returns the manifest's record of the pass."""
    graph = model.graph
    n = _convert_constants(graph)
    islands = _fp32_islands(graph, FP32_ONLY_OPS)
    _convert_values(graph)
    return {"pass": "fp16", "initializers": n, "fp32_ops": list(FP32_ONLY_OPS), "fp32_islands": islands,
            "logits": "float32", "kv_cache": "float16",
            "statistics": "fp32 (function bodies / stash_type / softmax_precision)", "target": target}
