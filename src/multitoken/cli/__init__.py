"""The command line (see main.py); library code never imports this package."""

from multitoken.cli.main import COMMAND_MODULES, build_parser, main

__all__ = ["COMMAND_MODULES", "build_parser", "main"]
