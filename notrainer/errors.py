"""The one exception type for mistakes a user can fix.

Anything raised as `UsageError` is printed by the CLI as a single line
(`notrainer: error: ...`) with exit status 2, never as a traceback. Raise it early:
every check that can run before training should.
"""


class UsageError(Exception):
    """Bad input from the user: a key, a value, a file, a model that does not fit."""


def check(condition: bool, message: str) -> None:
    """Raise `UsageError(message)` unless `condition` holds."""
    if not condition:
        raise UsageError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries add multi-line context), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
