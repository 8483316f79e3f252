"""The `multitoken` command line: one subcommand per job.

Each job's module owns its subcommand: it defines ``register(subparsers)``, which adds a parser
and sets ``func`` to the function that runs it. This file only collects them and turns a
`UserError` into one line on stderr (exit status 2) instead of a traceback. A bad option is one
such line too (``error: multitoken train: argument --lr: ...``), not argparse's usage block;
`main` returns the exit status in every case and never raises SystemExit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

from multitoken.checks import Floats, Ints, Range
from multitoken.errors import UserError

# Modules that register a subcommand, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "multitoken.demo",
    "multitoken.data.prepare",
    "multitoken.train",
    "multitoken.ablate",
    "multitoken.evaluate",
    "multitoken.hf",
    "multitoken.retrofit",
    "multitoken.generate",
    "multitoken.trees",
    "multitoken.bench",
]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: PROG: MESSAGE (see PROG --help)``,
    exit status 2. Subcommand parsers inherit it (add_subparsers uses the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())  # argparse's own messages never need more than one line
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# ---- option types: a bad value is the parser's one-line error, before any work -----------------


def option(rng: Range) -> typing.Callable[[str], int | float]:
    """An option ``type=`` that parses with `rng` (ASCII digits, finite, in range)."""
    def parse(text: str) -> int | float:
        try:
            return rng.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def ints(lo: int | None = None, hi: int | None = None) -> typing.Callable[[str], int | float]:
    """``type=`` for an integer option from `lo` to `hi` (default: up to 2**63-1)."""
    return option(Ints(lo) if hi is None else Ints(lo, hi))


def floats(lo: float | None = None, hi: float | None = None, **kw: bool) -> typing.Callable[[str], int | float]:
    """``type=`` for a finite float option (see `checks.Floats` for open bounds)."""
    return option(Floats(lo, hi, **kw))


def path_arg(text: str) -> str:
    """``type=`` for paths: an empty string would mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: name a file or folder")
    return text


def text_arg(text: str) -> str:
    """``type=`` for a string that must not be empty (a stop string, a head spec, a device)."""
    if not text:
        raise argparse.ArgumentTypeError("empty value: give at least one character")
    return text


def device_arg(text: str) -> str:
    """``type=`` for a single-process ``--device``: auto, cpu, cuda or cuda:N, resolved now (so that
    a typo or a missing GPU is the parser's one-line error, not a traceback at load time)."""
    from multitoken.parallel import resolve_device

    try:
        return str(resolve_device(text))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tokenizer_arg(text: str) -> str:
    """``type=`` for ``--tokenizer``: ``bpe:N`` is checked here (N from 257, the byte alphabet plus
    EOS), before anything is read or written; paths are checked when loaded."""
    if text.startswith("bpe:"):
        try:
            Ints(257, 1 << 24).parse(text[4:])
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: expected bpe:N with N a vocabulary size from 257, e.g. bpe:8192 ({e})") from None
    return text_arg(text)


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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
