"""`edgellama generate` and `edgellama bench`: streaming, --json, and user errors as one line, exit 2."""

from __future__ import annotations

import io
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


def run_main(capsys, monkeypatch, *args, stdin=None):
    """`main(args)` in this process, stdin given as bytes: what the smollm2 tests check is the command's
    output, not the process (a subprocess paid an interpreter and the imports again for every run)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


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
    from tests.conftest import shared_export

    return shared_export(tmp_path_factory, "smollm2", target="ort")


@pytest.mark.slow
def test_generate_streams_and_json_agrees(smollm2, capsys, monkeypatch):
    rc, out, err = run_main(capsys, monkeypatch, "generate", smollm2, "--prompt", "What is the capital of France?",
                            "--chat", "--provider", "cpu", "--max-new-tokens", "24")
    assert rc == 0, err
    assert "Paris" in out
    rc, js, err = run_main(capsys, monkeypatch, "generate", smollm2, "--prompt", "-", "--chat", "--provider", "cpu",
                           "--max-new-tokens", "24", "--json", stdin="What is the capital of France?")
    d = json.loads(js)
    assert rc == 0 and {"text", "token_ids", "prefill_ms", "decode_tokens_per_s"} <= set(d)
    assert d["text"].strip() == out.strip() and d["provider"] == "cpu"
    assert d["prefill_ms"] > 0 and d["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_sampling_is_seeded(smollm2, capsys, monkeypatch):
    args = ("generate", smollm2, "--prompt", "Once upon a time", "--provider", "cpu", "--max-new-tokens", "16",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--json")
    a = json.loads(run_main(capsys, monkeypatch, *args, "--seed", "7")[1])
    b = json.loads(run_main(capsys, monkeypatch, *args, "--seed", "7")[1])
    assert a["token_ids"] == b["token_ids"] and a["seed"] == 7


# -- issue 14 flags ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import shared_export

    return shared_export(tmp_path_factory, "tiny", target="ort")


def test_json_has_the_schema_and_the_new_fields(tiny, capsys):
    from edgellama.runtime import Generator

    rc = main(["generate", str(tiny), "--prompt-ids", "5, 6,7", "--provider", "cpu", "--max-new-tokens", "6",
               "--no-eos", "--logprobs", "2", "--repetition-penalty", "1.3", "--json"])
    d = json.loads(capsys.readouterr().out)
    ref = Generator(tiny, provider="cpu").generate_ids([5, 6, 7], max_new_tokens=6, eos=False, repetition_penalty=1.3,
                                                       logprobs=2)[0]
    assert rc == 0 and d["schema"] == "edgellama.generate" and d["version"] >= 1
    assert d["token_ids"] == ref.token_ids and d["finish_reason"] == "length" and d["capped"] == 0
    assert [lp["token_id"] for lp in d["logprobs"]] == ref.token_ids and len(d["logprobs"][0]["top"]) == 2


def test_stop_strings_from_the_command_line(tiny, capsys):
    from edgellama.runtime import Generator

    gen = Generator(tiny, provider="cpu")
    free = gen.generate("hi", max_new_tokens=40, eos=False)
    stop = next(free.text[i:i + 2] for i in range(len(free.text) - 1) if free.text[i:i + 2].strip())
    rc = main(["generate", str(tiny), "--prompt", "hi", "--provider", "cpu", "--max-new-tokens", "40", "--no-eos",
               "--stop", "never", "--stop", stop])
    out = capsys.readouterr().out
    assert rc == 0 and out == free.text[:free.text.index(stop)] + "\n"


def test_speculative_from_the_command_line_gives_the_same_tokens(tiny, capsys):
    # A prompt that repeats itself, so prompt lookup has drafts to verify.
    argv = ["generate", str(tiny), "--prompt-ids", ",".join(["5,6,7,8"] * 6), "--provider", "cpu",
            "--max-new-tokens", "24", "--no-eos", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--speculative", "prompt-lookup"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and len(spec["token_ids"]) == 24
    rc = main(["generate", str(tiny), "--prompt", "hi", "--provider", "cpu", "--speculative", "no-such-drafter"])
    one_line_error(rc, capsys.readouterr().err, "no-such-drafter is not a model folder")


def test_prompt_ids_without_a_tokenizer_print_ids(tmp_path, capsys):
    from edgellama.runtime import Generator

    toy = build_toy(tmp_path / "toy", seed=4)
    rc = main(["generate", str(toy), "--prompt-ids", "5,7,9", "--provider", "cpu", "--max-new-tokens", "4", "--no-eos"])
    ids = Generator(toy, provider="cpu").generate_ids([5, 7, 9], max_new_tokens=4, eos=False)[0].token_ids
    assert rc == 0 and capsys.readouterr().out.strip() == ",".join(map(str, ids))


@pytest.mark.parametrize("extra,words", [(["--stop", ""], "stop string cannot be empty"),
                                         (["--regex", "[a-"], "invalid regex"),
                                         (["--json-schema", "MISSING"], "not a readable JSON schema"),
                                         (["--prompt-ids", "1,x"], "comma-separated token ids"),
                                         (["--logprobs", "-1"], "logprobs"),
                                         (["--repetition-penalty", "0"], "repetition_penalty")])
def test_bad_generation_flags_are_one_line(tiny, tmp_path, capsys, extra, words):
    extra = [str(tmp_path / "missing.json") if a == "MISSING" else a for a in extra]
    argv = ["generate", str(tiny), "--provider", "cpu", "--max-new-tokens", "2", *extra]
    if "--prompt-ids" not in extra:
        argv += ["--prompt", "hi"]
    one_line_error(main(argv), capsys.readouterr().err, words)


def test_json_schema_constrains_the_output(tiny, tmp_path, capsys):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "w": {"enum": ["yes", "no"]}},
              "required": ["ok", "w"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    rc = main(["generate", str(tiny), "--prompt", "hi", "--provider", "cpu", "--max-new-tokens", "40",
               "--json-schema", str(path), "--temperature", "1.0", "--seed", "3", "--json"])
    d = json.loads(capsys.readouterr().out)
    jsonschema = pytest.importorskip("jsonschema")
    assert rc == 0 and d["finish_reason"] == "stop"
    jsonschema.validate(json.loads(d["text"]), schema)
