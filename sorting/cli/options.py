"""The command line's own checks: a library's ``ValueError`` about a value becomes the
one-line error (exit status 2) naming the option the value came from; a ``ParameterError``
names its parameter, whose option is ``--`` and the name with dashes."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sorting.errors import InputError, ParameterError


@contextlib.contextmanager
def option(name: str) -> Iterator[None]:
    """Inside, a ``ValueError`` is about the value of option ``name`` (e.g. ``"--workers"``)."""
    try:
        yield
    except ValueError as exc:
        raise InputError(name, str(exc)) from None


@contextlib.contextmanager
def parameters() -> Iterator[None]:
    """Inside, a :class:`ParameterError` names the option of its parameter (``slab_mm``:
    ``--slab-mm``)."""
    try:
        yield
    except ParameterError as exc:
        raise InputError("--" + exc.name.replace("_", "-"), exc.problem) from None
