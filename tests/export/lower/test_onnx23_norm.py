"""`onnx23_norm.py`: RMSNorm -> RMSNormalization (opset 23)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgellama.export.lower.onnx23_norm import RMSNormalization
from tests.export.lower.conftest import LAYERS, apply_rule, node_named, ops


def test_lowers_every_norm(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[("edgellama", "RMSNorm")] == 2 * LAYERS + 1 and ops(m)[("", "RMSNormalization")] == 0
    report = apply_rule(m, RMSNormalization())
    assert ops(m)[("edgellama", "RMSNorm")] == 0 and ops(m)[("", "RMSNormalization")] == 2 * LAYERS + 1
    assert report.refused == [] and len(report.lowered) == 2 * LAYERS + 1
    attrs = node_named(m, "model.norm/RMSNorm").attributes
    assert attrs["axis"].value == -1 and attrs["stash_type"].value == 1
    assert "RMSNorm" not in {key[1] for key in m.functions}


def test_refuses_a_scale_that_is_not_1d(portable_fp32):
    m = portable_fp32[1]()
    norm = node_named(m, "model.norm/RMSNorm")
    hidden = norm.inputs[0].shape[-1]
    shape = ir.node("Constant", [], {"value": ir.tensor(np.array([1, hidden], np.int64))}, name="scale_shape")
    scale2 = ir.node("Reshape", [norm.inputs[1], shape.outputs[0]], name="scale_2d")
    scale2.outputs[0].dtype, scale2.outputs[0].shape = norm.inputs[1].dtype, ir.Shape([1, hidden])
    m.graph.insert_before(norm, [shape, scale2])
    norm.replace_input_with(1, scale2.outputs[0])
    report = apply_rule(m, RMSNormalization())
    assert [(r.node, r.rewrite) for r in report.refused] == [("model.norm/RMSNorm", "rms_normalization")]
    assert "not a 1-D [hidden] tensor" in report.refused[0].reason
    assert ops(m)[("edgellama", "RMSNorm")] == 1 and ops(m)[("", "RMSNormalization")] == 2 * LAYERS
    assert "RMSNorm" in {key[1] for key in m.functions}
