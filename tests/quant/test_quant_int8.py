"""int8 weight-only (MatMulNBits bits=8): layout against ORT's kernel, op counts, size, logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from edgellama import folder
from edgellama.quant import blockwise
from edgellama.quant.api import quantize_folder
from tests.quant.conftest import (TARGETS, dequantize, ids, kernel_matmul, logits, mean_kl, quantized_pair,
                                  shared_tiny, unpacked, weight_bytes)


@pytest.mark.parametrize("k,block", [(64, 32), (72, 32), (48, 16), (40, 64)])
def test_layout_matches_kernel(k, block):
    # Our numpy dequantization must be what ORT's kernel computes (K not a block multiple included).
    rng = np.random.default_rng(k)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    packed = blockwise.quantize(w, bits=8, block_size=block, symmetric=True)
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(kernel_matmul(packed, a), a @ dequantize(packed), rtol=1e-4, atol=1e-4)


def test_symmetric_error_within_half_step():
    w = np.random.default_rng(1).standard_normal((128, 16)).astype(np.float32)
    packed = blockwise.quantize(w, bits=8, block_size=32, symmetric=True)
    step = np.repeat(packed.scales, 32, axis=1).T          # [K, N] step of each weight
    assert np.all(np.abs(dequantize(packed) - w) <= step / 2 + 1e-7)
    assert packed.zero_points is None and unpacked(packed).min() >= 1   # codes 1..255 around 128


@pytest.fixture(scope="module", params=TARGETS)
def pair(request, tmp_path_factory):
    return quantized_pair(tmp_path_factory, request.param, "int8")


def test_op_counts(pair):
    fp32, q = pair
    cfg = folder.read_manifest(fp32).config
    n_matmul = 7 * cfg["num_hidden_layers"] + 1
    entry = folder.read_manifest(q).quantization[0]
    assert entry["ops_before"][":MatMul"] == n_matmul
    assert entry["ops_after"].get(":MatMul", 0) == 0
    # q/k/v and gate/up each stacked into one MatMulNBits (+ Split): 4 nodes a layer, then lm_head.
    assert entry["ops_after"]["com.microsoft:MatMulNBits"] == 4 * cfg["num_hidden_layers"] + 1
    assert entry["ops_after"][":Split"] == 2 * cfg["num_hidden_layers"]
    assert entry["ops_after"]["com.microsoft:GatherBlockQuantized"] == 1
    model = onnx.load(q / "model.onnx", load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {n.name for n in nbits} >= {"lm_head/MatMulNBits", "model.layers.0.mlp.down_proj/MatMulNBits",
                                       "model.layers.0.self_attn.q_proj+k_proj+v_proj/MatMulNBits",
                                       "model.layers.0.mlp.gate_proj+up_proj/MatMulNBits"}
    assert all(helper.get_node_attr_value(n, "bits") == 8 for n in nbits)


def test_size_ratio(pair):
    # 1 byte + a fp32 scale per 32 weights = 1.125 / 4 of fp32, plus the small fp32 norm weights
    # and rope tables the pass leaves alone.
    fp32, q = pair
    assert weight_bytes(q) / weight_bytes(fp32) < 0.32


def test_logits_close(pair):
    # Measured on tiny (random weights): mean KL 1.3e-4 with the default accuracy_level 4 (int8
    # activations), 7.9e-5 with fp32 activations. Bound 5e-4: ~4x the measurement, and far
    # below a broken layout (transposed or mis-scaled weights give KL > 0.1).
    fp32, q = pair
    x = ids()
    a, b = logits(fp32, x), logits(q, x)
    assert np.isfinite(b).all()
    assert mean_kl(a, b) < 5e-4
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99


def test_untied_embedding_gets_own_table(pair):
    # tiny is untied: the embedding gets its own int8 table (the tied case: next test).
    assert folder.read_manifest(pair[1]).quantization[0]["embedding"] == "int8"


def test_tied_embedding_shared(tmp_path_factory, tmp_path):
    from tests.quant.conftest import tied_tiny_folder

    src = tied_tiny_folder(tmp_path_factory)   # Llama(tiny(tie_word_embeddings=True)), torch seed 0, fp32
    out = quantize_folder(src, tmp_path / "q", mode="int8")
    entry = folder.read_manifest(out).quantization[0]
    assert entry["embedding"].startswith("shared with lm_head")
    # The table is stored once: int8 bytes of the 512x64 table plus the layers, well under a
    # second copy of the table.
    assert weight_bytes(out) / weight_bytes(src) < 0.32
    x = ids()
    assert mean_kl(logits(src, x), logits(out, x)) < 5e-4


def test_fine_blocks_for_named_projections(tmp_path_factory, tmp_path, monkeypatch):
    from edgellama.quant import int8

    src = shared_tiny(tmp_path_factory)
    monkeypatch.setattr(int8, "PROJECTION_BLOCK_SIZES", {"lm_head": 16, "down_proj": 16})
    q = quantize_folder(src, tmp_path / "fine", mode="int8")
    model = onnx.load(q / "model.onnx", load_external_data=False)
    blocks = {n.name: helper.get_node_attr_value(n, "block_size") for n in model.graph.node if n.op_type == "MatMulNBits"}
    fine = {n for n, b in blocks.items() if b == 16}
    assert fine and all(n.startswith("lm_head/") or ".down_proj/" in n for n in fine)
    assert {b for n, b in blocks.items() if n not in fine} == {32}
    x = ids()
    # Finer blocks quantize the same weights at least as well: KL to fp32 no worse than block 32's.
    coarse = quantize_folder(src, tmp_path / "coarse", mode="int8")
    ref = logits(src, x)
    assert mean_kl(ref, logits(q, x)) <= mean_kl(ref, logits(coarse, x)) * 1.05
