"""The runtime checks a folder's model.onnx on an outline parsed with protobuf alone
(`folder.load_model_outline`), so a generating process never imports onnx or onnx_ir (issue 11's
memory goal: the two, with the sympy onnx_ir loads, were ~50 MB of its resident memory). The
outline must read what onnx's ModelProto reads: the external-data and vocab checks give the same
answers on both, for hostile records as for real folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgellama import folder as model_folder
from edgellama.errors import ModelFolderError
from tests.conftest import build_toy, fresh_dir, shared_export

FUZZ = settings()   # the profile tests/conftest.py loads



def outcome(check) -> str:
    """'ok' or the ModelFolderError's line: what a check decided."""
    try:
        check()
    except ModelFolderError as e:
        return str(e)
    return "ok"


def test_a_generating_process_imports_neither_onnx_nor_torch(tmp_path_factory):
    """Nor the tokenizer: token ids in and out need none (tests/runtime/test_lazy_tokenizer.py)."""
    folder = shared_export(tmp_path_factory, "tiny", target="ort")
    script = ("import json, sys\n"
              "from edgellama.runtime import Generator\n"
              "gen = Generator(sys.argv[1], provider='cpu', threads=1)\n"
              "gen.generate_ids([5, 6, 7], max_new_tokens=3, eos=False)\n"
              "heavy = ('onnx', 'onnx_ir', 'sympy', 'torch', 'onnxscript', 'tokenizers', 'jinja2')\n"
              "print(json.dumps([m for m in heavy if m in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def tensor_records(model) -> list[tuple]:
    return [(t.name, list(t.dims), t.data_type, t.data_location, [(e.key, e.value) for e in t.external_data])
            for t in model.graph.initializer]


def graph_records(model) -> list[tuple]:
    nodes = [(n.name, n.op_type, n.domain, list(n.input), list(n.output)) for n in model.graph.node]
    outputs = [(o.name, [d.dim_value if d.HasField("dim_value") else d.dim_param
                         for d in o.type.tensor_type.shape.dim]) for o in model.graph.output]
    return [nodes, outputs, [[n.op_type for n in f.node] for f in model.functions]]


@pytest.mark.parametrize("options", [{"target": "ort"}, {"target": "portable"}])
def test_the_outline_reads_what_onnx_reads(tmp_path_factory, options):
    folder = shared_export(tmp_path_factory, "tiny", **options)
    proto = model_folder.load_model_proto(folder, with_weights=False)
    outline = model_folder.load_model_outline(folder)
    assert tensor_records(outline) == tensor_records(proto)
    assert graph_records(outline) == graph_records(proto)
    assert model_folder.external_data_paths(outline) == model_folder.external_data_paths(proto) != []
    vocab = model_folder.read_manifest(folder).config["vocab_size"]
    for size in (vocab, vocab + 1):
        assert outcome(lambda: model_folder.check_vocab(outline, vocab_size=size, folder=folder)) == \
            outcome(lambda: model_folder.check_vocab(proto, vocab_size=size, folder=folder))


def placed(tensor: TensorProto, where: str) -> onnx.ModelProto:
    """A model holding `tensor` in one of the places the external-data check walks."""
    node = helper.make_node("Identity", ["x"], ["y"])
    inner = helper.make_graph([], "inner", [], [], initializer=[tensor])
    initializer, functions = [], []
    if where == "initializer":
        initializer = [tensor]
    elif where == "attribute":
        node = helper.make_node("Constant", [], ["y"], value=tensor)
    elif where == "attribute list":
        node.attribute.append(helper.make_attribute("ts", [tensor]))
    elif where == "subgraph":
        node = helper.make_node("If", ["x"], ["y"], then_branch=inner, else_branch=inner)
    elif where == "function":
        functions = [helper.make_function("local", "f", ["a"], ["b"],
                                          [helper.make_node("Constant", [], ["b"], value=tensor)],
                                          [helper.make_opsetid("", 17)])]
    graph = helper.make_graph([node], "g", [], [], initializer=initializer)
    return helper.make_model(graph, functions=functions)


@FUZZ
@given(offset=st.integers(-1, 80).map(str) | st.text(max_size=3),
       length=st.none() | st.integers(-1, 80).map(str) | st.text(max_size=3),
       location=st.sampled_from(["model.onnx.data", "../x.data", "/etc/passwd", "missing.data", "", "."]),
       dims=st.lists(st.integers(-1, 24), max_size=2),
       data_type=st.sampled_from([1, 2, 7, 8, 10, 16, 21, 25, 0, 99]),
       location_field=st.sampled_from([TensorProto.EXTERNAL, TensorProto.DEFAULT]),
       where=st.sampled_from(["initializer", "attribute", "attribute list", "subgraph", "function"]))
def test_external_data_checks_agree(offset, length, location, dims, data_type, location_field, where):
    tensor = TensorProto(name="w", data_type=data_type, dims=dims)
    tensor.data_location = location_field
    record = {"location": location, "offset": offset, **({"length": length} if length is not None else {})}
    for key, value in record.items():
        tensor.external_data.add(key=key, value=value)
    model = placed(tensor, where)
    with fresh_dir("outline-") as folder:
        (folder / model_folder.DATA).write_bytes(b"\0" * 64)
        (folder / model_folder.MODEL).write_bytes(model.SerializeToString())
        assert outcome(lambda: model_folder.load_model_outline(folder)) == \
            outcome(lambda: model_folder.check_external_data(model, folder))


@FUZZ
@given(data=st.data())
def test_damaged_model_files_read_alike(data):
    """Bytes of a real folder's model.onnx overwritten or cut: wherever onnx can parse them, the
    outline parses them too, and both checks decide the same."""
    with fresh_dir("outline-") as root:
        folder = build_toy(root / "toy")
        blob = bytearray((folder / model_folder.MODEL).read_bytes())
        if data.draw(st.booleans()):
            for _ in range(data.draw(st.integers(1, 4))):
                blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        else:
            blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
        (folder / model_folder.MODEL).write_bytes(bytes(blob))
        try:
            proto = onnx.load_model_from_string(bytes(blob))
        except Exception:  # noqa: BLE001 - garbage: onnx refuses it, nothing to compare
            return
        vocab = model_folder.read_manifest(folder).config["vocab_size"]

        def proto_checks():
            model_folder.check_external_data(proto, folder)
            model_folder.check_vocab(proto, vocab_size=vocab, folder=folder)

        def outline_checks():
            outline = model_folder.load_model_outline(folder)
            model_folder.check_vocab(outline, vocab_size=vocab, folder=folder)

        assert outcome(outline_checks) == outcome(proto_checks)


@pytest.mark.parametrize("dtype", list(ir.DataType))
def test_each_element_type_needs_the_bytes_onnx_ir_counts(dtype, tmp_path):
    """The check's table of element widths (kept apart from onnx_ir, which the runtime does not
    import) against onnx_ir's own: a record one byte short of the tensor's data is refused."""
    try:
        needed = (5 * dtype.bitwidth + 7) // 8
    except (TypeError, ValueError, NotImplementedError):
        needed = None                     # no fixed width (STRING, UNDEFINED): only the length counts
    (tmp_path / model_folder.DATA).write_bytes(b"\0" * 256)
    tensor = TensorProto(name="w", data_type=int(dtype), dims=[5])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=model_folder.DATA)
    offset = tensor.external_data.add(key="offset")
    # a width the table should not have (or the wrong one) moves where the record stops fitting
    cases = [(256, True)] if needed is None else [(256 - needed, True), (256 - needed + 1, False)]
    for start, fits in cases:
        offset.value = str(start)
        (tmp_path / model_folder.MODEL).write_bytes(placed(tensor, "initializer").SerializeToString())
        assert (outcome(lambda: model_folder.load_model_outline(tmp_path)) == "ok") == fits, (dtype, start)
