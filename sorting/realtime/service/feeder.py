"""A stand-in detector: sends a recording's lines to a TCP line stream in frames, paced at the
line rate or as fast as the receiver reads (for testing an installation, the tests and the bench)."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np

from sorting.io.wire import encode_frame


def feed(address: tuple[str, int], lines: np.ndarray, line_rate_hz: float | None = None, frame_lines: int = 32,
         first_line: int = 0, seq0: int = 0, start: int = 0, stop: int | None = None,
         stop_event: threading.Event | None = None, connect_timeout_s: float = 10.0) -> int:
    """Send ``lines[start:stop]`` as frames of ``frame_lines``, numbered from ``first_line``;
    paced at ``line_rate_hz`` (None: as fast as possible). Returns the frames sent. The
    connection is closed cleanly at the end."""
    stop = lines.shape[0] if stop is None else min(stop, lines.shape[0])
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            sock = socket.create_connection(address, timeout=connect_timeout_s)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sent = 0
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for i, a in enumerate(range(start, stop, frame_lines)):
            if stop_event is not None and stop_event.is_set():
                break
            b = min(a + frame_lines, stop)
            if line_rate_hz:
                due = t0 + (b - start) / line_rate_hz  # the frame leaves when its last line is read
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            sock.sendall(encode_frame(seq0 + i, first_line + a - start, np.asarray(lines[a:b])))
            sent += 1
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2.0)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
    return sent
