"""Helpers every reader of :mod:`sorting.io` shares: one-line messages, missing files."""
from __future__ import annotations

from pathlib import Path

from sorting.errors import InputError


def oneline(text: object) -> str:
    return " ".join(str(text).split())


def require(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")
