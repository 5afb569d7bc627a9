"""The command line: `python -m refimpl {run,init,quantize,info,golden,compare,bench,serve-sim} ...`.

Every subcommand lives in `refimpl.commands.<name>` (serve-sim in `serve_sim`) with `add_parser(subparsers)` and
`main(args) -> int`. Errors in the input (RefimplError) reach the user as one line on stderr
and exit status 2, never a traceback; REFIMPL_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import RefimplError

COMMANDS = ("run", "init", "quantize", "info", "golden", "compare", "bench", "serve_sim")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 (as RefimplError)."""

    def error(self, message):
        raise RefimplError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m refimpl",
                     description="Executable specification of the openPangu models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"refimpl.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"refimpl.commands.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except RefimplError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("error: out of memory (try fewer layers, bf16 numerics, or a streamed checkpoint)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: still one line unless debugging
        if os.environ.get("REFIMPL_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set REFIMPL_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 3
