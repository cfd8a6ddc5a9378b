"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a bad config value) raises `UserError`. The CLI
prints it as one line on stderr and exits with code 2, with no traceback. Messages name the place:
`data/train.jsonl:17: field 'chosen': must be a non-empty string`.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user gave softpo; printed as one line, exit code 2."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.source, self.row, self.field = source, row, field
        self.detail = message
        super().__init__(one_line(format_location(source, row, field) + message))


def one_line(text: str) -> str:
    """Line breaks that came from user input (a key, a cell, a file name) are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def format_location(source: str | None, row: int | None, field: str | None) -> str:
    """`file:row: field 'x': ` prefix; rows are 1-based line/record numbers."""
    where = ""
    if source is not None:
        where = f"{source}:{row}: " if row is not None else f"{source}: "
    elif row is not None:
        where = f"row {row}: "
    if field is not None:
        where += f"field '{field}': "
    return where


class NonFiniteError(RuntimeError):
    """Training kept producing non-finite losses or gradients."""
