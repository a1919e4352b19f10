"""Every quantization mode of an `ort` graph: the residual Add and its norm back into one
com.microsoft.SkipSimplifiedLayerNormalization.

The fp32 CPU lowering keeps them apart because that kernel's fp32 sum of squares is less accurate
than torch's (export/lower/ort_norm.py); a quantized model's own rounding dwarfs that difference,
and the fused kernel saves two nodes per layer on every decode step (onnxruntime-genai's builder
writes the fused kernel at every precision). The rewrite is the export's own Skip rewrite
(`ort_norm.join_skip_norm`), so a quantized graph has the norms an fp16 `ort` export has.
"""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower import ort_norm


def apply(model: ir.Model, *, target: str) -> int:
    """Fuse every residual norm of an `ort` model's main graph in place; returns how many."""
    if target != "ort":
        return 0   # portable and onnx23 keep standard ops only
    fused = 0
    for node in list(model.graph):
        if node.graph is not None and (node.domain, node.op_type) == ("", "SimplifiedLayerNormalization"):
            fused += ort_norm.join_skip_norm(node, model.graph) is None
    if fused:
        model.opset_imports.setdefault(ort_norm.MS_DOMAIN, 1)
    return fused
