"""Bad inputs across every command: one `edgellama: error:` line, exit 2 (1 for a failed check),
no traceback, nothing written and nothing that existed changed.

Each row is (argv, expected words, setup). argv names paths by placeholder: {tiny} (an fp32 export
of the built-in tiny model, shared by the module), {int8} (its int8 quantization), {toy}
(conftest's build_toy: no tokenizer), {hf} (a Hugging Face checkpoint folder), {case} (an empty
folder of this row), {out} (a path under {case} that must not appear). `setup` edits {case} before
the snapshot: a row's own inputs (a copied folder with a broken manifest) count as pre-existing
and must come out unchanged too.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from edgellama import folder as model_folder
from edgellama.cli.main import main
from tests.conftest import build_toy, shared_trace


# -- shared folders (one of each per module) -----------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    from edgellama.export.sources import save_hf_folder

    from tests.conftest import shared_export

    root = tmp_path_factory.mktemp("shared")
    shutil.copytree(shared_export(tmp_path_factory, "tiny"), root / "tiny")   # the session's export, not traced again
    assert main(["quantize", str(root / "tiny"), "-o", str(root / "int8"), "--mode", "int8", "--quiet"]) == 0
    build_toy(root / "toy")
    save_hf_folder("tiny", root / "hf")
    return {"root": root, "tiny": root / "tiny", "int8": root / "int8", "toy": root / "toy", "hf": root / "hf"}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`: sha256 of files, 'dir' for folders."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(err: str, prefix: str = "edgellama: error: ") -> str:
    """The one line besides progress lines (`[edgellama] step ...`), last on stderr."""
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("[edgellama] ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(prefix) and err.strip().endswith(lines[0]), err
    return lines[0]


# -- setups: each edits the row's own folder {case} --------------------------------------------------
def copy_tiny(case: Path, shared: dict, name: str = "m") -> Path:
    return Path(shutil.copytree(shared["tiny"], case / name))


def edit_manifest(edit):
    def setup(case, shared):
        m = copy_tiny(case, shared)
        data = json.loads((m / model_folder.MANIFEST).read_text())
        edit(data)
        (m / model_folder.MANIFEST).write_text(json.dumps(data))
    return setup


def write(name: str, data: bytes = b"x"):
    def setup(case, shared):
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(data)
    return setup


def foreign_folder(case, shared):
    (case / "mine").mkdir()
    (case / "mine" / "notes.txt").write_text("my notes")


def our_parent_of(key: str):
    """{case}/p: a folder with an edgellama manifest holding a copy of `key` at {case}/p/in."""
    def setup(case, shared):
        shutil.copytree(shared[key], case / "p" / "in")
        shutil.copy(shared["tiny"] / model_folder.MANIFEST, case / "p" / model_folder.MANIFEST)
    return setup


def corrupt(name: str, how: str):
    def setup(case, shared):
        m = copy_tiny(case, shared)
        path = m / name
        if how == "delete":
            path.unlink()
        elif how == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(how.encode())
    return setup


def nothing(case, shared):
    pass


Q = ["--mode", "int8", "--quiet"]
G = ["--provider", "cpu", "--max-new-tokens", "2"]
CASES = [
    # top level
    (["frobnicate"], "invalid choice", nothing),
    (["--bogus"], "unrecognized", nothing),
    # export: arguments
    (["export"], "required", nothing),
    (["export", "tiny"], "required", nothing),
    (["export", "no-such-model", "-o", "{out}"], "no such model source", nothing),
    (["export", "tiny", "-o", "{out}", "--target", "bogus"], "invalid choice", nothing),
    (["export", "tiny", "-o", "{out}", "--dtype", "int3"], "invalid choice", nothing),
    (["export", "tiny", "-o", "{out}", "--opset", "5"], "opset 5", nothing),
    (["export", "tiny", "-o", "{out}", "--opset", "abc"], "invalid int", nothing),
    (["export", "tiny", "-o", "{out}", "--target", "onnx23", "--opset", "22"], "needs --opset 23", nothing),
    (["export", "tiny", "-o", "{out}", "--provider", "tpu"], "invalid choice", nothing),
    (["export", "tiny", "-o", "{out}", "--quant", "int9"], "invalid choice", nothing),
    (["export", "tiny", "-o", "{out}", "--exclude", "lm_head"], "need --quant", nothing),
    (["export", "tiny", "-o", "{out}", "--block-size", "32"], "need --quant", nothing),
    (["export", "tiny", "-o", "{out}", "--quant", "int4", "--block-size", "24"], "block size 24", nothing),
    (["export", "tiny", "-o", "{out}", "--quant", "fp16", "--accuracy-level", "4"], "int8, int4 and int4-fast only", nothing),
    (["export", "tiny", "-o", "{out}", "--quant", "int8", "--dtype", "fp16"], "starts from an fp32", nothing),
    (["export", "{case}/empty", "-o", "{out}"], "", write("empty/.keep")),
    # export: outputs, containment, --force
    (["export", "tiny", "-o", "{case}/f/out"], "is a file", write("f")),
    (["export", "tiny", "-o", "{case}/f"], "not a folder", write("f")),
    (["export", "tiny", "-o", "{case}/mine"], "not empty", foreign_folder),
    (["export", "tiny", "-o", "{case}/mine", "--force"], "not an edgellama model folder", foreign_folder),
    (["export", "tiny", "-o", "{tiny}"], "pass --force", nothing),
    (["export", "{hf}", "-o", "{hf}", "--force"], "overlaps the input", nothing),
    (["export", "{hf}", "-o", "{hf}"], "overlaps the input", nothing),
    (["export", "{hf}", "-o", "{hf}/sub"], "overlaps the input", nothing),
    (["export", "{case}/p/in", "-o", "{case}/p", "--force"], "overlaps the input", our_parent_of("hf")),
    (["export", "{case}/m.gguf", "-o", "{case}", "--force"], "overlaps the input", write("m.gguf", b"GGUF")),
    # quantize
    (["quantize", "{tiny}", "-o", "{out}"], "required", nothing),
    (["quantize", "{tiny}", "-o", "{out}", "--mode", "int9"], "invalid choice", nothing),
    (["quantize", "{tiny}", "-o", "{out}", "--mode", "int4", "--block-size", "7"], "block size 7", nothing),
    (["quantize", "{tiny}", "-o", "{out}", "--mode", "int4", "--block-size", "abc"], "invalid int", nothing),
    (["quantize", "{tiny}", "-o", "{out}", "--mode", "fp16", "--accuracy-level", "4"], "int8, int4 and int4-fast only", nothing),
    (["quantize", "{case}/missing", "-o", "{out}", *Q], "no such directory", nothing),
    (["quantize", "{case}/empty", "-o", "{out}", *Q], "not an edgellama model folder", write("empty/.keep")),
    (["quantize", "{int8}", "-o", "{out}", *Q], "already quantized", nothing),
    (["quantize", "{tiny}", "-o", "{tiny}", *Q, "--force"], "is the input folder", nothing),
    (["quantize", "{case}/p/in", "-o", "{case}/p", *Q, "--force"], "overlaps the input", our_parent_of("tiny")),
    (["quantize", "{tiny}", "-o", "{tiny}/sub", *Q], "overlaps the input", nothing),
    (["quantize", "{tiny}", "-o", "{case}/f/out", *Q], "is a file", write("f")),
    (["quantize", "{tiny}", "-o", "{case}/mine", *Q, "--force"], "not an edgellama model folder", foreign_folder),
    (["quantize", "{case}/m", "-o", "{out}", *Q], "corrupted", corrupt(model_folder.DATA, "flip")),
    (["quantize", "{case}/m", "-o", "{out}", *Q], "missing", corrupt(model_folder.DATA, "delete")),
    (["quantize", "{case}/m", "-o", "{out}", *Q], "corrupted", corrupt(model_folder.MANIFEST, "{not json")),
    (["quantize", "{case}/m", "-o", "{out}", *Q], "fp16 export",
     edit_manifest(lambda d: d.update(dtype="fp16"))),
    # generate
    (["generate", "{case}/missing", "--prompt", "hi", *G], "no such directory", nothing),
    (["generate", "{toy}", "--prompt", "hi", *G], "no usable tokenizer", nothing),
    (["generate", "{tiny}", "--prompt", "", *G], "empty prompt", nothing),
    (["generate", "{tiny}", "--prompt", "", "--json", *G], "empty prompt", nothing),
    (["generate", "{tiny}", "--prompt", "caf\udce9", *G], "not valid UTF-8", nothing),
    (["generate", "{tiny}", "--prompt", "caf\udce9", "--chat", *G], "not valid UTF-8", nothing),
    (["generate", "{tiny}", "--prompt", "-", *G], "not valid UTF-8", "stdin:caf\xe9"),
    (["generate", "{tiny}", "--prompt", "hi", "--seed", "-1", "--temperature", "1", *G], "seed", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--seed", "x", *G], "invalid int", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--provider", "cpu", "--max-new-tokens", "0"], "max_new_tokens",
     nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--temperature", "-1", *G], "temperature", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--top-k", "-1", *G], "top_k", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--top-p", "0", *G], "top_p", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--threads", "0", *G], "threads", nothing),
    (["generate", "{tiny}", "--prompt", "x" * 300, *G], "context", nothing),
    (["generate", "{tiny}", "--prompt", "hi", "--provider", "tpu"], "invalid choice", nothing),
    (["generate", "{tiny}"], "--prompt", nothing),
    (["generate", "{case}/m", "--prompt", "hi", *G], "vocab_size",
     edit_manifest(lambda d: d["config"].update(vocab_size=1024))),
    (["generate", "{case}/m", "--prompt", "hi", *G], "vocab_size",
     edit_manifest(lambda d: d["config"].update(vocab_size=300))),
    (["generate", "{case}/m", "--prompt", "hi", *G], "corrupted", corrupt(model_folder.DATA, "flip")),
    (["generate", "{case}/m", "--prompt", "hi", *G], "missing", corrupt(model_folder.MODEL, "delete")),
    (["generate", "{case}/m", "--prompt", "hi", *G], "corrupted", corrupt(model_folder.MANIFEST, "[1, 2")),
    # inspect
    (["inspect"], "required", nothing),
    (["inspect", "{case}/missing"], "missing", nothing),
    (["inspect", "{case}/empty"], "not an edgellama model folder", write("empty/.keep")),
    (["inspect", "{case}/m"], "corrupted", corrupt(model_folder.MANIFEST, "{")),
    (["inspect", "{case}/m"], "corrupted", corrupt(model_folder.MODEL, "not a protobuf")),
    (["inspect", "{case}/junk.onnx"], "", write("junk.onnx", b"\x00garbage")),
    # parity
    (["parity", "{tiny}", "--decode-steps", "300", "--quiet"], "context", nothing),
    (["parity", "{tiny}", "--decode-steps", "-1", "--quiet"], "--decode-steps", nothing),
    (["parity", "{case}/m", "--quiet"], "pad_token_id must be a token id",
     edit_manifest(lambda d: d["config"].update(pad_token_id=9999))),
    (["parity", "{tiny}", "--reference", "{case}/missing", "--quiet"], "no such directory", nothing),
    (["parity", "{tiny}", "--reference", "{toy}", "--quiet"], "different model configurations", nothing),
    (["parity", "{tiny}", "--providers", "tpu", "--quiet"], "unknown provider", nothing),
    (["parity", "{tiny}", "--tolerance", "bogus", "--quiet"], "", nothing),
    (["parity", "{tiny}", "--prompts", "{case}/missing.txt", "--quiet"], "cannot read prompts", nothing),
    (["parity", "{tiny}", "--prompts", "{case}/empty.txt", "--quiet"], "has no prompts", write("empty.txt", b"\n\n")),
    (["parity", "{tiny}", "--precision", "int3", "--quiet"], "invalid choice", nothing),
    (["parity", "{case}/missing", "--quiet"], "no such directory", nothing),
    (["parity", "{tiny}", "--json", "{case}/missing/r.json"], "does not exist", nothing),
    (["parity", "{tiny}", "--markdown", "{case}/missing/r.md"], "does not exist", nothing),
    (["parity", "{tiny}", "--json", "{case}"], "is a folder", nothing),
    # bench
    (["bench", "{case}/missing", "--quiet"], "no such directory", nothing),
    (["bench", "{toy}", "--against", "llama.cpp", "--quiet"], "unknown --against", nothing),
    (["bench", "{toy}", "--new-tokens", "1", "--runs", "1", "--quiet"], "--new-tokens must be at least 2", nothing),
    (["bench", "{toy}", "--runs", "x"], "invalid int", nothing),
    (["bench", "{toy}", "--loop", "bogus"], "invalid choice", nothing),
    (["bench", "{tiny}", "--plot", "{case}/missing/b.png"], "--plot", nothing),
    (["bench", "{tiny}", "--plot", "{case}/b.notanimage"], "--plot", nothing),
]


def _ids(case):
    return "-".join([case[0][0], *(a.strip("-{}") for a in case[0][1:3])])[:60]


@pytest.mark.parametrize("argv, words, setup", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(argv, words, setup, shared, tmp_path, capsys, monkeypatch):
    case = tmp_path / "case"
    case.mkdir()
    if callable(setup):
        setup(case, shared)
    else:  # "stdin:TEXT": the prompt arrives on stdin as latin-1 bytes (invalid UTF-8)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(setup.removeprefix("stdin:").encode("latin-1"))))
    paths = {k: str(v) for k, v in shared.items()} | {"case": str(case), "out": str(case / "out")}
    argv = [a.format(**paths) if "{" in a else a for a in argv]
    before = snapshot(shared["root"], case)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_line(err)
    assert words in line, line
    assert snapshot(shared["root"], case) == before
    assert not list(shared["root"].parent.glob("**/.*partial-*")) and not list(case.glob("**/.*partial-*"))


def test_a_failed_check_is_one_line_exit_1(shared, capsys):
    """int8 checked against fp32 tolerances fails: exit 1, one `check failed` line."""
    before = snapshot(shared["root"])
    rc = main(["parity", str(shared["int8"]), "--reference", str(shared["tiny"]), "--precision", "fp32",
               "--no-localize", "--decode-steps", "1", "--quiet"])
    assert rc == 1
    one_line(capsys.readouterr().err, prefix="edgellama: check failed: ")
    assert snapshot(shared["root"]) == before


def test_the_table_covers_every_command():
    commands = {argv[0] for argv, _, _ in CASES}
    assert {"export", "quantize", "generate", "inspect", "parity", "bench"} <= commands
    assert len(CASES) >= 60


# -- filesystem faults ----------------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "model.onnx.data")


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_disk_full_is_one_line_and_keeps_the_older_folder(command, shared, tmp_path, capsys, monkeypatch):
    out = copy_tiny(tmp_path, shared, "out")          # an older good output at OUT
    before = snapshot(shared["root"], tmp_path)
    monkeypatch.setattr(model_folder, "save_model", _disk_full)
    argv = (["export", "tiny", "-o", str(out), "--force", "--quiet"] if command == "export" else
            ["quantize", str(shared["tiny"]), "-o", str(out), "--force", *Q])
    capsys.readouterr()
    with shared_trace("tiny"):     # the session's tiny trace: what fails here is the write
        rc = main(argv)
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "No space left on device" in line
    assert snapshot(shared["root"], tmp_path) == before     # older folder intact, staged folder removed


def test_export_quant_creates_missing_parents(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    with shared_trace("tiny"):     # the session's tiny trace: what is checked is the output path
        assert main(["export", "tiny", "-o", str(out), "--quant", "int8", "--quiet"]) == 0
    assert model_folder.verify_folder(out).quant_pass == "int8"


def test_force_over_the_source_keeps_the_users_checkpoint(shared, tmp_path, capsys):
    """The issue's data-loss examples, with the user's files checked byte for byte."""
    hf = Path(shutil.copytree(shared["hf"], tmp_path / "hf"))
    (hf / model_folder.MANIFEST).write_text("{}")   # even a folder that looks like ours is not replaced
    parent = tmp_path / "p"
    src = Path(shutil.copytree(shared["tiny"], parent / "in"))
    shutil.copy(src / model_folder.MANIFEST, parent / model_folder.MANIFEST)
    before = snapshot(tmp_path)
    assert main(["export", str(hf), "-o", str(hf), "--force", "--quiet"]) == 2
    assert main(["quantize", str(src), "-o", str(parent), "--mode", "int8", "--force", "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("overlaps the input" in line for line in err)
    assert snapshot(tmp_path) == before
    assert {"config.json", "model.safetensors"} <= {p.name for p in hf.iterdir()}


# -- the same refusals through the API: typed, before ONNX Runtime runs ------------------------------------
@pytest.fixture(scope="module")
def generator(shared):
    from edgellama.runtime.generator import Generator

    return Generator(shared["tiny"], provider="cpu")


def _no_run(*args, **kwargs):
    raise AssertionError("ONNX Runtime was reached")


@pytest.mark.parametrize("call", [
    lambda g: list(g.stream("")),
    lambda g: list(g.stream("caf\udce9")),
    lambda g: list(g.stream([{"role": "user", "content": "caf\udce9"}])),
    lambda g: g.generate("hi", temperature=1.0, seed=-1),
    lambda g: g.generate_ids([[]]),
])
def test_api_refuses_bad_prompts_before_onnx_runtime(call, generator, monkeypatch):
    from edgellama.errors import RuntimeInputError
    from edgellama.runtime import kv_loop

    monkeypatch.setattr(kv_loop, "make_loop", _no_run)
    with pytest.raises(RuntimeInputError):
        call(generator)


def test_onnx_runtime_errors_come_out_typed(shared, generator, monkeypatch):
    import numpy as np
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from edgellama.errors import RuntimeInputError
    from edgellama.runtime import kv_loop
    from edgellama.runtime.session import OrtModel

    toy = OrtModel(shared["toy"], provider="cpu")
    past = [np.zeros((1, 1, 1, 3), np.float32)] * len(toy.past_names)    # the wrong head size
    with pytest.raises(RuntimeInputError, match="ONNX Runtime failed"):
        toy.forward(np.array([[1]]), np.ones((1, 2), np.int64), np.array([[1]]), past)

    def failing_loop(*args, **kwargs):
        class Loop:
            def step(self, *a):
                raise Fail("[ONNXRuntimeError] : 1 : FAIL : a kernel failed")
        return Loop()

    monkeypatch.setattr(kv_loop, "make_loop", failing_loop)
    with pytest.raises(RuntimeInputError, match="a kernel failed"):
        generator.generate("hi", max_new_tokens=2)

    def iobinding_failure(*args, **kwargs):   # ORT's Python layer raises a plain RuntimeError here
        class Loop:
            def step(self, *a):
                toy.session.run_with_iobinding(toy.session.io_binding())
        return Loop()

    monkeypatch.setattr(kv_loop, "make_loop", iobinding_failure)
    with pytest.raises(RuntimeInputError, match="Error in execution"):
        generator.generate("hi", max_new_tokens=2)


@pytest.mark.parametrize("vocab", [1024, 300])
def test_a_manifest_vocab_that_disagrees_with_the_weights_is_refused(vocab, shared, tmp_path):
    from edgellama.errors import ModelFolderError
    from edgellama.runtime.session import OrtModel

    edit_manifest(lambda d: d["config"].update(vocab_size=vocab))(tmp_path, shared)
    with pytest.raises(ModelFolderError, match="vocab_size"):
        OrtModel(tmp_path / "m", provider="cpu")
