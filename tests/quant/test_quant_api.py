"""quantize_folder / check_request / `edgellama quantize`: refusals, the written folder, --exclude."""

from __future__ import annotations

import json
import shutil

import pytest

from edgellama.cli.main import main
from edgellama.errors import QuantError
from edgellama import folder
from edgellama.quant.api import MODES, check_request, quantize_folder
from tests.conftest import shared_export, shared_trace
from tests.quant.conftest import shared_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_int8(tiny, tmp_path_factory):
    return quantize_folder(tiny, tmp_path_factory.mktemp("q") / "int8", mode="int8")


@pytest.mark.parametrize("mode,block", [("int9", None), ("", None), ("int8", 48), ("int4", 8), ("int4", 512),
                                        ("int8", 0), ("fp16", 32), ("int8-dynamic", 32), ("int4", True)])
def test_check_request_refuses(mode, block):
    with pytest.raises(QuantError):
        check_request(mode, block)


@pytest.mark.parametrize("mode,block", [("fp16", None), ("int8", None), ("int8", 128), ("int4", 16),
                                        ("int4", 256), ("int8-dynamic", None)])
def test_check_request_accepts(mode, block):
    check_request(mode, block)


def test_folder_is_complete_and_recorded(tiny, tiny_int8):
    manifest = folder.verify_folder(tiny_int8)   # sizes and hashes of every file
    src = folder.read_manifest(tiny)
    assert set(manifest.files) == set(src.files)
    for name in ("tokenizer.json", "tokenizer_config.json", "genai_config.json"):
        assert (tiny_int8 / name).read_bytes() == (tiny / name).read_bytes()
    (entry,) = manifest.quantization
    assert entry["pass"] == "int8" and entry["block_size"] == 32 and entry["bits"] == 8
    # Every MatMul is quantized: q/k/v and gate/up stacked (one MatMulNBits + Split each), the rest alone.
    splits = entry["ops_after"][":Split"]
    assert entry["ops_before"][":MatMul"] == entry["ops_after"]["com.microsoft:MatMulNBits"] + splits * 3 // 2
    assert manifest.quantized_from["model_sha256"] == src.files["model.onnx"].sha256
    assert manifest.config == src.config and manifest.target == src.target
    assert not [p for p in tiny_int8.parent.iterdir() if ".partial-" in p.name]


def test_already_quantized_refused(tiny_int8, tmp_path):
    with pytest.raises(QuantError, match="already quantized"):
        quantize_folder(tiny_int8, tmp_path / "out", mode="int4")
    assert not (tmp_path / "out").exists()


def test_not_an_export_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(QuantError, match="not an edgellama model folder"):
        quantize_folder(tmp_path / "src", tmp_path / "out", mode="int8")
    assert not (tmp_path / "out").exists()


def test_corrupted_export_refused(tiny, tmp_path):
    src = shutil.copytree(tiny, tmp_path / "src")
    with open(src / "model.onnx.data", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(QuantError, match="corrupted"):
        quantize_folder(src, tmp_path / "out", mode="int8")
    assert not (tmp_path / "out").exists()


def test_bad_request_checked_before_loading(tmp_path):
    # The source does not even exist: the mode / block size must be refused first.
    with pytest.raises(QuantError, match="unknown quantization mode"):
        quantize_folder(tmp_path / "nowhere", tmp_path / "out", mode="int3")
    with pytest.raises(QuantError, match="block size 24"):
        quantize_folder(tmp_path / "nowhere", tmp_path / "out", mode="int4", block_size=24)


def test_exclude_keeps_named_modules(tiny, tmp_path):
    out = quantize_folder(tiny, tmp_path / "out", mode="int8", exclude="lm_head,model.layers.0.mlp.*")
    entry = folder.read_manifest(out).quantization[0]
    assert sorted(entry["excluded"]) == ["lm_head", "model.layers.0.mlp.down_proj",
                                         "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    # Layer 0's MLP and lm_head stay MatMul; layer 0: qkv stacked + o; layer 1: qkv, o, gate+up, down.
    assert entry["ops_after"][":MatMul"] == 4 and entry["ops_after"]["com.microsoft:MatMulNBits"] == 6


@pytest.mark.parametrize("argv_tail,message", [
    (["--mode", "int3"], "invalid choice"),
    (["--mode", "int4", "--block-size", "20"], "block size 20"),
    (["--mode", "fp16", "--block-size", "32"], "--block-size applies to int8, int4 and int4-fast"),
])
def test_cli_bad_request(tiny, tmp_path, capsys, argv_tail, message):
    rc = main(["quantize", str(tiny), "-o", str(tmp_path / "out"), *argv_tail])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("edgellama: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["quantized", "not-export"])
def test_cli_refused_source(tiny_int8, tmp_path, capsys, which):
    src = tiny_int8 if which == "quantized" else tmp_path
    rc = main(["quantize", str(src), "-o", str(tmp_path / "out"), "--mode", "int8", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("edgellama: error: ")
    assert not (tmp_path / "out").exists()


def test_cli_writes_folder_and_refuses_nonempty_out(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(tiny), "-o", str(out), "--mode", "int4", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    manifest = json.loads((out / "edgellama.json").read_text())
    assert manifest["quantization"][0]["pass"] == "int4"
    before = (out / "model.onnx.data").stat().st_mtime_ns
    assert main(["quantize", str(tiny), "-o", str(out), "--mode", "int8", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "model.onnx.data").stat().st_mtime_ns == before
    assert main(["quantize", str(tiny), "-o", str(out), "--mode", "int8", "--quiet", "--force"]) == 0
    assert folder.read_manifest(out).quantization[0]["pass"] == "int8"


def test_modes_listed():
    assert MODES == ("fp16", "int8", "int8-dynamic", "int4", "int4-fast")


def test_accuracy_level_recorded_and_applied(tiny, tmp_path):
    import onnx
    from onnx import helper

    out = quantize_folder(tiny, tmp_path / "out", mode="int4", accuracy_level=0)
    assert folder.read_manifest(out).quantization[0]["accuracy_level"] == 0
    model = onnx.load(out / "model.onnx", load_external_data=False)
    levels = {helper.get_node_attr_value(n, "accuracy_level") for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert levels == {0}


@pytest.mark.parametrize("mode,level", [("fp16", 4), ("int8-dynamic", 0), ("int8", 7)])
def test_accuracy_level_refused(tiny, tmp_path, mode, level):
    with pytest.raises(QuantError, match="accuracy"):
        quantize_folder(tiny, tmp_path / "out", mode=mode, accuracy_level=level)
    assert not (tmp_path / "out").exists()


def test_output_is_input_refused(tiny):
    with pytest.raises(QuantError, match="is the input folder"):
        quantize_folder(tiny, tiny, mode="int8", force=True)
    folder.verify_folder(tiny)


def test_export_quant_in_memory_matches_quantize_folder(tiny, tiny_int8, tmp_path, capsys):
    # `export --quant` quantizes the in-memory model and writes one folder: the same bytes as
    # export followed by quantize, recorded the same way (no fp32 folder to point at).
    out = tmp_path / "q"
    with shared_trace("tiny"):     # tiny's trace, as the fp32 folder `tiny` was exported from
        assert main(["export", "tiny", "-o", str(out), "--quant", "int8", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    manifest, expected = folder.verify_folder(out), folder.read_manifest(tiny_int8)
    assert (out / "model.onnx.data").read_bytes() == (tiny_int8 / "model.onnx.data").read_bytes()
    assert manifest.quantization == expected.quantization and manifest.io == expected.io
    assert manifest.precision == "int8" and manifest.quantized_from == {"path": None, "model_sha256": None}
    assert set(manifest.files) == set(expected.files)


def test_export_quant_int4_static_in_memory_matches_quantize_folder(tmp_path_factory, tmp_path, capsys):
    # The static contract's packed q|k|v weight keeps v at 8 bits: in memory its width is read from
    # the initializer (the graph Value may carry no shape there), with the same bytes as from a folder
    # (the session's tiny ort export: `export tiny --target ort`'s bytes).
    fp32, direct = shared_export(tmp_path_factory, "tiny", target="ort"), tmp_path / "direct"
    assert main(["quantize", str(fp32), "-o", str(tmp_path / "two-step"), "--mode", "int4", "--quiet"]) == 0
    assert main(["export", "tiny", "--target", "ort", "-o", str(direct), "--quant", "int4", "--quiet"]) == 0
    capsys.readouterr()
    assert folder.read_manifest(direct).kv_cache == "static"
    assert (direct / "model.onnx.data").read_bytes() == (tmp_path / "two-step" / "model.onnx.data").read_bytes()
