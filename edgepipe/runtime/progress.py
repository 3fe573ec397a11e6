"""The one progress callback type: a stage says what it is doing; only the CLIs print it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def silent(msg: str) -> None:
    """The default ``Progress``: library calls without a callback say nothing."""
