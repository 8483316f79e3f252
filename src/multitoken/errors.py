"""The exceptions for mistakes a user can make.

The CLI prints a `UserError` as a single line (``error: ...``) and exits with status 2;
everything else is a bug and keeps its traceback. Messages name the fix.

Library code words an error about a setting by the setting's name and value (`BadValue`:
``temperature=-0.1: ...``); only the CLI layer knows the setting came from an option and names
the option instead (``--temperature -0.1: ...``).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, bad configuration or a missing file: printed as one line by the CLI."""


class BadValue(UserError):
    """A bad value of a named setting.

    Args:
        name: the setting (a parameter or config field name, e.g. ``max_new_tokens``).
        value: the value as the user wrote it (already ``repr``-ed where quotes help).
        why: what is wrong and the fix; ``{setting}`` in it stands for the setting's name, which
            the CLI replaces by the option's (``use {setting} cpu or auto``).
        option: the CLI option that sets it (default ``--`` + name with ``-`` for ``_``).
    """

    def __init__(self, name: str, value: object, why: str, option: str | None = None) -> None:
        self.name, self.value, self.why = name, str(value), why
        self.option = option or "--" + name.replace("_", "-")
        super().__init__(f"{name}={self.value}: {why.replace('{setting}', name)}")

    def as_option(self) -> str:
        """The message as the CLI words it: ``--option VALUE: why``."""
        return f"{self.option} {self.value}: {self.why.replace('{setting}', self.option)}"
