"""Smoothing folded into RMSNorm weights: exact in fp32, found on every target, recorded."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from edgellama.export import folder
from edgellama.quant import smooth
from edgellama.quant.api import quantize_folder
from quant_util import TARGETS, ids, logits, shared_tiny


@pytest.mark.parametrize("target", TARGETS)
def test_fp32_function_unchanged(target, tmp_path_factory, tmp_path):
    src = shared_tiny(tmp_path_factory, target)
    model = folder.load_model_proto(src)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    record = smooth.apply(model)
    layers = folder.read_manifest(src)["config"]["num_hidden_layers"]
    # Both norms of each layer (q/k/v and gate/up readers); tiny's untied lm_head adds the final norm.
    assert record["smoothing"]["norms"] == 2 * layers + 1
    changed = [t.name for t in model.graph.initializer
               if not np.array_equal(numpy_helper.to_array(t), before[t.name])]
    assert len(changed) == (2 * layers + 1) + 5 * layers + 1          # gammas + the weights they feed
    with folder.staged_folder(tmp_path / "s", force=False) as tmp:
        folder.save_model(model, tmp)
    x = ids()
    a, b = logits(src, x), logits(tmp_path / "s", x)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_recorded_only_with_int8_activations(tmp_path_factory, tmp_path):
    src = shared_tiny(tmp_path_factory)
    on = folder.read_manifest(quantize_folder(src, tmp_path / "a", mode="int8"))["quantization"][0]
    off = folder.read_manifest(quantize_folder(src, tmp_path / "b", mode="int8", accuracy_level=0))["quantization"][0]
    assert on["smoothing"]["alpha"] == smooth.ALPHA and off["smoothing"] is None
