"""edgellama: export Llama models to ONNX, quantize them, run them on ONNX Runtime, check parity."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import signal
import sys
import threading
import traceback

import edgellama
from edgellama.errors import CheckFailed, EdgellamaError

# One module per subcommand under edgellama.cli; each has a docstring (its help), `add_arguments`
# and `run(args) -> int`. Imported lazily so `edgellama --help` never loads torch.
SUBCOMMANDS = ("export", "inspect", "quantize", "generate", "chat", "bench", "parity", "serve", "sweep")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        raise EdgellamaError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept, and every option's default shown after its help.

    A help that already states its default (`(default ...`, `default:`) is left as written, as
    are flags. An unset default (None, "", []) reads `none`: the option is off unless given.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if not _shows_default(action) or "(default" in help or "default:" in help:
            return help
        shown = "none" if action.default in (None, "", [], ()) else "%(default)s"
        return f"{help} (default: {shown})".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):   # argparse prints nothing after an option without help
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    takes_value = action.nargs != 0   # flags (store_true, count, help, version) take none
    optional = bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
    return takes_value and optional and action.default is not argparse.SUPPRESS and not action.required


def _module(name: str):
    return importlib.import_module(f"edgellama.cli.{name}")


_DEBUG_HELP = "show tracebacks for user errors too"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellama", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgellama {edgellama.__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug after the subcommand too; SUPPRESS keeps a subparser's default off the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        mod = _module(name)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=HelpFormatter, parents=[common])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


# Exit status of an interrupted run: 128 + the signal, as a shell reports a process the signal
# ended (Ctrl-C 130, a CI runner's SIGTERM 143), so a caller can tell a cancel from a failure.
_INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _Interrupts:
    """SIGINT and SIGTERM recorded, then raised as KeyboardInterrupt in the main thread.

    Libraries on the way up may turn the KeyboardInterrupt into another exception (torch's export
    tracing re-raises what it caught, an import cut short is an ImportError): once a signal is
    recorded, whatever reaches `main` is reported as the interrupt it is. SIGTERM's default would
    end the process with no cleanup (a staged folder left behind); raised, it unwinds like Ctrl-C.
    """

    def __init__(self):
        self.received: list[int] = []

    def _handle(self, signum, frame):
        self.received.append(signum)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self   # signal handlers can only be set from the main thread: leave Python's defaults
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in _INTERRUPT_EXIT}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def exit_status(self) -> int:
        print("edgellama: interrupted", file=sys.stderr, flush=True)
        return _INTERRUPT_EXIT.get(self.received[0], 130) if self.received else 130


def _run(argv: list[str]) -> int:
    # Build only the parser of the named subcommand: its imports stay off other commands' paths.
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):   # no subcommand: usage on stderr, exit 2 as for any bad usage
        parser.print_help(sys.stderr)
        return 2
    return int(args._run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    interrupts = _Interrupts()
    try:
        with interrupts.installed():
            status = _run(argv)
    except KeyboardInterrupt:
        return interrupts.exit_status()
    except SystemExit:
        raise   # --help and --version
    except BaseException as e:
        if interrupts.received:   # the interrupt, renamed on its way up
            return interrupts.exit_status()
        if isinstance(e, EdgellamaError):
            if debug:
                traceback.print_exc()
            print(f"edgellama: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, CheckFailed):
            print(f"edgellama: check failed: {e}", file=sys.stderr)
            return 1
        raise
    # A library that swallowed the KeyboardInterrupt let the command finish: still a cancelled run.
    return interrupts.exit_status() if interrupts.received else status


def entry() -> None:
    """The `edgellama` command: `main` as a process. An interrupted run exits at once with its
    status: a second signal, or one still pending when the handlers were restored, would otherwise
    strike during the interpreter's shutdown and end the process by the signal instead."""
    status = main()
    if status in _INTERRUPT_EXIT.values():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
