"""int8-dynamic (W8A8): int8 weights, activations quantized to int8 at run time, integer GEMM.

Built from standard ONNX ops only, so it is valid on every target (onnx23 included) and any runtime:

  per distinct activation A (q/k/v share one, gate/up share one):
    A_scale = max(|A|, last axis) / 127                    (per token: Abs, ReduceMax, Mul, Max)
    A_q = uint8(clip(round(A / A_scale), -127, 127) + 128) (Div, Round, Clip, Add, Cast)
  per weight MatMul:
    MatMulInteger(A_q, W_q int8, 128) -> int32
    Cast(float) * (A_scale * W_scale[N])                   (W_scale per output column)

ONNX Runtime fuses the MatMulInteger chain into MatMulIntegerToFloat (u8s8 GEMM). Symmetric
activation codes kept as uint8 around a fixed zero point 128, because ORT's s8s8 GEMM is ~10x
slower on AVX2 (smollm2 decode: 439 ms vs 41 ms in that op); the price is 7-bit weight codes
(WEIGHT_QMAX_U8, saturation, below).

Per-token scales, not ONNX's per-tensor DynamicQuantizeLinear: in a prefill, the first token's
massive activations set one scale for every token and flatten the rest (smollm2, per tensor:
perplexity +78%; per token: +2.6%, mean KL 0.026 with smoothing). PER_TOKEN = False gives the classic
DynamicQuantizeLinear + MatMulInteger form, which ONNX Runtime fuses into DynamicQuantizeMatMul.
Reference: ONNX operator specs of MatMulInteger, DynamicQuantizeLinear.

Policy (what is quantized and why):
- Decoder-layer MatMuls: int8 symmetric per output channel.
- lm_head: kept in fp32 (KEEP_LM_HEAD_FP32): its activation error goes straight into the logits.
- Embedding: unchanged (a Gather, no arithmetic to speed up; with tied embeddings it is the
  same fp32 table lm_head reads).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellama.quant import common, smooth as smoothing

KEEP_LM_HEAD_FP32 = True
PER_TOKEN = True
ACT_UINT8 = True       # per-token codes stored as uint8 + 128 (see _quantize_activation)
SMOOTH = True          # SmoothQuant factors folded into the RMSNorm weights first (smooth.py)


# With uint8 activations (the per-tensor DynamicQuantizeLinear form) weight codes must use 7 bits
# (-63..63): x86 CPUs without VNNI multiply uint8 x int8 with VPMADDUBSW, which adds two products
# into a saturating int16; 255 * 127 * 2 overflows it and wrecks the output (smollm2: KL 13 with
# full codes), 255 * 63 * 2 fits (onnxruntime.quantization's `reduce_range`). Full codes are used
# only with int8 activations (ACT_UINT8 = False: accurate, but the slow s8s8 GEMM).
WEIGHT_QMAX_U8 = 63
WEIGHT_QMAX = 127


def _quantize_columns(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> int8 codes -qmax..qmax and per-column scales [N] (symmetric)."""
    amax = np.abs(w).max(0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _quantize_activation(graph: onnx.GraphProto, a: str, mod: str) -> tuple[tuple[str, str, str], list]:
    """(A_q, A_scale, A_zero or '') and the nodes computing them."""
    names = [common.unique_name(graph, f"{a}_{s}") for s in ("quantized", "scale", "zero_point")]
    if not PER_TOKEN:
        return tuple(names), [helper.make_node("DynamicQuantizeLinear", [a], names,
                                               name=f"{mod}/DynamicQuantizeLinear")]
    # Symmetric int8 per row (token): scale = max|a_row| / 127. One token's outlier (the first
    # token's massive activations) then cannot flatten every other token of a prefill.
    q, scale = names[0], names[1]
    t = {k: common.unique_name(graph, f"{a}_{k}") for k in ("abs", "amax", "axes", "inv127", "raw", "eps",
                                                              "div", "round", "lo", "hi", "clip")}
    nodes = [
        helper.make_node("Abs", [a], [t["abs"]], name=f"{mod}/Abs_act"),
        common.constant(t["axes"], np.array([-1], np.int64), name=f"{mod}/Constant_axes"),
        helper.make_node("ReduceMax", [t["abs"], t["axes"]], [t["amax"]], keepdims=1, name=f"{mod}/ReduceMax_act"),
        common.constant(t["inv127"], np.array(1 / 127, np.float32), name=f"{mod}/Constant_inv127"),
        helper.make_node("Mul", [t["amax"], t["inv127"]], [t["raw"]], name=f"{mod}/Mul_act_scale"),
        common.constant(t["eps"], np.array(1e-12, np.float32), name=f"{mod}/Constant_eps"),
        helper.make_node("Max", [t["raw"], t["eps"]], [scale], name=f"{mod}/Max_act_scale"),
        helper.make_node("Div", [a, scale], [t["div"]], name=f"{mod}/Div_act"),
        helper.make_node("Round", [t["div"]], [t["round"]], name=f"{mod}/Round_act"),
        common.constant(t["lo"], np.array(-127, np.float32), name=f"{mod}/Constant_lo"),
        common.constant(t["hi"], np.array(127, np.float32), name=f"{mod}/Constant_hi"),
        helper.make_node("Clip", [t["round"], t["lo"], t["hi"]], [t["clip"]], name=f"{mod}/Clip_act"),
    ]
    if not ACT_UINT8:
        nodes.append(helper.make_node("Cast", [t["clip"]], [q], to=TensorProto.INT8, name=f"{mod}/Cast_act"))
        return (q, scale, ""), nodes
    # uint8 codes around a fixed zero point 128: ORT's fast u8s8 GEMM instead of its slow s8s8 one.
    shift, shifted, zero = (common.unique_name(graph, f"{a}_{k}") for k in ("c128", "shifted", "zero_point"))
    nodes += [
        common.constant(shift, np.array(128, np.float32), name=f"{mod}/Constant_128"),
        helper.make_node("Add", [t["clip"], shift], [shifted], name=f"{mod}/Add_act_zero"),
        helper.make_node("Cast", [shifted], [q], to=TensorProto.UINT8, name=f"{mod}/Cast_act"),
        common.constant(zero, np.array(128, np.uint8), name=f"{mod}/Constant_zero_point"),
    ]
    return (q, scale, zero), nodes


def apply(model: onnx.ModelProto, *, exclude: Sequence[str] = (),
          keep_lm_head_fp32: bool = KEEP_LM_HEAD_FP32, smooth: bool = SMOOTH) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    graph = model.graph
    patterns = tuple(exclude) + (("lm_head",) if keep_lm_head_fp32 else ())
    smoothed = smoothing.apply(model, exclude=patterns) if smooth else {"smoothing": None}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    replacements: dict[str, list[onnx.NodeProto]] = {}
    done = []
    qmax = WEIGHT_QMAX if PER_TOKEN and not ACT_UINT8 else WEIGHT_QMAX_U8
    for wm in common.weight_matmuls(graph, exclude=patterns):
        node, mod = wm.node, common.module_name(wm.node)
        a = node.input[0]
        new: list[onnx.NodeProto] = []
        if a not in quantized_inputs:
            # Emitted right before the first MatMul reading A; later readers come after it.
            quantized_inputs[a], nodes = _quantize_activation(graph, a, mod)
            new += nodes
        a_q, a_scale, a_zero = quantized_inputs[a]
        q, scale = _quantize_columns(common.weight_array(graph, wm), qmax)
        base = wm.weight.replace("/", "_")
        w_q = common.add_initializer(graph, q, common.unique_name(graph, f"{base}_int8"))
        w_s = common.add_initializer(graph, scale, common.unique_name(graph, f"{base}_scale"))
        out = node.output[0]
        acc, acc_f, s = (common.unique_name(graph, f"{out}_{x}") for x in ("int32", "float", "scale"))
        new += [
            helper.make_node("MatMulInteger", [a_q, w_q] + ([a_zero] if a_zero else []), [acc],
                             name=f"{mod}/MatMulInteger"),
            helper.make_node("Cast", [acc], [acc_f], to=TensorProto.FLOAT, name=f"{mod}/Cast"),
            helper.make_node("Mul", [a_scale, w_s], [s], name=f"{mod}/Mul_scale"),
            helper.make_node("Mul", [acc_f, s], [out], name=f"{mod}/Mul"),
        ]
        replacements[out] = new
        done.append(mod)
    common.replace_nodes(graph, replacements)
    common.drop_unused_initializers(graph)
    excluded = [common.module_name(n) for n in graph.node if n.op_type == "MatMul"]
    return {"pass": "int8-dynamic", "ops": "MatMulInteger" + ("" if PER_TOKEN else " + DynamicQuantizeLinear"),
            "weights": f"int8 symmetric per output channel, codes -{qmax}..{qmax}",
            "activations": "int8 symmetric per token, dynamic" if PER_TOKEN else "uint8 per tensor, dynamic",
            "matmuls": len(done), "lm_head": "fp32" if keep_lm_head_fp32 else "int8", "embedding": "fp32",
            "excluded": excluded, **smoothed}
