"""Streaming export: the model is traced without its weights and each weight goes from the source
into model.onnx.data in the target dtype when the folder is written; a source that breaks during
that write (truncated, changed, the disk full) leaves nothing behind and an older output intact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from edgellama import folder as model_folder
from edgellama.errors import SourceError
from edgellama.export import onnx_export, sources
from edgellama.export.onnx_export import NoTokenizerWarning, export_model
from edgellama.progress import Progress


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    """tiny as a bf16 checkpoint folder in two shards, the way large checkpoints ship."""
    from safetensors.torch import save_file

    folder = sources.save_hf_folder("tiny", tmp_path_factory.mktemp("src") / "tiny-bf16")
    _, weights, _, _ = sources.load_source(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in halves.items():
        save_file({n: weights[n].to(torch.bfloat16).contiguous() for n in part}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {n: shard for shard, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _export(source, out, **options):
    """export_model(source, out) on the session's opening and trace of `source` (tests/conftest.py
    shared_trace: one trace per source and dtype, ~3 CPU s each, instead of one per export). For the
    tests whose claim is the folder written from the source (each weight still read from the
    checkpoint as the folder is written), not the trace; the tests that change a source under a
    running export open and trace their own copy."""
    from tests.conftest import shared_trace

    with shared_trace(str(source)):
        return export_model(str(source), out, **options)


def _initializers(out) -> dict[str, np.ndarray]:
    proto = onnx.load(out / model_folder.MODEL, load_external_data=False)
    load_external_data_for_model(proto, str(out))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _tree(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("target,dtype", [("portable", "fp16"), ("ort", "fp32")])
def test_written_weights_are_the_source_converted(hf_bf16, tmp_path, target, dtype):
    """Every source weight lands in model.onnx.data under its own name, converted from bf16 as torch
    converts it (or transposed, as MatMul reads it), and the manifest's hash is the file's."""
    out = _export(hf_bf16, tmp_path / "out", target=target, dtype=dtype)
    weights, _, _ = sources.open_source(hf_bf16)
    inits = _initializers(out)
    want = onnx_export.DTYPES[dtype]
    packed = [n for n in inits if n.endswith(".qkv_proj.weight")]
    for name in weights.shapes:
        source = weights.read(name, want).numpy()
        if name in inits:
            assert np.array_equal(inits[name], source) or np.array_equal(inits[name], source.T), name
        else:   # the static contract packs q|k|v into one initializer
            layer = name.rsplit(".", 2)[0]
            assert name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and f"{layer}.qkv_proj.weight" in packed
    for name in packed:
        layer = name.removesuffix(".qkv_proj.weight")
        parts = [weights.read(f"{layer}.{p}_proj.weight", want).numpy().T for p in "qkv"]
        assert np.array_equal(inits[name], np.concatenate(parts, axis=1)), name
    record = model_folder.read_manifest(out).files[model_folder.DATA]
    assert record.sha256 == model_folder.sha256_file(out / model_folder.DATA)
    assert record.bytes == (out / model_folder.DATA).stat().st_size


def test_each_weight_is_read_while_the_data_file_is_written(tmp_path):
    """Nothing of size is read before the write starts; then each weight once, as the file grows."""
    weights, _, _ = sources.open_source("tiny")
    data = tmp_path / model_folder.DATA
    reads: list[tuple[str, int | None]] = []

    def reader(name, dtype):
        reads.append((name, data.stat().st_size if data.exists() else None))
        return weights.reader(name, dtype)

    streamed = sources.Weights(weights.config, weights.shapes, reader)
    ir_model = onnx_export.lower(onnx_export.export_weights(streamed), target="ort", kv_cache="static")
    big = {n for n, shape in weights.shapes.items() if np.prod(shape) > 8192}
    assert not [n for n, size in reads if n in big], "a large weight was read before the write"
    before = len(reads)
    model_folder.save_model(ir_model, tmp_path)
    during = reads[before:]
    assert {n for n, _ in during} >= big
    assert all(size is not None for _, size in during)
    sizes = [size for n, size in during if n in big]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)   # one read per weight, in file order
    assert len([n for n, _ in during if n in big]) == len(big)


def test_the_folder_carries_the_source_configs_and_is_readable_by_others(hf_bf16, tmp_path):
    (hf_bf16 / "generation_config.json").write_text('{"do_sample": false, "eos_token_id": 1, "max_length": 77}\n')
    old = os.umask(0o022)
    try:
        out = _export(hf_bf16, tmp_path / "out")
        tiny = _export("tiny", tmp_path / "tiny")
    finally:
        os.umask(old)
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_bf16 / name).read_bytes()
        assert name in model_folder.read_manifest(out).files
    # a source without these files gets them written from its config, as transformers writes them
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == sources.open_source("tiny")[0].config.vocab_size
    assert "eos_token_id" in json.loads((tiny / "generation_config.json").read_text())
    for folder in (out, tiny):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_a_source_without_a_tokenizer_warns(hf_bf16, tmp_path):
    import shutil

    bare = shutil.copytree(hf_bf16, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.warns(NoTokenizerWarning, match="no tokenizer"):
        out = export_model(str(bare), tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoTokenizerWarning)
        _export(hf_bf16, tmp_path / "with", force=True)


class _AtWrite(Progress):
    """Runs `action` as the folder's write begins: the source changes under a running export."""

    def __init__(self, action):
        super().__init__(enabled=False)
        self.action = action

    @contextlib.contextmanager
    def step(self, what, **kwargs):
        if what == "write model folder":
            self.action()
        with super().step(what, **kwargs) as s:
            yield s


@pytest.fixture
def shards(hf_bf16, tmp_path):
    """A private copy of the bf16 checkpoint (the tests below damage it) and an older output."""
    import shutil

    src = shutil.copytree(hf_bf16, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / model_folder.MANIFEST).write_text("{}")
    (out / "older.txt").write_text("an older export")
    return src, out


def _assert_nothing_left(out):
    assert _tree(out) == {model_folder.MANIFEST: hashlib.sha256(b"{}").hexdigest(),
                          "older.txt": hashlib.sha256(b"an older export").hexdigest()}
    assert [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def test_a_shard_truncated_during_the_write_is_one_error(shards):
    src, out = shards
    last = src / "model-00002-of-00002.safetensors"

    def truncate():
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size // 2)

    with pytest.raises(SourceError, match="model-00002-of-00002.safetensors: not a readable safetensors file"):
        export_model(str(src), out, force=True, progress=_AtWrite(truncate))
    _assert_nothing_left(out)


def test_a_tensor_changed_during_the_write_is_one_error(shards):
    """A shard rewritten after its header was checked: a tensor of another dtype and shape."""
    from safetensors.torch import load_file, save_file

    src, out = shards
    last = src / "model-00002-of-00002.safetensors"
    tensors = load_file(str(last))
    name = sorted(tensors)[-1]

    def rewrite():
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, dtype=torch.float16)
        save_file(tensors, str(last))

    with pytest.raises(SourceError, match=f"{name} changed while it was read: F16"):
        export_model(str(src), out, force=True, progress=_AtWrite(rewrite))
    _assert_nothing_left(out)


def test_a_full_disk_is_one_line_and_exit_2(shards):
    """The write fails (a file-size limit, as a full disk fails it): exit 2, one line, the staged
    folder removed and the older output intact."""
    src, out = shards

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    p = subprocess.run([sys.executable, "-m", "edgellama.cli.main", "export", str(src), "-o", str(out), "--force",
                        "--quiet"], capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgellama: error: writing") and "File too large" in lines[0]
    _assert_nothing_left(out)

