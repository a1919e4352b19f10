"""The CLI's contract: help and version, and user errors as one line with exit 2, no traceback."""

import argparse
import re
import subprocess
import sys

import pytest

import edgellama
from edgellama.cli.main import SUBCOMMANDS, build_parser, main


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
    (["export", "tiny", "-o", "OUTDIR", "--quant", "fp16", "--accuracy-level", "4"], "int8, int4 and int4-fast only"),
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


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(tmp_path, where):
    argv = ["inspect", str(tmp_path / "missing")]
    rc, _, err = run_cli(*(["--debug", *argv] if where == "before" else [*argv, "--debug"]))
    assert rc == 2 and "Traceback" in err and "edgellama: error:" in err


def test_bare_command_prints_usage_and_exits_2():
    rc, out, err = run_cli()
    assert rc == 2 and out == ""
    assert err.startswith("usage: edgellama") and all(name in err for name in SUBCOMMANDS)


def _option_help(help_text: str, option: str) -> str:
    """The help block of `option` in argparse's `--help` output (its line and the indented lines under it)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {re.escape(option)}\b", line))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 6):
            break
        block.append(line)
    return " ".join(x.strip() for x in block)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_every_default(command):
    """Every option that takes a value and is not required says its default; the docstring's layout
    (its indented lines) survives the formatter."""
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    text = sub.format_help()
    options = [a for a in sub._actions if a.option_strings and a.nargs != 0 and not a.required]
    assert options or command == "inspect"
    for action in options:
        block = _option_help(text, action.option_strings[0])
        assert "default" in block, block
        if "default" not in (action.help or ""):   # not stated by hand: the formatter wrote it
            shown = "none" if action.default in (None, "", []) else str(action.default)
            assert f"(default: {shown})" in block, block
    doc = sys.modules[f"edgellama.cli.{command}"].__doc__
    indented = [line for line in doc.splitlines() if line.startswith("  ") and line.strip()]
    assert all(line in text for line in indented)


def test_export_of_a_source_without_a_tokenizer_warns_in_one_line(tmp_path):
    import shutil
    import subprocess
    import sys

    from edgellama.export.sources import save_hf_folder

    hf = save_hf_folder("tiny", tmp_path / "hf")
    bare = shutil.copytree(hf, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    r = subprocess.run([sys.executable, "-m", "edgellama.cli.main", "export", str(bare), "-o", str(tmp_path / "out"),
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellama: warning: ") and "tokenizer" in lines[0], r.stderr
    assert not (tmp_path / "out" / "tokenizer.json").exists()
