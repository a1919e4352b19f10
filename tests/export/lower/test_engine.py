"""`engine.py` and `targets.py`: rule order, the report, pruning, target selection."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from edgellama.errors import ExportError
from edgellama.export.lower import Rule, lower, lower_with_report
from edgellama.export.lower import engine
from edgellama.export.lower.ort_norm import SimplifiedLayerNorm
from tests.export.lower.conftest import LAYERS, ops


class Never(Rule):
    name = "never"
    op_type = "RMSNorm"

    def check(self, node, ctx):
        return "refuses everything"


def test_first_accepting_rule_applies_and_earlier_refusals_are_reported(portable_fp32):
    m = portable_fp32[1]()
    report = engine.apply(m, [Never(), SimplifiedLayerNorm()], engine.Context(m.graph, "cpu"))
    assert len(report.refused) == len(report.lowered) == 2 * LAYERS + 1
    assert {(r.rewrite, r.reason) for r in report.refused} == {("never", "refuses everything")}
    assert {x.rewrite for x in report.lowered} == {"simplified_layer_norm"}
    assert ops(m)[("edgellama", "RMSNorm")] == 0


def test_refused_everywhere_keeps_functions_and_opset(portable_fp32):
    m = portable_fp32[1]()
    report = engine.apply(m, [Never()], engine.Context(m.graph))
    assert report.lowered == [] and len(report.refused) == 2 * LAYERS + 1
    assert ops(m)[("edgellama", "RMSNorm")] == 2 * LAYERS + 1
    assert len(m.functions) == 3 and m.opset_imports["edgellama"] == 1


def test_prune_drops_unused_functions_then_the_opset(portable_fp32):
    m = portable_fp32[1]()
    for node in [n for n in m.graph if n.domain == "edgellama" and n.op_type != "RMSNorm"]:
        node.domain = "elsewhere"   # no body calls them any more
    engine.prune(m)
    assert [key[1] for key in m.functions] == ["RMSNorm"] and m.opset_imports["edgellama"] == 1
    for node in [n for n in m.graph if n.domain == "edgellama"]:
        node.domain = "elsewhere"
    engine.prune(m)
    assert len(m.functions) == 0 and "edgellama" not in m.opset_imports


def test_portable_is_left_as_is(portable_fp32):
    m = portable_fp32[1]()
    before = ops(m)
    lowered, report = lower_with_report(m, target="portable")
    assert lowered is m and ops(m) == before and report == engine.Report()


def test_unknown_target():
    with pytest.raises(ExportError, match="unknown target 'tpu'; choose one of portable, ort, onnx23"):
        lower(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), target="tpu")


def test_report_names_each_lowered_node(portable_fp32):
    _, report = lower_with_report(portable_fp32[1](), target="onnx23")
    lowered = {x.node: x.rewrite for x in report.lowered}
    assert len(lowered) == 2 * LAYERS + 1 + 2 * LAYERS + LAYERS
    assert lowered["model.layers.1.self_attn/GroupQueryAttention"] == "attention"
