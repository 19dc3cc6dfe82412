"""Where detector lines come from: a recording, the live digital twin, or a TCP line stream.

Every source yields ``(first_line, lines, t_in)``: lines (L, P, 2) uint16, the stream
index of the first one, and the wall-clock time (``time.perf_counter``) they became
available to the pipeline. Paced sources release each chunk when its last line would
have been acquired at the line rate.
"""
from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Iterator

import numpy as np

from sorting.io.wire import LINE_HEADER, MAX_FRAME_BYTES, FrameError, decode_header

Chunk = tuple[int, np.ndarray, float]


def prefault(lines: np.ndarray, block_lines: int = 4096) -> None:
    """Read every page of a memory-mapped recording once, so that a timed run measures the
    loop, not the disk or the first touch of each page."""
    for first in range(0, lines.shape[0], block_lines):
        np.asarray(lines[first:first + block_lines]).sum()


class Pacer:
    """Sleeps until line ``i`` would have been acquired: t0 + i / line_rate."""

    def __init__(self, line_rate_hz: float, realtime: bool, t0: float | None = None):
        self.rate = line_rate_hz
        self.realtime = realtime
        self.t0 = t0  # wall time of line 0; None = when the first chunk is asked for

    def wait(self, end_line: int, first_line: int = 0) -> float:
        """When lines before ``end_line`` are (or were) acquired.

        Paced, this is the acquisition time even when the loop is behind: lines wait in
        the acquisition buffer, and that wait is part of their latency. Unpaced, it is now.
        """
        now = time.perf_counter()
        if not self.realtime:
            return now
        if self.t0 is None:
            self.t0 = now - first_line / self.rate
        due = self.t0 + end_line / self.rate
        if due > now:
            time.sleep(due - now)
        return due


def replay(lines: np.ndarray, line_rate_hz: float, chunk_lines: int = 32, realtime: bool = False,
           start: int = 0, stop: int | None = None, t0: float | None = None) -> Iterator[Chunk]:
    """Chunks of a memory-mapped recording, as fast as possible or paced at the line rate
    (``t0``: a shared wall time of line 0, for lanes that must keep the same clock)."""
    n = lines.shape[0] if stop is None else min(stop, lines.shape[0])
    pacer = Pacer(line_rate_hz, realtime, t0)
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


class _Broken(Exception):
    """The connection cannot go on (malformed or truncated frame, silence, reset)."""


class TCPLineSource:
    """A TCP server for the acquisition process's line stream (frames of :mod:`sorting.io.wire`).

    Binds to loopback unless told otherwise. One connection at a time. A clean end of
    stream (the peer closes between frames) ends the run. A malformed header, a truncated
    frame, a reset or ``idle_timeout_s`` without data drops the connection, is counted in
    ``rejected`` / ``broken`` (the reason in ``errors``), and the source waits for the
    acquisition process to reconnect, until ``stop()`` or ``accept_timeout_s`` without one.
    A header is checked (magic, version, channels, pixels, size cap) before its payload is
    allocated. A frame that starts before a line already received is read and dropped
    (``stale``); one that starts after the expected line is passed on, and the pipeline
    counts the gap. Frames longer than ``max_lines`` are yielded in pieces of at most
    ``max_lines`` lines, so the pipeline's ring buffer never wraps inside one chunk.
    """

    def __init__(self, pixels: int, host: str = "127.0.0.1", port: int = 0, *, max_lines: int | None = 32,
                 accept_timeout_s: float = 30.0, idle_timeout_s: float = 10.0, poll_s: float = 0.2,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        if max_lines is not None and max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, got {max_lines}")
        self.pixels = pixels
        self.max_lines = max_lines
        self.accept_timeout_s = accept_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.poll_s = poll_s
        self.max_frame_bytes = max_frame_bytes
        self.server = socket.create_server((host, port))
        self.address = self.server.getsockname()
        self.frames = 0
        self.lines = 0
        self.connections = 0
        self.rejected = 0  # malformed headers
        self.broken = 0  # truncated frames, resets, silent peers
        self.stale = 0  # frames starting before a line already received
        self.seq_gaps = 0  # sequence numbers skipped (frames lost upstream)
        self.errors: deque[str] = deque(maxlen=100)
        self.next_line: int | None = None
        self._next_seq: int | None = None
        self._stop = False

    def stop(self) -> None:
        """Ask the source to end; honoured within ``poll_s`` (also while waiting for data)."""
        self._stop = True

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> "TCPLineSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while not self._stop:
                conn = self._accept()
                if conn is None:
                    return
                self.connections += 1
                with conn:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.settimeout(self.poll_s)
                    try:
                        yield from self._frames(conn)
                        return  # clean end of stream
                    except _Broken as exc:
                        self.errors.append(str(exc))
                    except OSError as exc:  # reset by peer and friends
                        self.broken += 1
                        self.errors.append(f"connection lost: {exc}")
        finally:
            self.close()

    def _accept(self) -> socket.socket | None:
        self.server.settimeout(self.poll_s)
        deadline = time.monotonic() + self.accept_timeout_s
        while not self._stop and time.monotonic() < deadline:
            try:
                conn, _ = self.server.accept()
                return conn
            except (socket.timeout, TimeoutError):
                continue
        return None

    def _recv_exact(self, conn: socket.socket, buf: memoryview, at_boundary: bool = False) -> bool:
        """Fill ``buf``; False on a clean end of stream (only allowed ``at_boundary``, before any byte)."""
        n = len(buf)
        got = 0
        idle_since = time.monotonic()
        while got < n:
            if self._stop:
                raise _Broken("stopped")
            try:
                k = conn.recv_into(buf[got:], n - got)
            except (socket.timeout, TimeoutError):
                if time.monotonic() - idle_since > self.idle_timeout_s:
                    self.broken += 1
                    raise _Broken(f"no data for {self.idle_timeout_s:g} s") from None
                continue
            if k == 0:
                if at_boundary and got == 0:
                    return False
                self.broken += 1
                raise _Broken(f"connection closed inside a frame ({got} of {n} bytes)")
            got += k
            idle_since = time.monotonic()
        return True

    def _frames(self, conn: socket.socket) -> Iterator[Chunk]:
        head_buf = memoryview(bytearray(LINE_HEADER.size))
        while not self._stop:
            if not self._recv_exact(conn, head_buf, at_boundary=True):
                return
            try:
                head = decode_header(head_buf.tobytes(), self.pixels, self.max_frame_bytes)
            except FrameError as exc:
                self.rejected += 1
                # the stream cannot be resynchronised after a bad header: drop the connection
                raise _Broken(f"rejected frame: {exc}") from None
            payload = memoryview(bytearray(head.payload_bytes))
            self._recv_exact(conn, payload)
            if self._next_seq is not None and head.seq > self._next_seq:
                self.seq_gaps += head.seq - self._next_seq
            self._next_seq = head.seq + 1
            if self.next_line is not None and head.first_line < self.next_line:
                self.stale += 1
                self.errors.append(f"frame {head.seq} starts at line {head.first_line}, "
                                   f"before line {self.next_line} (dropped)")
                continue
            self.frames += 1
            self.lines += head.lines
            self.next_line = head.first_line + head.lines
            lines = np.frombuffer(payload, dtype="<u2").reshape(head.lines, head.pixels, head.channels)
            t_in = time.perf_counter()
            step = self.max_lines or head.lines
            for off in range(0, head.lines, step):
                yield head.first_line + off, lines[off:off + step], t_in
