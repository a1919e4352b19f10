"""The `ort` target, all rules together: op counts, refusals, and parity on ONNX Runtime against
the torch blocks (see conftest for the parity setup)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgellama.errors import ExportError
from edgellama.export import onnx_export as E
from edgellama.export.lower import lower_ort, lower_ort_with_report
from tests.conftest import OrtLoop, left_padded_batch, ort_session, random_llama, teacher_forced
from tests.export.lower.conftest import LAYERS, TOL, io_signature, ops, portable_fp16


# -- structure ------------------------------------------------------------------------------------
def test_op_counts_and_graph_contract(portable_fp32):
    _, fresh = portable_fp32
    before = fresh()
    counts = ops(before)
    assert counts[("edgellama", "RMSNorm")] == 2 * LAYERS + 1
    signature = io_signature(before)

    after, refusals = lower_ort_with_report(fresh())
    counts = ops(after)
    assert not [k for k in counts if k[0] == "edgellama"]
    assert counts[("com.microsoft", "GroupQueryAttention")] == LAYERS
    assert counts[("com.microsoft", "RotaryEmbedding")] == 2 * LAYERS
    # fp32 on the CPU: no norm takes the Skip kernel (ort_norm.py says why); every residual Add stays.
    assert counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 0
    assert counts[("", "SimplifiedLayerNormalization")] == 2 * LAYERS + 1
    # Every residual Add stays, beside the one Add of each SiLU (x / (1 + exp(-x)), one Exp each).
    assert counts[("", "Exp")] == LAYERS and counts[("", "Sigmoid")] == 0
    assert counts[("", "Add")] == 2 * LAYERS + LAYERS
    assert {(r.rewrite, "serially in fp32" in r.reason) for r in refusals} == {("skip_simplified_layer_norm", True)}
    assert len(refusals) == 2 * LAYERS + 1
    assert len(after.functions) == 0
    assert after.opset_imports["com.microsoft"] == 1 and "edgellama" not in after.opset_imports
    assert io_signature(after) == signature
    # Node names survive, so block-level parity probes still find them.
    names = {n.name: n.op_type for n in after.graph}
    assert names["model.layers.2.self_attn/GroupQueryAttention"] == "GroupQueryAttention"
    assert names["model.norm/RMSNorm"] == "SimplifiedLayerNormalization"


def test_fp16_fuses_every_residual_norm():
    """fp16: every norm but the first reads residual + branch: 2L fused, the first (of the embedding) plain."""
    lowered, refusals = lower_ort_with_report(portable_fp16())
    counts = ops(lowered)
    assert counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * LAYERS
    assert counts[("", "SimplifiedLayerNormalization")] == 1
    assert counts[("", "Add")] == counts[("", "Exp")] == LAYERS   # each residual Add went into a Skip norm; the SiLUs' stay
    assert [(r.node, r.rewrite) for r in refusals] == [
        ("model.layers.0.input_layernorm/RMSNorm", "skip_simplified_layer_norm")]
    assert "not produced by an Add" in refusals[0].reason
    names = {n.name: n.op_type for n in lowered.graph}
    assert names["model.norm/RMSNorm"] == "SkipSimplifiedLayerNormalization"


def test_unknown_provider():
    with pytest.raises(ExportError, match="unknown provider 'tpu'"):
        lower_ort(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), provider="tpu")


# -- parity on ONNX Runtime ---------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_fp32_parity_on_cpu(portable_fp32, provider, tmp_path):
    """Lowered for CPU, and for CUDA (GQA kept as function) run on the CPU provider: same numbers."""
    model, fresh = portable_fp32
    loop = OrtLoop(ort_session(lower_ort(fresh(), provider=provider), tmp_path), model.config, "fp32")
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(model, loop, ids, mask, steps=8)
    print(f"ort({provider}) fp32: prefill+8 decode logits max abs diff {diff:.2e}")
    assert diff <= TOL
    alone, _ = loop.step(ids[1:, 4:].numpy(), mask[1:, 4:].numpy(), loop.empty(1))
    padded, past = loop.step(ids.numpy(), mask.numpy(), loop.empty(2))
    assert np.abs(alone[0] - padded[1, 4:]).max() <= TOL
    # present = past ++ current, past copied bit for bit (no shared buffer, no reordering).
    nxt = padded[:, -1].argmax(-1)[:, None]
    _, present = loop.step(nxt, np.concatenate((mask.numpy(), np.ones_like(nxt)), 1), past)
    for (pk, pv), (k, v) in zip(past, present):
        assert k.shape[2] == v.shape[2] == pk.shape[2] + 1
        assert np.array_equal(k[:, :, :-1], pk) and np.array_equal(v[:, :, :-1], pv)


def test_fp16_runs_on_cpu(tmp_path):
    """fp16 lowered: every fused kernel has a CPU fp16 implementation; error stays that of fp16 itself."""
    model = random_llama(layers=LAYERS)
    lowered = lower_ort(portable_fp16())
    assert ops(lowered)[("com.microsoft", "GroupQueryAttention")] == LAYERS
    loop = OrtLoop(ort_session(lowered, tmp_path / "ort"), model.config, "fp16")
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(random_llama(layers=LAYERS), loop, ids, mask, steps=8)   # against fp32 torch
    # The yardstick: the portable fp16 graph on ORT (the same fp16 weights through plain ops).
    portable = OrtLoop(ort_session(portable_fp16(), tmp_path / "portable"), model.config, "fp16")
    base = teacher_forced(random_llama(layers=LAYERS), portable, ids, mask, steps=8)
    print(f"ort fp16 vs torch fp32: {diff:.2e} (portable fp16: {base:.2e})")
    assert np.isfinite(diff) and diff <= max(3 * base, 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_parity(dtype, tmp_path):
    from edgellama.runtime.session import cuda_status

    ok, reason = cuda_status()
    if not ok:
        pytest.skip(f"onnxruntime has no usable CUDAExecutionProvider here: {reason}")
    model = random_llama(layers=LAYERS)
    lowered = lower_ort(E.export_onnx(model, dtype=dtype), provider="cuda")
    # TF32 off: fp32 parity is measured at fp32 precision.
    sess = ort_session(lowered, tmp_path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                       provider_options=[{"use_tf32": "0"}, {}])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    loop = OrtLoop(sess, model.config, dtype)
    ids, mask = left_padded_batch(model.config.vocab_size)
    diff = teacher_forced(random_llama(layers=LAYERS), loop, ids, mask, steps=8)
    print(f"ort(cuda) {dtype}: prefill+8 decode logits max abs diff {diff:.2e}")
    assert diff <= (TOL if dtype == "fp32" else 5e-2)
