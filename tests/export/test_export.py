"""torch -> ONNX: one function-op node per block, dynamic dims kept, the graph contract, bad input."""

import collections

import pytest

from edgellama.errors import ExportError, ModelFolderError
from edgellama import folder as model_folder
from edgellama.export import onnx_export
from tests.conftest import portable_copy, random_llama


def _ops(ir_model):
    return collections.Counter((n.domain, n.op_type) for n in ir_model.graph)


LAYERS = 3


@pytest.fixture(scope="module")
def tiny_ir():
    """The portable graph of a 3-layer tiny Llama: what these tests read is its structure (nodes, names,
    I/O), not its weights, so it is the session's trace of random_llama(layers=3), which
    tests/export/lower reads too (conftest.portable_copy: one trace, ~3 CPU s, for both)."""
    return portable_copy(random_llama(layers=LAYERS), key=f"random_llama-{LAYERS}")


def test_one_node_per_block(tiny_ir):
    ops = _ops(tiny_ir)
    layers = 3
    assert ops[("edgellama", "RMSNorm")] == 2 * layers + 1
    assert ops[("edgellama", "RotaryEmbedding")] == 2 * layers
    assert ops[("edgellama", "GroupQueryAttention")] == layers
    # Nothing of the blocks' insides leaks into the main graph.
    assert not {("", "Softmax"), ("", "ReduceMean"), ("", "Sqrt"), ("", "Cos")} & set(ops)
    assert tiny_ir.opset_imports["edgellama"] == 1


def test_nodes_named_after_modules(tiny_ir):
    names = {n.name for n in tiny_ir.graph}
    assert "model.layers.2.self_attn/GroupQueryAttention" in names
    assert "model.layers.0.input_layernorm/RMSNorm" in names
    assert "model.norm/RMSNorm" in names
    assert "model.layers.1.mlp.down_proj/MatMul" in names


@pytest.mark.parametrize("tied", [False, True])
def test_initializers_carry_state_dict_names(tied):
    """Every initializer holding a torch weight (as is, or transposed as MatMul reads it) is named
    after the weight's state_dict entry, on every target; a tied embedding has one name."""
    import numpy as np
    import onnx_ir as ir

    model = random_llama(0, layers=LAYERS, tie_word_embeddings=tied)
    weights = {name: t.detach().numpy() for name, t in model.named_parameters()}
    weights.update({name: t.numpy() for name, t in model.named_buffers()})
    # untied: the session's trace of random_llama(layers=3) (the same weights: seed 0), not a second one
    portable = (onnx_export.export_onnx(model) if tied else
                portable_copy(model, key=f"random_llama-{LAYERS}"))
    for target in ("portable", "ort", "onnx23"):
        ir_model = onnx_export.lower(ir.from_proto(ir.to_proto(portable)), target=target)
        inits = {name: v.const_value.numpy() for name, v in ir_model.graph.initializers.items()}
        assert set(weights) <= set(inits), (target, set(weights) - set(inits))
        for name, array in inits.items():
            sources = [w for w, a in weights.items()
                       if array.shape in (a.shape, a.T.shape) and (np.array_equal(array, a) or np.array_equal(array, a.T))]
            assert not sources or name in sources, (target, name, sources)
    assert ("lm_head.weight" in weights) is not tied
    assert "model.layers.1.mlp.down_proj.weight" in weights


def test_graph_contract_and_dynamic_dims(tiny_ir):
    ins = {v.name: v for v in tiny_ir.graph.inputs}
    outs = {v.name: v for v in tiny_ir.graph.outputs}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [str(d) for d in ins["input_ids"].shape] == ["batch", "sequence"]
    assert [str(d) for d in ins["attention_mask"].shape] == ["batch", "total_sequence"]
    assert [str(d) for d in ins["past_key_values.2.value"].shape] == ["batch", "2", "past_sequence", "16"]
    assert [str(d) for d in outs["logits"].shape] == ["batch", "sequence", "512"]
    assert [str(d) for d in outs["present.0.key"].shape] == ["batch", "2", "total_sequence", "16"]
    assert len(ins) == 3 + 2 * 3 and len(outs) == 1 + 2 * 3


def test_check_dynamic_refuses_a_specialized_dim(tiny_ir):
    import onnx_ir as ir

    v = tiny_ir.graph.inputs[0]
    saved = v.shape
    try:
        v.shape = ir.Shape([1, ir.SymbolicDim("sequence")])
        with pytest.raises(ExportError, match="specialized dim 0 of input_ids"):
            onnx_export.check_dynamic(tiny_ir)
    finally:
        v.shape = saved


def test_fp16_export_keeps_fp32_logits():
    # the session's fp16 trace of random_llama(layers=3) (tests/export/lower reads it too): the I/O dtypes
    # are the claim, the same for any tiny Llama
    ir16 = portable_copy(random_llama(layers=LAYERS), key=f"random_llama-{LAYERS}", dtype="fp16")
    dtypes = {v.name: v.dtype.name for v in list(ir16.graph.inputs) + list(ir16.graph.outputs)}
    assert dtypes["logits"] == "FLOAT"
    assert dtypes["past_key_values.0.key"] == dtypes["present.0.value"] == "FLOAT16"


@pytest.mark.parametrize("kwargs, words", [
    ({"target": "tensorrt"}, "unknown target 'tensorrt'"),
    ({"dtype": "int3"}, "unknown dtype 'int3'"),
    ({"opset": 12}, "opset 12 is not supported"),
    ({"target": "onnx23", "opset": 21}, "needs --opset 23"),
    ({"provider": "tpu"}, "unknown provider 'tpu'"),
])
def test_bad_arguments_write_nothing(tmp_path, kwargs, words):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=words):
        onnx_export.export_model("tiny", out, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ModelFolderError, match="not empty; pass --force"):
        onnx_export.export_model("tiny", out)
    assert (out / "keep.txt").read_text() == "precious"


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        with model_folder.staged_folder(out, force=False) as tmp:
            (tmp / model_folder.MODEL).write_bytes(b"half a model")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_force_replaces_only_once_the_new_folder_is_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / model_folder.MANIFEST).write_text("{}")       # --force replaces only folders edgellama wrote
    with pytest.raises(RuntimeError):
        with model_folder.staged_folder(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert (out / "old.txt").read_text() == "old"          # nothing lost
    with model_folder.staged_folder(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert len(list(tmp_path.iterdir())) == 1


def test_a_shared_export_equals_a_fresh_one(tmp_path_factory, tmp_path):
    """tests/conftest.shared_export opens a source and traces it once for all the folders it exports
    from it (each lowering a clone of that trace); the folders the suite reads stand for export_model's,
    so they must be its bytes: two targets lowered from one trace, each against a fresh export."""
    import hashlib

    from tests.conftest import shared_export

    def files(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    shared_export(tmp_path_factory, "tiny")      # the trace the two below are lowered from, at least once before
    for options in ({"target": "ort"}, {"target": "ort", "kv_cache": "dynamic"}):
        fresh = onnx_export.export_model("tiny", tmp_path / options.get("kv_cache", "static"), **options)
        assert files(shared_export(tmp_path_factory, "tiny", **options)) == files(fresh), options
