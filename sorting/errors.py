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


class ParameterError(ValueError):
    """A bad value of a library function's parameter ``name`` (a Python name, not a flag):
    the command line turns it into the one-line error naming its own option."""

    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f"{name} {problem}")


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM) before the work was finished.

    The CLI exits ``128 + signum``: 130 for SIGINT, 143 for SIGTERM. A KeyboardInterrupt
    (Python's own Ctrl-C) counts as SIGINT.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
