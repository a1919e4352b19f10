"""Fuzzing the readers of untrusted model files (issue 10): mutated config.json dicts, manifests,
shard indexes, safetensors headers and GGUF files. The only outcome besides success is the typed
user error (one line), each example within hypothesis' deadline, and nothing outside the folder is
opened: a foreign file beside the folder is never read, and its contents never reach a message.

Examples are derandomized (tests/conftest.py's hypothesis profile), so a run is reproducible and CI
never meets a new failing case by chance.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import contextmanager
from pathlib import Path

import onnx  # noqa: F401  # imported here, not inside the first example's deadline
import onnx_ir  # noqa: F401
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellama import folder as model_folder
from edgellama.errors import ConfigError, EdgellamaError, ModelFolderError, SourceError
from edgellama.export import config as presets
from edgellama.export import sources
from edgellama.export.config import LlamaConfig
from edgellama.export.model import rope_inv_freq
from edgellama.folder import FORMAT_VERSION, MANIFEST, Manifest
from tests.conftest import fresh_dir, seeded_llama
from tests.export.test_sources import write_gguf

FUZZ = settings()   # the profile tests/conftest.py loads ("edgellama" unless --hypothesis-profile names another)
SECRET = "FOREIGN_SECRET"

# -- values a hostile or damaged file may hold ---------------------------------------------------------
ODD = st.sampled_from([0, -1, 1, 2, 3, 10 ** 12, 2 ** 63 - 1, 0.5, 1.0, float("nan"), float("inf"), -0.0, "",
                       "false", "true", "2.0", "llama3", "linear", "default", True, False, None, [], {}])
SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
           | st.text(max_size=12) | ODD)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def one_line(error: Exception) -> None:
    assert isinstance(error, EdgellamaError), repr(error)
    text = str(error)
    assert text and "\n" not in text and len(text) < 2000 and SECRET not in text



# -- config.json ----------------------------------------------------------------------------------------
HF = presets.tiny().to_hf()
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ROPE_KEYS = st.sampled_from([*LLAMA3, "type", "rope_theta"])
ROPE = st.one_of(st.just(LLAMA3), st.dictionaries(ROPE_KEYS, SCALARS, max_size=6).map(lambda d: {**LLAMA3, **d}),
                 JSON)


def check_config(config: LlamaConfig) -> None:
    """What a config that passed the boundary promises the code past it."""
    assert isinstance(config.tie_word_embeddings, bool)
    for name in presets.SIZE_LIMITS:
        value = getattr(config, name)
        assert type(value) is int and 0 < value <= presets.SIZE_LIMITS[name]
    inv = rope_inv_freq(config)
    assert torch.isfinite(inv).all()


@FUZZ
@given(changes=st.dictionaries(st.sampled_from([*HF, "rope_parameters"]), JSON | ROPE, max_size=5),
       dropped=st.sets(st.sampled_from(list(HF)), max_size=3))
def test_config_json_fields(changes, dropped):
    raw = {k: v for k, v in {**HF, **changes}.items() if k not in dropped}
    try:
        config = LlamaConfig.from_hf(raw)
    except ConfigError as e:
        one_line(e)
        return
    check_config(config)
    if "tie_word_embeddings" in changes:
        assert config.tie_word_embeddings is changes["tie_word_embeddings"]     # never a truthy string


@FUZZ
@given(rope=ROPE, theta=SCALARS | st.just(500000.0))
def test_rope_parameters(rope, theta):
    for raw in ({**HF, "rope_scaling": rope, "rope_theta": theta},
                {**HF, "rope_parameters": {**rope, "rope_theta": theta} if isinstance(rope, dict) else rope}):
        try:
            check_config(LlamaConfig.from_hf(raw))
        except ConfigError as e:
            one_line(e)


# -- the manifest ---------------------------------------------------------------------------------------
MANIFEST_BASE = Manifest(config=presets.tiny().to_dict(), target="ort", dtype="fp16", source={"kind": "tiny"},
                         quantization=[{"pass": "int4", "block_size": 32}],
                         io={"inputs": [{"name": "past_key_values.0.key", "dtype": "float16"}]},
                         packages={"onnx": "1.18"}).to_dict()
FILE_NAMES = st.sampled_from(["model.onnx", "tokenizer.json", "../outside.txt", "{outside}", "link", "", ".",
                              "..", "a/b", "/etc/passwd"]) | st.text(max_size=10)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from([*MANIFEST_BASE, "format_version"]), JSON, max_size=4),
       files=st.dictionaries(FILE_NAMES, st.fixed_dictionaries({"bytes": st.integers(-5, 2 ** 70) | ODD,
                                                                "sha256": st.text(max_size=4) | ODD}), max_size=3),
       raw_text=st.none() | st.text(max_size=40))
def test_manifest(changes, files, raw_text):
    with fresh_dir("fuzz-") as root:
        outside = root / "outside.txt"
        outside.write_text(SECRET * 300)             # 4200 bytes: its size must never show up either
        folder = root / "model"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"abc")
        (folder / "link").symlink_to(outside)
        files = {name.replace("{outside}", str(outside)): rec for name, rec in files.items()}
        data = {**MANIFEST_BASE, **changes, "files": files}
        (folder / MANIFEST).write_text(raw_text if raw_text is not None else json.dumps(data))
        hashed = []
        real_hash = model_folder.sha256_file
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_folder, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real_hash(p, *a))
            try:
                manifest = model_folder.verify_folder(folder)
            except ModelFolderError as e:
                one_line(e)
                assert "4200" not in str(e)
                manifest = None
        assert all(folder.resolve() in p.resolve().parents for p in hashed)
        if manifest is None:
            return
        assert manifest.precision and isinstance(manifest.weight_bytes, int) and manifest.kv_dtype
        try:
            check_config(LlamaConfig.from_dict(manifest.config))
        except ConfigError as e:
            one_line(e)


# -- a sharded checkpoint's index --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """root/ckpt: config.json and tiny's weights in two shards; root/elsewhere/x.safetensors: a foreign file."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("fuzz-ckpt")
    hf = sources.save_hf_folder("tiny", root / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    folder = root / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((hf / "config.json").read_text())
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(folder / file))
    (root / "elsewhere").mkdir()
    save_file({SECRET: torch.zeros(2)}, str(root / "elsewhere" / "x.safetensors"))
    (folder / "link.safetensors").symlink_to(root / "elsewhere" / "x.safetensors")
    return folder, halves


@contextmanager
def safetensors_opens():
    """The paths the safetensors library is asked to open, recorded."""
    import safetensors

    opened: list[Path] = []
    real = safetensors.safe_open
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(Path(path)) or real(path, *a, **k))
        yield opened


@FUZZ
@given(data=st.data())
def test_shard_index(checkpoint, data):
    folder, halves = checkpoint
    shards = st.sampled_from([*halves, "../elsewhere/x.safetensors", str(folder.parent / "elsewhere/x.safetensors"),
                              "link.safetensors", "missing.safetensors", "", ".", "config.json"])
    right = {k: f for f, keys in halves.items() for k in keys}
    weight_map = data.draw(st.fixed_dictionaries({k: st.just(f) | shards for k, f in right.items()}))
    index = data.draw(st.sampled_from(["map", "junk"]))
    body = {"metadata": {}, "weight_map": weight_map} if index == "map" else data.draw(JSON)
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    with safetensors_opens() as opened:
        try:
            config, weights, _, _ = sources.load_source(folder)
        except SourceError as e:
            one_line(e)
        else:
            assert config == presets.tiny() and SECRET not in weights
    assert all(folder.resolve() in p.resolve().parents for p in opened), opened


# -- safetensors headers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-st")
    hf = sources.save_hf_folder("tiny", root / "hf")
    return hf, (hf / "model.safetensors").read_bytes()


TENSOR_ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "BOOL", "U8", "F64", "X"]) | SCALARS,
    "shape": st.lists(st.integers(-2, 2 ** 40) | st.sampled_from([0, 1, 64, 512]), max_size=3) | SCALARS,
    "data_offsets": st.lists(st.integers(-2, 2 ** 40), min_size=2, max_size=2) | SCALARS})


@FUZZ
@given(data=st.data())
def test_safetensors_header(single_file, data):
    folder, good = single_file
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])
    how = data.draw(st.sampled_from(["entry", "bytes", "truncate", "length"]))
    if how == "entry":
        name = data.draw(st.sampled_from(sorted(header)))
        header[name] = {**header[name], **data.draw(TENSOR_ENTRY)} if name != "__metadata__" else data.draw(JSON)
        text = json.dumps(header).encode()
        blob = struct.pack("<Q", len(text)) + text + good[8 + length:]
    elif how == "bytes":
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, 8 + length))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif how == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    else:
        blob = struct.pack("<Q", data.draw(st.integers(0, 2 ** 64 - 1))) + good[8:]
    (folder / "model.safetensors").write_bytes(blob)
    try:
        config, weights, _, _ = sources.load_source(folder)
    except SourceError as e:
        one_line(e)
    else:
        assert config == presets.tiny() and all(v.dtype == torch.float32 for v in weights.values())


# -- GGUF ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-gguf")
    model = seeded_llama(presets.tiny(num_hidden_layers=1), seed=2)
    path = write_gguf(root / "good.gguf", model)
    return root, model, path.read_bytes()


def load_gguf(path: Path) -> None:
    try:
        config, _, _, _ = sources.load_source(path)
    except SourceError as e:
        one_line(e)
    else:
        check_config(config)


@FUZZ
@given(data=st.data())
def test_gguf_bytes(gguf_file, data):
    root, _, good = gguf_file
    blob = bytearray(good)
    if data.draw(st.booleans()):
        # the header, the metadata and the tensor infos: the first few kilobytes hold every count and offset
        for _ in range(data.draw(st.integers(1, 6))):
            at = data.draw(st.integers(0, min(len(blob) - 1, 24 * 1024)))
            blob[at] = data.draw(st.integers(0, 255))
    else:
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    (root / "fuzzed.gguf").write_bytes(bytes(blob))
    load_gguf(root / "fuzzed.gguf")


GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size", "llama.rope.scaling.type",
             "llama.rope.scaling.factor", "llama.attention.key_length", "general.architecture",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
             "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
             "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]
GGUF_SCALARS = (st.integers(-2 ** 63, 2 ** 63 - 1) | st.sampled_from([0, 1, 2, 64, 10 ** 12]) | st.booleans()
                | st.floats(width=32) | st.text(max_size=8) | st.sampled_from(["llama", "gpt2", "linear", "none"]))
GGUF_VALUES = st.none() | GGUF_SCALARS | st.lists(st.integers(0, 2 ** 31), min_size=1, max_size=3) \
    | st.lists(st.text(max_size=4), min_size=1, max_size=3)


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, min_size=1, max_size=3))
def test_gguf_metadata(gguf_file, meta):
    root, model, _ = gguf_file
    path = root / "meta.gguf"
    path.unlink(missing_ok=True)
    write_gguf(path, model, meta=meta)
    load_gguf(path)


# -- external-data records ---------------------------------------------------------------------------
@FUZZ
@given(offset=st.integers(-1, 2 ** 40).map(str) | st.text(max_size=4),
       length=st.none() | st.integers(-1, 2 ** 40).map(str) | st.text(max_size=4),
       location=st.sampled_from(["model.onnx.data", "../x.data", "/etc/passwd", "missing.data", "", "."]),
       dims=st.lists(st.integers(-1, 1 << 20), max_size=2))
def test_external_data_records(offset, length, location, dims):
    import onnx
    from onnx import TensorProto, helper

    with fresh_dir("fuzz-") as folder:
        (folder / "model.onnx.data").write_bytes(b"\0" * 64)
        tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        record = {"location": location, "offset": offset, **({"length": length} if length is not None else {})}
        for key, value in record.items():
            tensor.external_data.add(key=key, value=value)
        model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[tensor]))
        try:
            model_folder.check_external_data(model, folder)
        except ModelFolderError as e:
            one_line(e)
            return
        numel = math.prod(dims)
        assert int(offset) + numel * 4 <= 64 and location == "model.onnx.data"
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))


# -- issue 10's examples for the folder base -----------------------------------------------------------
def manifest_folder(root: Path, files: dict, **changes) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"abc")
    data = {**Manifest(config=presets.tiny().to_dict()).to_dict(), "files": files, **changes}
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt", "link"])
def test_manifest_entry_outside_the_folder_is_neither_stated_nor_hashed(tmp_path, monkeypatch, name):
    """Issue 10: an entry naming a file outside was stat'ed and hashed (its size in the error)."""
    (tmp_path / "outside.txt").write_text(SECRET * 300)
    folder = manifest_folder(tmp_path, {name: {"bytes": 1, "sha256": "x"}})
    (folder / "link").symlink_to(tmp_path / "outside.txt")
    monkeypatch.setattr(model_folder, "sha256_file", lambda *a: pytest.fail("hashed"))
    with pytest.raises(ModelFolderError) as err:
        model_folder.verify_folder(folder)
    one_line(err.value)
    assert "4200" not in str(err.value) and str(Path("/etc/passwd").stat().st_size) not in str(err.value)


@pytest.mark.parametrize("text, words", [
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "files": ["model.onnx"]}), "'files' has the wrong type"),
    ("[" * 100000 + "]" * 100000, "is corrupted"),
    ('{"format_version": 1, "config": {}, "opset": ' + "9" * 5000 + "}", "is corrupted"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "opset": 10 ** 30}), "'opset'"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {},
                 "files": {"model.onnx": {"bytes": 10 ** 30, "sha256": "x"}}}), "record of 'model.onnx'"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "quantization": [{"pass": ["int4"]}]}),
     "'quantization' has the wrong type"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "io": {"inputs": 3}}), "'io.inputs'"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "source": {"spec": {"x": 1}}}), "'source'"),
    (json.dumps({"format_version": True, "config": {}}), "unknown format"),
])
def test_malformed_manifest_is_one_line(tmp_path, text, words):
    """Issue 10: `files` as a list was an AttributeError; deep nesting a RecursionError; a 5000-digit
    number a ValueError traceback."""
    folder = manifest_folder(tmp_path, {})
    (folder / MANIFEST).write_text(text)
    with pytest.raises(ModelFolderError, match=words) as err:
        model_folder.read_manifest(folder)
    one_line(err.value)


def test_manifest_vocab_disagreeing_with_the_graph_is_caught(tmp_path):
    """Issue 10: a manifest whose vocab_size disagrees with the weights let out-of-table ids reach
    ONNX Runtime. `check_vocab` is the comparison the folder's opener runs."""
    from tests.conftest import build_toy

    folder = build_toy(tmp_path / "toy")
    proto = model_folder.load_model_proto(folder, with_weights=False)
    vocab = model_folder.read_manifest(folder).config["vocab_size"]
    model_folder.check_vocab(proto, vocab_size=vocab, folder=folder)
    with pytest.raises(ModelFolderError, match=rf"manifest's vocab_size \({vocab + 5}\) disagrees with the model "
                                               rf"\(the (embedding table|logits) has {vocab} entries\)"):
        model_folder.check_vocab(proto, vocab_size=vocab + 5, folder=folder)


def test_external_data_past_the_end_of_its_file_is_one_line(tmp_path):
    """Issue 10: external data whose offset or length ran past its file was a ValueError traceback in quantize."""
    from tests.conftest import build_toy

    folder = build_toy(tmp_path / "toy")
    proto = onnx.load(folder / model_folder.MODEL, load_external_data=False)
    size = (folder / model_folder.DATA).stat().st_size
    tensor = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for offset, length in (("{}".format(size - 4), None), ("0", str(size + 1)), ("-1", None)):
        del tensor.external_data[:]
        record = {"location": model_folder.DATA, "offset": offset, **({"length": length} if length else {})}
        for key, value in record.items():
            tensor.external_data.add(key=key, value=value)
        onnx.save(proto, folder / model_folder.MODEL)
        for read in (lambda: model_folder.load_model_proto(folder), lambda: model_folder.load_model_ir(folder)):
            with pytest.raises(ModelFolderError, match="external data") as err:
                read()
            one_line(err.value)
