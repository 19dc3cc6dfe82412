"""The command line's own checks: a library's ``ValueError`` about a value becomes the
one-line error (exit status 2) naming the option the value came from."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sorting.errors import InputError


@contextlib.contextmanager
def option(name: str) -> Iterator[None]:
    """Inside, a ``ValueError`` is about the value of option ``name`` (e.g. ``"--workers"``)."""
    try:
        yield
    except ValueError as exc:
        raise InputError(name, str(exc)) from None
