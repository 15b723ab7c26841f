"""Error types shared across packages; the CLI maps ``BadInputError`` to exit code 2."""
from __future__ import annotations


class BadInputError(ValueError):
    """Bad user input that is not a config field: unknown env id, wrong observation shape, ..."""


class NonFiniteLossError(RuntimeError):
    """The learner saw too many non-finite losses in a row (exit code 3)."""

    exit_code = 3
