"""runtime/session.py: folder checks, provider choice, the numpy forward, typed errors.

A hand-built toy graph that follows the graph contract (standard ONNX ops only) keeps these tests
independent of the exporter: logits = (embed(ids) + masked sum of all cached keys) @ W.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgellama.errors import ModelFolderError, ProviderError, RuntimeInputError
from edgellama import folder as model_folder
from edgellama.runtime import session

from tests.conftest import HIDDEN, LAYERS, VOCAB, build_toy, toy_reference  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("toy") / "model")


def test_forward_matches_reference_and_cache_is_concatenated(toy):
    m = session.OrtModel(toy, provider="cpu")
    assert m.provider == "cpu" and m.kv_dtype == np.float32 and m.config.vocab_size == VOCAB
    ids = np.array([[3, 4, 5]])
    mask = np.ones((1, 3), np.int64)
    logits, present, extra = m.forward(ids, mask, np.arange(3)[None], m.empty_past(1))
    np.testing.assert_allclose(logits, toy_reference(ids, mask, toy), rtol=1e-5, atol=1e-5)
    assert len(present) == 2 * LAYERS and present[0].shape == (1, 1, 3, HIDDEN) and extra == {}
    # One more token through the cache: the cache grows by one slot and keeps the old ones.
    logits2, present2, _ = m.forward(np.array([[6]]), np.ones((1, 4), np.int64), np.array([[3]]), present)
    assert present2[0].shape == (1, 1, 4, HIDDEN)
    np.testing.assert_array_equal(present2[0][:, :, :3], present[0])
    full = toy_reference(np.array([[3, 4, 5, 6]]), np.ones((1, 4), np.int64), toy)
    np.testing.assert_allclose(logits2[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_past_as_pairs_is_accepted(toy):
    m = session.OrtModel(toy, provider="cpu")
    flat = m.empty_past(2)
    pairs = list(zip(flat[0::2], flat[1::2]))
    ids, mask, pos = np.array([[1, 2], [3, 4]]), np.ones((2, 2), np.int64), np.array([[0, 1], [0, 1]])
    a = m.forward(ids, mask, pos, flat)[0]
    b = m.forward(ids, mask, pos, pairs)[0]
    np.testing.assert_array_equal(a, b)


def test_bad_token_ids_and_positions_are_typed_errors(toy):
    m = session.OrtModel(toy, provider="cpu")
    with pytest.raises(RuntimeInputError, match="token id 11 is outside the vocabulary"):
        m.forward(np.array([[11]]), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64), m.empty_past(1))
    with pytest.raises(RuntimeInputError, match="outside the vocabulary"):
        m.forward(np.array([[-1]]), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64), m.empty_past(1))
    with pytest.raises(RuntimeInputError, match="past the model's context"):
        m.forward(np.array([[1]]), np.ones((1, 1), np.int64), np.array([[32]]), m.empty_past(1))
    with pytest.raises(RuntimeInputError, match="attention_mask covers"):
        m.forward(np.array([[1]]), np.ones((1, 3), np.int64), np.array([[0]]), m.empty_past(1))


def test_missing_and_corrupted_files(toy, tmp_path):
    with pytest.raises(ModelFolderError, match="no such directory"):
        session.OrtModel(tmp_path / "absent", provider="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    (broken / model_folder.DATA).unlink()
    with pytest.raises(ModelFolderError, match="model.onnx.data is missing"):
        session.OrtModel(broken, provider="cpu")
    shutil.rmtree(broken)
    shutil.copytree(toy, broken)
    data = bytearray((broken / model_folder.DATA).read_bytes())
    data[0] ^= 0xFF
    (broken / model_folder.DATA).write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="corrupted"):
        session.OrtModel(broken, provider="cpu")
    (broken / model_folder.MANIFEST).write_text("{not json")
    with pytest.raises(ModelFolderError, match="corrupted"):
        session.OrtModel(broken, provider="cpu")


def test_external_data_outside_the_folder_is_refused(toy, tmp_path):
    import onnx

    evil = tmp_path / "evil"
    shutil.copytree(toy, evil)
    shutil.copy(toy / model_folder.DATA, tmp_path / "outside.data")
    model = onnx.load(evil / model_folder.MODEL, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save(model, evil / model_folder.MODEL)
    # hashes that match: the location check alone must refuse it
    model_folder.write_manifest(evil, model_folder.read_manifest(evil))
    with pytest.raises(ModelFolderError, match="points outside the model folder"):
        session.OrtModel(evil, provider="cpu")


def test_contract_violations_are_folder_errors(toy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(toy, bad)
    manifest = json.loads((bad / model_folder.MANIFEST).read_text())
    manifest["config"]["num_hidden_layers"] = 3   # the graph has 2 layers of past inputs
    (bad / model_folder.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="graph contract .*past_key_values.2.key"):
        session.OrtModel(bad, provider="cpu")


def test_provider_choice(toy, monkeypatch):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        session.OrtModel(toy, provider="tpu")
    monkeypatch.setattr(session, "cuda_status", lambda: (False, "no GPU in this test"))
    with pytest.raises(ProviderError, match="CUDA is not available: no GPU in this test"):
        session.OrtModel(toy, provider="cuda")
    notes = []
    assert session.resolve_provider("auto", notice=notes.append) == "cpu"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert len(notes) == 1 and "running on CPU" in notes[0] and "\n" not in notes[0]


def test_cuda_status_is_consistent_with_ort():
    ok, reason = session.cuda_status()
    assert isinstance(reason, str) and "\n" not in reason
    if ok:
        import onnxruntime

        assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_threads_and_optimization_are_checked(toy):
    with pytest.raises(RuntimeInputError, match="threads must be at least 1"):
        session.OrtModel(toy, provider="cpu", threads=0)
    with pytest.raises(RuntimeInputError, match="unknown optimization level"):
        session.OrtModel(toy, provider="cpu", optimization="max")
    m = session.OrtModel(toy, provider="cpu", threads=1, optimization="disable")
    assert m.threads == 1


@pytest.mark.cuda
def test_cuda_session_runs_on_cuda(toy):
    if not session.cuda_status()[0]:
        pytest.skip("onnxruntime has no usable CUDAExecutionProvider here")
    m = session.OrtModel(toy, provider="cuda")
    assert m.strict and m.session.get_providers()[0] == "CUDAExecutionProvider"
    ids, mask = np.array([[3, 4]]), np.ones((1, 2), np.int64)
    logits = m.forward(ids, mask, np.arange(2)[None], m.empty_past(1))[0]
    np.testing.assert_allclose(logits, toy_reference(ids, mask, toy), rtol=1e-4, atol=1e-4)
