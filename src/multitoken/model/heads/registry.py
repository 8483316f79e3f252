"""Head kind (the string a config stores) -> head family class.

The built-in families are named by where their class lives and imported when first asked for,
so the config can check a kind (and the family's own constraints) without importing the model.
A new family is one file with a `HeadFamily` subclass plus an entry here (or a call to
`register_family`, which is how tests add one without touching the package).
"""

from __future__ import annotations

import importlib

BUILTIN: dict[str, str] = {
    "parallel": "multitoken.model.heads.parallel:ParallelHeads",
    "sequential": "multitoken.model.heads.sequential:SequentialMTP",
    "medusa": "multitoken.model.heads.medusa:MedusaHeads",
}
_loaded: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Make `cls` (a `HeadFamily` with a ``kind``) available under its kind; usable as a decorator."""
    _loaded[cls.kind] = cls
    return cls


def unregister_family(kind: str) -> None:
    """Forget a family added with `register_family` (built-in ones stay available)."""
    _loaded.pop(kind, None)


def kinds() -> list[str]:
    """Every head kind, built-in ones first."""
    return [*BUILTIN, *(k for k in _loaded if k not in BUILTIN)]


def family(kind: str) -> type:
    """The head family class of `kind` (a KeyError for an unknown one: configs check kinds first)."""
    if kind not in _loaded:
        module, name = BUILTIN[kind].split(":")
        _loaded[kind] = getattr(importlib.import_module(module), name)
    return _loaded[kind]
