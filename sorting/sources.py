"""Where detector lines come from: a recording, the live digital twin, or a TCP line stream.

Every source yields ``(first_line, lines, t_in)``: lines (L, P, 2) uint16, the stream
index of the first one, and the wall-clock time (``time.perf_counter``) they became
available to the pipeline. Paced sources release each chunk when its last line would
have been acquired at the line rate.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np

from .wire import LINE_HEADER, FrameError, decode_header

Chunk = tuple[int, np.ndarray, float]


class Pacer:
    """Sleeps until line ``i`` would have been acquired: t0 + i / line_rate."""

    def __init__(self, line_rate_hz: float, realtime: bool):
        self.rate = line_rate_hz
        self.realtime = realtime
        self.t0: float | None = None

    def wait(self, end_line: int, first_line: int = 0) -> float:
        now = time.perf_counter()
        if not self.realtime:
            return now
        if self.t0 is None:
            self.t0 = now - first_line / self.rate
        due = self.t0 + end_line / self.rate
        if due > now:
            time.sleep(due - now)
            return due
        return now


def replay(lines: np.ndarray, line_rate_hz: float, chunk_lines: int = 32, realtime: bool = False,
           start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
    """Chunks of a memory-mapped recording, as fast as possible or paced at the line rate."""
    n = lines.shape[0] if stop is None else min(stop, lines.shape[0])
    pacer = Pacer(line_rate_hz, realtime)
    for first in range(start, n, chunk_lines):
        last = min(first + chunk_lines, n)
        chunk = lines[first:last]
        t_in = pacer.wait(last, first)
        yield first, chunk, t_in


def rechunk(blocks: Iterator[tuple[int, np.ndarray]], line_rate_hz: float, chunk_lines: int = 32,
            realtime: bool = False) -> Iterator[Chunk]:
    """Chunks of ``chunk_lines`` from blocks of any size (e.g. the live twin's)."""
    pacer = Pacer(line_rate_hz, realtime)
    for first, block in blocks:
        for off in range(0, block.shape[0], chunk_lines):
            chunk = block[off:off + chunk_lines]
            start = first + off
            yield start, chunk, pacer.wait(start + chunk.shape[0], start)


class TCPLineSource:
    """A TCP server that takes one acquisition connection and yields its frames.

    Binds to loopback unless told otherwise. Frames are described in :mod:`sorting.wire`;
    a malformed frame is counted, the connection dropped, and the server waits for the
    acquisition process to reconnect (until ``stop()``).
    """

    def __init__(self, pixels: int, host: str = "127.0.0.1", port: int = 0, accept_timeout_s: float = 30.0):
        self.pixels = pixels
        self.server = socket.create_server((host, port))
        self.server.settimeout(accept_timeout_s)
        self.address = self.server.getsockname()
        self.rejected = 0
        self.frames = 0
        self.errors: list[str] = []
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self.server.close()

    def _recv_exact(self, conn: socket.socket, n: int, into: memoryview | None = None) -> memoryview | None:
        buf = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = conn.recv_into(buf[got:], n - got)
            if k == 0:
                return None
            got += k
        return buf

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while not self._stop:
                try:
                    conn, _ = self.server.accept()
                except (socket.timeout, TimeoutError):
                    return
                with conn:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    yield from self._frames(conn)
                return  # one acquisition session per run
        finally:
            self.close()

    def _frames(self, conn: socket.socket) -> Iterator[Chunk]:
        while not self._stop:
            raw = self._recv_exact(conn, LINE_HEADER.size)
            if raw is None:
                return
            try:
                head = decode_header(bytes(raw), self.pixels)
            except FrameError as exc:
                self.rejected += 1
                self.errors.append(str(exc))
                return  # the stream cannot be resynchronised after a bad header
            payload = self._recv_exact(conn, head.payload_bytes)
            if payload is None:
                return
            self.frames += 1
            lines = np.frombuffer(payload, dtype="<u2").reshape(head.lines, head.pixels, head.channels)
            yield head.first_line, lines, time.perf_counter()
