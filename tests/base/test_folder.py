"""The manifest, typed: every malformed field refused with a one-line ModelFolderError that names
it, and what is written reads back the same."""

import json

import pytest

from edgellama.errors import ModelFolderError
from edgellama import folder as model_folder
from edgellama.folder import FORMAT_VERSION, MANIFEST, FileRecord, Manifest, read_manifest, write_manifest


def full_manifest() -> Manifest:
    return Manifest(config={"vocab_size": 11}, target="ort", dtype="fp16", provider="cuda", opset=21,
                    source={"kind": "tiny", "name": "tiny"}, quantization=[{"pass": "int4", "block_size": 32}],
                    io={"inputs": [{"name": "past_key_values.0.key", "dtype": "float16"}]},
                    packages={"onnx": "1.18"}, quantized_from={"path": "/x"},
                    files={"model.onnx": FileRecord(bytes=3, sha256="ab")})


def test_to_dict_round_trip():
    m = full_manifest()
    data = json.loads(json.dumps(m.to_dict()))
    assert data["format_version"] == FORMAT_VERSION
    assert Manifest.from_dict(data) == m
    assert Manifest.from_dict(data).precision == "int4"


def test_optional_fields_default_and_quantized_from_left_out():
    data = Manifest(config={}).to_dict()
    assert "quantized_from" not in data
    back = Manifest.from_dict(data)
    assert back == Manifest(config={}) and back.precision == "fp32" and back.kv_dtype == "float"


@pytest.mark.parametrize("key, value", [
    ("config", []), ("target", 1), ("dtype", None), ("opset", "23"), ("opset", True), ("source", "tiny"),
    ("quantization", {}), ("io", []), ("packages", ["onnx"]), ("quantized_from", "x"), ("files", []),
])
def test_from_dict_refuses_a_wrong_type(key, value):
    data = {**Manifest(config={}).to_dict(), key: value}
    with pytest.raises(ModelFolderError, match=f"'{key}' has the wrong type"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("data, words", [
    ([], "not a JSON object"),
    ({"config": {}}, "unknown format"),
    ({"format_version": FORMAT_VERSION}, "no 'config'"),
    ({"format_version": FORMAT_VERSION, "config": {}, "files": {"model.onnx": {"bytes": -1, "sha256": "a"}}},
     "record of 'model.onnx'"),
    ({"format_version": FORMAT_VERSION, "config": {}, "files": {"model.onnx": {"bytes": True, "sha256": "a"}}},
     "record of 'model.onnx'"),
    ({"format_version": FORMAT_VERSION, "config": {}, "files": {"model.onnx": {"bytes": 1}}},
     "record of 'model.onnx'"),
])
def test_from_dict_refuses_a_malformed_manifest(data, words):
    with pytest.raises(ModelFolderError, match=words):
        Manifest.from_dict(data, where="here.json")


def test_unknown_keys_are_ignored():
    data = {**Manifest(config={}).to_dict(), "written_by_a_later_version": 1}
    assert Manifest.from_dict(data) == Manifest(config={})


def test_written_manifest_reads_back(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")
    written = write_manifest(tmp_path, Manifest(config={"vocab_size": 11}, dtype="fp16"))
    assert (tmp_path / MANIFEST).is_file()
    back = read_manifest(tmp_path)
    assert back == written and back.precision == "fp16"
    assert back.files["model.onnx"].bytes == 3


def test_genai_config_omits_a_missing_bos_token():
    """onnxruntime-genai's parser refuses a null bos_token_id (a Qwen2 config has none)."""
    from edgellama.export.config import tiny

    with_bos, without = tiny(), tiny(bos_token_id=None)
    assert model_folder.genai_config(with_bos, inputs=[])["model"]["bos_token_id"] == with_bos.bos_token_id
    assert "bos_token_id" not in model_folder.genai_config(without, inputs=[])["model"]
