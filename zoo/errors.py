"""The errors users see.

Every failure the product anticipates (bad input, a missing file, a shape that does not fit) is a
`ZooError` or, from the composition engine, a `compose.errors.CompositionError`: one line saying what
is wrong and how to fix it. The CLI prints it and exits with 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from compose.errors import CompositionError


def one_line(text: str) -> str:
    """`text` with newlines and other control characters quoted (`\\n`, `\\x1b`): errors quote input, which must
    neither break their one line nor reach a terminal as escape sequences."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ZooError(Exception):
    """A user-facing error: `message` names what is wrong, `hint` how to fix it (`str(error)` is one line)."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(one_line(f"{message} — {hint}" if hint else message))


#: What the CLI turns into a one-line message and exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ZooError, CompositionError)
