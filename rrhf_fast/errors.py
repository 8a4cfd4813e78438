"""Errors meant for users: one sentence saying what is wrong, where, and what to do."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or flags; the CLI prints it without a traceback."""


class DataError(UserError, ValueError):
    """A malformed input record; the message names the file, the line and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        where = str(path) if line is None else f"{path}:{line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class ModelError(UserError, ValueError):
    """A model, or an attention or kernel choice, that rrhf-fast cannot run as asked."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name: library
    errors carry pages of context, and a user's one-sentence error quotes only their gist."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
