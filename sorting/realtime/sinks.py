"""Where decisions go: the JSON-lines event log (docs/cli.md, the event log) and the UDP valve sink."""
from __future__ import annotations

import json
import socket
from pathlib import Path

from sorting.errors import InputError
from sorting.io.wire import encode_valve
from sorting.realtime.events import Event


class EventLog:
    """One JSON object per particle, in completion order; flushed every chunk so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", buffering=1 << 16)
        except OSError as exc:
            raise InputError(path, f"cannot write the event log ({exc.strerror})") from None
        self.count = 0

    def write(self, events: list[Event]) -> None:
        if not events:
            return
        self._fh.write("".join(json.dumps(e.to_json(), separators=(",", ":")) + "\n" for e in events))
        self.count += len(events)
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


class UDPValveSink:
    """Sends one datagram per non-late eject (format in :mod:`sorting.io.wire`); never blocks the loop.

    An unreachable controller is counted, not fatal.
    """

    def __init__(self, host: str, port: int, n_valves: int):
        self.addr = (host, port)
        self.n_valves = n_valves
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            # connected: the kernel reports an unreachable controller (ICMP) as an error we count
            self.sock.connect(self.addr)
        except OSError as exc:
            self.sock.close()
            raise ValueError(f"cannot send to {host}:{port} ({exc.strerror or exc})") from None
        self.seq = 0
        self.sent = 0
        self.errors = 0

    def send(self, events: list[Event]) -> None:
        for e in events:
            if not e.sent:  # a pass, or a late eject
                continue
            msg = encode_valve(self.seq, e.particle, e.open_s, e.close_s, e.valves, self.n_valves)
            self.seq += 1
            try:
                self.sock.send(msg)
                self.sent += 1
            except OSError:
                self.errors += 1

    def close(self) -> None:
        self.sock.close()


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(option, f"expected HOST:PORT, got {text!r}")
    return host, int(port)
