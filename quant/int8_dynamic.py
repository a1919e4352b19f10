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

import numpy as np
import onnx_ir as ir

from edgellama.quant import common, smooth
from edgellama.quant.registry import Settings

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
INT8, UINT8, FLOAT = ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.FLOAT


def _quantize_columns(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> int8 codes -qmax..qmax and per-column scales [N] (symmetric)."""
    amax = np.abs(w).max(0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _quantize_activation(names: common.Names, a: ir.Value, mod: str) -> tuple[list[ir.Value | None], list[ir.Node]]:
    """[A_q, A_scale, A_zero or None] and the nodes computing them."""
    if not PER_TOKEN:
        node = common.op("DynamicQuantizeLinear", [a], [names(f"{a.name}_{s}") for s in ("quantized", "scale", "zero_point")],
                         name=f"{mod}/DynamicQuantizeLinear")
        return list(node.outputs), [node]
    # Symmetric int8 per row (token): scale = max|a_row| / 127. One token's outlier (the first
    # token's massive activations) then cannot flatten every other token of a prefill.
    q, scale = names(f"{a.name}_quantized"), names(f"{a.name}_scale")

    def const(key: str, value: np.ndarray, suffix: str | None = None) -> ir.Value:
        nodes.append(common.constant(names(f"{a.name}_{key}"), value, name=f"{mod}/Constant_{suffix or key}"))
        return nodes[-1].outputs[0]

    def step(op_type: str, inputs: list[ir.Value], key: str, suffix: str, output: str | None = None, **attrs) -> ir.Value:
        nodes.append(common.op(op_type, inputs, [output or names(f"{a.name}_{key}")], name=f"{mod}/{op_type}_{suffix}",
                               **attrs))
        return nodes[-1].outputs[0]

    nodes: list[ir.Node] = []
    amax = step("ReduceMax", [step("Abs", [a], "abs", "act"), const("axes", np.array([-1], np.int64))], "amax", "act",
                keepdims=1)
    raw = step("Mul", [amax, const("inv127", np.array(1 / 127, np.float32))], "raw", "act_scale")
    a_scale = step("Max", [raw, const("eps", np.array(1e-12, np.float32))], "", "act_scale", output=scale)
    rounded = step("Round", [step("Div", [a, a_scale], "div", "act")], "round", "act")
    clipped = step("Clip", [rounded, const("lo", np.array(-127, np.float32)), const("hi", np.array(127, np.float32))],
                   "clip", "act")
    if not ACT_UINT8:
        return [step("Cast", [clipped], "", "act", output=q, to=INT8), a_scale, None], nodes
    # uint8 codes around a fixed zero point 128: ORT's fast u8s8 GEMM instead of its slow s8s8 one.
    shifted = step("Add", [clipped, const("c128", np.array(128, np.float32), "128")], "shifted", "act_zero")
    a_q = step("Cast", [shifted], "", "act", output=q, to=UINT8)
    return [a_q, a_scale, const("zero_point", np.array(128, np.uint8))], nodes


def apply(model: ir.Model, *, target: str, settings: Settings) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    graph = model.graph
    patterns = settings.exclude + (("lm_head",) if KEEP_LM_HEAD_FP32 else ())
    smoothed = smooth.apply(model, exclude=patterns) if SMOOTH else {"smoothing": None}
    names = common.Names(graph)
    quantized_inputs: dict[ir.Value, list[ir.Value | None]] = {}
    done = []
    qmax = WEIGHT_QMAX if PER_TOKEN and not ACT_UINT8 else WEIGHT_QMAX_U8
    for wm in common.weight_matmuls(graph, exclude=patterns):
        node, mod = wm.node, common.module_name(wm.node)
        a = node.inputs[0]
        new: list[ir.Node] = []
        if a not in quantized_inputs:
            # Emitted right before the first MatMul reading A; later readers come after it.
            quantized_inputs[a], new = _quantize_activation(names, a, mod)
        a_q, a_scale, a_zero = quantized_inputs[a]
        # Quantized when written (streaming, see common.py): codes and scales from one computation.
        k, n = (int(d) for d in wm.weight.const_value.shape)
        k, n = (n, k) if wm.transposed else (k, n)
        columns = common.Deferred(lambda weight=common.weight_reader(wm): _quantize_columns(weight(), qmax))
        base = wm.weight.name.replace("/", "_")
        w_q = common.add_lazy(graph, columns.part(lambda r: r[0]), dtype=INT8, shape=(k, n), name=names(f"{base}_int8"))
        w_s = common.add_lazy(graph, columns.part(lambda r: r[1]), dtype=FLOAT, shape=(n,), name=names(f"{base}_scale"))
        old = node.outputs[0]
        acc, acc_f, s = (names(f"{old.name}_{x}") for x in ("int32", "float", "scale"))
        out = common.output_like(old)
        matmul = common.op("MatMulInteger", [a_q, w_q] + ([a_zero] if a_zero is not None else []), [acc],
                           name=f"{mod}/MatMulInteger")
        cast = common.op("Cast", [matmul.outputs[0]], [acc_f], to=FLOAT, name=f"{mod}/Cast")
        mul_s = common.op("Mul", [a_scale, w_s], [s], name=f"{mod}/Mul_scale")
        mul = common.op("Mul", [cast.outputs[0], mul_s.outputs[0]], [out], name=f"{mod}/Mul")
        common.replace(graph, [node], [*new, matmul, cast, mul_s, mul], [out])
        done.append(mod)
    common.drop_unused(graph)
    excluded = [common.module_name(n) for n in graph if n.op_type == "MatMul"]
    return {"pass": "int8-dynamic", "ops": "MatMulInteger" + ("" if PER_TOKEN else " + DynamicQuantizeLinear"),
            "weights": f"int8 symmetric per output channel, codes -{qmax}..{qmax}",
            "activations": "int8 symmetric per token, dynamic" if PER_TOKEN else "uint8 per tensor, dynamic",
            "matmuls": len(done), "lm_head": "fp32" if KEEP_LM_HEAD_FP32 else "int8", "embedding": "fp32",
            "excluded": excluded, **smoothed}
