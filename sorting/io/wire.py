"""Wire formats of the control-PC interfaces: the TCP line stream in, the UDP valve commands out.

TCP line stream (acquisition process -> pipeline), one frame per block of lines,
all integers little-endian::

    offset size  field
    0      4     magic  b"XRTL"
    4      2     version (1)
    6      2     channels (2)
    8      8     sequence number (u64, +1 per frame)
    16     8     first line index (u64, stream line of the frame's first line)
    24     4     line count L (u32)
    28     4     pixels P (u32)
    32     2*L*P*channels  payload: uint16 counts, C order (L, P, channels)

A frame whose first line is past the previous frame's end means dropped lines (a gap);
one that starts before it is dropped (stale). A header that breaks these rules (or
announces more than ``MAX_FRAME_BYTES`` of payload) is rejected before anything is
allocated, counted, and the connection is dropped; the acquisition process reconnects
and goes on. Closing the connection between frames ends the stream.

UDP valve command (pipeline -> valve controller), one datagram per ejected particle::

    0      4     magic b"XRTV"
    4      2     version (1)
    6      2     valves V (u16)
    8      8     sequence number (u64, +1 per datagram)
    16     8     particle id (u64)
    24     8     open time (f64, stream seconds: air starts at the nozzle row)
    32     8     close time (f64, stream seconds)
    40     ceil(V/8)  valve bitmask, bit v of byte v//8 = valve v (LSB first)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

LINE_MAGIC = b"XRTL"
VALVE_MAGIC = b"XRTV"
VERSION = 1
LINE_HEADER = struct.Struct("<4sHHQQII")
VALVE_HEADER = struct.Struct("<4sHHQQdd")
#: refuse frames larger than this (a hostile or broken peer must not make us allocate GBs)
MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameError(ValueError):
    """A malformed frame; the message says what is wrong."""


@dataclass(frozen=True)
class FrameHeader:
    seq: int
    first_line: int
    lines: int
    pixels: int
    channels: int

    @property
    def payload_bytes(self) -> int:
        return self.lines * self.pixels * self.channels * 2


def encode_frame(seq: int, first_line: int, lines: np.ndarray) -> bytes:
    """Header + payload for ``lines`` (L, P, 2) uint16."""
    lines = np.ascontiguousarray(lines, dtype="<u2")
    if lines.ndim != 3:
        raise ValueError(f"lines must be (L, P, channels), got shape {lines.shape}")
    n, p, c = lines.shape
    return LINE_HEADER.pack(LINE_MAGIC, VERSION, c, seq, first_line, n, p) + lines.tobytes()


def decode_header(buf: bytes, pixels: int | None = None, max_bytes: int = MAX_FRAME_BYTES) -> FrameHeader:
    """Check and unpack a frame header; ``pixels`` is what the pipeline expects.

    Raises
    ------
    FrameError
        Short header, bad magic, other version, channel count other than 2, 0 lines,
        other pixel count, or a payload over ``max_bytes``.
    """
    if len(buf) != LINE_HEADER.size:
        raise FrameError(f"short header ({len(buf)} of {LINE_HEADER.size} bytes)")
    magic, version, channels, seq, first, n, p = LINE_HEADER.unpack(buf)
    if magic != LINE_MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(f"unsupported version {version}")
    if channels != 2:
        raise FrameError(f"{channels} channels, expected 2")
    if n == 0:
        raise FrameError("frame with 0 lines")
    if p == 0:
        raise FrameError("frame with 0 pixels")
    if pixels is not None and p != pixels:
        raise FrameError(f"{p} pixels, expected {pixels}")
    head = FrameHeader(seq, first, n, p, channels)
    if head.payload_bytes > max_bytes:
        raise FrameError(f"frame of {head.payload_bytes} bytes exceeds the {max_bytes}-byte cap")
    return head


def encode_valve(seq: int, particle: int, open_s: float, close_s: float, valves: list[int] | range,
                 n_valves: int) -> bytes:
    """One valve datagram; ``valves`` are valve indices in ``0 .. n_valves - 1``."""
    if not 0 < n_valves < 1 << 16:
        raise ValueError(f"n_valves must be in 1 .. 65535, got {n_valves}")
    mask = bytearray((n_valves + 7) // 8)
    for v in valves:
        if not 0 <= v < n_valves:
            raise ValueError(f"valve {v} outside 0 .. {n_valves - 1}")
        mask[v >> 3] |= 1 << (v & 7)
    return VALVE_HEADER.pack(VALVE_MAGIC, VERSION, n_valves, seq, particle, open_s, close_s) + bytes(mask)


def decode_valve(buf: bytes) -> dict:
    if len(buf) < VALVE_HEADER.size or buf[:4] != VALVE_MAGIC:
        raise FrameError("not a valve datagram")
    magic, version, n_valves, seq, particle, open_s, close_s = VALVE_HEADER.unpack_from(buf)
    if version != VERSION:
        raise FrameError(f"unsupported valve datagram version {version}")
    mask = buf[VALVE_HEADER.size:]
    if len(mask) != (n_valves + 7) // 8:
        raise FrameError("valve bitmask length does not match the valve count")
    valves = [v for v in range(n_valves) if mask[v >> 3] >> (v & 7) & 1]
    return {"seq": seq, "particle": particle, "open_s": open_s, "close_s": close_s, "valves": valves}
