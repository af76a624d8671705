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


def did_you_mean(word: str, choices) -> str:
    """` (did you mean X?)` for the closest of `choices`, or an empty string."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""
