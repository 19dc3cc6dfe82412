"""Helpers every reader of :mod:`sorting.io` shares: one-line messages, missing files."""
from __future__ import annotations

from pathlib import Path

from sorting.errors import InputError


def oneline(text: object) -> str:
    return " ".join(str(text).split())


def require(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")


def check_output_file(path: Path, option: str) -> Path:
    """The one rule for options that name an output FILE (``--events``, ``--summary-json``,
    ``--out``, ``--json``): its folder must already exist, so a typo in a path never makes a
    tree of new folders; the file itself may or may not exist (it is overwritten). Options
    that name an output FOLDER (``--report``, ``demo --out``) create it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(option, f"{path} is a folder; {option} names the file to write")
    parent = path.parent
    if not parent.exists():
        raise InputError(option, f"{path}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise InputError(option, f"{path}: {parent} is not a folder")
    return path
