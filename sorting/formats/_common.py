"""Helpers every reader of :mod:`sorting.formats` shares: one-line messages, missing files."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def _oneline(text: object) -> str:
    return " ".join(str(text).split())


def _require(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")
