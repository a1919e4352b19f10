"""quant/skip_norm.py: an `ort` graph's residual norms fused into the Skip kernel by every quantization mode."""

from __future__ import annotations

import numpy as np

from edgellama.quant.common import count_ops
from tests.conftest import ort_session, portable_copy, random_llama


def test_an_ort_graph_gets_its_skip_norms_back_and_computes_the_same(tmp_path):
    """quant/skip_norm.py: the fp32 lowering's Add + SimplifiedLayerNormalization pairs fused again;
    portable graphs keep standard ops."""
    from edgellama.export import onnx_export
    from edgellama.quant import skip_norm

    model = random_llama()
    layers = model.config.num_hidden_layers
    lowered = onnx_export.lower(portable_copy(model, key="skip-norm"), target="ort")
    before = count_ops(lowered)
    assert before[":SimplifiedLayerNormalization"] == 2 * layers + 1 and "com.microsoft:SkipSimplifiedLayerNormalization" not in before
    fused = onnx_export.lower(portable_copy(model, key="skip-norm"), target="ort")
    assert skip_norm.apply(fused, target="ort") == 2 * layers   # the first norm reads the embedding, no Add
    after = count_ops(fused)
    assert after["com.microsoft:SkipSimplifiedLayerNormalization"] == 2 * layers
    assert after[":SimplifiedLayerNormalization"] == 1
    assert after[":Add"] == before[":Add"] - 2 * layers
    ids = np.arange(1, 9, dtype=np.int64)[None]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None]}
    for i in range(layers):
        shape = (1, model.config.num_key_value_heads, 0, model.config.head_dim)
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = np.zeros(shape, np.float32)
    a = ort_session(lowered, tmp_path / "plain").run(["logits"], feed)[0]
    b = ort_session(fused, tmp_path / "fused").run(["logits"], feed)[0]
    assert np.abs(a - b).max() <= 1e-4
    portable = portable_copy(model, key="skip-norm")
    assert skip_norm.apply(portable, target="portable") == 0 and count_ops(portable) == count_ops(
        portable_copy(model, key="skip-norm"))
