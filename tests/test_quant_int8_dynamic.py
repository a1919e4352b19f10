"""int8-dynamic (W8A8 from DynamicQuantizeLinear + MatMulInteger): op counts, ORT fusion, logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgellama.export import folder
from edgellama.quant.api import quantize_folder
from quant_util import TARGETS, ids, logits, mean_kl, shared_tiny, weight_bytes


@pytest.fixture(scope="module", params=TARGETS)
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dyn-{request.param}")
    fp32 = shared_tiny(tmp_path_factory, request.param)
    return fp32, quantize_folder(fp32, root / "dyn", mode="int8-dynamic")


def test_op_counts(pair):
    fp32, q = pair
    layers = folder.read_manifest(fp32)["config"]["num_hidden_layers"]
    entry = folder.read_manifest(q)["quantization"][0]
    after = entry["ops_after"]
    assert after[":MatMulInteger"] == 7 * layers
    assert after[":MatMul"] == 1 and entry["excluded"] == ["lm_head"]     # lm_head stays fp32
    # One DynamicQuantizeLinear per distinct activation: q/k/v share, gate/up share, o, down.
    assert after[":DynamicQuantizeLinear"] == 4 * layers
    added = set(after) - set(entry["ops_before"])
    assert added and all(k.startswith(":") for k in added)                # adds standard ONNX only


def test_fused_by_onnxruntime(pair, tmp_path):
    import onnxruntime as ort

    _, q = pair
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx", load_external_data=False).graph.node]
    assert "MatMulInteger" not in ops
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulIntegerToFloat") == 7 * 2


def test_size_ratio(pair):
    # Each layer weight goes from 4 bytes to 1 (+ one fp32 scale per column); lm_head, the
    # embedding, norms and rope tables stay as they were.
    fp32, q = pair
    c = folder.read_manifest(fp32)["config"]
    h, d = c["hidden_size"], c["head_dim"]
    per_layer = h * d * (c["num_attention_heads"] + c["num_key_value_heads"]) * 2 + 3 * h * c["intermediate_size"]
    saved = weight_bytes(fp32) - weight_bytes(q)
    assert 2.9 * per_layer * c["num_hidden_layers"] < saved <= 3 * per_layer * c["num_hidden_layers"]


def test_logits_close(pair):
    # Measured on tiny: mean KL 4.7e-3 (per-tensor uint8 activations dominate the error: ~1/255 of
    # the tensor's range per element, against int8 weight-only's 7.9e-5). Bound 2e-2.
    fp32, q = pair
    x = ids()
    a, b = logits(fp32, x), logits(q, x)
    assert np.isfinite(b).all()
    assert mean_kl(a, b) < 2e-2
