"""The CLI's contract: help and version, and user errors as one line with exit 2, no traceback."""

import subprocess
import sys

import pytest

import edgellama
from edgellama.cli.main import main


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "edgellama.cli.main", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and edgellama.__version__ in capsys.readouterr().out
    rc, out, _ = run_cli("--help")
    assert rc == 0 and "export" in out and "inspect" in out


@pytest.mark.parametrize("argv, words", [
    (["frobnicate"], "invalid choice"),
    (["export"], "required"),
    (["export", "no-such-model", "-o", "OUTDIR"], "no-such-model"),
    (["inspect", "no/such/folder"], "no/such/folder"),
    (["export", "tiny", "-o", "OUTDIR", "--exclude", "lm_head"], "need --quant"),
    (["export", "tiny", "-o", "OUTDIR", "--quant", "fp16", "--accuracy-level", "4"], "int8 and int4 only"),
    (["export", "tiny", "-o", "OUTDIR", "--quant", "int4", "--block-size", "24"], "block size 24"),
])
def test_user_errors_are_one_line_exit_2(argv, words, tmp_path):
    argv = [str(tmp_path / "o") if a == "OUTDIR" else a for a in argv]
    rc, out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgellama: error: ") and words in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path):
    rc, _, err = run_cli("--debug", "inspect", str(tmp_path / "missing"))
    assert rc == 2 and "Traceback" in err and "edgellama: error:" in err
