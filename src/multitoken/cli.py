"""The `multitoken` command line: one subcommand per job.

Each job's module owns its subcommand: it defines ``register(subparsers)``, which adds a parser
and sets ``func`` to the function that runs it. This file only collects them and turns a
`UserError` into one line on stderr (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from multitoken.errors import UserError

# Modules that register a subcommand, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "multitoken.demo",
    "multitoken.data.prepare",
    "multitoken.train",
    "multitoken.evaluate",
    "multitoken.hf",
    "multitoken.retrofit",
    "multitoken.generate",
    "multitoken.trees",
    "multitoken.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description="Multi-token prediction: train MTP heads, decode faster, exactly.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
