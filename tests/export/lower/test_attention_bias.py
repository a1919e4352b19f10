"""`attention_bias.py`: the lowered graphs' additive mask equals `ops.attention_bias`, and the GQA
function body builds the same mask from the same steps."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from edgellama.export import functions, ops as reference
from edgellama.export.lower import engine
from edgellama.export.lower.attention_bias import attention_bias


def _bias_model(dtype: ir.DataType) -> tuple[ir.Model, int]:
    query = ir.Value(name="query", type=ir.TensorType(dtype), shape=ir.Shape(["B", "S", 8]))
    mask = ir.Value(name="mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "T"]))
    anchor = ir.node("Identity", [query], name="anchor")
    graph = ir.Graph([query, mask], [anchor.outputs[0]], nodes=[anchor], opset_imports={"": 23})
    ctx = engine.Context(graph)
    before = len(graph)
    bias = attention_bias(anchor, ctx, query=query, mask=mask, prefix="t/")
    assert attention_bias(anchor, ctx, query=query, mask=mask, prefix="t/") is bias   # built once
    graph.outputs.append(bias)
    return ir.Model(graph, ir_version=10), len(graph) - before


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, ir.DataType.FLOAT16])
def test_bias_equals_the_reference_with_padding_and_a_past(dtype):
    model, added = _bias_model(dtype)
    assert added == 19
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], np.int64)   # T = 6, row 1 left-padded
    query = np.zeros((2, 2, 8), dtype.numpy())                            # S = 2 on a past of 4
    bias = sess.run(["t/attention_bias"], {"query": query, "mask": mask})[0]
    want = reference.attention_bias(torch.from_numpy(mask), 2, {ir.DataType.FLOAT: torch.float32,
                                                                 ir.DataType.FLOAT16: torch.float16}[dtype])
    assert bias.dtype == dtype.numpy() and np.array_equal(bias, want.numpy())


def test_function_body_builds_the_same_mask():
    body = functions.group_query_attention(23)
    kinds = [n.op_type for n in body.node]
    # causal AND padding once, plus the sliding window's steps (an attribute: 0 = off, tested in the body)
    assert kinds.count("LessOrEqual") == 2 and kinds.count("And") == 2 and kinds.count("Range") == 2
    assert kinds.count("Greater") == 1 and kinds.count("Or") == 1
