"""int8-dynamic (W8A8): int8 weights, activations quantized to uint8 at run time, integer GEMM.

Built from standard ONNX ops only, so it is valid on every target (onnx23 included) and any runtime:

  DynamicQuantizeLinear(A) -> A_q uint8, A_scale, A_zero   (per tensor, once per distinct A: q/k/v
                                                            and gate/up share one)
  MatMulInteger(A_q, W_q int8, A_zero) -> int32
  Cast(float) * (A_scale * W_scale[N])                      (W_scale per output column)

ONNX Runtime's graph optimizer fuses this chain into `com.microsoft.DynamicQuantizeMatMul`
(DynamicQuantizeMatMulFusion / MatMulIntegerToFloatFusion), the same kernel its own
`quantize_dynamic` produces, so the standard form costs nothing on ORT.
Reference: ONNX operator specs of DynamicQuantizeLinear and MatMulInteger.

Policy (what is quantized and why):
- Decoder-layer MatMuls: int8 symmetric per output channel (scale = column absmax / 127).
- lm_head: kept in fp32 (see KEEP_LM_HEAD_FP32): per-tensor activation quantization of the final
  hidden state is the largest single error of W8A8 on the logits; lm_head is one MatMul per token.
- Embedding: unchanged (a Gather, no arithmetic to speed up; with tied embeddings it is the
  same fp32 table lm_head reads).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellama.quant import common

KEEP_LM_HEAD_FP32 = True


def _quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> int8 codes -127..127 and per-column scales [N] (symmetric)."""
    amax = np.abs(w).max(0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def apply(model: onnx.ModelProto, *, exclude: Sequence[str] = (),
          keep_lm_head_fp32: bool = KEEP_LM_HEAD_FP32) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    graph = model.graph
    patterns = tuple(exclude) + (("lm_head",) if keep_lm_head_fp32 else ())
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    replacements: dict[str, list[onnx.NodeProto]] = {}
    done = []
    for wm in common.weight_matmuls(graph, exclude=patterns):
        node, mod = wm.node, common.module_name(wm.node)
        a = node.input[0]
        new: list[onnx.NodeProto] = []
        if a not in quantized_inputs:
            names = tuple(common.unique_name(graph, f"{a}_{s}") for s in ("quantized", "scale", "zero_point"))
            quantized_inputs[a] = names
            # Emitted right before the first MatMul reading A; later readers come after it.
            new.append(helper.make_node("DynamicQuantizeLinear", [a], list(names),
                                        name=f"{mod}/DynamicQuantizeLinear"))
        a_q, a_scale, a_zero = quantized_inputs[a]
        q, scale = _quantize_columns(common.weight_array(graph, wm))
        base = wm.weight.replace("/", "_")
        w_q = common.add_initializer(graph, q, common.unique_name(graph, f"{base}_int8"))
        w_s = common.add_initializer(graph, scale, common.unique_name(graph, f"{base}_scale"))
        out = node.output[0]
        acc, acc_f, s = (common.unique_name(graph, f"{out}_{x}") for x in ("int32", "float", "scale"))
        new += [
            helper.make_node("MatMulInteger", [a_q, w_q, a_zero], [acc], name=f"{mod}/MatMulInteger"),
            helper.make_node("Cast", [acc], [acc_f], to=TensorProto.FLOAT, name=f"{mod}/Cast"),
            helper.make_node("Mul", [a_scale, w_s], [s], name=f"{mod}/Mul_scale"),
            helper.make_node("Mul", [acc_f, s], [out], name=f"{mod}/Mul"),
        ]
        replacements[out] = new
        done.append(mod)
    common.replace_nodes(graph, replacements)
    common.drop_unused_initializers(graph)
    excluded = [common.module_name(n) for n in graph.node if n.op_type == "MatMul"]
    return {"pass": "int8-dynamic", "ops": "DynamicQuantizeLinear + MatMulInteger (ORT: DynamicQuantizeMatMul)",
            "weights": "int8 symmetric per output channel", "activations": "uint8 per tensor, dynamic",
            "matmuls": len(done), "lm_head": "fp32" if keep_lm_head_fp32 else "int8", "embedding": "fp32",
            "excluded": excluded}
