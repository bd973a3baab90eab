"""One exception family for the whole suite.

Every error a user can fix by changing an input is a ``CtdInputError`` whose message is one line:
where (file, line, field) and what to do about it. The CLI prints that line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CtdError", "CtdInputError", "CtdNumericalError", "input_error"]


class CtdError(Exception):
    """Base class of every error the suite raises on purpose."""


class CtdInputError(CtdError, ValueError):
    """Bad input: a missing file, a malformed row, an unknown label, ... (CLI exit code 2)."""

    def __init__(self, message: str):
        # Keep the message to one line: it is what the CLI prints, without a traceback.
        super().__init__(" ".join(str(message).split()))


class CtdNumericalError(CtdError, FloatingPointError):
    """NaN or inf where a finite number is required (activations, losses)."""


def input_error(where: str | Path | None, problem: str, fix: str, line: int | None = None) -> CtdInputError:
    """Build a one-line ``CtdInputError``: ``"<where>[:<line>]: <problem>; <fix>"``."""
    place = "" if where is None else str(where)
    if line is not None:
        place = f"{place}:{line}"
    prefix = f"{place}: " if place else ""
    return CtdInputError(f"{prefix}{problem}; {fix}")
