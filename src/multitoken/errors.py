"""One exception type for mistakes a user can make.

The CLI prints a `UserError` as a single line (``error: ...``) and exits with status 2;
everything else is a bug and keeps its traceback. Messages name the fix.
"""


class UserError(Exception):
    """Bad input, bad configuration or a missing file: printed as one line by the CLI."""
