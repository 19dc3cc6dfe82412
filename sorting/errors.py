"""The one exception type that means "the user handed us something wrong".

The CLI turns it into one line on stderr and exit status 2; anything else is an
internal error (exit status 1).
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: a file, an option or a config value. The message names it."""

    def __init__(self, where: str | Path | None, problem: str):
        self.where = str(where) if where is not None else None
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)
