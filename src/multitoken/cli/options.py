"""Option types shared by the subcommands: a bad value is the parser's one-line error, before any work.

`add_dataclass_arguments` derives a subcommand's options from a config dataclass (one
``--field-name`` per field, help from the field's docstring).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from typing import Any

from multitoken.checks import Floats, Ints, Range
from multitoken.config import BETA_RANGE, LOSS_WEIGHT_RANGE, WEIGHT_SCHEDULES, parse_weights
from multitoken.errors import BadValue, UserError


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


def listed(parse: typing.Callable[[str], Any]) -> typing.Callable[[str], list]:
    """``type=`` for a comma-separated list whose items each parse with `parse`."""
    def parse_list(text: str) -> list:
        return [parse(x) for x in text.split(",")]
    return parse_list


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
    from multitoken.training.parallel import resolve_device

    try:
        return str(resolve_device(text))
    except BadValue as e:
        raise argparse.ArgumentTypeError(e.as_option()) from None


def dtype_arg(text: str) -> str:
    """``type=`` for ``--dtype``: auto|bfloat16|float16|float32 (bf16, fp16, fp32 kept as aliases),
    returned in the canonical spelling."""
    from multitoken.checks import dtype_name

    try:
        return dtype_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("dtype ")) from None


def tokenizer_arg(text: str) -> str:
    """``type=`` for ``--tokenizer``: ``bpe:N`` is checked here (N from 257, the byte alphabet plus
    EOS), before anything is read or written; paths are checked when loaded."""
    if text.startswith("bpe:"):
        try:
            Ints(257, 1 << 24).parse(text[4:])
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: expected bpe:N with N a vocabulary size from 257, e.g. bpe:8192 ({e})") from None
    return text_arg(text)



# ---- options from a dataclass --------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field name."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (e.g. a zipped install): options go without help text
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _floats(text: str, rng: Range) -> list[float]:
    """Comma-separated numbers, each in `rng` (ASCII digits; NaN and inf refused)."""
    parts = [x for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 1,0.5,0.25")
    try:
        return [float(rng.parse(x)) for x in parts]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected comma-separated numbers, e.g. 1,0.5,0.25") from None


def _optional_floats(text: str) -> list[float] | str | None:
    """``--loss-weights``: numbers, or a named schedule (config.parse_weights)."""
    if text.strip().lower().partition(":")[0] in ("", "none", "default", "equal", "geometric", "lambda"):
        try:
            return parse_weights(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    try:
        return _floats(text, LOSS_WEIGHT_RANGE)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}, or a named schedule: {WEIGHT_SCHEDULES}") from None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, ranges: dict[str, Range] | None = None) -> None:
    """Add ``--field-name`` for every field of dataclass `cls`; unset options stay absent from the
    namespace (default SUPPRESS) so that a TOML file or a saved config can fill them.

    bool fields become ``--x/--no-x``; tuples and lists of floats are comma-separated; int and
    float fields are parsed by their `Range` in `ranges` (ASCII digits, finite, in range), so a
    bad number is argparse's one-line error before any work starts.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    ranges = ranges or {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name,
                                  help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"))
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kw.update(type=lambda s: tuple(_floats(s, BETA_RANGE)), metavar="A,B")
        elif hint in (list[float] | None, typing.Optional[list[float]], list[float] | str | None):
            kw.update(type=_optional_floats, metavar="W0,W1,...|NAME")
        elif hint in (int, float):
            if f.name not in ranges:
                raise AssertionError(f"{cls.__name__}.{f.name} has no Range: add it to the config's RANGES table")
            kw.update(type=option(ranges[f.name]), metavar=f.name.upper())
        else:
            kw.update(type=text_arg if hint is str else hint, metavar=f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
