"""`edgellama parity` end to end on the tiny model: pass, fail with localization, precision, errors."""

import json
import shutil

import numpy as np
import pytest

from edgellama.cli.main import main
from tests.conftest import shared_export

STEPS = "3"


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny", dtype="fp16")


def _parity(*args, tmp_path=None):
    """Run the CLI; return (exit code, JSON report or None)."""
    report = None if tmp_path is None else tmp_path / "report.json"
    argv = ["parity", *map(str, args), "--decode-steps", STEPS, "--quiet"]
    if report is not None:
        argv += ["--json", str(report)]
    rc = main(argv)
    return rc, (json.loads(report.read_text()) if report is not None and report.exists() else None)


def perturb(src, dst, *, layer: int, block: str, scale: float = 0.5):
    """Copy a model folder, add `scale` to one element of layer `layer`'s `block` weight
    (the initializer feeding that module's MatMul), and rewrite the manifest's hashes."""
    import onnx

    from edgellama import folder as model_folder

    shutil.copytree(src, dst)
    proto = onnx.load(dst / model_folder.MODEL, load_external_data=False)
    module = {"o_proj": "self_attn.o_proj", "mlp": "mlp.down_proj", "q_proj": "self_attn.q_proj"}[block]
    node = next(n for n in proto.graph.node if n.name.startswith(f"model.layers.{layer}.{module}/"))
    init = next(t for t in proto.graph.initializer if t.name in node.input)
    users = [n for n in proto.graph.node if init.name in n.input]
    assert len(users) == 1, "the perturbed weight must belong to this block only"
    info = {e.key: e.value for e in init.external_data}
    assert init.data_type == onnx.TensorProto.FLOAT
    offset = int(info.get("offset", 0))
    with open(dst / info["location"], "r+b") as f:
        f.seek(offset + 4 * 7)          # element 7: any element will do, as long as it changes the output
        value = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(offset + 4 * 7)
        f.write(np.float32(value + scale).tobytes())
    model_folder.write_manifest(dst, model_folder.read_manifest(dst))
    return dst


def test_export_passes_against_torch(tiny_fp32, tmp_path):
    rc, report = _parity(tiny_fp32, "--reference", "torch", tmp_path=tmp_path)
    assert rc == 0, report
    c = report["comparisons"][0]
    assert report["schema"] == "edgellama.parity" and report["schema_version"] == 1
    assert report["precision"] == "fp32" and c["status"] == "pass"
    assert c["logits"]["all"]["top1"] == 1.0 and c["greedy"]["first_divergence"] is None
    assert c["localization"] is None
    # every batch ran: each prompt alone and the left-padded batch
    assert len(c["batches"]) == len(report["prompts"]) + 1


def test_identical_folders_are_bit_equal(tiny_fp32, tmp_path):
    rc, report = _parity(tiny_fp32, "--reference", tiny_fp32, tmp_path=tmp_path)
    assert rc == 0
    c = report["comparisons"][0]
    assert c["logits"]["all"]["max_abs"] == 0.0 and c["present_kv"]["max_abs"] == 0.0


@pytest.mark.parametrize("layer, block", [(1, "o_proj"), (0, "mlp")])
def test_perturbed_weight_fails_and_is_localized(tiny_fp32, tmp_path, layer, block):
    bad = perturb(tiny_fp32, tmp_path / "bad", layer=layer, block=block)
    rc, report = _parity(bad, "--reference", tiny_fp32, tmp_path=tmp_path)
    assert rc == 1
    first = report["comparisons"][0]["localization"]["first_failing"]
    assert (first["layer"], first["block"]) == (layer, block)
    # every earlier block was compared and matched
    blocks = report["comparisons"][0]["localization"]["blocks"]
    earlier = blocks[:blocks.index(next(b for b in blocks if b["key"] == first["key"]))]
    assert earlier and all(b["pass"] for b in earlier if b["compared"])


def test_perturbed_weight_against_torch_names_layer_and_op(tiny_fp32, tmp_path, capsys):
    bad = perturb(tiny_fp32, tmp_path / "bad", layer=1, block="o_proj")
    rc = main(["parity", str(bad), "--decode-steps", STEPS])
    out = capsys.readouterr().out
    assert rc == 1
    assert "layer 1 o_proj (MatMul)" in out and "model.layers.1.self_attn.o_proj/" in out


def test_fp16_export_needs_fp16_tolerances(tiny_fp16, tmp_path):
    rc, report = _parity(tiny_fp16, tmp_path=tmp_path)
    assert rc == 0, json.dumps(report["comparisons"][0]["checks"], indent=1)
    assert report["precision"] == "fp16"
    assert report["comparisons"][0]["logits"]["all"]["max_abs"] > 0    # fp16 really differs
    rc, report = _parity(tiny_fp16, "--precision", "fp32", "--no-localize", tmp_path=tmp_path)
    assert rc == 1 and report["precision"] == "fp32"
    # and an explicit override loosens one key without changing the rest
    rc, report = _parity(tiny_fp16, "--tolerance", "kl_mean=1e-12", tmp_path=tmp_path)
    assert rc == 1 and report["tolerances"]["kl_mean"] == 1e-12


def test_markdown_summary(tiny_fp32, tmp_path):
    md = tmp_path / "summary.md"
    rc = main(["parity", str(tiny_fp32), "--reference", str(tiny_fp32), "--decode-steps", "1", "--quiet",
               "--markdown", str(md)])
    assert rc == 0
    text = md.read_text()
    assert "edgellama parity: pass" in text and "| logits prefill |" in text


def test_prompts_file(tiny_fp32, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nA longer second prompt for padding\n")
    rc, report = _parity(tiny_fp32, "--reference", tiny_fp32, "--prompts", prompts, tmp_path=tmp_path)
    assert rc == 0 and report["prompts"] == ["hello there", "A longer second prompt for padding"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_missing_or_corrupted_model_is_one_line_exit_2(tiny_fp32, tmp_path, capsys, damage):
    folder = tmp_path / "m"
    if damage != "missing":
        shutil.copytree(tiny_fp32, folder)
        data = folder / "model.onnx.data"
        if damage == "truncated":
            data.write_bytes(data.read_bytes()[:100])
        else:
            (folder / "model.onnx").write_bytes(b"not a model")
    rc = main(["parity", str(folder), "--decode-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("edgellama: error: ") and str(folder) in err[0]


def test_bad_arguments_exit_2(tiny_fp32, capsys):
    assert main(["parity", str(tiny_fp32), "--tolerance", "nonsense=1"]) == 2
    assert main(["parity", str(tiny_fp32), "--providers", "tpu"]) == 2
    assert main(["parity", str(tiny_fp32), "--prompts", "/nonexistent/prompts.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("edgellama: error: ") for line in err)


def test_assert_parity_one_liner(tiny_fp32, tmp_path):
    from edgellama.testing import assert_parity

    report = assert_parity(tiny_fp32, reference="torch", decode_steps=2)
    assert report["status"] == "pass"
    bad = perturb(tiny_fp32, tmp_path / "bad", layer=0, block="o_proj")
    with pytest.raises(AssertionError, match="layer 0 o_proj"):
        assert_parity(bad, reference=tiny_fp32, decode_steps=2)


@pytest.mark.parametrize("flag, name", [("--json", "nowhere/report.json"), ("--markdown", "nowhere/summary.md"),
                                        ("--json", "")])
def test_report_path_refused_before_the_check_runs(tiny_fp32, tmp_path, capsys, flag, name):
    """A report the check could not write is refused up front: no progress line (nothing ran), one
    error line, exit 2 (a finished check failing to write read as a parity failure in CI)."""
    path = tmp_path / name if name else tmp_path     # a missing folder, or a folder where a file goes
    rc = main(["parity", str(tiny_fp32), "--decode-steps", STEPS, flag, str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("edgellama: error: ") and flag in err[0], err
    assert not (tmp_path / "nowhere").exists()
