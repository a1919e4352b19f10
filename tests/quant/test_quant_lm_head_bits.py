"""int4 --lm-head-bits 4: a 4-bit symmetric lm_head (symmetric so that a tied embedding can read
its bytes, as smollm2's does; tiny's embedding is untied and keeps its own int8 table)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgellama import folder
from edgellama.errors import QuantError
from edgellama.quant.registry import check_request
from tests.quant.conftest import ids, logits, mean_kl, nodes, shared_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from edgellama.quant.api import quantize_folder

    fp32 = shared_tiny(tmp_path_factory, "ort")
    return fp32, quantize_folder(fp32, tmp_path_factory.mktemp("lm-head-bits") / "int4", mode="int4", lm_head_bits=4)


def test_lm_head_is_4_bit(pair):
    fp32, four = pair
    assert not folder.read_manifest(fp32).config["tie_word_embeddings"]
    head = nodes(four, "MatMulNBits")["lm_head/MatMulNBits"]
    assert helper.get_node_attr_value(head, "bits") == 4
    assert len(head.input) == 3                      # symmetric: no zero points
    (gather,) = nodes(four, "GatherBlockQuantized").values()
    assert helper.get_node_attr_value(gather, "bits") == 8
    entry = folder.read_manifest(four).quantization[0]
    assert entry["lm_head_bits"] == 4 and entry["embedding"] == "int8"
    # The decoder layers as by default: 4 bits but for v_proj.
    layers = folder.read_manifest(fp32).config["num_hidden_layers"]
    assert entry["int8_matmuls"] == sorted(f"model.layers.{i}.self_attn.v_proj" for i in range(layers))


def test_logits_stay_close(pair):
    # A wrong nibble order or scale layout in the head pushes KL past 0.5 (as for the layers' own
    # layout test in test_quant_int4.py); int4's default (8-bit head) stays under 3e-2 on tiny.
    fp32, four = pair
    x = ids()
    a, f = logits(fp32, x), logits(four, x)
    assert np.isfinite(f).all()
    assert mean_kl(a, f) < 5e-2


@pytest.mark.parametrize("mode,bits,message", [("int8", 4, "applies to int4 and int4-fast only"),
                                                ("int4", 6, "is not one of 4, 8"),
                                                ("int4", True, "is not one of 4, 8")])
def test_bad_requests(mode, bits, message):
    with pytest.raises(QuantError, match=message):
        check_request(mode, lm_head_bits=bits)


def test_default_request_is_8_bits():
    assert check_request("int4").settings.lm_head_bits == 8
    assert check_request("int8").settings.lm_head_bits is None


@pytest.mark.parametrize("argv", [["export", "tiny", "-o", "{out}", "--lm-head-bits", "4"],
                                  ["quantize", "{src}", "-o", "{out}", "--mode", "int8", "--lm-head-bits", "4"]])
def test_cli_refuses_misplaced_flag(argv, tmp_path, capsys):
    from edgellama.cli.main import main

    out = tmp_path / "out"
    argv = [a.format(out=out, src=tmp_path) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("edgellama: error:")
    assert "--lm-head-bits" in err[0] and not out.exists()
