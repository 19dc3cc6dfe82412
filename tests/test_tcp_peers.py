"""The TCP line source against stalled, hostile, quiet and restarting peers (no pipeline).

The incident this guards against: a peer sent 20 bytes of a header and stopped; it held the
only connection for the whole idle timeout while the detector's frames queued unread.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np

from sorting.io.wire import encode_frame
from sorting.realtime.sources import TCPLineSource

P = 16


def _lines(first, n):
    return (np.arange(first * P * 2, (first + n) * P * 2) % 65536).astype(np.uint16).reshape(n, P, 2)


def _send(address, frames, close=True, delay_s=0.0, hold_s=0.0):
    """Connect, send ``frames`` (bytes), optionally wait, close."""
    time.sleep(delay_s)
    s = socket.create_connection(address, timeout=5)
    try:
        for f in frames:
            s.sendall(f)
        time.sleep(hold_s)
    except OSError:
        pass
    finally:
        if close:
            s.close()
    return s


def _collect(source, until_lines, timeout_s=10.0):
    """Chunks (first, lines) from the source until ``until_lines`` lines came, skipping heartbeats."""
    got, n = [], 0
    deadline = time.monotonic() + timeout_s
    for item in source:
        if item is not None:
            first, lines, _ = item
            got.append((first, lines.copy()))
            n += lines.shape[0]
        if n >= until_lines or time.monotonic() > deadline:
            source.stop()
    return got


def test_a_peer_stalling_inside_a_frame_is_dropped_within_the_stall_timeout():
    source = TCPLineSource(P, max_lines=8, accept_timeout_s=None, persistent=True, heartbeat=True, poll_s=0.05,
                           stall_timeout_s=0.2)
    frame = encode_frame(0, 0, _lines(0, 10))
    hostile = threading.Thread(target=_send, args=(source.address, [frame[:20]]), kwargs={"hold_s": 5.0})
    detector_frames = [encode_frame(i, 10 * i, _lines(10 * i, 10)) for i in range(5)]
    detector = threading.Thread(target=_send, args=(source.address, detector_frames), kwargs={"delay_s": 0.1})
    hostile.start()
    t0 = time.monotonic()
    detector.start()
    got = _collect(source, 50)
    elapsed = time.monotonic() - t0
    hostile.join()
    detector.join()
    stream = np.concatenate([lines for _, lines in got])
    np.testing.assert_array_equal(stream, _lines(0, 50))
    assert source.broken == 1 and any("stalled inside a frame" in e for e in source.errors)
    # the detector waited for the stall timeout (0.2 s), not for the 10 s idle timeout or the 5 s hold
    assert elapsed < 3.0


def test_a_trickling_peer_cannot_hold_a_frame_open():
    source = TCPLineSource(P, accept_timeout_s=None, persistent=True, heartbeat=True, poll_s=0.05,
                           stall_timeout_s=0.3)
    frame = encode_frame(0, 0, _lines(0, 400))  # 25.6 kB: due within 0.3 s + 25.6 ms at 1 MB/s

    def trickle():
        s = socket.create_connection(source.address)
        try:
            for i in range(0, 400):  # a byte every 20 ms: never silent for the stall timeout
                s.send(frame[i:i + 1])
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            s.close()

    t = threading.Thread(target=trickle)
    t.start()
    deadline = time.monotonic() + 5
    for item in source:
        if source.broken or time.monotonic() > deadline:
            source.stop()
    t.join()
    assert source.broken == 1 and any("still incomplete" in e for e in source.errors)


def test_a_second_connection_waits_while_the_first_sends_and_replaces_it_once_quiet():
    source = TCPLineSource(P, max_lines=100, accept_timeout_s=None, persistent=True, heartbeat=True, poll_s=0.05,
                           takeover_quiet_s=0.3)
    first = socket.create_connection(source.address)
    second = None
    got = []
    t_quiet = None
    deadline = time.monotonic() + 10
    for i, item in enumerate(source):
        if item is not None:
            got.append((item[0], item[1].copy(), time.monotonic()))
        n = len(got)
        if n < 10 and (item is not None or i == 0):
            time.sleep(0.05)  # the first peer sends a frame every 50 ms: never quiet for 0.3 s
            first.sendall(encode_frame(n, 4 * n, _lines(4 * n, 4)))
            if n == 2 and second is None:  # a newcomer sends its frame meanwhile: it must wait
                second = socket.create_connection(source.address)
                second.sendall(encode_frame(0, 40, _lines(40, 4)))
        if n == 10 and t_quiet is None:
            t_quiet = time.monotonic()  # the first peer stops sending (its connection stays open)
        if n >= 11 or time.monotonic() > deadline:
            source.stop()
    firsts = [f for f, _, _ in got]
    assert firsts == [4 * k for k in range(10)] + [40]  # the newcomer's frame only after the first's ten
    assert source.replaced == 1 and source.connections == 2
    assert got[-1][2] - t_quiet >= 0.25  # taken up once the first had been quiet for takeover_quiet_s
    np.testing.assert_array_equal(got[-1][1], _lines(40, 4))
    first.close()
    second.close()


def test_reconnects_continue_or_renumber_the_stream():
    """Persistent: a clean close does not end the stream. A reconnect whose counter continues
    keeps its numbers (a gap where lines were lost); one whose counter restarted is renumbered
    after the stream's last line, a gap as long as it was away."""
    rate = 1000.0
    source = TCPLineSource(P, max_lines=100, accept_timeout_s=None, persistent=True, heartbeat=True,
                           poll_s=0.05, line_rate_hz=rate)

    def sessions():
        _send(source.address, [encode_frame(0, 0, _lines(0, 10))])
        time.sleep(0.2)
        _send(source.address, [encode_frame(1, 15, _lines(15, 5))])  # continues, 5 lines lost
        time.sleep(0.3)
        _send(source.address, [encode_frame(0, 0, _lines(0, 10)), encode_frame(1, 10, _lines(10, 10))])  # restart

    t = threading.Thread(target=sessions)
    t.start()
    got = _collect(source, 40)
    t.join()
    firsts = [f for f, _ in got]
    assert firsts[:2] == [0, 15]
    assert source.restarts == 1 and source.connections == 3
    # the restarted peer's line 0 lands after line 19, about 0.3 s (300 lines) later
    assert 20 + 200 <= firsts[2] <= 20 + 2000, firsts
    assert firsts[3] == firsts[2] + 10
    np.testing.assert_array_equal(got[2][1], _lines(0, 10))


def test_a_clean_close_ends_a_non_persistent_stream():
    source = TCPLineSource(P, accept_timeout_s=5)
    t = threading.Thread(target=_send, args=(source.address, [encode_frame(0, 0, _lines(0, 3))]))
    t.start()
    got = list(source)
    t.join()
    assert [f for f, _, _ in got] == [0] and source.frames == 1
