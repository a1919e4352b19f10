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
  symmetric lm_head rounded to nearest on all 16 codes (a tied embedding reads its bytes, as
  onnxruntime-genai's builder does), smaller in memory and faster per token; smollm2 mean KL 0.130
  -> 0.207 (genai's int4 0.389; 0.302 while the head took the clip search and 15 codes).
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

`--mode int4-fast` (int4_fast.py, Policy FAST below) is the other end of the same trade: the
smallest graph measured whose smollm2 quality still beats genai's int4 on mean KL, top-1 and
perplexity alike. Decode speed relative to genai's int4 (one lockstep run of bench/profile_step.py,
the head as then: clip search, 15 codes) and KL: all 4-bit at block 32 ~1.02x, KL 0.332; blocks
of 64 everywhere ~1.09x, 0.401; down_proj back at 32 ~1.06x, 0.367. With the head rounded to
nearest on 16 codes: FAST 0.286 (perplexity +28.8% against genai's +31.3%); blocks of 64 with
down_proj too 0.319 but +34.6%, behind genai on perplexity. Symmetric layer blocks gain ~1% speed
for a much worse fit (0.428 at 32).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where a 4-bit pass spends its bytes: the one thing `int4` and `int4-fast` differ in."""
    name: str
    eight_bit: tuple[str, ...]          # decoder projections kept at 8 bits (a separate MatMulNBits)
    fine: tuple[str, ...] = ()          # decoder projections in blocks of at most FINE_BLOCK
    fine_head: bool = False             # a 4-bit lm_head in blocks of at most FINE_BLOCK too


FINE_BLOCK = 32

# The default: quality first (v_proj and, unless --lm-head-bits 4, lm_head at 8 bits).
ACCURATE = Policy("int4", eight_bit=EIGHT_BIT_PROJECTIONS)

# Speed first, and still ahead of onnxruntime-genai's int4 on quality: every decoder MatMul 4-bit
# (no 8-bit v, so q|k|v is one MatMulNBits and no Concat follows it), blocks of 64 (half the
# scales and zero points to read and apply per weight) except down_proj and the lm_head/embedding
# table, which lose the most at 64 and stay at 32. The figures of each choice are in the
# issue-11 note and bench/quality.py; the registry gives this pass block 64 and a 4-bit lm_head.
FAST = Policy("int4-fast", eight_bit=(), fine=("down_proj",), fine_head=True)


def _projection(wm: common.WeightMatMul) -> str | None:
    """`v_proj`, `down_proj`, ... for a decoder-layer MatMul; None outside the layers."""
    mod = common.module_name(wm.node)
    return mod.rsplit(".", 1)[-1] if mod.startswith("model.layers.") else None


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


def _choose(wm: common.WeightMatMul, *, policy: Policy, four: matmul_nbits.Choice, fine: matmul_nbits.Choice,
            eight: matmul_nbits.Choice, head: matmul_nbits.Choice) -> matmul_nbits.Choice | matmul_nbits.Columns:
    """4 bits in the decoder layers but for the policy's 8-bit projections; a packed q|k|v keeps its
    v columns at 8 bits too, so the static contract quantizes exactly as the dynamic one does."""
    proj = _projection(wm)
    v = _v_width(wm) if proj == "qkv_proj" and "v_proj" in policy.eight_bit else None
    if v:
        shape = wm.weight.const_value.shape
        n = shape[0] if wm.transposed else shape[-1]
        return matmul_nbits.Columns((("qk", int(n) - v, four), ("v", v, eight)))
    if proj is not None and proj not in policy.eight_bit:
        return fine if proj in policy.fine else four
    return head if common.module_name(wm.node) == "lm_head" else eight


def apply(model: ir.Model, *, target: str, settings: Settings, policy: Policy = ACCURATE) -> dict:
    """Quantize `model` in place by `policy`; returns the manifest's record of the pass."""
    level, exclude, block = settings.accuracy_level, settings.exclude, settings.block_size
    smoothed = smooth.apply(model, exclude=exclude, mlp=True) if SMOOTH and level == 4 else {"smoothing": None}
    four = matmul_nbits.Choice(bits=4, symmetric=SYMMETRIC, search=SEARCH, float_zero_points=FLOAT_ZERO_POINTS)
    fine_block = min(block, FINE_BLOCK)
    fine = dataclasses.replace(four, block_size=fine_block)
    eight = matmul_nbits.Choice(bits=8, symmetric=True, search=False)
    head_bits = settings.lm_head_bits or 8
    # A 4-bit lm_head is symmetric so that a tied embedding can read its bytes (one table, as at 8 bits),
    # and rounded to nearest without the clip search: the search lowers the table's squared error by
    # clipping its largest entries, which are the ones that decide the top logits (smollm2's KL and
    # perplexity both worse with it: figures in the issue-11 note).
    head = eight if head_bits == 8 else matmul_nbits.Choice(
        bits=4, symmetric=LM_HEAD_SYMMETRIC, search=False, block_size=fine_block if policy.fine_head else None)
    stats = matmul_nbits.rewrite(
        model, choose=lambda wm: _choose(wm, policy=policy, four=four, fine=fine, eight=eight, head=head),
        block_size=block, accuracy_level=level, exclude=exclude)
    finer = {"fine_block_size": fine_block, "fine": list(policy.fine),
             "lm_head_block_size": fine_block if policy.fine_head and head_bits == 4 else block}
    return {"pass": policy.name, "requires": "onnxruntime (com.microsoft contrib ops)",
            "op": "com.microsoft.MatMulNBits", "bits": 4, "block_size": block,
            **(finer if policy.fine or policy.fine_head else {}),
            "symmetric": SYMMETRIC, "scale_search": SEARCH, "float_zero_points": FLOAT_ZERO_POINTS,
            "accuracy_level": level, "lm_head_bits": head_bits, "matmuls": len(stats.matmuls),
            "int8_matmuls": sorted(m for m, b in stats.matmuls.items() if b == 8),
            "embedding": stats.embedding, "excluded": stats.excluded, **smoothed}
