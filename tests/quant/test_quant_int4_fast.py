"""int4-fast (quant/int4.py, Policy FAST): every decoder MatMul 4-bit, blocks of 64 but down_proj and
the lm_head (32); int4's kernels, fit and SmoothQuant otherwise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from edgellama import folder
from edgellama.quant.registry import check_request
from tests.conftest import shared_export
from tests.quant.conftest import ids, logits, mean_kl, nodes, shared_tiny


def _matmuls(q) -> dict[str, onnx.NodeProto]:
    return nodes(q, "MatMulNBits")


def _attr(node, name):
    return helper.get_node_attr_value(node, name)


@pytest.fixture(scope="module", params=["dynamic", "static"])
def pair(request, tmp_path_factory):
    from edgellama.quant.api import quantize_folder

    fp32 = shared_export(tmp_path_factory, "tiny", target="ort", kv_cache=request.param)
    return fp32, quantize_folder(fp32, tmp_path_factory.mktemp(f"int4-fast-{request.param}") / "q", mode="int4-fast")


def test_bits_and_blocks(pair):
    fp32, q = pair
    layers = folder.read_manifest(fp32).config["num_hidden_layers"]
    nodes = _matmuls(q)
    # Per layer: q|k|v in one MatMulNBits (v is 4-bit too, so nothing is split off and concatenated
    # back), o, gate|up, down; then lm_head.
    assert len(nodes) == 4 * layers + 1
    assert {_attr(n, "bits") for n in nodes.values()} == {4}
    blocks = {name: _attr(n, "block_size") for name, n in nodes.items()}
    fine = {name for name in blocks if "down_proj" in name or name.startswith("lm_head")}
    assert len(fine) == layers + 1
    assert {blocks[n] for n in fine} == {32} and {b for n, b in blocks.items() if n not in fine} == {64}
    assert len(nodes["lm_head/MatMulNBits"].input) == 3          # symmetric head: no zero points
    assert all(len(n.input) == 4 for name, n in nodes.items() if name != "lm_head/MatMulNBits")
    model = onnx.load(q / "model.onnx", load_external_data=False)
    concat_inputs = {i for n in model.graph.node if n.op_type == "Concat" for i in n.input}
    assert not concat_inputs & {o for n in nodes.values() for o in n.output}
    manifest = folder.read_manifest(q)
    entry = manifest.quantization[0]
    assert (entry["pass"], entry["block_size"], entry["fine_block_size"], entry["lm_head_bits"]) == ("int4-fast", 64, 32, 4)
    assert entry["int8_matmuls"] == [] and entry["fine"] == ["down_proj"]
    assert manifest.precision == "int4"          # compared, toleranced and benchmarked as int4


def test_logits_close(tmp_path_factory):
    # The same bound as int4 with a 4-bit lm_head (test_quant_lm_head_bits.py): a wrong nibble order,
    # scale layout or block size in any of the three block shapes pushes KL past 0.5.
    from edgellama.quant.api import quantize_folder

    fp32 = shared_tiny(tmp_path_factory, "ort")
    q = quantize_folder(fp32, tmp_path_factory.mktemp("int4-fast-kl") / "q", mode="int4-fast")
    x = ids()
    a, b = logits(fp32, x), logits(q, x)
    assert np.isfinite(b).all()
    assert mean_kl(a, b) < 5e-2


def test_defaults_and_overrides():
    s = check_request("int4-fast").settings
    assert (s.block_size, s.lm_head_bits, s.accuracy_level) == (64, 4, 4)
    assert check_request("int4-fast", 16).settings.block_size == 16
    assert check_request("int4-fast", lm_head_bits=8).settings.lm_head_bits == 8


def test_a_smaller_block_applies_everywhere(tmp_path_factory):
    # --block-size sets the coarse block; the fine ones never get coarser than it.
    from edgellama.quant.api import quantize_folder

    fp32 = shared_tiny(tmp_path_factory, "ort")
    q = quantize_folder(fp32, tmp_path_factory.mktemp("int4-fast-16") / "q", mode="int4-fast", block_size=16)
    assert {_attr(n, "block_size") for n in _matmuls(q).values()} == {16}


def test_cli(tmp_path_factory, tmp_path, capsys):
    from edgellama.cli.main import main

    fp32 = shared_tiny(tmp_path_factory, "ort")
    rc = main(["quantize", str(fp32), "-o", str(tmp_path / "q"), "--mode", "int4-fast", "--lm-head-bits", "8",
               "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out)
    assert rc in (0, None) and out["mode"] == "int4-fast"
    assert out["manifest"]["quantization"][0]["lm_head_bits"] == 8
    assert _attr(_matmuls(tmp_path / "q")["lm_head/MatMulNBits"], "bits") == 8


@pytest.mark.genai
def test_genai_runs_it_as_we_do(pair):
    # onnxruntime-genai loads an int4-fast folder of either contract and its greedy tokens are ours.
    pytest.importorskip("onnxruntime_genai")
    from tests.check.test_genai import assert_genai_greedy_equals_ours

    assert_genai_greedy_equals_ours(pair[1])
