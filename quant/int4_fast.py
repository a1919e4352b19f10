"""int4-fast: int4 with the bytes spent for speed (int4.FAST): every decoder MatMul 4-bit, blocks of
64 but for down_proj and a 4-bit lm_head/embedding table (blocks of 32). Same kernels, fit and
SmoothQuant as int4; the registry gives it block 64 and lm_head bits 4 as defaults."""

from __future__ import annotations

import onnx_ir as ir

from edgellama.quant import int4
from edgellama.quant.registry import Settings


def apply(model: ir.Model, *, target: str, settings: Settings) -> dict:
    return int4.apply(model, target=target, settings=settings, policy=int4.FAST)
