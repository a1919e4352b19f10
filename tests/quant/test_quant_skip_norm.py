"""quant/skip_norm.py: an `ort` graph's residual norms fused into the Skip kernel by every quantization mode."""

from __future__ import annotations

import numpy as np

from edgellama.quant.common import count_ops
from tests.conftest import portable_copy, random_llama
from tests.quant.conftest import prefill_logits


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
    a = prefill_logits(lowered, model.config, tmp_path / "plain")
    b = prefill_logits(fused, model.config, tmp_path / "fused")
    assert np.abs(a - b).max() <= 1e-4
    portable = portable_copy(model, key="skip-norm")
    assert skip_norm.apply(portable, target="portable") == 0 and count_ops(portable) == count_ops(
        portable_copy(model, key="skip-norm"))
