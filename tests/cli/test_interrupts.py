"""Ctrl-C and SIGTERM end a command the same way wherever they land: `edgellama: interrupted` on
stderr, exit 130 (SIGINT) or 143 (SIGTERM), no traceback, an older folder at OUT left byte for byte
as it was and no new folder that looks complete (no `.partial-` or `.old-` leftovers beside it).

The moments are found from the progress lines on stderr, so a slow or loaded machine shifts them
less than fixed sleeps would: before any progress (1 s after `main` installed its signal handlers:
importing torch or onnx_ir), inside
torch's export tracing, during `quantize` (where ONNX Runtime is first imported), and at the final
write. A signal within the interpreter's own startup, before `main` runs (a fraction of a second),
gets Python's default handling; nothing has been written by then.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellama import folder as model_folder
from edgellama.cli import main as cli_main
from edgellama.errors import ProviderError

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    """The older good folder each moment starts from (copied) and quantizes (read only): the
    session's shared tiny export."""
    from tests.conftest import shared_export

    return shared_export(tmp_path_factory, "tiny")


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_and_signal(argv: list[str], *, sig: int, line: str | None, delay: float) -> tuple[int, str]:
    """Start the CLI, wait for the progress line starting with `line` (None: don't wait), then
    `delay` seconds, send `sig`; (exit status, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "edgellama.cli.main", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen = []
    if line is None:
        _wait_for_handlers(p.pid)
    else:
        for text in p.stderr:
            seen.append(text)
            if text.startswith(f"[edgellama] {line}"):
                break
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    return p.returncode, "".join(seen) + err


def _wait_for_handlers(pid: int, *, timeout: float = 120.0) -> None:
    """Until the process catches SIGTERM: `main` has installed its handlers (Python itself catches only
    SIGINT at startup). A fixed sleep from the start is not enough on a loaded machine, where the
    interpreter's start alone can take longer, and a signal then gets Python's default handling."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():   # not Linux: the fixed delay alone
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            caught = next(int(x.split()[1], 16) for x in status.read_text().splitlines() if x.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return   # the process has ended
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.01)


def check_interrupted(rc: int, err: str, *, sig: int, out: Path, before: dict[str, str], may_finish: bool) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    assert "Traceback" not in err, err
    if rc == 0 and may_finish:   # the signal came after the command had finished: a whole new folder
        model_folder.verify_folder(out)
        return
    others = [x for x in err.strip().splitlines() if x and not x.startswith("[edgellama] ")]
    assert rc == EXIT[sig] and others == ["edgellama: interrupted"], (rc, err)
    assert files(out) == before


# (command, signal, progress line to wait for, extra delay)
MOMENTS = [
    ("export", signal.SIGINT, None, 1.0),
    ("export", signal.SIGTERM, "export to ONNX", 1.0),
    ("quantize", signal.SIGINT, "quantize (", 0.0),
    ("quantize", signal.SIGTERM, "load model", 0.2),
]
SLOW_MOMENTS = [
    ("export", signal.SIGTERM, None, 1.0),
    ("export", signal.SIGINT, "load source", 0.0),
    ("export", signal.SIGINT, "export to ONNX", 1.0),
    ("export", signal.SIGINT, "export to ONNX", 4.0),
    ("export", signal.SIGTERM, "write model folder", 0.0),
    ("export", signal.SIGINT, "write model folder", 0.0),
    ("quantize", signal.SIGINT, None, 1.0),
    ("quantize", signal.SIGTERM, "quantize (", 0.0),
    ("quantize", signal.SIGINT, "quantize (", 0.05),
    ("quantize", signal.SIGINT, "write model folder", 0.0),
    ("quantize", signal.SIGTERM, "write model folder", 0.0),
]


def _interrupt_all(moments, fp32: Path, tmp_path: Path) -> None:
    """Run every moment at once (they are independent processes) and check each."""
    jobs = []
    for i, (command, sig, line, delay) in enumerate(moments):
        out = Path(shutil.copytree(fp32, tmp_path / f"run{i}" / "out"))   # the older good folder
        argv = (["export", "tiny", "-o", str(out), "--force"] if command == "export" else
                ["quantize", str(fp32), "-o", str(out), "--mode", "int8", "--force"])
        jobs.append((out, files(out), sig, line, delay, argv))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: run_and_signal(j[5], sig=j[2], line=j[3], delay=j[4]), jobs))
    for (out, before, sig, line, _, _), (rc, err) in zip(jobs, results):
        check_interrupted(rc, err, sig=sig, out=out, before=before, may_finish=line == "write model folder")


def test_interrupts_leave_the_older_folder(fp32, tmp_path):
    _interrupt_all(MOMENTS, fp32, tmp_path)


@pytest.mark.slow
def test_interrupts_at_every_moment(fp32, tmp_path):
    _interrupt_all(SLOW_MOMENTS, fp32, tmp_path)


# -- the interrupt renamed on its way up (in process, deterministic) -----------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("renamed_as", [RuntimeError, ImportError, ProviderError])
def test_an_interrupt_turned_into_another_exception_is_still_an_interrupt(sig, renamed_as, monkeypatch, capsys):
    """What torch's tracing or an import cut short does: catch the KeyboardInterrupt, raise another."""
    def run(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)   # the handler raises before this ends
        except KeyboardInterrupt:
            raise renamed_as("something else went wrong") from None
        return 0

    monkeypatch.setattr("edgellama.cli.inspect.run", run)
    previous = signal.getsignal(sig)
    assert cli_main.main(["inspect", "anything"]) == EXIT[sig]
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["edgellama: interrupted"]
    assert signal.getsignal(sig) is previous     # main restores the handlers it replaced


def test_an_interrupt_swallowed_by_a_library_still_ends_as_interrupted(monkeypatch, capsys):
    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        return 0

    monkeypatch.setattr("edgellama.cli.inspect.run", run)
    assert cli_main.main(["inspect", "anything"]) == 130
    assert capsys.readouterr().err.strip() == "edgellama: interrupted"
