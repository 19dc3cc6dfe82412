"""Where detector lines come from: a recording, the live digital twin, or a TCP line stream.

Every source yields ``(first_line, lines, t_in)``: lines (L, P, 2) uint16, the stream
index of the first one, and the wall-clock time (``time.perf_counter``) they became
available to the pipeline. Paced sources release each chunk when its last line would
have been acquired at the line rate.
"""
from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections import deque
from collections.abc import Iterator

import numpy as np

from sorting.io.wire import LINE_HEADER, MAX_FRAME_BYTES, FrameError, decode_header

Chunk = tuple[int, np.ndarray, float]
#: inside a frame, bytes must come at least this fast (on top of ``stall_timeout_s``), or the
#: peer is dropped: a trickle cannot hold the port either
MIN_FRAME_RATE_BYTES_S = 1e6


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
    (``t0``: the wall time of line 0, when several sources must keep one clock; default: now)."""
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


class _Conn:
    """The connection being read: its socket, where it stands in the current frame, and how
    long the reader has waited on it without receiving a byte."""

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.head = memoryview(bytearray(LINE_HEADER.size))
        self.buf = self.head  # what is being filled: the header, then the payload
        self.got = 0
        self.header = None  # the frame's checked header while its payload is read
        self.waited_s = 0.0  # time spent waiting on it since its last byte
        self.frame_wait_s = 0.0  # time spent waiting inside the current frame
        self.first_frame = True
        self.offset = 0  # added to the peer's line numbers (a restarted counter)

    @property
    def mid_frame(self) -> bool:
        return self.got > 0 or self.header is not None


class TCPLineSource:
    """A TCP server for the acquisition process's line stream (frames of :mod:`sorting.io.wire`).

    Binds to loopback unless told otherwise. One connection is read at a time:

    - A header is checked (magic, version, channels, pixels, size cap) before its payload
      is allocated; a malformed one drops the connection (``rejected``).
    - Once a frame has begun, its bytes must keep coming: a peer that sends nothing for
      ``stall_timeout_s`` of the reader's waiting inside a frame, closes inside a frame or
      resets is dropped (``broken``). Between frames, ``idle_timeout_s`` of silence drops it.
    - A second connection while one is being read waits in the listen backlog, unread; it is
      taken up when the current one ends or is dropped, or when the current one has been quiet
      (nothing received) for ``takeover_quiet_s`` of the reader's waiting: then it replaces it
      (``replaced``). So a stalled or silent peer holds the port for at most the stall or
      takeover time, and the detector's frames wait in its connection, not lost.
    - A clean close between frames ends the stream, unless ``persistent``: then the source
      waits for the next connection. ``accept_timeout_s`` without a connection ends it too
      (None: wait until :meth:`stop`).
    - Line numbers: a frame that starts before a line already received is read and dropped
      (``stale``); one that starts after the expected line is passed on, and the pipeline
      counts the gap. On a new connection whose first frame starts before the expected line,
      the peer's line counter restarted (``restarts``): its lines are renumbered to continue
      the stream after a gap as long as the time it was away (at ``line_rate_hz``; at least
      one line), so open particles are cut and stream time keeps pace with the belt.
    - Frames longer than ``max_lines`` are yielded in pieces of at most ``max_lines`` lines,
      so the pipeline's ring buffer never wraps inside one chunk.
    - ``heartbeat``: while no line arrives, ``None`` is yielded every ``poll_s``, so the
      consumer can look after other things (publish its state, apply a setpoint).
    """

    def __init__(self, pixels: int, host: str = "127.0.0.1", port: int = 0, *, max_lines: int | None = 32,
                 accept_timeout_s: float | None = 30.0, idle_timeout_s: float = 10.0, poll_s: float = 0.2,
                 max_frame_bytes: int = MAX_FRAME_BYTES, stall_timeout_s: float = 0.2,
                 takeover_quiet_s: float = 0.5, persistent: bool = False, heartbeat: bool = False,
                 line_rate_hz: float | None = None):
        if max_lines is not None and max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, got {max_lines}")
        self.pixels = pixels
        self.max_lines = max_lines
        self.accept_timeout_s = accept_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.poll_s = poll_s
        self.max_frame_bytes = max_frame_bytes
        self.stall_timeout_s = stall_timeout_s
        self.takeover_quiet_s = takeover_quiet_s
        self.persistent = persistent
        self.heartbeat = heartbeat
        self.line_rate_hz = line_rate_hz
        self.server = socket.create_server((host, port))
        self.server.setblocking(False)
        self.address = self.server.getsockname()
        self.frames = 0
        self.lines = 0
        self.connections = 0
        self.rejected = 0  # malformed headers
        self.broken = 0  # truncated frames, resets, silent or stalled peers
        self.stale = 0  # frames starting before a line already received
        self.seq_gaps = 0  # sequence numbers skipped (frames lost upstream)
        self.replaced = 0  # quiet connections replaced by a new one
        self.restarts = 0  # connections whose line counter started over
        self.errors: deque[str] = deque(maxlen=100)
        self.next_line: int | None = None
        self.peer = None  # the address of the connection being read, or None
        self._next_seq: int | None = None
        self._last_line_t: float | None = None  # wall time the last line arrived
        self._conn: _Conn | None = None
        self._stop = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def stop(self) -> None:
        """Ask the source to end; honoured within ``poll_s`` (also while waiting for data)."""
        self._stop = True

    def close(self) -> None:
        self._drop_conn()
        self.server.close()

    def __enter__(self) -> "TCPLineSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ connections
    def _drop_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.close()
        self._conn = None
        self.peer = None

    def _adopt(self, sock: socket.socket, peer) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = _Conn(sock, peer)
        self.peer = peer
        self.connections += 1

    def _on_accept(self) -> None:
        """Take up a waiting connection (called when there is none, or the current one is quiet)."""
        try:
            sock, peer = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. the peer reset before we took it up
            self.errors.append(f"accept failed: {exc}")
            return
        cur = self._conn
        if cur is not None:
            self.replaced += 1
            self.errors.append(f"{cur.peer[0]}:{cur.peer[1]} quiet for {cur.waited_s:.2f} s: "
                               f"replaced by {peer[0]}:{peer[1]}")
            self._drop_conn()
        self._adopt(sock, peer)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[Chunk | None]:
        sel = selectors.DefaultSelector()
        listening = False  # the listening socket is watched only while a newcomer may be taken up
        registered = None
        no_conn_s = idle_s = 0.0
        try:
            while not self._stop:
                conn = self._conn
                if conn is not registered:
                    if registered is not None:
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(registered.sock)
                    if conn is not None:
                        sel.register(conn.sock, selectors.EVENT_READ)
                    registered = conn
                if conn is not None:
                    no_conn_s = 0.0
                    try:
                        chunks, ended = self._read(conn)
                    except _Broken as exc:
                        self.errors.append(str(exc))
                        self._drop_conn()
                        continue
                    except OSError as exc:  # reset by peer and friends
                        self.broken += 1
                        self.errors.append(f"connection lost: {exc}")
                        self._drop_conn()
                        continue
                    if chunks:
                        idle_s = 0.0
                        yield from chunks
                        continue
                    if ended:  # clean close between frames
                        self._drop_conn()
                        if not self.persistent:
                            return
                        continue
                # nothing to read now: wait for data or a connection
                may_take = conn is None or conn.waited_s >= self.takeover_quiet_s
                if may_take != listening:
                    if may_take:
                        sel.register(self.server, selectors.EVENT_READ)
                    else:
                        sel.unregister(self.server)
                    listening = may_take
                timeout = self.poll_s if conn is None or not conn.mid_frame else min(self.poll_s, 0.02)
                t0 = time.monotonic()
                events = sel.select(timeout)
                waited = time.monotonic() - t0
                idle_s += waited
                if any(key.fileobj is self.server for key, _ in events):
                    self._on_accept()
                if conn is not None and conn is self._conn:
                    self._waited(conn, waited, any(key.fileobj is conn.sock for key, _ in events))
                if self._conn is None:
                    no_conn_s += waited
                    if self.accept_timeout_s is not None and no_conn_s > self.accept_timeout_s:
                        return
                if self.heartbeat and idle_s >= self.poll_s:
                    idle_s = 0.0
                    yield None
        finally:
            sel.close()
            self.close()

    def _waited(self, conn: _Conn, waited: float, readable: bool) -> None:
        """Account ``waited`` seconds the reader waited on ``conn`` (``readable``: and then it had
        data); drop it when it has stalled inside a frame, trickles a frame too slowly, or has
        been silent too long."""
        if not readable:
            conn.waited_s += waited
        if conn.mid_frame:
            conn.frame_wait_s += waited
            size = len(conn.buf) + (LINE_HEADER.size if conn.header is not None else 0)
            if conn.waited_s > self.stall_timeout_s:
                why = f"stalled inside a frame ({conn.got} of {len(conn.buf)} bytes) for {conn.waited_s:.2f} s"
            elif conn.frame_wait_s > self.stall_timeout_s + size / MIN_FRAME_RATE_BYTES_S:
                why = f"a frame of {size} bytes still incomplete after {conn.frame_wait_s:.2f} s of waiting"
            else:
                return
        elif conn.waited_s > self.idle_timeout_s:
            why = f"no data for {self.idle_timeout_s:g} s"
        else:
            return
        self.broken += 1
        self.errors.append(f"{conn.peer[0]}:{conn.peer[1]}: {why}: dropped")
        self._drop_conn()

    def _read(self, conn: _Conn) -> tuple[list[Chunk], bool]:
        """Read what the socket holds, up to the end of one frame. Returns the frame's chunks
        (empty if none was completed) and whether the peer closed cleanly between frames."""
        while True:
            buf = conn.buf
            try:
                k = conn.sock.recv_into(buf[conn.got:], len(buf) - conn.got)
            except (BlockingIOError, InterruptedError):
                return [], False
            if k == 0:
                if not conn.mid_frame:
                    return [], True
                self.broken += 1
                raise _Broken(f"connection closed inside a frame ({conn.got} of {len(buf)} bytes)")
            conn.got += k
            conn.waited_s = 0.0
            if conn.got < len(buf):
                continue
            conn.got = 0
            if conn.header is None:
                try:
                    conn.header = decode_header(conn.head.tobytes(), self.pixels, self.max_frame_bytes)
                except FrameError as exc:
                    self.rejected += 1
                    # the stream cannot be resynchronised after a bad header: drop the connection
                    raise _Broken(f"rejected frame: {exc}") from None
                conn.buf = memoryview(bytearray(conn.header.payload_bytes))
                continue
            head, payload = conn.header, conn.buf
            conn.header, conn.buf = None, conn.head
            conn.frame_wait_s = 0.0
            chunks = self._frame(conn, head, payload)
            if chunks:
                return chunks, False

    def _frame(self, conn: _Conn, head, payload: memoryview) -> list[Chunk]:
        now = time.perf_counter()
        if conn.first_frame:
            conn.first_frame = False
            if self.next_line is not None and head.first_line < self.next_line:
                # the peer's counter started over: continue the stream after the time it was away
                away = 1
                if self.line_rate_hz and self._last_line_t is not None:
                    away = max(1, int(round((now - self._last_line_t) * self.line_rate_hz)))
                conn.offset = self.next_line + away - head.first_line
                self.restarts += 1
                self.errors.append(f"{conn.peer[0]}:{conn.peer[1]} restarted its line counter at "
                                   f"{head.first_line}: stream line {head.first_line + conn.offset}")
        if self._next_seq is not None and head.seq > self._next_seq:
            self.seq_gaps += head.seq - self._next_seq
        self._next_seq = head.seq + 1
        first = head.first_line + conn.offset
        if self.next_line is not None and first < self.next_line:
            self.stale += 1
            self.errors.append(f"frame {head.seq} starts at line {first}, before line {self.next_line} (dropped)")
            return []
        self.frames += 1
        self.lines += head.lines
        self.next_line = first + head.lines
        self._last_line_t = now
        lines = np.frombuffer(payload, dtype="<u2").reshape(head.lines, head.pixels, head.channels)
        step = self.max_lines or head.lines
        return [(first + off, lines[off:off + step], now) for off in range(0, head.lines, step)]
