"""int8 weight-only: every weight MatMul -> MatMulNBits bits=8, symmetric, blockwise along K.

Policy (what is quantized and why):
- All weight MatMuls, lm_head included: with tied embeddings (smollm2) lm_head/embedding is a
  fifth of the parameters, and int8 keeps it within the size goal (<= 0.30x of fp32) at no
  measurable cost in quality.
- The token embedding becomes GatherBlockQuantized (int8, same blocks). When it is tied to
  lm_head it reads lm_head's quantized bytes, so the table is stored once.
- Symmetric codes -127..127 around the kernel's default zero point 128 (no zero-point tensor),
  scale = block absmax / 127: at 8 bits a zero point buys nothing measurable.
- Block size 32 by default (Q8_0's block): one fp32 scale per 32 weights, 1.125 bytes a weight.
- `accuracy_level` 4 by default (registry.py; ONNX Runtime quantizes A to int8 per block at run
  time and uses its integer kernels, the fast CPU path and the main source of the loss, as for
  onnxruntime-genai's int8); `--accuracy-level 0` keeps fp32 activations (figures below).

Measured on smollm2 (portable target, 16 windows of 256 tokens of standard-library docstrings,
against the fp32 ONNX model; .notes/quant.md): 0.285x the fp32 bytes;
default (accuracy_level 4, smoothing): perplexity +0.11%, mean KL 3.2e-3, top-1 96.7%;
accuracy_level 4 without smoothing: +0.33%, KL 4.7e-3, top-1 95.9%;
accuracy_level 0 (fp32 activations): +0.15%, KL 1.3e-3, top-1 98.1%, but ~25x slower decode on
this AVX2 CPU (MLAS has no fast fp32-activation path for 8-bit weights here).
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.quant import common, matmul_nbits, smooth
from edgellama.quant.registry import Settings

# SmoothQuant factors folded into the RMSNorm weights before quantizing (smooth.py), when the
# activations are quantized (accuracy_level 4): smollm2 KL 4.6e-3 -> 3.1e-3.
SMOOTH = True

# Block size per projection (the module path's last part), in place of the request's. Empty: finer
# blocks for lm_head and down_proj lower KL (smollm2 3.07e-3 -> 2.48e-3 at block 16) but cost ~10%
# decode speed, and int8 is the speed mode.
PROJECTION_BLOCK_SIZES: dict[str, int] = {}


def apply(model: ir.Model, *, target: str, settings: Settings) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    level, exclude = settings.accuracy_level, settings.exclude
    smoothed = smooth.apply(model, exclude=exclude) if SMOOTH and level == 4 else {"smoothing": None}

    def choose(wm: common.WeightMatMul) -> matmul_nbits.Choice:
        block = PROJECTION_BLOCK_SIZES.get(common.module_name(wm.node).rsplit(".", 1)[-1])
        return matmul_nbits.Choice(bits=8, symmetric=True, search=False, block_size=block)

    stats = matmul_nbits.rewrite(model, choose=choose, block_size=settings.block_size, accuracy_level=level,
                                 exclude=exclude)
    return {"pass": "int8", "requires": "onnxruntime (com.microsoft contrib ops)",
            "op": "com.microsoft.MatMulNBits", "bits": 8, "block_size": settings.block_size,
            "symmetric": True, "accuracy_level": level, "matmuls": len(stats.matmuls),
            "embedding": stats.embedding, "excluded": stats.excluded, **smoothed}
