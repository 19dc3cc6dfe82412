"""The service's event log: JSON lines like :class:`sorting.realtime.sinks.EventLog`, rotated by
size or on the hour, never losing or splitting a line.

The current file is always the path given (``events.jsonl``). When it would grow past
``max_bytes``, or the wall-clock hour has changed since it was opened, it is flushed, closed
and renamed to ``events.YYYYmmddTHHMMSS.jsonl`` (the time it was opened, UTC; ``-1``, ``-2``
.. appended if that name is taken), and a new one is opened; then the lines are written.
A chunk's lines always go whole into one file. Rotated files are never deleted by the
service.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from sorting.errors import InputError
from sorting.realtime.events import Event


def rotated_name(path: Path, opened_s: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(opened_s))
    cand = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    k = 1
    while cand.exists():
        cand = path.with_name(f"{path.stem}.{stamp}-{k}{path.suffix}")
        k += 1
    return cand


class RotatingEventLog:
    """``write(events)`` / ``write_record(dict)`` / ``close()``; ``count`` particles written in all files.

    ``max_bytes``: rotate before a write that would take the file past it (0: never by size).
    ``hourly``: rotate at the first write after the UTC hour changed. ``clock``: wall time
    in seconds (a test can move it).
    """

    def __init__(self, path: Path, max_bytes: int = 0, hourly: bool = False, clock=time.time):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.hourly = hourly
        self.clock = clock
        self.count = 0
        self.rotations: list[Path] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                # an earlier run's log is kept, not overwritten
                self.path.rename(rotated_name(self.path, self.path.stat().st_mtime))
        except OSError as exc:
            raise InputError(path, f"cannot write the event log ({exc.strerror})") from None
        self._open()

    def _open(self) -> None:
        try:
            self._fh = open(self.path, "w", buffering=1 << 16)
        except OSError as exc:
            raise InputError(self.path, f"cannot write the event log ({exc.strerror})") from None
        self.opened_s = self.clock()
        self._hour = int(self.opened_s // 3600)
        self.size = 0

    def _rotate_if_due(self, nbytes: int) -> None:
        if self.size == 0:
            return
        by_size = self.max_bytes > 0 and self.size + nbytes > self.max_bytes
        by_hour = self.hourly and int(self.clock() // 3600) != self._hour
        if not (by_size or by_hour):
            return
        self._fh.flush()
        self._fh.close()
        dest = rotated_name(self.path, self.opened_s)
        self.path.rename(dest)
        self.rotations.append(dest)
        self._open()

    def _write_text(self, text: str) -> None:
        data_len = len(text.encode()) if not text.isascii() else len(text)
        self._rotate_if_due(data_len)
        self._fh.write(text)
        self._fh.flush()
        self.size += data_len

    def write(self, events: list[Event]) -> None:
        if not events:
            return
        self._write_text("".join(json.dumps(e.to_json(), separators=(",", ":")) + "\n" for e in events))
        self.count += len(events)

    def write_record(self, record: dict) -> None:
        """A line that is not a particle (a setpoint change); it has no ``particle`` key."""
        self._write_text(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()
