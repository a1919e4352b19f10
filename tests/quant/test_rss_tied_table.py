"""A tied embedding reads the lm_head's MatMulNBits bytes as they are stored ([N, n_blocks, blob]),
so ONNX Runtime folds nothing into a second copy of the table when the session loads (issue 11's
memory goal: the former Reshape of the bytes to [N, K*bits/8] was folded into one, +32 MB resident
on smollm2 int8). The gather gives bit for bit what the former layout gave, and the lm_head is
still quantized once when the folder is written.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgellama import folder
from edgellama.quant import blockwise
from edgellama.quant.api import quantize_folder
from tests.quant.conftest import ids

MODES = {"int8": {"mode": "int8"}, "int4": {"mode": "int4"}, "int4-lm4": {"mode": "int4", "lm_head_bits": 4}}


@pytest.fixture(scope="module")
def tied_fp32(tmp_path_factory):
    """tiny with a tied embedding (torch seed 0), fp32: the session's folder (tests/quant/conftest.py),
    which the tests here only read."""
    from tests.quant.conftest import tied_tiny_folder

    return tied_tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module", params=list(MODES))
def tied(request, tied_fp32, tmp_path_factory):
    out = quantize_folder(tied_fp32, tmp_path_factory.mktemp("tied-q") / request.param, **MODES[request.param])
    assert folder.read_manifest(out).quantization[0]["embedding"].startswith("shared with lm_head")
    return out


def nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def test_the_session_folds_no_copy_of_the_table(tied, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    ort.InferenceSession(str(tied / folder.MODEL), opts, providers=["CPUExecutionProvider"])
    stored = {t.name for t in onnx.load(tied / folder.MODEL, load_external_data=False).graph.initializer}
    optimized = onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.initializer
    made = {t.name: nbytes(t) for t in optimized if t.name not in stored}
    # what ONNX Runtime may make: shapes and split sizes (tens of bytes); the table is 512 x 64 codes
    assert sum(made.values()) < 1024, made


def former_layout(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its embedding as it was written before: GatherBlockQuantized over
    Reshapes of the lm_head's bytes to [N, K*bits/8] and of its flat scales to [N, n_blocks]."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    (rows,) = [n for n in g.node if gather.output[0] in n.input]
    (head,) = [n for n in g.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0]]
    dims = {t.name: list(t.dims) for t in g.initializer}
    n, nb, blob = dims[gather.input[0]]
    g.initializer.extend([numpy_helper.from_array(np.array([n, nb * blob], np.int64), "former_data_shape"),
                          numpy_helper.from_array(np.array([n, nb], np.int64), "former_scales_shape")])
    bits, block = (helper.get_node_attr_value(gather, k) for k in ("bits", "block_size"))
    nodes = [helper.make_node("Reshape", [head.input[1], "former_data_shape"], ["former_data"]),
             helper.make_node("Reshape", [head.input[2], "former_scales_shape"], ["former_scales"]),
             helper.make_node("GatherBlockQuantized", ["former_data", gather.input[1], "former_scales"],
                              [rows.output[0]], domain="com.microsoft", bits=bits, block_size=block,
                              quantize_axis=1, gather_axis=0)]
    kept = [x for x in g.node if x is not gather and x is not rows]
    at = list(g.node).index(gather)
    del g.node[:]
    g.node.extend(kept[:at] + nodes + kept[at:])
    return model


def run(model: onnx.ModelProto, where, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(where))
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    b, n = x.shape
    feeds = {"input_ids": x, "attention_mask": np.ones((b, n), np.int64),
             "position_ids": np.broadcast_to(np.arange(n), (b, n)).copy()}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
    return s.run(["logits"], feeds)[0]


def test_the_gather_equals_the_former_layout(tied):
    model = onnx.load(tied / folder.MODEL, load_external_data=False)
    x = ids()
    now, before = run(model, tied, x), run(former_layout(model), tied, x)
    assert np.isfinite(now).all() and np.array_equal(now, before)


def test_the_lm_head_is_quantized_once(tied_fp32, tmp_path, monkeypatch):
    """The Gather's scales are written next to the lm_head's own, from one computation of its plan."""
    vocab = folder.read_manifest(tied_fp32).config["vocab_size"]
    real, heads = blockwise.quantize, []

    def counted(*args, **kwargs):
        packed = real(*args, **kwargs)
        heads.extend([packed.n] if packed.n == vocab else [])
        return packed

    monkeypatch.setattr(blockwise, "quantize", counted)
    quantize_folder(tied_fp32, tmp_path / "int8", mode="int8")
    assert heads == [vocab]
