"""`--json` on every command: exactly one JSON object on stdout with the `edgellama.<command>` schema
and its version, progress on stderr only, and fields that say what was done.

One tiny export (through a real `edgellama` process, so stdout is the process's own) and its
int8 quantization are shared by the module.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from edgellama import folder as model_folder
from edgellama.cli.main import main


def strict_json(text: str) -> dict:
    """The one JSON object `text` holds: one line, no NaN/Infinity (strict parsers refuse them)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    obj = json.loads(lines[0], parse_constant=refuse)
    assert isinstance(obj, dict)
    return obj


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama.cli.main", *args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("json") / "tiny"
    p = cli("export", "tiny", "-o", str(out), "--json")
    assert p.returncode == 0, p.stderr
    return out, strict_json(p.stdout), p.stderr


@pytest.fixture(scope="module")
def quantized(exported) -> tuple[Path, dict]:
    import contextlib
    import io

    src = exported[0]
    out = src.parent / "int8"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["quantize", str(src), "-o", str(out), "--mode", "int8", "--json", "--quiet"]) == 0
    return out, strict_json(buf.getvalue())


def check_folder_payload(obj: dict, folder: Path) -> None:
    assert obj["folder"] == str(folder.absolute())
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert obj["files"] == on_disk and obj["bytes"] == sum(on_disk.values())
    assert obj["manifest"] == model_folder.read_manifest(folder).to_dict()
    assert obj["steps"] and all(s["seconds"] >= 0 for s in obj["steps"])
    assert obj["seconds"] >= sum(s["seconds"] for s in obj["steps"]) * 0.99


def test_export_json(exported):
    folder, obj, err = exported
    assert (obj["schema"], obj["version"]) == ("edgellama.export", 1)
    check_folder_payload(obj, folder)
    assert [s["step"] for s in obj["steps"]] == ["load source", "export to ONNX (portable)", "write model folder"]
    assert obj["manifest"]["target"] == "portable" and obj["manifest"]["dtype"] == "fp32"
    # progress went to stderr, each step's start and end
    assert "[edgellama] load source ..." in err and "[edgellama] write model folder: done" in err


def test_quantize_json(quantized, exported):
    folder, obj = quantized
    assert (obj["schema"], obj["version"]) == ("edgellama.quantize", 1)
    check_folder_payload(obj, folder)
    assert obj["mode"] == "int8" and obj["input"] == str(exported[0].absolute())
    assert obj["manifest"]["quantization"] and "quantize (int8)" in [s["step"] for s in obj["steps"]]


def test_inspect_json(exported, capsys):
    folder = exported[0]
    assert main(["inspect", str(folder), "--json"]) == 0
    obj = strict_json(capsys.readouterr().out)
    assert (obj["schema"], obj["version"]) == ("edgellama.inspect", 1)
    assert obj["path"] == str(folder) and obj["manifest"] == model_folder.read_manifest(folder).to_dict()
    assert obj["ops"]["edgellama"]["GroupQueryAttention"] == obj["manifest"]["config"]["num_hidden_layers"]


def test_bench_json(exported, capsys):
    folder = exported[0]
    assert main(["bench", str(folder), "--runs", "1", "--new-tokens", "3", "--prompt-tokens", "4", "--json"]) == 0
    captured = capsys.readouterr()
    obj = strict_json(captured.out)
    assert (obj["schema"], obj["version"]) == ("edgellama.bench", 1)
    assert (obj["prompt_tokens"], obj["new_tokens"], obj["runs"], obj["plot"]) == (4, 3, 1, None)
    (row,) = obj["rows"]
    assert row["runs"] == 1 and len(row["tokens"]) == 3 and row["decode_tokens_per_s"] > 0
    assert row["weight_bytes"] == obj["rows"][0]["weight_bytes"] == model_folder.read_manifest(folder).weight_bytes
    # progress on stderr: the benchmark step counted its runs (one warm-up + one timed)
    assert "[edgellama] benchmark 1 runner(s): done" in captured.err


def test_bench_plot_in_json(exported, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert main(["bench", str(exported[0]), "--runs", "1", "--new-tokens", "2", "--prompt-tokens", "2", "--json",
                 "--quiet", "--plot", str(png)]) == 0
    obj = strict_json(capsys.readouterr().out)
    assert obj["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_json_to_stdout(exported, capsys, tmp_path):
    folder = exported[0]
    report = tmp_path / "report.json"
    argv = ["parity", str(folder), "--reference", str(folder), "--decode-steps", "1"]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    obj = strict_json(captured.out)      # the report only: no table on stdout
    assert (obj["schema"], obj["version"], obj["schema_version"]) == ("edgellama.parity", 1, 1)
    assert obj["status"] == "pass" and obj["comparisons"][0]["logits"]["all"]["max_abs"] == 0.0
    assert not Path("-").exists()
    assert "[edgellama] comparing" in captured.err   # progress still on stderr
    # --json FILE writes the same object (timings aside)
    assert main([*argv, "--json", str(report), "--quiet"]) == 0
    written = json.loads(report.read_text())
    assert {k for k in written} == {k for k in obj} and written["schema"] == obj["schema"]
    assert written["version"] == obj["version"] and written["comparisons"][0]["checks"] == obj["comparisons"][0]["checks"]


def test_parity_json_to_stdout_when_it_fails(exported, quantized, capsys):
    rc = main(["parity", str(quantized[0]), "--reference", str(exported[0]), "--precision", "fp32", "--no-localize",
               "--decode-steps", "1", "--quiet", "--json", "-"])
    captured = capsys.readouterr()
    assert rc == 1
    obj = strict_json(captured.out)
    assert obj["schema"] == "edgellama.parity" and obj["status"] == "fail"
    assert captured.err.strip().startswith("edgellama: check failed: ")


def test_print_json_writes_non_finite_numbers_as_strings():
    import io

    from edgellama.cli.output import print_json

    buf = io.StringIO()
    print_json("probe", {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "schema": "spoofed"}, stream=buf)
    obj = strict_json(buf.getvalue())
    assert obj == {"schema": "edgellama.probe", "version": 1, "a": "nan", "b": ["inf", "-inf", 1.5]}
    assert list(obj)[:2] == ["schema", "version"]


def test_terminal_gets_a_live_bar_and_stdout_stays_json(exported, tmp_path):
    """stderr on a pseudo-terminal: the progress is a redrawn line (carriage returns, elapsed time),
    still ending each step with its `done` line; stdout (a pipe) holds only the JSON object."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgellama.cli.main", "quantize", str(exported[0]), "-o",
                                 str(tmp_path / "q"), "--mode", "int8", "--json"],
                                stdout=subprocess.PIPE, stderr=slave, text=True, env={**os.environ, "TERM": "xterm"})
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:   # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read()
        assert proc.wait(timeout=600) == 0
    finally:
        os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert "\r" in err and "elapsed" in err, err
    assert "[edgellama] quantize (int8): done" in err
    assert strict_json(out)["schema"] == "edgellama.quantize"
