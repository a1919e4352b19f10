"""fp16: dtypes of the graph I/O, fp32 logits, CPU kernels, closeness and finiteness."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edgellama import folder
from edgellama.quant import fp16
from edgellama.quant.api import quantize_folder
from edgellama.errors import QuantError
from tests.quant.conftest import TARGETS, ids, logits, mean_kl, quantized_pair, session, shared_tiny, weight_bytes


@pytest.fixture(scope="module", params=TARGETS)
def pair(request, tmp_path_factory):
    return quantized_pair(tmp_path_factory, request.param, "fp16")


def test_io_and_manifest(pair):
    fp32, q = pair
    manifest = folder.read_manifest(q)
    assert manifest.dtype == "fp16" and manifest.quantization[0]["pass"] == "fp16"
    types = {v.name: v.type for v in session(q).get_inputs() + session(q).get_outputs()}
    assert types["logits"] == "tensor(float)"
    kv = {n: t for n, t in types.items() if n.startswith(("past_key_values.", "present."))}
    assert kv and set(kv.values()) == {"tensor(float16)"}
    assert {v["name"]: v["dtype"] for v in manifest.io["inputs"]}["past_key_values.0.key"] == "float16"
    model = onnx.load(q / "model.onnx", load_external_data=False)
    assert not [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert 0.49 < weight_bytes(q) / weight_bytes(fp32) < 0.51


def test_logits_close_and_finite(pair):
    # Measured on tiny: mean KL 2.3e-7 (fp16 rounding, 2^-11 relative, with fp32 statistics).
    fp32, q = pair
    x = ids()
    a, b = logits(fp32, x), logits(q, x)
    assert np.isfinite(b).all()
    assert mean_kl(a, b) < 1e-5


def test_padded_batch_stays_finite(pair):
    # Left padding: fully masked key slots use a finite minimum, which must not overflow in fp16.
    _, q = pair
    s = session(q)
    x = ids(batch=2, seq=8)
    mask = np.ones((2, 8), np.int64)
    mask[0, :3] = 0
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": x, "attention_mask": mask, "position_ids": pos}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float16)
    out = s.run(["logits"], feeds)[0]
    assert np.isfinite(out).all()


def test_fp32_only_ops_really_lack_fp16_cpu_kernels():
    # FP32_ONLY_OPS must track ONNX Runtime: an op listed here that gains an fp16 CPU kernel only
    # costs casts, but an op missing from it fails at session creation (test_io_and_manifest).
    import onnxruntime as ort
    from onnx import helper

    for op in fp16.FP32_ONLY_OPS:
        node = helper.make_node(op, ["x"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_exclude_refused(tmp_path, tmp_path_factory):
    fp32 = shared_tiny(tmp_path_factory)
    with pytest.raises(QuantError, match="--exclude"):
        quantize_folder(fp32, tmp_path / "out", mode="fp16", exclude="lm_head")
    assert not (tmp_path / "out").exists()
