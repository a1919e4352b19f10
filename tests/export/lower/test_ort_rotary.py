"""`ort_rotary.py`: RotaryEmbedding -> com.microsoft.RotaryEmbedding."""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower import lower_ort_with_report
from edgellama.export.lower.ort_rotary import MsRotaryEmbedding
from tests.export.lower.conftest import LAYERS, apply_rule, node_named, ops

MS_ROPE = ("com.microsoft", "RotaryEmbedding")


def test_lowers_every_rotary(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 2 * LAYERS and ops(m)[MS_ROPE] == 0
    report = apply_rule(m, MsRotaryEmbedding())
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 0 and ops(m)[MS_ROPE] == 2 * LAYERS
    assert report.refused == [] and len(report.lowered) == 2 * LAYERS
    attrs = node_named(m, "model.layers.0.self_attn/RotaryEmbedding").attributes
    assert {k: a.value for k, a in attrs.items()} == {"num_heads": 4, "rotary_embedding_dim": 16, "interleaved": 0}
    assert "RotaryEmbedding" not in {key[1] for key in m.functions}


def test_refuses_for_an_unknown_provider_dtype(portable_fp32):
    """bf16 has no CPU kernel: refused with the kernel table's reason, the node stays."""
    m = portable_fp32[1]()
    rope = node_named(m, "model.layers.0.self_attn/RotaryEmbedding")
    rope.inputs[0].dtype = ir.DataType.BFLOAT16
    report = apply_rule(m, MsRotaryEmbedding())
    assert [r.node for r in report.refused] == [rope.name]
    assert "no bfloat16 RotaryEmbedding kernel for cpu" in report.refused[0].reason
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 1 and ops(m)[MS_ROPE] == 2 * LAYERS - 1


def test_refused_rotary_keeps_its_function(portable_fp32):
    """Caches of another dtype than X break the kernel's type constraint: the node stays edgellama."""
    _, fresh = portable_fp32
    m = fresh()
    rope = next(n for n in m.graph if n.name == "model.layers.1.self_attn/RotaryEmbedding")
    cast = ir.node("Cast", [rope.inputs[2]], {"to": ir.DataType.DOUBLE}, name="cos64")
    cast.outputs[0].dtype = ir.DataType.DOUBLE
    m.graph.insert_before(rope, cast)
    rope.replace_input_with(2, cast.outputs[0])

    lowered, refusals = lower_ort_with_report(m)
    assert any(r.node == rope.name and "differ in dtype" in r.reason for r in refusals)
    assert ops(lowered)[("edgellama", "RotaryEmbedding")] == 1
    assert ops(lowered)[("com.microsoft", "RotaryEmbedding")] == 2 * LAYERS - 1
    assert [key[1] for key in lowered.functions] == ["RotaryEmbedding"]
    assert lowered.opset_imports["edgellama"] == 1
