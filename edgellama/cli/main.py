"""edgellama: export Llama models to ONNX, quantize them, run them on ONNX Runtime, check parity."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import edgellama
from edgellama.errors import CheckFailed, EdgellamaError

# One module per subcommand under edgellama.cli; each has a docstring (its help), `add_arguments`
# and `run(args) -> int`. Imported lazily so `edgellama --help` never loads torch.
SUBCOMMANDS = ("export", "inspect", "quantize", "generate", "bench", "parity")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        raise EdgellamaError(message)


def _module(name: str):
    return importlib.import_module(f"edgellama.cli.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellama", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgellama {edgellama.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        mod = _module(name)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        # Build only the parser of the named subcommand: its imports stay off other commands' paths.
        first = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(only=first if first in SUBCOMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2 if argv and not set(argv) <= {"--debug"} else 0
        return int(args._run(args) or 0)
    except EdgellamaError as e:
        if debug:
            traceback.print_exc()
        print(f"edgellama: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"edgellama: check failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgellama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
