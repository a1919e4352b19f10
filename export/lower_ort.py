"""The `ort` lowering pass: edgellama function ops -> ONNX Runtime's fused contrib kernels.

Input is the portable model of `onnx_export.export_onnx` (one `edgellama` node per block);
output keeps the graph contract (same input/output names, dtypes and dynamic dims) with:

    RMSNorm(Add(residual, branch))  ->  com.microsoft.SkipSimplifiedLayerNormalization
                                        (output 3, the residual sum, feeds the next residual)
    RMSNorm(anything else)          ->  SimplifiedLayerNormalization (ORT's, domain ai.onnx)
    RotaryEmbedding                 ->  com.microsoft.RotaryEmbedding
    GroupQueryAttention             ->  com.microsoft.GroupQueryAttention (+ attention bias)

One rewrite per module (`lower_ort_norm.py`, `lower_ort_rotary.py`, `lower_ort_gqa.py`); each
has a `check` that returns the reason it refuses a node (None when it accepts) and a `rewrite`.
A refused node keeps its edgellama function node, whose standard-ONNX body ONNX Runtime inlines,
so a refusal costs speed, never validity. Refusals are returned by `lower_ort_with_report`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import onnx_ir as ir

from edgellama.errors import ExportError

MS_DOMAIN = "com.microsoft"
EDGELLAMA = "edgellama"
PROVIDERS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Refusal:
    node: str      # node name, e.g. "model.layers.0.input_layernorm/RMSNorm"
    rewrite: str   # e.g. "skip_simplified_layer_norm"
    reason: str


@dataclasses.dataclass
class Rewrite:
    """One node-level rewrite: `check(node, ctx) -> reason | None`, `rewrite(node, ctx) -> None`."""

    name: str
    op_type: str                      # the edgellama op it lowers
    check: Callable[[ir.Node, "Lowering"], str | None]
    rewrite: Callable[[ir.Node, "Lowering"], None]


class Lowering:
    """What the rewrites share: the graph, the target provider, and graph-wide derived values
    (sequence lengths, attention bias) built once and reused by every layer."""

    def __init__(self, graph: ir.Graph, provider: str):
        self.graph = graph
        self.provider = provider
        self.cache: dict[Any, Any] = {}

    def replace(self, old_values: list[ir.Value], new_values: list[ir.Value]) -> None:
        """Point every use of `old_values` at `new_values`, graph outputs included, and give the new
        values the old names, shapes and types, so the graph contract is unchanged."""
        for old, new in zip(old_values, new_values):
            name, shape, type_ = old.name, old.shape, old.type
            old.name = None
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            new.name, new.shape, new.type = name, shape, type_


def _rewrites() -> dict[str, list[Rewrite]]:
    from edgellama.export import lower_ort_gqa, lower_ort_norm, lower_ort_rotary

    chain: dict[str, list[Rewrite]] = {}
    # For each edgellama op, the rewrites in order of preference: the first that accepts applies.
    for rw in (*lower_ort_norm.REWRITES, *lower_ort_rotary.REWRITES, *lower_ort_gqa.REWRITES):
        chain.setdefault(rw.op_type, []).append(rw)
    return chain


def lower_ort_with_report(ir_model: ir.Model, *, provider: str = "cpu") -> tuple[ir.Model, list[Refusal]]:
    """`lower_ort`, plus every refusal (node, rewrite, reason). Edits `ir_model` in place."""
    if provider not in PROVIDERS:
        raise ExportError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    graph = ir_model.graph
    ctx = Lowering(graph, provider)
    chain = _rewrites()
    refusals: list[Refusal] = []
    for node in list(graph):
        if node.domain != EDGELLAMA or node.graph is None:
            continue   # not ours, or already consumed by an earlier fusion
        for rw in chain.get(node.op_type, []):
            reason = rw.check(node, ctx)
            if reason is None:
                rw.rewrite(node, ctx)
                break
            refusals.append(Refusal(node.name or node.op_type, rw.name, reason))
    _prune_functions(ir_model)
    ir_model.opset_imports[MS_DOMAIN] = 1
    return ir_model, refusals


def lower_ort(ir_model: ir.Model, *, provider: str = "cpu") -> ir.Model:
    """The portable model lowered to ONNX Runtime's fused kernels for `provider` ("cpu"/"cuda").

    Semantics are those of the edgellama ops (`export/ops.py`: `rms_norm_ref`, `rotary_ref`,
    `gqa_ref`), i.e. transformers' LlamaForCausalLM, left-padded batches included.
    """
    return lower_ort_with_report(ir_model, provider=provider)[0]


def _prune_functions(ir_model: ir.Model) -> None:
    """Drop function bodies no node calls any more, and the edgellama opset when nothing uses it."""
    used = {(n.domain, n.op_type, n.overload) for n in ir.traversal.RecursiveGraphIterator(ir_model.graph)}
    for fn in list(ir_model.functions.values()):
        used |= {(n.domain, n.op_type, n.overload) for n in ir.traversal.RecursiveGraphIterator(fn)}
    for key in list(ir_model.functions):
        if key not in used:
            del ir_model.functions[key]
    if not any(domain == EDGELLAMA for domain, _, _ in used):
        ir_model.opset_imports.pop(EDGELLAMA, None)


# -- which dtypes each fused kernel has, per provider (ONNX Runtime 1.31) ------------------------------
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


def kernel_refusal(op_type: str, dtype: ir.DataType | None, ctx: Lowering) -> str | None:
    """Why ORT could not run `op_type` in `dtype` on the target provider (None when it can)."""
    supported = KERNEL_DTYPES[op_type][ctx.provider]
    if dtype in supported:
        return None
    name = dtype.name.lower() if dtype is not None else "unknown"
    return (f"ONNX Runtime has no {name} {op_type} kernel for {ctx.provider} "
            f"(registered: {', '.join(d.name.lower() for d in supported)})")


# -- small builders shared by the rewrites ----------------------------------------------------------
def static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None
