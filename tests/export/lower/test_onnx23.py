"""The `onnx23` target, all rules together: op counts, refusals, the checker, and parity on ONNX
Runtime CPU against the torch blocks (see conftest for the parity setup)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgellama.errors import ExportError
from edgellama.export import onnx_export as E
from edgellama.export.lower import lower_onnx23, lower_onnx23_with_report
from tests.conftest import left_padded_batch, ort_session, random_llama, teacher_forced
from tests.export.lower.conftest import LAYERS, TOL, FiniteLoop, io_signature, ops, portable_fp16


# -- structure ------------------------------------------------------------------------------------
def test_op_counts_and_graph_contract(portable_fp32):
    _, fresh = portable_fp32
    before = fresh()
    counts = ops(before)
    assert counts[("edgellama", "RMSNorm")] == 2 * LAYERS + 1
    assert counts[("edgellama", "RotaryEmbedding")] == 2 * LAYERS
    assert counts[("edgellama", "GroupQueryAttention")] == LAYERS
    assert len(before.functions) == 3
    signature = io_signature(before)

    after, refusals = lower_onnx23_with_report(fresh())
    assert refusals == []
    counts = ops(after)
    assert counts[("", "Attention")] == LAYERS
    assert counts[("", "RMSNormalization")] == 2 * LAYERS + 1
    assert counts[("", "RotaryEmbedding")] == 2 * LAYERS
    assert not [k for k in counts if k[0] != ""]            # standard ai.onnx only
    assert counts[("", "Where")] == 1                        # one attention mask, shared by all layers
    assert len(after.functions) == 0
    assert dict(after.opset_imports) == {"": 23}
    assert io_signature(after) == signature
    # Node names survive, so block-level parity probes still find them.
    names = {n.name: n for n in after.graph}
    attn = names["model.layers.2.self_attn/GroupQueryAttention"]
    assert attn.op_type == "Attention"
    assert {k: a.value for k, a in attn.attributes.items()} == {
        "q_num_heads": 4, "kv_num_heads": 2, "scale": 0.25, "is_causal": 0, "softmax_precision": 1}
    rope = names["model.layers.0.self_attn/RotaryEmbedding"]
    # Opset 23 order: X, cos_cache, sin_cache, position_ids (caches named as in the state_dict).
    assert [v.name for v in rope.inputs[1:]] == ["rope_cos", "rope_sin", "position_ids"]
    assert names["model.norm/RMSNorm"].attributes["stash_type"].value == 1


def test_full_check_passes(portable_fp32):
    proto = ir.serde.serialize_model(lower_onnx23(portable_fp32[1]()))
    onnx.checker.check_model(proto, full_check=True)


def test_through_export_lower(portable_fp32):
    """`onnx_export.lower(target="onnx23")` reaches this pass."""
    lowered = E.lower(portable_fp32[1](), target="onnx23")
    assert ops(lowered)[("", "Attention")] == LAYERS


def test_refuses_a_model_not_at_opset_23():
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    with pytest.raises(ExportError, match="opset 23 .*opset 18"):
        lower_onnx23(model)


# -- refused nodes stay function ops and still run ----------------------------------------------------
def _refused_model(fresh):
    """The final norm's scale reshaped to [1, 1, H] (same numbers, a shape RMSNormalization's check
    refuses) and layer 1's query rotary fed a cos cache of unknown shape."""
    m = fresh()
    norm = next(n for n in m.graph if n.name == "model.norm/RMSNorm")
    hidden = norm.inputs[0].shape[-1]
    shape = ir.node("Constant", [], {"value": ir.tensor(np.array([1, 1, hidden], np.int64))}, name="scale_shape")
    scale3 = ir.node("Reshape", [norm.inputs[1], shape.outputs[0]], name="scale_3d")
    scale3.outputs[0].dtype, scale3.outputs[0].shape = norm.inputs[1].dtype, ir.Shape([1, 1, hidden])
    m.graph.insert_before(norm, [shape, scale3])
    norm.replace_input_with(1, scale3.outputs[0])

    rope = next(n for n in m.graph if n.name == "model.layers.1.self_attn/RotaryEmbedding")
    cos = ir.node("Identity", [rope.inputs[2]], name="cos_unknown_shape")
    cos.outputs[0].dtype = rope.inputs[2].dtype        # dtype known, shape not
    m.graph.insert_before(rope, cos)
    rope.replace_input_with(2, cos.outputs[0])
    return m


def test_refused_nodes_keep_their_functions(portable_fp32, tmp_path):
    model, fresh = portable_fp32
    lowered, refusals = lower_onnx23_with_report(_refused_model(fresh))
    reasons = {r.node: (r.rewrite, r.reason) for r in refusals}
    assert set(reasons) == {"model.norm/RMSNorm", "model.layers.1.self_attn/RotaryEmbedding"}
    assert reasons["model.norm/RMSNorm"][0] == "rms_normalization"
    assert "not a 1-D [hidden] tensor" in reasons["model.norm/RMSNorm"][1]
    assert "caches are not [positions, head_dim/2]" in reasons["model.layers.1.self_attn/RotaryEmbedding"][1]
    counts = ops(lowered)
    assert counts[("edgellama", "RMSNorm")] == 1 and counts[("", "RMSNormalization")] == 2 * LAYERS
    assert counts[("edgellama", "RotaryEmbedding")] == 1 and counts[("", "RotaryEmbedding")] == 2 * LAYERS - 1
    assert counts[("", "Attention")] == LAYERS
    assert sorted(key[1] for key in lowered.functions) == ["RMSNorm", "RotaryEmbedding"]
    assert lowered.opset_imports["edgellama"] == 1
    onnx.checker.check_model(ir.serde.serialize_model(lowered), full_check=True)
    # It still runs, with the reference's numbers.
    loop = FiniteLoop(ort_session(lowered, tmp_path), model.config, "fp32")
    ids, mask = left_padded_batch(model.config.vocab_size)
    assert teacher_forced(model, loop, ids, mask, steps=2) <= TOL


# -- parity on ONNX Runtime ---------------------------------------------------------------------------
def test_fp32_parity_prefill_and_decode(onnx23_fp32_loop):
    model, loop = onnx23_fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(model, loop, ids, mask, steps=8)
    print(f"onnx23 fp32: prefill+8 decode logits max abs diff {diff:.2e}")
    assert diff <= TOL


def test_fp16_runs_on_cpu(tmp_path):
    """fp16 lowered: ORT CPU has fp16 kernels for all three ops; the fp16 attention mask (finite
    minimum -65504) keeps the caches finite; error stays that of the portable fp16 graph."""
    model = random_llama(layers=LAYERS)
    lowered, refusals = lower_onnx23_with_report(portable_fp16())   # opset 23, the default
    assert refusals == [] and ops(lowered)[("", "Attention")] == LAYERS
    loop = FiniteLoop(ort_session(lowered, tmp_path / "onnx23"), model.config, "fp16")
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(random_llama(layers=LAYERS), loop, ids, mask, steps=8)   # against fp32 torch
    portable = FiniteLoop(ort_session(portable_fp16(), tmp_path / "portable"), model.config, "fp16")
    base = teacher_forced(random_llama(layers=LAYERS), portable, ids, mask, steps=8)
    print(f"onnx23 fp16 vs torch fp32: {diff:.2e} (portable fp16: {base:.2e})")
    assert np.isfinite(diff) and diff <= max(3 * base, 1e-2)
