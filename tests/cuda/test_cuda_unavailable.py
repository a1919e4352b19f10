"""CUDA asked for where there is none (issue 12, bad input), on every CLI command that takes a provider.

`--provider cuda` / `--providers cuda` exits 2 with one `edgellama: error:` line naming why; `auto`
falls back to the CPU with one notice line (when the onnxruntime build has a CUDA provider that
cannot start) and still does its work. Not marked `cuda`: these run on CPU-only machines. The
forced variants stub `cuda_status` so that they assert the same on any machine, a GPU one too.
"""

from __future__ import annotations

import json

import pytest

from edgellama.cli.main import main as cli
from edgellama.runtime import session as S

NOTICE = "edgellama: running on CPU"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("nocuda") / "tiny"
    assert cli(["export", "tiny", "-o", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def no_cuda(monkeypatch):
    """This process sees an onnxruntime build with a CUDA provider that cannot start."""
    import onnxruntime

    monkeypatch.setattr(S, "cuda_status", lambda: (False, "no GPU in this test"))
    real = onnxruntime.get_available_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: list(dict.fromkeys(["CUDAExecutionProvider", *real()])))


def error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgellama: error: "), err
    assert "Traceback" not in err
    return lines[0]


def cuda_argv(command: str, model: str) -> list[str]:
    return {"generate": ["generate", model, "--prompt", "hi", "--provider", "cuda", "--max-new-tokens", "2"],
            "bench": ["bench", model, "--provider", "cuda", "--prompt-tokens", "4", "--new-tokens", "3",
                      "--runs", "1", "--quiet"],
            "parity": ["parity", model, "--providers", "cuda", "--decode-steps", "1", "--quiet"],
            "parity-reference": ["parity", model, "--reference", model, "--reference-provider", "cuda",
                                 "--decode-steps", "1", "--quiet"]}[command]


@pytest.mark.parametrize("command", ["generate", "bench", "parity", "parity-reference"])
def test_cuda_where_there_is_none_is_one_line_exit_2(tiny, capsys, command):
    ok, _ = S.cuda_status()
    if ok:
        pytest.skip("CUDA works here (the forced variant below still runs)")
    line = error_line(capsys, cli(cuda_argv(command, str(tiny))))
    assert "CUDA is not available" in line, line


@pytest.mark.parametrize("command", ["generate", "bench", "parity", "parity-reference"])
def test_cuda_where_there_is_none_forced(tiny, capsys, no_cuda, command):
    line = error_line(capsys, cli(cuda_argv(command, str(tiny))))
    assert "CUDA is not available: no GPU in this test" in line, line


def _notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(NOTICE)]


def test_generate_auto_falls_back_with_one_notice(tiny, capsys, no_cuda):
    rc = cli(["generate", str(tiny), "--prompt", "hi", "--provider", "auto", "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    notices = _notices(err)
    assert len(notices) == 1 and "CUDA is not available (no GPU in this test)" in notices[0], err
    assert json.loads(out)["provider"] == "cpu"


def test_bench_auto_falls_back_with_one_notice(tiny, capsys, no_cuda):
    rc = cli(["bench", str(tiny), "--provider", "auto", "--prompt-tokens", "4", "--new-tokens", "3", "--runs", "1",
              "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(_notices(err)) == 1, err
    assert json.loads(out)["provider"] == "cpu"


def test_auto_on_this_machine(tiny, capsys):
    """Unstubbed: where CUDA cannot start, `auto` runs on the CPU with at most one notice line."""
    import onnxruntime

    ok, _ = S.cuda_status()
    rc = cli(["generate", str(tiny), "--prompt", "hi", "--provider", "auto", "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["provider"] == ("cuda" if ok else "cpu")
    expected = 1 if (not ok and "CUDAExecutionProvider" in onnxruntime.get_available_providers()) else 0
    assert len(_notices(err)) == expected, err
