"""`onnx23_rotary.py`: RotaryEmbedding -> RotaryEmbedding (opset 23)."""

from __future__ import annotations

import onnx_ir as ir

from edgellama.export.lower.onnx23_rotary import RotaryEmbedding
from tests.export.lower.conftest import LAYERS, apply_rule, ops


def check_rotary(node, ctx):
    return RotaryEmbedding().check(node, ctx)


def test_lowers_every_rotary(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 2 * LAYERS and ops(m)[("", "RotaryEmbedding")] == 0
    report = apply_rule(m, RotaryEmbedding())
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 0 and ops(m)[("", "RotaryEmbedding")] == 2 * LAYERS
    assert report.refused == [] and len(report.lowered) == 2 * LAYERS


def test_rotary_check_refuses_heads_that_do_not_divide(portable_fp32):
    m = portable_fp32[1]()
    rope = next(n for n in m.graph if n.op_type == "RotaryEmbedding")
    assert check_rotary(rope, None) is None
    rope.attributes["num_heads"] = ir.AttrInt64("num_heads", 3)
    assert "num_heads 3 does not divide X's last dim 64" in check_rotary(rope, None)
    report = apply_rule(m, RotaryEmbedding())
    assert [r.node for r in report.refused] == [rope.name]
    assert ops(m)[("edgellama", "RotaryEmbedding")] == 1 and ops(m)[("", "RotaryEmbedding")] == 2 * LAYERS - 1
