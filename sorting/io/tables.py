"""CSV tables and JSON metadata: typed, validated reading; deterministic writing."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sorting.errors import InputError
from sorting.io.common import oneline, require


def read_json(path: Path, fmt: str | None, keys: tuple[str, ...]) -> dict:
    require(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({oneline(exc)})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "must hold a JSON object {...}")
    if fmt is not None and meta.get("format") != fmt:
        raise InputError(path, f'"format" is {meta.get("format")!r}; expected "{fmt}"')
    missing = [k for k in keys if k not in meta]
    if missing:
        raise InputError(path, f"missing key(s) {', '.join(missing)}")
    return meta


def json_number(path: Path, meta: dict, key: str, *, integer: bool = False, minimum: float = 0.0,
                 strict: bool = True) -> float:
    value = meta[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        raise InputError(path, f'"{key}" is {value!r}; expected {kind} {">" if strict else ">="} {minimum:g}')
    return int(value) if integer else float(value)


def read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line_number, row)`` pairs; values stripped, never None."""
    require(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(path, f"line {reader.line_num} has {len(values)} fields; "
                                           f"the header has {len(header)}")
                rows.append((reader.line_num, {h: v.strip() for h, v in zip(header, values)}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read as CSV ({oneline(exc)})") from None
    if not header:
        raise InputError(path, f"is empty; expected the header {','.join(required)}")
    dupes = sorted(h for h, c in Counter(header).items() if c > 1)
    if dupes:
        raise InputError(path, f"duplicate column(s) {', '.join(dupes)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    return header, rows


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "12.0" from tools that write every number as float
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def cell(path: Path, line: int, row: dict, key: str, kind: str, *, optional: bool = False,
          choices: tuple[str, ...] = ()) -> Any:
    """One typed CSV value; kind is 'int', 'nonneg_int', 'float', 'nonneg_float' or 'str'."""
    text = row[key]
    if text == "":
        if optional:
            return None
        raise InputError(path, f"line {line}: {key} is empty")
    if kind == "str":
        if choices and text not in choices:
            allowed = ", ".join(choices) + (" or empty" if optional else "")
            raise InputError(path, f"line {line}: {key} is {text!r}; expected {allowed}")
        return text
    try:
        value = _parse_int(text) if kind.endswith("int") else float(text)
    except ValueError:
        expected = "an integer" if kind.endswith("int") else "a number"
        raise InputError(path, f"line {line}: {key} is {text!r}; expected {expected}") from None
    if not math.isfinite(value) or (kind.startswith("nonneg") and value < 0):
        raise InputError(path, f"line {line}: {key} is {text!r}; expected a finite number >= 0")
    return value


def relative(path: Path, line: int, text: str) -> Path:
    if Path(text).is_absolute():
        raise InputError(path, f"line {line}: file {text!r} must be relative to {path.parent}")
    return path.parent / text


# ------------------------------------------------------------ writer helpers
def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, tuple)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(columns)
        for row in rows:
            out.writerow([_fmt(row.get(c)) for c in columns])
