"""What the `ort` rules share: ONNX Runtime's contrib domain and which dtypes each fused kernel has,
per provider (ONNX Runtime 1.31)."""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.engine import Context

MS_DOMAIN = "com.microsoft"
PROVIDERS = ("cpu", "cuda")

_F, _H, _B = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16
# CPU: contrib_ops/cpu/cpu_contrib_kernels.cc (the installed onnxruntime_pybind11_state.so instantiates
# GroupQueryAttention<float|MLFloat16>, RotaryEmbedding<float|MLFloat16>, SkipLayerNorm<float|double|
# MLFloat16|BFloat16>); SimplifiedLayerNormalization's CPU kernel is exercised in fp32/fp16 by the tests.
# CUDA: contrib_ops/cuda/cuda_contrib_kernels.cc (libonnxruntime_providers_cuda.so instantiates
# GroupQueryAttention<MLFloat16|BFloat16> only, RotaryEmbedding and SkipLayerNorm<float|MLFloat16|BFloat16>,
# LayerNorm<float|MLFloat16|BFloat16|double>).
KERNEL_DTYPES = {
    "GroupQueryAttention": {"cpu": (_F, _H), "cuda": (_H, _B)},
    "RotaryEmbedding": {"cpu": (_F, _H), "cuda": (_F, _H, _B)},
    "SkipSimplifiedLayerNormalization": {"cpu": (_F, _H, _B), "cuda": (_F, _H, _B)},
    "SimplifiedLayerNormalization": {"cpu": (_F, _H), "cuda": (_F, _H, _B)},
}


def kernel_refusal(op_type: str, dtype: ir.DataType | None, ctx: Context) -> str | None:
    """Why ORT could not run `op_type` in `dtype` on the target provider (None when it can)."""
    supported = KERNEL_DTYPES[op_type][ctx.provider]
    if dtype in supported:
        return None
    name = dtype.name.lower() if dtype is not None else "unknown"
    return (f"ONNX Runtime has no {name} {op_type} kernel for {ctx.provider} "
            f"(registered: {', '.join(d.name.lower() for d in supported)})")
