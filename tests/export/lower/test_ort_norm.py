"""`ort_norm.py`: RMSNorm -> (Skip)SimplifiedLayerNormalization, the Skip rule preferred (fp16, or CUDA;
fp32 on the CPU keeps the Add and takes the plain kernel)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgellama.export.lower import lower_ort_with_report
from edgellama.export.lower.ort_norm import SimplifiedLayerNorm, SkipSimplifiedLayerNorm
from tests.export.lower.conftest import LAYERS, apply_rule, node_named, ops, portable_fp16

MS_SKIP = ("com.microsoft", "SkipSimplifiedLayerNormalization")
PLAIN = ("", "SimplifiedLayerNormalization")


def test_skip_rule_alone_fuses_every_residual_add():
    m = portable_fp16()
    counts = ops(m)
    assert counts[("edgellama", "RMSNorm")] == 2 * LAYERS + 1 and counts[MS_SKIP] == 0
    adds = counts[("", "Add")]
    report = apply_rule(m, SkipSimplifiedLayerNorm())
    counts = ops(m)
    assert counts[MS_SKIP] == 2 * LAYERS and counts[("", "Add")] == adds - 2 * LAYERS
    # The embedding's norm reads no residual sum: refused, and left an edgellama node.
    assert counts[("edgellama", "RMSNorm")] == 1
    assert [r.node for r in report.refused] == ["model.layers.0.input_layernorm/RMSNorm"]
    assert len(report.lowered) == 2 * LAYERS


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_skip_rule_refuses_fp32_on_the_cpu_only(portable_fp32, provider):
    m = portable_fp32[1]()
    adds = ops(m)[("", "Add")]
    report = apply_rule(m, SkipSimplifiedLayerNorm(), provider)
    counts = ops(m)
    if provider == "cpu":
        assert counts[MS_SKIP] == 0 and counts[("", "Add")] == adds
        assert len(report.refused) == 2 * LAYERS + 1 and report.lowered == []
        assert all("serially in fp32" in r.reason for r in report.refused)
    else:   # CUDA's kernel reduces in a tree: fused, as at fp16
        assert counts[MS_SKIP] == 2 * LAYERS and counts[("", "Add")] == adds - 2 * LAYERS


def test_plain_rule_alone_lowers_every_norm(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[PLAIN] == 0
    report = apply_rule(m, SimplifiedLayerNorm())
    counts = ops(m)
    assert counts[PLAIN] == 2 * LAYERS + 1 and counts[("edgellama", "RMSNorm")] == 0
    assert report.refused == []
    attrs = node_named(m, "model.norm/RMSNorm").attributes
    assert attrs["stash_type"].value == 1 and attrs["axis"].value == -1


def test_plain_rule_refuses_a_scale_of_another_dtype(portable_fp32):
    m = portable_fp32[1]()
    norm = node_named(m, "model.norm/RMSNorm")
    cast = ir.node("Cast", [norm.inputs[1]], {"to": ir.DataType.DOUBLE}, name="scale64")
    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.DOUBLE, norm.inputs[1].shape
    m.graph.insert_before(norm, cast)
    norm.replace_input_with(1, cast.outputs[0])
    report = apply_rule(m, SimplifiedLayerNorm())
    assert [(r.node, r.rewrite) for r in report.refused] == [("model.norm/RMSNorm", "simplified_layer_norm")]
    assert "scale dtype" in report.refused[0].reason
    assert ops(m)[PLAIN] == 2 * LAYERS and ops(m)[("edgellama", "RMSNorm")] == 1


def test_skip_norm_refuses_a_broadcasting_add():
    """A norm fed by `x + bias[H]` is no residual sum: it becomes a plain SimplifiedLayerNormalization."""
    fresh = portable_fp16
    m = fresh()
    norm = next(n for n in m.graph if n.name == "model.norm/RMSNorm")
    x = norm.inputs[0]
    bias = ir.node("Constant", [], {"value": ir.tensor(np.full([x.shape[-1]], 0.5, np.float16))}, name="bias")
    add = ir.node("Add", [x, bias.outputs[0]], name="biased")
    add.outputs[0].dtype, add.outputs[0].shape = x.dtype, x.shape
    m.graph.insert_before(norm, [bias, add])
    norm.replace_input_with(0, add.outputs[0])

    lowered, refusals = lower_ort_with_report(m)
    reasons = {r.node: r.reason for r in refusals}
    assert "one known rank-2/3 shape" in reasons["model.norm/RMSNorm"]
    final = next(n for n in lowered.graph if n.name == "model.norm/RMSNorm")
    assert (final.domain, final.op_type) == ("", "SimplifiedLayerNormalization")
    assert final.inputs[0].producer().name == "biased"
    assert ops(lowered)[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * LAYERS - 1
