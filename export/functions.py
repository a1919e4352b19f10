"""Standard-ONNX bodies of the `edgellama` function ops (RMSNorm, RotaryEmbedding, GroupQueryAttention).

Each body computes what its reference in `ops.py` computes (`rms_norm_ref`, `rotary_ref`,
`gqa_ref`, themselves matching transformers' LlamaForCausalLM), so any ONNX runtime can run the
portable model: ONNX Runtime inlines function bodies at load.

The bodies are dtype-polymorphic (fp32, fp16, bf16): precision-sensitive steps cast to fp32
(RMSNorm statistics, softmax) and `CastLike` brings results back to the input's type, so no
body names a dtype it was not given. Their opset equals the model's, because the checker
(`full_check=True`) refuses a function whose standard-ONNX opset differs from the model's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from edgellama.export.lower.attention_bias import allowed_keys
from edgellama.export.schemas import DOMAIN, VERSION

_FLOAT32_MIN = -3.4028234663852886e38   # finfo(float32).min: finite, so fully masked padding rows stay finite


class _Body:
    """A tiny builder: `b.op("Mul", x, y)` appends a node and returns its (fresh) output name."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | list[str] | None = None,
           **attrs) -> str | list[str]:
        if out is None:
            names = [f"{self._prefix}{self._n}_{i}" for i in range(outputs)]
            self._n += 1
        else:
            names = [out] if isinstance(out, str) else list(out)
        refs = {k: v for k, v in attrs.items() if isinstance(v, _Ref)}
        node = helper.make_node(op_type, list(inputs), names,
                                **{k: v for k, v in attrs.items() if not isinstance(v, _Ref)})
        for name, ref in refs.items():
            node.attribute.append(ref.proto(name))
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names

    def emit(self, op_type: str, *inputs: str, name: str, **attrs) -> str:
        """`op` as `attention_bias.allowed_keys` calls it: tensor attributes come as numpy arrays and
        the step's name is not needed (body values are numbered)."""
        attrs = {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
        return self.op(op_type, *inputs, **attrs)

    def ints(self, *values: int) -> str:
        return self.op("Constant", value_ints=list(values))

    def attr_int(self, attribute: str) -> str:
        """The function's int attribute as a 1-D int64 tensor, for building shapes."""
        return self.op("Constant", value_ints=_Ref(attribute, AttributeProto.INTS, from_int=True))


class _Ref:
    """A node attribute that refers to one of the function's own attributes (`ref_attr_name`)."""

    def __init__(self, name: str, kind: int, from_int: bool = False):
        self.name, self.kind, self.from_int = name, kind, from_int

    def proto(self, attr_name: str) -> AttributeProto:
        a = AttributeProto()
        a.name = attr_name
        a.type = AttributeProto.INT if self.from_int else self.kind
        a.ref_attr_name = self.name
        return a


def _fix_int_refs(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`Constant(value_ints=<int attribute>)` is not allowed; turn it into `value_int` + Unsqueeze."""
    fixed: list[onnx.NodeProto] = []
    for node in nodes:
        ref = next((a for a in node.attribute if a.ref_attr_name and a.name == "value_ints"), None)
        if ref is None:
            fixed.append(node)
            continue
        scalar = node.output[0] + "_scalar"
        c = helper.make_node("Constant", [], [scalar])
        a = AttributeProto()
        a.name, a.type, a.ref_attr_name = "value_int", AttributeProto.INT, ref.ref_attr_name
        c.attribute.append(a)
        axes = node.output[0] + "_axes"
        fixed += [c, helper.make_node("Constant", [], [axes], value_ints=[0]),
                  helper.make_node("Unsqueeze", [scalar, axes], [node.output[0]])]
    return fixed


def _function(name: str, inputs: list[str], outputs: list[str], body: _Body, attributes: list[str],
              opset: int, doc: str, defaults: dict[str, int] | None = None) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, name, inputs, outputs, _fix_int_refs(body.nodes),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
        attributes=attributes, doc_string=doc,
        attribute_protos=[helper.make_attribute(k, v) for k, v in (defaults or {}).items()],
    )


def rms_norm(opset: int) -> onnx.FunctionProto:
    """Y = scale * CastLike(x32 / sqrt(mean(x32^2, -1) + epsilon), X): `ops.rms_norm_ref`."""
    b = _Body("n")
    xf = b.op("Cast", "X", to=TensorProto.FLOAT)                                # statistics in fp32
    mean_sq = b.op("ReduceMean", b.op("Mul", xf, xf), b.ints(-1), keepdims=1)
    eps = b.op("Constant", value_float=_Ref("epsilon", AttributeProto.FLOAT))
    inv_rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_sq, eps)))      # torch.rsqrt
    normed = b.op("CastLike", b.op("Mul", xf, inv_rms), "X")
    b.op("Mul", "scale", normed, out="Y")
    return _function("RMSNorm", ["X", "scale"], ["Y"], b, ["epsilon"], opset, rms_norm.__doc__)


def rotary_embedding(opset: int) -> onnx.FunctionProto:
    """Rotate-half RoPE of packed heads X [B,S,N*D] at position_ids: `ops.rotary_ref`."""
    b = _Body("r")
    heads = b.op("Reshape", "X", b.op("Concat", b.ints(0, 0), b.attr_int("num_heads"), b.ints(-1), axis=0))
    half_cos = b.op("Gather", "cos_cache", "position_ids", axis=0)              # [B, S, D/2]
    half_sin = b.op("Gather", "sin_cache", "position_ids", axis=0)
    axis2 = b.ints(2)
    cos = b.op("CastLike", b.op("Unsqueeze", b.op("Concat", half_cos, half_cos, axis=-1), axis2), "X")  # [B,S,1,D]
    sin = b.op("CastLike", b.op("Unsqueeze", b.op("Concat", half_sin, half_sin, axis=-1), axis2), "X")
    x1, x2 = b.op("Split", heads, axis=-1, num_outputs=2, outputs=2)
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)                      # rotate_half: cat(-x2, x1)
    y = b.op("Add", b.op("Mul", heads, cos), b.op("Mul", rotated, sin))        # [B, S, N, D]
    b.op("Reshape", y, b.op("Shape", "X"), out="Y")
    return _function("RotaryEmbedding", ["X", "position_ids", "cos_cache", "sin_cache"], ["Y"], b,
                     ["num_heads"], opset, rotary_embedding.__doc__)


def group_query_attention(opset: int) -> onnx.FunctionProto:
    """Causal GQA over past ++ current keys with a [B,T] padding mask: `ops.gqa_ref`.

    Query heads are grouped as [B, H_kv, n_rep, S, D] and multiplied against keys [B, H_kv, 1, T, D]
    by broadcasting, which equals `repeat_kv` (repeat_interleave) without materializing copies.
    `sliding_window` (default 0, none) narrows each query's keys to the last `sliding_window` slots.
    """
    b = _Body("a")
    nq, nkv = b.attr_int("num_heads"), b.attr_int("kv_num_heads")
    n_rep = b.op("Div", nq, nkv)
    zero2, minus1 = b.ints(0, 0), b.ints(-1)
    # q: [B, S, Nq*D] -> [B, S, Nkv, n_rep, D] -> [B, Nkv, n_rep, S, D]
    q = b.op("Transpose", b.op("Reshape", "query", b.op("Concat", zero2, nkv, n_rep, minus1, axis=0)),
             perm=[0, 2, 3, 1, 4])
    kv_shape = b.op("Concat", zero2, nkv, minus1, axis=0)
    # k, v: [B, S, Nkv*D] -> [B, Nkv, S, D]; present = past ++ current along the sequence
    k = b.op("Transpose", b.op("Reshape", "key", kv_shape), perm=[0, 2, 1, 3])
    v = b.op("Transpose", b.op("Reshape", "value", kv_shape), perm=[0, 2, 1, 3])
    b.op("Concat", "past_key", k, axis=2, out="present_key")                   # [B, Nkv, T, D]
    b.op("Concat", "past_value", v, axis=2, out="present_value")
    axis2 = b.ints(2)
    k5 = b.op("Unsqueeze", "present_key", axis2)                               # [B, Nkv, 1, T, D]
    v5 = b.op("Unsqueeze", "present_value", axis2)
    scores = b.op("MatMul", q, b.op("Transpose", k5, perm=[0, 1, 2, 4, 3]))    # [B, Nkv, n_rep, S, T]
    scale = b.op("CastLike", b.op("Constant", value_float=_Ref("scale", AttributeProto.FLOAT)), scores)
    scores = b.op("Cast", b.op("Mul", scores, scale), to=TensorProto.FLOAT)    # softmax in fp32
    # The same mask as the lowered attention kernels get: [B, 1, S, T], one more axis for the groups.
    window = b.op("Constant", value_int=_Ref("sliding_window", AttributeProto.INT))
    allowed = b.op("Unsqueeze", allowed_keys(b.emit, "query", "attention_mask", window=window),
                   b.ints(2))                                                      # [B,1,1,S,T]
    masked_value = b.op("Constant", value=helper.make_tensor("min", TensorProto.FLOAT, [], [_FLOAT32_MIN]))
    probs = b.op("Softmax", b.op("Where", allowed, scores, masked_value), axis=-1)
    out = b.op("MatMul", b.op("CastLike", probs, "query"), v5)                 # [B, Nkv, n_rep, S, D]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])                         # [B, S, Nkv, n_rep, D]
    b.op("Reshape", out, b.op("Concat", zero2, minus1, axis=0), out="output")  # [B, S, Nq*D]
    return _function("GroupQueryAttention",
                     ["query", "key", "value", "past_key", "past_value", "attention_mask"],
                     ["output", "present_key", "present_value"], b,
                     ["num_heads", "kv_num_heads", "scale"], opset, group_query_attention.__doc__,
                     defaults={"sliding_window": 0})


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """The bodies of all edgellama function ops for a model of standard-ONNX opset `opset` (>= 18)."""
    return [rms_norm(opset), rotary_embedding(opset), group_query_attention(opset)]
