"""Which rules each target applies, and `lower(ir_model, *, target, provider)`.

Input is the portable model of `onnx_export.export_onnx` (one `edgellama` node per block); output
keeps the graph contract (same input/output names, dtypes and dynamic dims). Semantics are those
of the edgellama ops (`export/ops.py`: `rms_norm_ref`, `rotary_ref`, `gqa_ref`), i.e.
transformers' LlamaForCausalLM, left-padded batches included.

`ort`, ONNX Runtime's fused contrib kernels for `provider` ("cpu"/"cuda"):

    RMSNorm(Add(residual, branch))  ->  com.microsoft.SkipSimplifiedLayerNormalization   (ort_norm.py)
                                        (output 3, the residual sum, feeds the next residual;
                                        not fp32 on the CPU, where that kernel is less accurate)
    RMSNorm(anything else)          ->  SimplifiedLayerNormalization (ORT's, domain ai.onnx)
    RotaryEmbedding                 ->  com.microsoft.RotaryEmbedding                    (ort_rotary.py)
    GroupQueryAttention             ->  com.microsoft.GroupQueryAttention (+ attention bias) (ort_gqa.py)

`onnx23`, the standard ai.onnx opset-23 ops (needs a model exported at opset 23):

    RMSNorm              ->  RMSNormalization        (onnx23_norm.py)
    RotaryEmbedding      ->  RotaryEmbedding-23      (onnx23_rotary.py)
    GroupQueryAttention  ->  Attention-23            (onnx23_attention.py)

ONNX Runtime 1.31 CPU runs all three opset-23 ops as kernels (not function expansions) in fp32
and fp16. CUDA: the installed libonnxruntime_providers_cuda.so (1.31.1) instantiates
onnxruntime::cuda::Attention<float|MLFloat16|BFloat16>, RotaryEmbedding<float|MLFloat16|BFloat16>
and RMSNorm (fp32 statistics), so no dtype is refused for CUDA there; that was read from the
library's type names, not run (no GPU in our tests).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir

from edgellama.errors import ExportError
from edgellama.folder import TARGETS
from edgellama.export.lower.engine import Context, Lowered, Refusal, Report, Rule, apply
from edgellama.export.lower.onnx23_attention import Attention
from edgellama.export.lower.onnx23_norm import RMSNormalization
from edgellama.export.lower.onnx23_rotary import RotaryEmbedding
from edgellama.export.lower.onnx23_types import OPSET
from edgellama.export.lower.ort_gqa import MsGroupQueryAttention
from edgellama.export.lower.ort_kernels import KERNEL_DTYPES, MS_DOMAIN, PROVIDERS
from edgellama.export.lower.ort_norm import SimplifiedLayerNorm, SkipSimplifiedLayerNorm
from edgellama.export.lower.ort_rotary import MsRotaryEmbedding
from edgellama.export.lower.ort_static import StaticKvCache

KV_CACHES = ("static", "dynamic")


def _ort_accepts(ir_model: ir.Model, provider: str) -> None:
    if provider not in PROVIDERS:
        raise ExportError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")


def _onnx23_accepts(ir_model: ir.Model, provider: str) -> None:
    opset = ir_model.opset_imports.get("")
    if opset != OPSET:
        raise ExportError(f"the onnx23 target needs a model exported at opset {OPSET} (this one is opset {opset})")


@dataclasses.dataclass(frozen=True)
class Target:
    rules: tuple[Rule, ...]                     # per op, in order of preference
    accepts: Callable[[ir.Model, str], None]    # raises ExportError for a model or provider it cannot take
    opsets: dict[str, int]                      # opset imports the lowered nodes need


LOWERINGS = {
    "ort": Target((SkipSimplifiedLayerNorm(), SimplifiedLayerNorm(), MsRotaryEmbedding(), MsGroupQueryAttention()),
                  _ort_accepts, {MS_DOMAIN: 1}),
    # Provider-independent: every dtype the opset allows has a kernel on both providers.
    "onnx23": Target((RMSNormalization(), RotaryEmbedding(), Attention()), _onnx23_accepts, {}),
}


def lower_with_report(ir_model: ir.Model, *, target: str, provider: str = "cpu",
                      kv_cache: str = "dynamic") -> tuple[ir.Model, Report]:
    """`lower`, plus what each rule lowered and every refusal (node, rule, reason)."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if kv_cache not in KV_CACHES:
        raise ExportError(f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    if kv_cache == "static" and target != "ort":
        raise ExportError(f"the static KV cache needs --target ort (ONNX Runtime's GroupQueryAttention); "
                          f"{target} keeps the dynamic contract")
    if target not in LOWERINGS:   # portable: the function ops stay
        return ir_model, Report()
    spec = LOWERINGS[target]
    spec.accepts(ir_model, provider)
    ctx = Context(ir_model.graph, provider)
    report = apply(ir_model, spec.rules, ctx)
    ir_model.opset_imports.update(spec.opsets)
    if kv_cache == "static":
        static = StaticKvCache()
        if (reason := static.check(ir_model, ctx)) is not None:
            raise ExportError(f"--kv-cache static refused: {reason} (--kv-cache dynamic keeps today's graph)")
        static.rewrite(ir_model, ctx)
        report.lowered.append(Lowered("graph", static.name))
    return ir_model, report


def static_refusal(config) -> str | None:
    """Why a model family's graph cannot take the static KV cache (None when it can): the pass packs
    the plain q/k/v MatMuls into one and moves rotary into GroupQueryAttention, which leaves no
    place for q/k/v biases (qwen2) or a per-head norm between projection and rotary (qwen3)."""
    if getattr(config, "attention_bias", False):
        return f"{config.model_type}'s q/k/v biases do not fit the static graph's packed QKV MatMul"
    if getattr(config, "qk_norm", False):
        return f"{config.model_type}'s q_norm/k_norm sit between projection and rotary, which the static graph fuses"
    return None


def default_kv_cache(target: str, *, dtype: str, provider: str) -> str:
    """The contract an export gets when none is asked for: static where ONNX Runtime has the
    GroupQueryAttention kernel that writes the shared buffer (ort, not fp32 on CUDA), else dynamic
    (export_model also falls back to dynamic for a family `static_refusal` names)."""
    if target != "ort":
        return "dynamic"
    dtypes = KERNEL_DTYPES["GroupQueryAttention"].get(provider, ())
    return "static" if {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}.get(dtype) in dtypes else "dynamic"


def lower(ir_model: ir.Model, *, target: str, provider: str = "cpu", kv_cache: str = "dynamic") -> ir.Model:
    """The portable model lowered to `target`'s kernels (in place; returns `ir_model`)."""
    return lower_with_report(ir_model, target=target, provider=provider, kv_cache=kv_cache)[0]


# -- per target, as the tests and callers name them ---------------------------------------------------
def lower_ort_with_report(ir_model: ir.Model, *, provider: str = "cpu") -> tuple[ir.Model, list[Refusal]]:
    ir_model, report = lower_with_report(ir_model, target="ort", provider=provider)
    return ir_model, report.refused


def lower_ort(ir_model: ir.Model, *, provider: str = "cpu") -> ir.Model:
    return lower(ir_model, target="ort", provider=provider)


def lower_onnx23_with_report(ir_model: ir.Model) -> tuple[ir.Model, list[Refusal]]:
    ir_model, report = lower_with_report(ir_model, target="onnx23")
    return ir_model, report.refused


def lower_onnx23(ir_model: ir.Model) -> ir.Model:
    return lower(ir_model, target="onnx23")
