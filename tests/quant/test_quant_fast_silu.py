"""quant/fast_silu.py: the exported exact SiLU back to x * Sigmoid(x) in every quantization mode."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgellama.quant import fast_silu
from edgellama.quant.api import quantize_model
from edgellama.quant.common import count_ops
from tests.conftest import portable_copy, random_llama
from tests.quant.conftest import prefill_logits


def _silu_graph(*, negate: str = "x", one: float = 1.0, extra_reader: bool = False) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    other = ir.Value(name="other", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    c = ir.Value(name="one", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                 const_value=ir.tensor(np.array(one, np.float32), name="one"))
    neg = ir.node("Neg", [x if negate == "x" else other], name="neg")
    exp = ir.node("Exp", [neg.outputs[0]], name="exp")
    add = ir.node("Add", [exp.outputs[0], c], name="add")
    div = ir.node("Div", [x, add.outputs[0]], name="mlp/Div")
    div.outputs[0].name = "y"
    outputs = [div.outputs[0]]
    nodes = [neg, exp, add, div]
    if extra_reader:
        outputs.append(exp.outputs[0])
        exp.outputs[0].name = "e"
    graph = ir.Graph([x, other], outputs, nodes=nodes, initializers=[c], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_a_silu_becomes_sigmoid_times_x():
    model = _silu_graph()
    assert fast_silu.apply(model) == 1
    assert count_ops(model) == {":Sigmoid": 1, ":Mul": 1}
    assert "one" not in model.graph.initializers
    assert model.graph.outputs[0].name == "y"


@pytest.mark.parametrize("case,reason", [
    ({"negate": "other"}, "does not negate the Div's numerator"),
    ({"one": 2.0}, "not the constant 1"),
    ({"extra_reader": True}, "does not read a Neg read only there"),
])
def test_what_is_not_that_silu_is_left(case, reason):
    model = _silu_graph(**case)
    before = count_ops(model)
    div = next(n for n in model.graph if n.op_type == "Div")
    assert reason in fast_silu.refusal(div)
    assert fast_silu.apply(model) == 0
    assert count_ops(model) == before


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_every_mode_writes_sigmoid_and_computes_the_same(mode, tmp_path):
    model = random_llama()
    layers = model.config.num_hidden_layers
    exported = portable_copy(model, key="fast-silu")
    assert count_ops(exported).get(":Sigmoid", 0) == 0 and count_ops(exported)[":Exp"] == layers
    fast = portable_copy(model, key="fast-silu")
    assert fast_silu.apply(fast) == layers
    counts = count_ops(fast)
    assert counts[":Sigmoid"] == layers and ":Exp" not in counts and ":Div" not in counts
    a = prefill_logits(exported, model.config, tmp_path / "exact")
    b = prefill_logits(fast, model.config, tmp_path / "fast")
    assert np.abs(a - b).max() <= 1e-4
    quantized = portable_copy(model, key="fast-silu")
    entry = quantize_model(quantized, mode=mode, target="portable")
    assert entry["fast_silu"] == layers and entry["ops_after"].get(":Exp", 0) == 0

