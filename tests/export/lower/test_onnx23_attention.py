"""`onnx23_attention.py`: GroupQueryAttention -> Attention (opset 23) with the shared attention bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from edgellama.export import model as M
from edgellama.export.lower.onnx23_attention import Attention
from tests.conftest import left_padded_batch
from tests.export.lower.conftest import LAYERS, TOL, apply_rule, node_named, ops


def test_lowers_every_attention_with_one_shared_bias(portable_fp32):
    m = portable_fp32[1]()
    assert ops(m)[("edgellama", "GroupQueryAttention")] == LAYERS and ops(m)[("", "Attention")] == 0
    wheres = ops(m)[("", "Where")]
    report = apply_rule(m, Attention())
    assert ops(m)[("edgellama", "GroupQueryAttention")] == 0 and ops(m)[("", "Attention")] == LAYERS
    assert ops(m)[("", "Where")] == wheres + 1
    assert report.refused == [] and len(report.lowered) == LAYERS
    bias = node_named(m, "model.layers.1.self_attn/GroupQueryAttention").inputs[3]
    assert bias.name == "onnx23/attention_bias" and bias.dtype == ir.DataType.FLOAT
    assert [str(d) for d in bias.shape] == ["batch", "1", "sequence", "total_sequence"]


def test_refuses_heads_that_do_not_group(portable_fp32):
    m = portable_fp32[1]()
    attn = node_named(m, "model.layers.0.self_attn/GroupQueryAttention")
    attn.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", 3)
    report = apply_rule(m, Attention())
    assert [(r.node, r.rewrite) for r in report.refused] == [(attn.name, "attention")]
    assert "kv_num_heads 3 does not divide num_heads 4" in report.refused[0].reason
    assert ops(m)[("edgellama", "GroupQueryAttention")] == 1 and ops(m)[("", "Attention")] == LAYERS - 1


def test_left_padded_row_equals_row_alone(onnx23_fp32_loop):
    model, loop = onnx23_fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    alone, _ = loop.step(ids[1:, 4:].numpy(), mask[1:, 4:].numpy(), loop.empty(1))
    padded, _ = loop.step(ids.numpy(), mask.numpy(), loop.empty(2))
    diff = float(np.abs(alone[0] - padded[1, 4:]).max())
    print(f"onnx23 fp32: padded row vs alone max abs diff {diff:.2e}")
    assert diff <= TOL


def test_chunked_continuation_batch_two(onnx23_fp32_loop):
    """Several new tokens on top of a cache, left-padded batch of two: Attention takes it (ORT's
    com.microsoft GroupQueryAttention does not), and the numbers match torch."""
    model, loop = onnx23_fp32_loop
    ids, mask = left_padded_batch(model.config.vocab_size)
    t_past, o_past, worst = model.empty_cache(2), loop.empty(2), 0.0
    for lo, hi in [(0, 5), (5, 8), (8, 9)]:
        m = mask[:, :hi]
        with torch.no_grad():
            tl, t_past = model(ids[:, lo:hi], m, M.positions_from_mask(m, hi - lo), t_past)
        ol, o_past = loop.step(ids[:, lo:hi].numpy(), m.numpy(), o_past)
        valid = m[:, lo:hi].bool().numpy()
        worst = max(worst, float(np.abs(ol - tl.numpy())[valid].max()))
    print(f"onnx23 fp32: chunked continuation (batch 2) max abs diff {worst:.2e}")
    assert worst <= TOL
