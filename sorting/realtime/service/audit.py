"""The audit log: one JSON line per setpoint change asked for, applied or refused.

Keys: ``time`` (UTC, ISO 8601), ``who`` (the interface and the client: ``http 127.0.0.1``,
``opcua operator``), ``what`` (``threshold`` or ``model``), ``old``, ``new``, ``result``
(``applied``, or ``refused: why``), and for applied changes ``from_line``: the first stream
line of the chunk from which it was in force. The file is appended to, never truncated,
and flushed after every line.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from sorting.errors import InputError


def utc_iso(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1)
        except OSError as exc:
            raise InputError(path, f"cannot write the audit log ({exc.strerror})") from None

    def write(self, record: dict) -> None:
        rec = {"time": utc_iso(), **record}
        self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
