"""`ort_gqa.py`: GroupQueryAttention -> com.microsoft.GroupQueryAttention (+ attention bias)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellama.export import model as M
from edgellama.export.lower import lower_ort, lower_ort_with_report
from edgellama.export.lower.ort_gqa import MsGroupQueryAttention
from tests.conftest import OrtLoop, left_padded_batch, ort_session
from tests.export.lower.conftest import LAYERS, TOL, apply_rule, node_named, ops

MS_GQA = ("com.microsoft", "GroupQueryAttention")


def test_lowers_every_attention_with_one_shared_bias(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[("edgellama", "GroupQueryAttention")] == LAYERS and ops(m)[MS_GQA] == 0
    wheres = ops(m)[("", "Where")]
    report = apply_rule(m, MsGroupQueryAttention())
    counts = ops(m)
    assert counts[("edgellama", "GroupQueryAttention")] == 0 and counts[MS_GQA] == LAYERS
    assert counts[("", "Where")] == wheres + 1            # one attention bias, shared by every layer
    assert report.refused == [] and len(report.lowered) == LAYERS
    gqa = node_named(m, "model.layers.2.self_attn/GroupQueryAttention")
    assert [v.name for v in gqa.inputs[5:7]] == ["ort/seqlens_k", "ort/total_sequence_length"]
    assert gqa.inputs[10].name == "ort/attention_bias"
    assert "GroupQueryAttention" not in {key[1] for key in m.functions}


def test_cuda_fp32_keeps_gqa_as_function(portable_fp32):
    """No fp32 GroupQueryAttention CUDA kernel: GQA stays the edgellama function, the rest lowers."""
    _, fresh = portable_fp32
    lowered, refusals = lower_ort_with_report(fresh(), provider="cuda")
    counts = ops(lowered)
    assert counts[("edgellama", "GroupQueryAttention")] == LAYERS
    assert counts[("com.microsoft", "GroupQueryAttention")] == 0
    assert counts[("com.microsoft", "RotaryEmbedding")] == 2 * LAYERS
    assert counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * LAYERS
    assert [key[1] for key in lowered.functions] == ["GroupQueryAttention"]
    gqa_reasons = [r.reason for r in refusals if r.rewrite == "ms_group_query_attention"]
    assert len(gqa_reasons) == LAYERS and "no float GroupQueryAttention kernel for cuda" in gqa_reasons[0]


def test_chunked_continuation_batch_one(portable_fp32, tmp_path):
    """Several new tokens on top of a cache (batch 1): ORT's kernel takes it, numbers match torch."""
    model, fresh = portable_fp32
    loop = OrtLoop(ort_session(lower_ort(fresh()), tmp_path), model.config, "fp32")
    ids = left_padded_batch(model.config.vocab_size)[0][:1]
    t_past, o_past, worst = model.empty_cache(1), loop.empty(1), 0.0
    for lo, hi in [(0, 5), (5, 8), (8, 9)]:
        mask = torch.ones(1, hi, dtype=torch.int64)
        with torch.no_grad():
            tl, t_past = model(ids[:, lo:hi], mask, M.positions_from_mask(mask, hi - lo), t_past)
        ol, o_past = loop.step(ids[:, lo:hi].numpy(), mask.numpy(), o_past)
        worst = max(worst, float(np.abs(ol - tl.numpy()).max()))
    assert worst <= TOL


def test_chunked_continuation_batch_two_is_a_kernel_limit(portable_fp32, tmp_path):
    """ORT 1.31's GroupQueryAttention refuses S > 1 with a past for batch > 1 (documented in
    ort_gqa.py); if a later ORT lifts this, this test says so."""
    model, fresh = portable_fp32
    loop = OrtLoop(ort_session(lower_ort(fresh()), tmp_path), model.config, "fp32")
    ids, mask = left_padded_batch(model.config.vocab_size)
    _, past = loop.step(ids[:, :5].numpy(), mask[:, :5].numpy(), loop.empty(2))
    with pytest.raises(Exception, match="batch_size must be 1"):
        loop.step(ids[:, 5:].numpy(), mask.numpy(), past)
