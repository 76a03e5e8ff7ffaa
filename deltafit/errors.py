"""User-facing errors.

Anything the user can fix (a recipe key, a file, a value) raises `UserError`; the CLI prints its
one-line message and exits with code 2, without a traceback. Everything else is a bug and keeps
its traceback.
"""

import difflib


class UserError(Exception):
    """A mistake in the user's input, reported as one clear line (exit code 2)."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
