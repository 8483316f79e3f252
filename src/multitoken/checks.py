"""Numbers from users: parsed from ASCII text only, finite, and inside a stated range.

One `Range` serves both sides: `Range.parse` reads a command-line string (cli/options.py turns it into
an option type, so a bad value is the parser's one-line error before any work starts), and
`Range.check` guards a value that arrived through Python, a TOML file or a config.json with a
one-line `UserError`.

Why not ``int()`` and ``float()``: they accept ``nan`` and ``inf`` (a NaN temperature compares
False with everything, so ``t < 0`` lets it through and sampling emits token 0 forever), and
``str.isdigit``/``int`` accept superscript and Arabic-Indic digits (``int('²')`` raises,
``int('١٠')`` is 10). Values are parsed with ASCII regular expressions, and every check is
written so that NaN fails it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from multitoken.errors import UserError

INT63 = 2**63 - 1
"""Largest count, step or seed we accept: fits an int64 tensor and a torch seed."""

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _fmt(x: float) -> str:
    if x == INT63:
        return "2**63-1"
    return str(int(x)) if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e15) else repr(float(x))


@dataclass(frozen=True)
class Range:
    """Allowed values: integers or finite floats between `lo` and `hi` (either may be open or absent).

    `parse` reads a string, `check` validates a Python value.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    or_zero: bool = False
    """Also allow exactly 0 below `lo` (e.g. temperature: 0 = greedy, else at least 1e-6)."""

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.integer:
                span = f"from {_fmt(lo)} to {_fmt(hi)}"
            else:
                span = f"in {'(' if self.lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.hi_open else ']'}"
        elif lo is not None:
            span = f"{'>' if self.lo_open else '>='} {_fmt(lo)}"
        elif hi is not None:
            span = f"{'<' if self.hi_open else '<='} {_fmt(hi)}"
        else:
            span = ""
        return ("0 or " if self.or_zero else "") + f"{what} {span}".strip()

    def problem(self, value: object) -> str | None:
        """Why `value` is not allowed, or None when it is."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}"
        if self.integer and not isinstance(value, int):
            return f"must be {self.describe()}"
        if not math.isfinite(value):
            return f"must be {self.describe()}"
        if self.or_zero and value == 0:
            return None
        # Written as "not (inside)" so that any comparison that cannot hold fails.
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return f"must be {self.describe()}"
        if self.hi is not None and not (value < self.hi if self.hi_open else value <= self.hi):
            return f"must be {self.describe()}"
        return None

    def check(self, name: str, value: object) -> int | float:
        """`value` itself (a float field's int comes back as a float), or a one-line `UserError`
        naming `name`."""
        why = self.problem(value)
        if why is not None:
            raise UserError(f"{name}={value!r}: {why}")
        return value if self.integer else float(value)  # type: ignore[arg-type]

    def parse(self, text: str) -> int | float:
        """The value written in `text` (ASCII digits only), or ValueError with a one-line reason."""
        s = text.strip()
        if self.integer:
            if not _INT.fullmatch(s):
                raise ValueError(f"{text!r} is not {self.describe()} (write it in ASCII digits, e.g. 8)")
            value: int | float = int(s)
        else:
            if s.lower() in _NON_FINITE:
                raise ValueError(f"{text!r} is not {self.describe()}")
            if not _FLOAT.fullmatch(s):
                raise ValueError(f"{text!r} is not {self.describe()} (write it in ASCII digits, e.g. 0.5 or 1e-3)")
            value = float(s)
        if self.problem(value) is not None:
            raise ValueError(f"{text!r} is not {self.describe()}")
        return value


def Ints(lo: int | None = None, hi: int | None = INT63) -> Range:
    """Integers from `lo` to `hi` inclusive (by default at most `INT63`)."""
    return Range(lo, hi, integer=True)


def Floats(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           or_zero: bool = False) -> Range:
    """Finite floats between `lo` and `hi`."""
    return Range(lo, hi, lo_open, hi_open, or_zero=or_zero)


# Sampling (generate.Sampling and the generate options). Temperature 0 is greedy. A tiny positive
# one (1e-40) overflows float32 logits to inf when dividing, and softmax of inf is NaN; the floor
# of 1e-6 (already one-hot in practice) leaves a wide margin. NaN and inf are refused everywhere.
SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Floats(1e-6, 1e6, or_zero=True),
    "top_k": Ints(0),
    "top_p": Floats(0, 1, lo_open=True),
}
MAX_NEW_TOKENS = 1 << 20
"""Most tokens one generate call may ask for (the context caps it further)."""


def parse_int(text: str, lo: int | None = None, hi: int | None = INT63, what: str = "value") -> int:
    """An integer from a spec fragment (``bpe:N``, ``parallel:N``), or a `UserError` naming `what`."""
    try:
        return int(Ints(lo, hi).parse(text))
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


# ---- dtypes ---------------------------------------------------------------------------------------

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The one spelling of dtypes on the command line and in the API (transformers' and vLLM's)."""
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
"""Older spellings, still accepted."""


def dtype_name(text: str) -> str:
    """The canonical name of a dtype spelling (``bf16`` -> ``bfloat16``), or a one-line `UserError`."""
    name = DTYPE_ALIASES.get(str(text).strip().lower(), str(text).strip().lower())
    if name not in DTYPES:
        raise UserError(f"dtype {text!r}: choose one of {'|'.join(DTYPES)} (aliases: {', '.join(DTYPE_ALIASES)})")
    return name


def parse_dtype(text: str):
    """'auto' or the torch dtype for a spelling (torch imported only here, so parsing stays fast)."""
    name = dtype_name(text)
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, name)
