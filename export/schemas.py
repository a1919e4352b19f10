"""ONNX schemas of the `edgellama` function ops, registered so the exporter can emit one node per block.

torch.onnx's translation functions (onnxscript) look up a schema for every op they call; a
function body alone is not enough, and a local function handed to the exporter gets inlined.
So the exporter emits schema-backed nodes and `onnx_export.py` attaches the bodies afterwards.
"""

from __future__ import annotations

import onnx
import onnx.reference  # noqa: F401  # builds its name-keyed schema table before ours share names with standard ops
from onnx.defs import OpSchema

DOMAIN = "edgellama"
VERSION = 1

_FLOAT = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "floating point tensors")
_INT64 = ("I", ["tensor(int64)"], "positions and masks")


def _schema(name: str, inputs: list[tuple[str, str]], outputs: list[str], attributes: dict[str, OpSchema.AttrType],
            doc: str, optional: dict[str, OpSchema.AttrType] | None = None) -> OpSchema:
    fp = OpSchema.FormalParameter
    return OpSchema(
        name, DOMAIN, VERSION, doc=doc,
        inputs=[fp(n, t) for n, t in inputs],
        outputs=[fp(n, "T") for n in outputs],
        type_constraints=[_FLOAT, _INT64] if any(t == "I" for _, t in inputs) else [_FLOAT],
        attributes=[OpSchema.Attribute(a, kind, a) for a, kind in attributes.items()]
        + [OpSchema.Attribute(a, kind, a, required=False) for a, kind in (optional or {}).items()],
    )


SCHEMAS = [
    _schema("RMSNorm", [("X", "T"), ("scale", "T")], ["Y"], {"epsilon": OpSchema.AttrType.FLOAT},
            "x * rsqrt(mean(x^2, -1) + epsilon) * scale, statistics in fp32 (transformers' LlamaRMSNorm)."),
    _schema("RotaryEmbedding", [("X", "T"), ("position_ids", "I"), ("cos_cache", "T"), ("sin_cache", "T")], ["Y"],
            {"num_heads": OpSchema.AttrType.INT},
            "Rotate-half rotary embedding of packed heads X [B,S,N*D] at position_ids, caches [P,D/2]."),
    _schema("GroupQueryAttention",
            [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
             ("attention_mask", "I")],
            ["output", "present_key", "present_value"],
            {"num_heads": OpSchema.AttrType.INT, "kv_num_heads": OpSchema.AttrType.INT,
             "scale": OpSchema.AttrType.FLOAT},
            "Causal grouped-query attention over past ++ current keys with a [B,T] padding mask; "
            "sliding_window w > 0: query slot i sees keys j > i - w only (0, the default: all).",
            optional={"sliding_window": OpSchema.AttrType.INT}),
]


def register() -> None:
    """Register the schemas once per process (idempotent)."""
    for schema in SCHEMAS:
        if not onnx.defs.has(schema.name, DOMAIN):
            onnx.defs.register_schema(schema)
