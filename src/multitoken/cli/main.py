"""The `multitoken` command line: one subcommand per job, one file per subcommand.

Each file of this package (train.py, prepare.py, ...) defines ``register(subparsers)``, which adds
its parser and sets ``func`` to the function that runs it. This file only collects them and turns
a `UserError` into one line on stderr (exit status 2) instead of a traceback; an error about a
named setting (`BadValue`) is worded with the setting's option name. A bad option is one
such line too (``error: multitoken train: argument --lr: ...``), not argparse's usage block;
`main` returns the exit status in every case and never raises SystemExit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

from multitoken.errors import BadValue, UserError

# Modules that register a subcommand, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [f"multitoken.cli.{name}" for name in (
    "demo", "prepare", "train", "ablate", "eval", "convert", "export", "retrofit", "draft_vocab", "generate", "tree", "bench")]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: PROG: MESSAGE (see PROG --help)``,
    exit status 2. Subcommand parsers inherit it (add_subparsers uses the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())  # argparse's own messages never need more than one line
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# ---- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="multitoken", description="Multi-token prediction: train MTP heads, decode faster, exactly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write results
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BadValue as e:
        print(f"error: {e.as_option()}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
