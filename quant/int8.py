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
- `accuracy_level` (ONNX Runtime's compute type for A): see ACCURACY_LEVEL.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from edgellama.quant import matmul_nbits

# 0 = let the kernel pick (fp32 activations on CPU, the accurate path). 4 quantizes activations to
# int8 per block at run time: faster on CPU, and the main source of onnxruntime-genai int8's loss.
ACCURACY_LEVEL = 0


def apply(model: onnx.ModelProto, *, block_size: int, exclude: Sequence[str] = (),
          accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    choice = matmul_nbits.Choice(bits=8, symmetric=True, search=False)
    stats = matmul_nbits.rewrite(model, choose=lambda wm: choice, block_size=block_size,
                                 accuracy_level=accuracy_level, exclude=exclude)
    return {"pass": "int8", "op": "com.microsoft.MatMulNBits", "bits": 8, "block_size": block_size,
            "symmetric": True, "accuracy_level": accuracy_level, "matmuls": len(stats.matmuls),
            "embedding": stats.embedding, "excluded": stats.excluded}
