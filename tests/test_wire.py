"""Wire formats (sorting/io/wire.py): the TCP line frame and the UDP valve datagram.

Expected bytes come from the layout table in the module docstring, packed by hand here.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from sorting.io.wire import (
    LINE_HEADER,
    MAX_FRAME_BYTES,
    FrameError,
    decode_header,
    decode_valve,
    encode_frame,
    encode_valve,
)

P = 7


def _header(magic=b"XRTL", version=1, channels=2, seq=5, first=1000, lines=3, pixels=P) -> bytes:
    # the documented layout: 4s magic, u16 version, u16 channels, u64 seq, u64 first line, u32 L, u32 P
    return struct.pack("<4sHHQQII", magic, version, channels, seq, first, lines, pixels)


def test_header_is_32_bytes_as_documented():
    assert LINE_HEADER.size == 32


def test_frame_round_trip_matches_the_documented_layout():
    rng = np.random.default_rng(0)
    lines = rng.integers(0, 65536, size=(3, P, 2), dtype=np.uint16)
    frame = encode_frame(5, 1000, lines)
    assert frame[:32] == _header()
    assert len(frame) == 32 + 3 * P * 2 * 2
    # payload: little-endian uint16, C order (L, P, channels)
    assert frame[32:34] == int(lines[0, 0, 0]).to_bytes(2, "little")
    assert frame[34:36] == int(lines[0, 0, 1]).to_bytes(2, "little")
    head = decode_header(frame[:32], P)
    assert (head.seq, head.first_line, head.lines, head.pixels, head.channels) == (5, 1000, 3, P, 2)
    assert head.payload_bytes == len(frame) - 32
    back = np.frombuffer(frame[32:], "<u2").reshape(head.lines, head.pixels, head.channels)
    np.testing.assert_array_equal(back, lines)


def test_big_endian_input_is_sent_little_endian():
    lines = np.arange(2 * P * 2, dtype=">u2").reshape(2, P, 2)
    frame = encode_frame(0, 0, lines)
    np.testing.assert_array_equal(np.frombuffer(frame[32:], "<u2").reshape(2, P, 2), lines)


@pytest.mark.parametrize("kw, match", [
    ({"magic": b"XRTX"}, "magic"),
    ({"version": 2}, "version"),
    ({"channels": 1}, "channels"),
    ({"channels": 3}, "channels"),
    ({"lines": 0}, "0 lines"),
    ({"pixels": P + 1}, "pixels"),
    ({"pixels": 0}, "pixels"),
])
def test_malformed_headers_raise(kw, match):
    with pytest.raises(FrameError, match=match):
        decode_header(_header(**kw), P)


def test_short_header_raises():
    with pytest.raises(FrameError, match="short"):
        decode_header(_header()[:31], P)


def test_size_cap():
    pixels = 1250
    at_cap = MAX_FRAME_BYTES // (pixels * 4)  # 4 bytes per pixel and line: 2 channels of uint16
    assert decode_header(_header(lines=at_cap, pixels=pixels), pixels).payload_bytes <= MAX_FRAME_BYTES
    with pytest.raises(FrameError, match="cap"):
        decode_header(_header(lines=at_cap + 1, pixels=pixels), pixels)
    # a header announcing terabytes is refused from its 32 bytes
    with pytest.raises(FrameError, match="cap"):
        decode_header(_header(lines=2**32 - 1, pixels=pixels), pixels)
    with pytest.raises(FrameError, match="cap"):
        decode_header(_header(lines=10, pixels=pixels), pixels, max_bytes=10 * pixels * 4 - 1)


def test_valve_round_trip_matches_the_documented_layout():
    valves = [0, 6, 7, 8, 9, 10, 11, 79]
    msg = encode_valve(42, 1234, 0.365, 0.388333, valves, 80)
    # 40-byte header, then ceil(80 / 8) = 10 bytes of mask, LSB first
    assert len(msg) == 40 + 10
    assert msg[:40] == struct.pack("<4sHHQQdd", b"XRTV", 1, 80, 42, 1234, 0.365, 0.388333)
    mask = msg[40:]
    assert mask[0] == 0b1100_0001  # valves 0, 6, 7
    assert mask[1] == 0b0000_1111  # valves 8..11
    assert mask[9] == 0b1000_0000  # valve 79
    assert sum(bin(b).count("1") for b in mask) == len(valves)
    d = decode_valve(msg)
    assert d == {"seq": 42, "particle": 1234, "open_s": 0.365, "close_s": 0.388333, "valves": valves}


def test_valve_mask_for_a_valve_count_not_multiple_of_8():
    msg = encode_valve(0, 0, 1.0, 2.0, [12], 13)
    assert len(msg) == 40 + 2
    assert msg[41] == 0b0001_0000
    assert decode_valve(msg)["valves"] == [12]


@pytest.mark.parametrize("bad", [-1, 80, 1000])
def test_valve_outside_the_row_is_refused(bad):
    with pytest.raises(ValueError, match="outside"):
        encode_valve(0, 0, 0.0, 1.0, [3, bad], 80)


def test_malformed_valve_datagrams_raise():
    good = encode_valve(1, 2, 0.1, 0.2, [1, 2], 16)
    with pytest.raises(FrameError):
        decode_valve(b"XRTL" + good[4:])
    with pytest.raises(FrameError):
        decode_valve(good[:39])
    with pytest.raises(FrameError, match="bitmask"):
        decode_valve(good + b"\x00")
    with pytest.raises(FrameError, match="version"):
        decode_valve(good[:4] + struct.pack("<H", 9) + good[6:])
