"""`edgellama chat`: driven through stdin in a real process (replies equal a ChatSession's, commands,
refused input as one line while the session goes on), and Ctrl-C during a reply."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from edgellama.cli import chat as chat_cli
from edgellama.cli.main import main
from edgellama.runtime import ChatSession, Generator

from tests.runtime.conftest import text_folders  # noqa: F401 - a tiny model that writes text


@pytest.fixture(scope="module")
def tiny(text_folders):  # noqa: F811
    return text_folders["static"]


def chat_process(folder, stdin: str, *args: str):
    p = subprocess.run([sys.executable, "-m", "edgellama.cli.main", "chat", str(folder), "--provider", "cpu",
                        "--max-new-tokens", "8", "--no-eos", *args], input=stdin, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_replies_equal_a_chat_session_and_commands_work(tiny):
    rc, out, err = chat_process(tiny, "hello\n/rewind 99999\n/nope\nand more\n/reset\nhello\n/exit\nnot read\n",
                                "--system", "be brief")
    session = ChatSession(Generator(tiny, provider="cpu"), system="be brief")
    want = [session.send("hello", max_new_tokens=8, eos=False).text,
            session.send("and more", max_new_tokens=8, eos=False).text]
    session.reset()
    want.append(session.send("hello", max_new_tokens=8, eos=False).text)
    assert rc == 0, err
    assert out == "\n".join(want) + "\n"
    errors = [line for line in err.splitlines() if line.startswith("edgellama: error:")]
    assert len(errors) == 2 and "cannot rewind 99999 tokens" in errors[0] and "unknown command /nope" in errors[1]
    assert "(conversation reset)" in err and "Traceback" not in err


def test_end_of_input_ends_the_session(tiny):
    rc, out, err = chat_process(tiny, "hello\n")
    assert rc == 0 and out.endswith("\n") and out.count(" [stopped]") == 0, err


def test_bad_flags_are_one_line_exit_2(tiny):
    rc, _, err = chat_process(tiny, "hello\n", "--stop", "")
    assert rc == 2 and err.strip().splitlines()[-1] == "edgellama: error: a stop string cannot be empty"


class _InterruptAt(io.StringIO):
    """stdout that raises KeyboardInterrupt (a Ctrl-C) at its `n`-th write of a reply piece."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def write(self, s):
        if s.strip() and s != " [stopped]":
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(tiny, monkeypatch, capsys):
    out = _InterruptAt(3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    monkeypatch.setattr(sys, "stdout", out)
    rc = main(["chat", str(tiny), "--provider", "cpu", "--max-new-tokens", "30", "--no-eos"])
    first, _, rest = out.getvalue().partition(" [stopped]\n")
    assert rc == 0 and rest, out.getvalue()
    # The second reply is the one the conversation with the cut first reply gives.
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "again"}]
    want = Generator(tiny, provider="cpu").generate(convo, chat=True, max_new_tokens=30, eos=False).text
    assert rest == want + "\n"
    assert chat_cli.__doc__ and "Ctrl-C" in chat_cli.__doc__
