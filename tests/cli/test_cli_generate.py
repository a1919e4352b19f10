"""`edgellama generate` and `edgellama bench`: streaming, --json, and user errors as one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgellama.cli.main import main

from tests.conftest import build_toy


def run_cli(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", "edgellama.cli.main", *map(str, args)], capture_output=True,
                       text=True, timeout=600, input=stdin)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, words):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines and lines[-1].startswith("edgellama: error: ") and words in lines[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,words", [
    (["generate", "MISSING", "--prompt", "hi"], "no such directory"),
    (["generate", "TOY", "--prompt", "hi", "--provider", "cpu"], "no usable tokenizer"),
    (["generate", "TOY", "--prompt", "hi", "--provider", "cpu", "--top-p", "0"], "top_p"),
    (["generate", "TOY", "--prompt", "hi", "--provider", "tpu"], "invalid choice"),
    (["generate", "TOY"], "--prompt"),
    (["bench", "TOY", "--against", "llama.cpp"], "unknown --against llama.cpp"),
    (["bench", "TOY", "--new-tokens", "1", "--runs", "1", "--quiet"], "--new-tokens must be at least 2"),
])
def test_user_errors(argv, words, tmp_path, capsys):
    toy = build_toy(tmp_path / "toy")
    argv = [str(toy) if a == "TOY" else str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    rc = main(argv)
    one_line_error(rc, capsys.readouterr().err, words)


def test_cuda_unavailable_is_one_line(tmp_path):
    from edgellama.runtime.session import cuda_status

    if cuda_status()[0]:
        pytest.skip("CUDA works here")
    rc, _, err = run_cli("generate", build_toy(tmp_path / "toy"), "--prompt", "hi", "--provider", "cuda")
    one_line_error(rc, err, "CUDA is not available")


def test_bench_runs_our_generator_on_the_toy(tmp_path, capsys):
    toy = build_toy(tmp_path / "toy")
    rc = main(["bench", str(toy), "--provider", "cpu", "--prompt-tokens", "4", "--new-tokens", "5", "--runs", "2",
               "--loop", "all", "--quiet", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["rows"]) == 3 and out["bandwidth_bytes_per_s"] > 0
    assert {r["name"].split(", ")[-1].rstrip(")") for r in out["rows"]} == {"numpy", "ortvalue", "iobinding"}
    assert all(len(r["tokens"]) == 5 for r in out["rows"])


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from edgellama.export.onnx_export import export_model

    return export_model("smollm2", tmp_path_factory.mktemp("cli") / "smollm2", target="ort", force=True)


@pytest.mark.slow
def test_generate_streams_and_json_agrees(smollm2):
    rc, out, err = run_cli("generate", smollm2, "--prompt", "What is the capital of France?", "--chat",
                           "--provider", "cpu", "--max-new-tokens", "24")
    assert rc == 0, err
    assert "Paris" in out
    rc, js, err = run_cli("generate", smollm2, "--prompt", "-", "--chat", "--provider", "cpu",
                          "--max-new-tokens", "24", "--json", stdin="What is the capital of France?")
    d = json.loads(js)
    assert rc == 0 and {"text", "token_ids", "prefill_ms", "decode_tokens_per_s"} <= set(d)
    assert d["text"].strip() == out.strip() and d["provider"] == "cpu"
    assert d["prefill_ms"] > 0 and d["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_sampling_is_seeded(smollm2):
    args = ("generate", smollm2, "--prompt", "Once upon a time", "--provider", "cpu", "--max-new-tokens", "16",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--json")
    a = json.loads(run_cli(*args, "--seed", "7")[1])
    b = json.loads(run_cli(*args, "--seed", "7")[1])
    assert a["token_ids"] == b["token_ids"] and a["seed"] == 7
