"""int4 weight-only: decoder-layer MatMuls -> MatMulNBits bits=4 blockwise (block 32 by default).

Policy (what is quantized and why):
- Every MatMul inside the decoder layers: 4 bits, asymmetric (a zero point per block, so the
  16 levels cover the block's own [min, max] instead of a symmetric range half-wasted on skewed
  blocks), with an error-minimizing scale: per block, a range of clip ratios is tried and the one
  with the least squared error kept, then the scale is refit by least squares (blockwise.py).
- lm_head: 8 bits (symmetric, as in int8). Its error goes straight into every logit and, with tied
  embeddings, the same table is the embedding: 4 bits there costs most of int4's quality loss
  for ~7% of the size.
- The token embedding: GatherBlockQuantized int8 (shared with lm_head when tied).
- `accuracy_level` 0: fp32 activations (see int8.ACCURACY_LEVEL).
"""

from __future__ import annotations

from typing import Sequence

import onnx

from edgellama.quant import common, matmul_nbits

ACCURACY_LEVEL = 0
SYMMETRIC = False
SEARCH = True


def _is_layer(wm: common.WeightMatMul) -> bool:
    return common.module_name(wm.node).startswith("model.layers.")


def apply(model: onnx.ModelProto, *, block_size: int, exclude: Sequence[str] = (),
          accuracy_level: int = ACCURACY_LEVEL, symmetric: bool = SYMMETRIC, search: bool = SEARCH) -> dict:
    """Quantize `model` in place; returns the manifest's record of the pass."""
    four = matmul_nbits.Choice(bits=4, symmetric=symmetric, search=search)
    eight = matmul_nbits.Choice(bits=8, symmetric=True, search=False)
    stats = matmul_nbits.rewrite(model, choose=lambda wm: four if _is_layer(wm) else eight,
                                 block_size=block_size, accuracy_level=accuracy_level, exclude=exclude)
    return {"pass": "int4", "op": "com.microsoft.MatMulNBits", "bits": 4, "block_size": block_size,
            "symmetric": symmetric, "scale_search": search, "accuracy_level": accuracy_level,
            "matmuls": len(stats.matmuls),
            "int8_matmuls": sorted(m for m, b in stats.matmuls.items() if b == 8),
            "embedding": stats.embedding, "excluded": stats.excluded}
