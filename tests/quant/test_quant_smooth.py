"""Smoothing folded into RMSNorm weights: exact in fp32, found on every target, recorded."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgellama import folder
from edgellama.quant import smooth
from edgellama.quant.api import quantize_folder
from tests.quant.conftest import TARGETS, ids, logits, shared_tiny


@pytest.mark.parametrize("target", TARGETS)
def test_fp32_function_unchanged(target, tmp_path_factory, tmp_path):
    src = shared_tiny(tmp_path_factory, target)
    model = folder.load_model_ir(src)
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    record = smooth.apply(model, mlp=True)
    layers = folder.read_manifest(src).config["num_hidden_layers"]
    # Both norms of each layer (q/k/v and gate/up readers); tiny's untied lm_head adds the final norm.
    assert record["smoothing"]["norms"] == 2 * layers + 1
    changed = [name for name, v in model.graph.initializers.items()
               if not np.array_equal(v.const_value.numpy(), before[name])]
    assert record["smoothing"]["mlp"] == layers
    # gammas + the weights they feed (q/k/v/gate/up, lm_head) + down_proj (its up_proj pair is in the 5)
    assert len(changed) == (2 * layers + 1) + 5 * layers + 1 + layers
    with folder.staged_folder(tmp_path / "s", force=False) as tmp:
        folder.save_model(model, tmp)
    x = ids()
    a, b = logits(src, x), logits(tmp_path / "s", x)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_mlp_pairs_found_and_refused(target, tmp_path_factory):
    src = shared_tiny(tmp_path_factory, target)
    model = folder.load_model_ir(src)
    layers = folder.read_manifest(src).config["num_hidden_layers"]
    pairs = smooth.mlp_targets(model.graph, ())
    assert len(pairs) == layers
    assert all(".up_proj" in up.name and ".down_proj" in down.name for up, _, down in pairs)
    # Excluding down_proj, or a second reader of up_proj's output, takes the pair out.
    assert smooth.mlp_targets(model.graph, ["*down_proj*"]) == []
    up, _, _ = pairs[0]
    model.graph.append(ir.node("Identity", [up.outputs[0]]))
    assert len(smooth.mlp_targets(model.graph, ())) == layers - 1


def test_recorded_only_with_int8_activations(tmp_path_factory, tmp_path):
    src = shared_tiny(tmp_path_factory)
    on = folder.read_manifest(quantize_folder(src, tmp_path / "a", mode="int8")).quantization[0]
    off = folder.read_manifest(quantize_folder(src, tmp_path / "b", mode="int8", accuracy_level=0)).quantization[0]
    assert on["smoothing"]["alpha"] == smooth.ALPHA and off["smoothing"] is None
    # The MLP pairs are int4's choice only (measured: they cost int8 top-1 and int8-dynamic perplexity).
    assert on["smoothing"]["mlp"] == 0
    int4 = folder.read_manifest(quantize_folder(src, tmp_path / "c", mode="int4")).quantization[0]
    assert int4["smoothing"]["mlp"] == folder.read_manifest(src).config["num_hidden_layers"]
