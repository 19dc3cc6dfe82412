"""Messages between the loop's process and the web process, over a Unix datagram socket pair.

One datagram is one message: ``b"XS1"``, a 4-byte little-endian JSON length, the JSON
object (its ``kind`` says what it is), and optionally raw bytes (a snapshot's belt rows).
Datagrams are whole or absent: a sender that finds the socket full drops the message
(the loop never waits on the web side) and counts it.

Loop -> web: ``config`` (once, first: addresses, token, static facts), ``hello`` (the
machine, the preview geometry, the calibration levels of the preview columns),
``snap`` (the state after a chunk, with belt rows), ``reply`` (to a setpoint request).
Web -> loop: ``ready`` / ``error`` (start-up), ``threshold`` and ``model`` requests.
"""
from __future__ import annotations

import json
import socket
import struct

MAGIC = b"XS1"
_LEN = struct.Struct("<I")
#: socket buffers: room for a few snapshots while the other side is busy
SOCKET_BUFFER_BYTES = 4 << 20
#: the largest message sent (a snapshot with its belt rows stays well below)
MAX_MESSAGE_BYTES = 512 << 10
#: latency histogram bucket bounds, ms (Prometheus ``le``); the loop counts, the web side reports
LATENCY_BUCKETS_MS = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    return a, b


def encode(obj: dict, blob: bytes | memoryview = b"") -> bytes:
    head = json.dumps(obj, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(head)) + head + bytes(blob)


def decode(msg: bytes) -> tuple[dict, memoryview]:
    """``(object, blob)``; raises ValueError on anything else."""
    if len(msg) < 7 or msg[:3] != MAGIC:
        raise ValueError("not a service message")
    (n,) = _LEN.unpack_from(msg, 3)
    if 7 + n > len(msg):
        raise ValueError("truncated service message")
    obj = json.loads(msg[7:7 + n])
    if not isinstance(obj, dict) or "kind" not in obj:
        raise ValueError("service message without a kind")
    return obj, memoryview(msg)[7 + n:]


def send_nowait(sock: socket.socket, obj: dict, blob: bytes | memoryview = b"") -> bool:
    """Send one message without blocking; False if the socket is full or gone (dropped)."""
    try:
        sock.send(encode(obj, blob), socket.MSG_DONTWAIT)
        return True
    except (BlockingIOError, InterruptedError, ConnectionError, OSError):
        return False
