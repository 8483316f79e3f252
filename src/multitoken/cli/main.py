"""The `multitoken` command line: one subcommand per job, one file per subcommand.

Each file of this package (train.py, prepare.py, ...) defines ``register(subparsers)``, which adds
its parser and sets ``func`` to the function that runs it. This file only collects them and turns
a `UserError` into one line on stderr (exit status 2) instead of a traceback; an error about a
named setting (`BadValue`) is worded with the setting's option name. A bad option is one
such line too (``error: multitoken train: argument --lr: ...``), not argparse's usage block;
`main` returns the exit status in every case and never raises SystemExit.

A subcommand that writes an ``--out`` folder sets ``out_kind`` (its `outdir.KINDS` key, or a function
of the parsed options that gives one); `main`
holds that folder's lock while the command runs, so a second process on it is refused in one line.
``--help`` is fast: `main` imports only the module of the subcommand it runs (torch included);
the others are listed from `COMMANDS` alone, so ``multitoken --help`` imports no torch at all.
Messages go through `logging` (``--log-level`` or ``MULTITOKEN_LOG_LEVEL``; default info) to
stderr; results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import typing

from multitoken import __version__
from multitoken.errors import BadValue, UserError

COMMANDS: dict[str, str] = {
    "demo": "prepare python-stdlib, train a small MTP model, evaluate, decode faster",
    "prepare": "tokenize a corpus into token shards (DATA_DIR)",
    "distill-data": "training data written by the model itself (Magpie chat, code continuations)",
    "train": "train a model with MTP heads on a prepared DATA_DIR",
    "ablate": "train head configurations side by side at equal tokens and equal compute",
    "eval": "per-depth validation loss/accuracy and expected tau of a run",
    "convert": "convert a Hugging Face folder, Hub id or GGUF file into a run directory",
    "export": "export a run as a Hugging Face folder (MTP heads kept)",
    "retrofit": "train MTP heads on a frozen pretrained model from backbone features computed once",
    "draft-vocab": "store a reduced draft vocabulary (the most frequent training tokens) in a heads file",
    "generate": "generate text from a run, a Hugging Face folder or a Hub id, plainly or self-speculatively",
    "chat": "chat with a model in the terminal through its chat template (tau after each answer)",
    "serve": "an OpenAI-compatible server with continuous batching and exact speculative decoding",
    "tree": "measure the heads' top-k accuracy and write RUN_DIR/tree.json (static draft tree)",
    "bench": "benchmarks: decoding and training speed, side by side",
}
"""Every subcommand and its one-line help, in the order `--help` lists them (no module imported)."""
COMMAND_MODULES: list[str] = [f"multitoken.cli.{name.replace('-', '_')}" for name in COMMANDS]
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_ENV = "MULTITOKEN_LOG_LEVEL"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: PROG: MESSAGE (see PROG --help)``,
    exit status 2. Subcommand parsers inherit it (add_subparsers uses the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())  # argparse's own messages never need more than one line
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# ---- the parser ----------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (as transformers' and vLLM's CLIs do), except for flags and
    options whose help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default  # identity, not ==: a default of 0 or 0.0 is worth showing, False (a flag) is not
        if "default" in text.lower() or d is None or d is False or d is argparse.SUPPRESS or d == [] or not action.option_strings:
            return text
        return super()._get_help_string(action) or ""


def build_parser(only: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The parser of every subcommand; with `lazy`, only the module of `only` (None: no module) is
    imported and the other subcommands are listed by name and help alone."""
    parser = Parser(prog="multitoken", description="Multi-token prediction: train MTP heads, decode faster, exactly.",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"multitoken {__version__}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower, default=None,
                        help=f"messages shown on stderr (default: ${LOG_ENV}, else info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_subparser_class())
    for name, text in COMMANDS.items():
        if not lazy or name == only:
            importlib.import_module(f"multitoken.cli.{name.replace('-', '_')}").register(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def _subparser_class() -> type:
    class Sub(Parser):
        def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
            kwargs.setdefault("formatter_class", HelpFormatter)
            super().__init__(*args, **kwargs)
    return Sub


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is no option or option value), if any."""
    it = iter(argv)
    for word in it:
        if word == "--log-level":
            next(it, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is emitted (not when the handler was made),
    so that a redirected or captured stderr still gets the messages."""

    @property  # type: ignore[override]
    def stream(self) -> typing.TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: typing.Any) -> None:
        pass


def setup_logging(level: str | None) -> None:
    """Messages as plain lines on stderr at `level` (or $MULTITOKEN_LOG_LEVEL, else info)."""
    name = (level or os.environ.get(LOG_ENV) or "info").lower()
    if name not in LOG_LEVELS:
        raise UserError(f"{LOG_ENV}={name!r}: choose one of {', '.join(LOG_LEVELS)}")
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("multitoken")
    root.handlers[:] = [handler]
    root.setLevel(name.upper())
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_in(argv), lazy=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        setup_logging(args.log_level)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.argv = argv  # recorded by commands that write results
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with out_lock(args):
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


def out_lock(args: argparse.Namespace) -> typing.ContextManager[object]:
    """The lock on the command's ``--out`` (none for commands that write no folder, and none on
    the other ranks of a torchrun job, whose rank 0 holds it)."""
    kind = getattr(args, "out_kind", None)
    if callable(kind):  # a command whose folder kind depends on its options (export --format)
        kind = kind(args)
    if kind is None or getattr(args, "out", None) is None or int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    from multitoken.io import outdir

    return outdir.locked(args.out, kind)


if __name__ == "__main__":
    sys.exit(main())
