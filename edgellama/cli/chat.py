"""Chat with an exported model folder in the terminal; each turn reuses the conversation's KV cache.

Type a message and press Enter: the reply streams to stdout. Commands: /reset starts the
conversation over, /rewind N forgets the last N cached tokens (and the messages they held),
/exit (or end of input, Ctrl-D) ends the session. Ctrl-C stops a reply and the session goes on;
Ctrl-C at the prompt ends it. Generation flags are those of `edgellama generate`; a refused
message or command prints one `edgellama: error:` line and the conversation stays as it was.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from edgellama.cli.generate import add_generation_arguments, options
from edgellama.errors import EdgellamaError, RuntimeInputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_generation_arguments(p, max_new_tokens=256)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


class _StopReply(KeyboardInterrupt):
    """Ctrl-C during a reply."""


def run(args: argparse.Namespace) -> int:
    from edgellama.runtime import ChatSession, Generator

    gen = Generator(args.model, provider=args.provider, threads=args.threads)
    opts = gen.options(**options(args))
    session = ChatSession(gen, system=args.system)
    while True:
        line = _read(prompt="> " if sys.stdin.isatty() else "")
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line):
                    return 0
            else:
                _reply(session, line, opts)
        except EdgellamaError as e:           # a refused turn: one line, and the session goes on
            print(f"edgellama: error: {e}", file=sys.stderr, flush=True)


def _read(*, prompt: str) -> str | None:
    if prompt:
        sys.stderr.write(prompt)
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _command(session, line: str) -> bool:
    """Run a /command; False ends the session."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation reset)", file=sys.stderr, flush=True)
    elif name == "/rewind":
        try:
            n = int(rest)
        except ValueError:
            raise RuntimeInputError(f"/rewind takes a number of tokens, got {rest.strip()!r}") from None
        session.rewind(n)
        print(f"(rewound {n} tokens; {session.cached_tokens} cached, {len(session.messages)} messages)",
              file=sys.stderr, flush=True)
    else:
        raise RuntimeInputError(f"unknown command {name}; the commands are /reset, /rewind N, /exit")
    return True


def _reply(session, message: str, opts) -> None:
    stream = session.stream(message, options=opts)
    with _ctrl_c_stops_the_reply():
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()


class _ctrl_c_stops_the_reply:
    """SIGINT raises _StopReply while a reply streams (the CLI's own handler would end the process)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum, frame):
        raise _StopReply

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
