"""int4 weight-only: decoder-layer MatMuls -> MatMulNBits bits=4 blockwise (block 32 by default).

Policy (what is quantized and why):
- Every MatMul inside the decoder layers: 4 bits, asymmetric (a zero point per block, so the
  16 levels cover the block's own [min, max] instead of a symmetric range half-wasted on skewed
  blocks), with an error-minimizing fit: per block, a range of clip ratios is tried and the one
  with the least squared error kept, then the affine map is refit by least squares for the
  chosen codes, a few rounds (blockwise.py). Except v_proj: 8 bits (EIGHT_BIT_PROJECTIONS).
- lm_head: 8 bits (symmetric, as in int8). Its error goes straight into every logit and, with tied
  embeddings, the same table is the embedding: 4 bits there costs most of int4's quality loss
  for ~7% of the size. `--lm-head-bits 4` (Settings.lm_head_bits) trades that back: a 4-bit
  symmetric lm_head (a tied embedding reads its bytes, as onnxruntime-genai's builder does), smaller
  in memory and faster per token; smollm2 mean KL 0.130 -> 0.302 (genai's int4 0.389).
- The token embedding: GatherBlockQuantized int8 (shared with lm_head when tied).
- `accuracy_level` 4 by default (registry.py: int8 activations, the fast CPU kernels), as int8.
- Integer zero points (packed 4-bit, the layout MLAS's fast kernels take). FLOAT_ZERO_POINTS
  (an fp32 offset per block, as GGUF's Q4_1 min) fits much better but ONNX Runtime's CPU kernels
  then take a slow path and the file grows to ~0.21x; kept as an option, measured below.

Measured on smollm2 (its weights sit on a Q4_1 grid; 16 windows x 256 tokens vs fp32 ONNX):
default: 0.192x size, perplexity +20.6%, mean KL 0.198, top-1 78%, decode ~40 ms/token (fp32
~120 ms on the same loaded run); without the v_proj exception KL 0.266. Float zero points: 0.21x,
+0.04%, KL 1.0e-3 (they reproduce the Q4_1 grid, whose offsets are not multiples of the step)
but ~560 ms/token. On the de-gridded copy (8 windows): integer zero points KL 0.331 (0.236 with
v_proj at 8 bits), float zero points 0.256: the grid, not the method, made the difference.
(Those figures predate SMOOTH. With it, the current default, against fp32 torch over 4,096 tokens
in windows of 512: smollm2 KL 0.130, top-1 80.6%, perplexity +14.0%; de-gridded copy KL 0.165,
top-1 76.8%, +16.9%; onnxruntime-genai's builder -p int4 in the same run: 0.389 and 0.511.)
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.quant import common, matmul_nbits, smooth
from edgellama.quant.registry import Settings

SYMMETRIC = False
SEARCH = True
FLOAT_ZERO_POINTS = False


# Decoder-layer projections kept at 8 bits: v_proj is 3% of a layer's weights and measured as the
# most sensitive (de-gridded smollm2, int4 KL 0.331 -> 0.236 for +0.3% size; down_proj at 8 bits
# gives 0.230 for +12% size, first/last layer 0.264 for +3%).
EIGHT_BIT_PROJECTIONS = ("v_proj",)


# SmoothQuant factors (smooth.py), norms and MLP pairs, folded in before quantizing: the int8
# activations (accuracy_level 4) lose less, and the 4-bit weights absorb the moved range with
# their own per-block scales. smollm2 (4,096 tokens vs fp32 torch): mean KL 0.200 -> 0.130,
# top-1 76.1% -> 80.6%, perplexity +18.5% -> +14.0%; norms alone 0.173.
SMOOTH = True


LM_HEAD_SYMMETRIC = True


def _is_four_bit(wm: common.WeightMatMul) -> bool:
    mod = common.module_name(wm.node)
    return mod.startswith("model.layers.") and mod.rsplit(".", 1)[-1] not in EIGHT_BIT_PROJECTIONS


def _v_width(wm: common.WeightMatMul) -> int | None:
    """The v columns of a packed q|k|v weight (the static contract's qkv_proj), read from the
    GroupQueryAttention it feeds (through a bias Add, if any); None when it feeds none."""
    readers = list(wm.node.outputs[0].uses())
    if len(readers) == 1 and readers[0].node.op_type == "Add":
        readers = list(readers[0].node.outputs[0].uses())
    for use in readers:
        node = use.node
        if node.op_type == "GroupQueryAttention" and use.idx == 0:
            heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
            shape = wm.weight.const_value.shape   # the initializer's own: the Value's may be unset in memory
            n = shape[0] if wm.transposed else shape[-1]
            return n // (heads + 2 * kv_heads) * kv_heads
    return None


def _choose(wm: common.WeightMatMul, four: matmul_nbits.Choice, eight: matmul_nbits.Choice,
            head: matmul_nbits.Choice) -> matmul_nbits.Choice | matmul_nbits.Columns:
    """4 bits in the decoder layers but for EIGHT_BIT_PROJECTIONS; a packed q|k|v keeps its v columns
    at 8 bits too, so the static contract quantizes exactly as the dynamic one does."""
    mod = common.module_name(wm.node)
    v = _v_width(wm) if mod.endswith(".qkv_proj") and "v_proj" in EIGHT_BIT_PROJECTIONS else None
    if v:
        shape = wm.weight.const_value.shape
        n = shape[0] if wm.transposed else shape[-1]
        return matmul_nbits.Columns((("qk", int(n) - v, four), ("v", v, eight)))
    if _is_four_bit(wm):
        return four
    return head if mod == "lm_head" else eight


def apply(model: ir.Model, *, target: str, settings: Settings) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    level, exclude = settings.accuracy_level, settings.exclude
    smoothed = smooth.apply(model, exclude=exclude, mlp=True) if SMOOTH and level == 4 else {"smoothing": None}
    four = matmul_nbits.Choice(bits=4, symmetric=SYMMETRIC, search=SEARCH, float_zero_points=FLOAT_ZERO_POINTS)
    eight = matmul_nbits.Choice(bits=8, symmetric=True, search=False)
    head_bits = settings.lm_head_bits or 8
    # A 4-bit lm_head is symmetric so that a tied embedding can read its bytes (one table, as at 8 bits).
    head = eight if head_bits == 8 else matmul_nbits.Choice(bits=4, symmetric=LM_HEAD_SYMMETRIC, search=SEARCH)
    stats = matmul_nbits.rewrite(model, choose=lambda wm: _choose(wm, four, eight, head),
                                 block_size=settings.block_size, accuracy_level=level, exclude=exclude)
    return {"pass": "int4", "requires": "onnxruntime (com.microsoft contrib ops)",
            "op": "com.microsoft.MatMulNBits", "bits": 4, "block_size": settings.block_size,
            "symmetric": SYMMETRIC, "scale_search": SEARCH, "float_zero_points": FLOAT_ZERO_POINTS,
            "accuracy_level": level, "lm_head_bits": head_bits, "matmuls": len(stats.matmuls),
            "int8_matmuls": sorted(m for m, b in stats.matmuls.items() if b == 8),
            "embedding": stats.embedding, "excluded": stats.excluded, **smoothed}
