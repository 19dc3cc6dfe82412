"""The streaming loop end to end on a simulated recording.

Expected values come from the recording's truth.csv and from the belt geometry (docs/formats.md,
the event log of docs/cli.md), computed here by hand, not from the code under test. One replay at 32
lines per chunk (with the UDP valve sink and the event log attached) is shared by most tests.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import SORTER_YAML, THRESHOLD
from loop_helpers import run_loop
from udp_receiver import UDPReceiver

from sorting.cli import main
from sorting.errors import InputError
from sorting.io import read_belt_recording
from sorting.io.wire import LINE_HEADER, decode_valve, encode_frame
from sorting.offline.outcome import jets_outcome, match_particles
from sorting.realtime.events import Event
from sorting.realtime.runner import build_pipeline, timing_of
from sorting.realtime.sinks import EventLog, UDPValveSink
from sorting.realtime.sources import TCPLineSource, rechunk, replay

#: event keys that depend on the wall clock
CLOCK_KEYS = ("latency_ms", "slack_ms", "late")


# ------------------------------------------------------------------ fixtures and helpers
def _pipeline(rec, model, sorter, chunk_lines=32):
    return build_pipeline(rec.calibration, model, sorter, timing_of(rec.meta), str(SORTER_YAML), chunk_lines)


def _clockless(events, drop=()):
    return [{k: v for k, v in e.items() if k not in CLOCK_KEYS and k not in drop} for e in events]


def _by_place(events):
    """Events without clock fields and ids, in stream order: particles completed in one chunk
    are listed by first line, so the completion order (and the ids) shift with the chunk size."""
    key = lambda e: (e["first_line"], e["x_min_px"], e["last_line"], e["x_max_px"])  # noqa: E731
    return sorted(_clockless(events, drop=("particle",)), key=key)


@pytest.fixture(scope="module")
def run32(rec, model, sorter, tmp_path_factory):
    """Replay at 32 lines per chunk, as fast as possible, with the UDP sink and the event log."""
    rx = UDPReceiver()
    rx.start()
    valves = UDPValveSink("127.0.0.1", rx.port, sorter.ejector.valves)
    log_path = tmp_path_factory.mktemp("run32") / "events.jsonl"
    pipe = _pipeline(rec, model, sorter, 32)
    result = run_loop(replay(rec.lines, rec.line_rate_hz, 32), pipe, EventLog(log_path), valves)
    valves.close()
    return result, rx.finish(), log_path, valves


def _truth_cols(truth):
    return (np.array([t["centroid_line"] for t in truth]), np.array([t["centroid_px"] for t in truth]),
            np.array([bool(t.get("touching") or 0) for t in truth]))


def _near(truth, events, tol_px=2.0):
    """(rocks, events) bool: the event's centroid lies within tol_px of the rock's."""
    tl, tp, _ = _truth_cols(truth)
    el = np.array([e["centroid_line"] for e in events])
    ep = np.array([e["centroid_px"] for e in events])
    return np.hypot(tl[:, None] - el[None, :], tp[:, None] - ep[None, :]) <= tol_px


# ------------------------------------------------------------------ detection
def test_every_truth_rock_found_exactly_once(rec, run32):
    events = run32[0].events
    truth = rec.truth
    assert len(truth) > 500 and len(events) > 500
    near = _near(truth, events)
    per_rock, per_event = near.sum(axis=1), near.sum(axis=0)
    single = ~_truth_cols(truth)[2]
    assert single.sum() > 500
    assert np.mean(per_rock[single] == 1) >= 0.995
    assert not np.any(per_rock > 1), "a rock was reported twice"
    ghosts = [e for e, k in zip(events, per_event) if k == 0 and not e["cut"]]
    assert ghosts == []
    assert len({e["particle"] for e in events}) == len(events)
    # the event's box holds the rock's centroid, and its area is the rock's (within the edge pixels)
    ti, ei = np.nonzero(near)
    for i, j in zip(ti, ei):
        t, e = truth[i], events[j]
        assert e["first_line"] <= t["centroid_line"] <= e["last_line"]
        assert e["x_min_px"] <= t["centroid_px"] <= e["x_max_px"]
        assert abs(e["first_line"] - t["first_line"]) <= 2 and abs(e["last_line"] - t["last_line"]) <= 2
        assert abs(e["x_min_px"] - t["x_min_px"]) <= 2 and abs(e["x_max_px"] - t["x_max_px"]) <= 2
    # the run's own scoring (sorting/offline/outcome.py) agrees with this independent count
    det = match_particles(events, truth)
    assert det["duplicated"] == 0
    assert det["found_once"] == int(np.sum(per_rock == 1))
    assert det["unmatched_particles"] == int(np.sum(per_event == 0))
    assert det["centroid_error_px_p99"] <= 2.0


def test_particle_ids_and_completion_order(rec, run32):
    events = run32[0].events
    assert [e["particle"] for e in events] == list(range(len(events)))
    # a particle completes when the line after its last line arrives: completion order is
    # last-line order up to one chunk (32 lines)
    last = np.array([e["last_line"] for e in events])
    assert np.all(np.maximum.accumulate(last) - last < 32)


@pytest.mark.parametrize("chunk_lines", [16, 128])
def test_same_particles_and_decisions_for_any_chunk_size(rec, model, sorter, run32, chunk_lines):
    ref = run32[0].events
    decisions = {e["decision"] for e in ref}
    assert decisions == {"eject", "pass"}, "the test needs both decisions"
    res = run_loop(replay(rec.lines, rec.line_rate_hz, chunk_lines), _pipeline(rec, model, sorter, chunk_lines))
    assert _by_place(res.events) == _by_place(ref)
    assert res.summary["lines"] == rec.lines.shape[0]


# ------------------------------------------------------------------ ejection
def test_every_eject_covers_its_own_centroid(rec, sorter, run32):
    f = rec.line_rate_hz
    pitch = rec.meta["pixel_pitch_mm"]
    speed_mm_s = rec.belt_speed_m_s * 1000.0
    ej = sorter.ejector
    ejects = [e for e in run32[0].events if e["decision"] == "eject"]
    assert len(ejects) > 50
    for e in ejects:
        assert not e["cut"] and not e["too_long"]
        assert e["score"] >= THRESHOLD
        v = e["valves"]
        assert v == list(range(v[0], v[-1] + 1)) and 0 <= v[0] and v[-1] < ej.valves
        # the centroid's column, in mm from the valve row's left edge, lies under an open valve
        x_mm = (e["centroid_px"] + 0.5) * pitch - ej.offset_mm
        assert v[0] * ej.valve_pitch_mm <= x_mm < (v[-1] + 1) * ej.valve_pitch_mm
        # ... and the air is on when the centroid reaches the nozzle row
        arrive_s = (e["centroid_line"] + 0.5) / f + ej.distance_mm / speed_mm_s
        assert e["open_s"] <= arrive_s <= e["close_s"]
        # air window by hand: leading edge minus margin .. trailing edge plus margin, >= min pulse
        open_s = e["first_line"] / f + (ej.distance_mm - ej.margin_mm) / speed_mm_s
        close_s = (e["last_line"] + 1) / f + (ej.distance_mm + ej.margin_mm) / speed_mm_s
        stretch = max(ej.min_pulse_ms / 1000 - (close_s - open_s), 0.0) / 2
        assert e["open_s"] == pytest.approx(open_s - stretch, abs=2e-6)
        assert e["close_s"] == pytest.approx(close_s + stretch, abs=2e-6)
        # valves by hand: particle extent plus margin, valves partly under it
        lo = int(np.floor((e["x_min_px"] * pitch - ej.margin_mm - ej.offset_mm) / ej.valve_pitch_mm))
        hi = int(np.ceil(((e["x_max_px"] + 1) * pitch + ej.margin_mm - ej.offset_mm) / ej.valve_pitch_mm)) - 1
        assert (v[0], v[-1]) == (max(lo, 0), min(hi, ej.valves - 1))


def test_slack_and_lateness_follow_the_contract(rec, sorter, run32):
    f = rec.line_rate_hz
    resp_s = sorter.ejector.response_ms / 1000
    for e in run32[0].events:
        assert e["late"] == (e["slack_ms"] < 0)
        if e["decision"] == "pass":
            assert e["valves"] == [] and e["open_s"] is None and e["close_s"] is None
            continue
        slack = (e["open_s"] - resp_s - e["last_line"] / f) * 1000 - e["latency_ms"]
        assert e["slack_ms"] == pytest.approx(slack, abs=2e-3)


def test_decisions_follow_the_threshold(run32):
    for e in run32[0].events:
        want = e["score"] >= THRESHOLD and not e["cut"] and not e["too_long"]
        # a score rounded to 6 digits can sit on either side of the cut
        if abs(e["score"] - THRESHOLD) > 1e-6:
            assert (e["decision"] == "eject") == want, e


def test_jets_hit_every_ejected_rock_and_nothing_else(rec, sorter, run32):
    events = run32[0].events
    out = jets_outcome(events, rec.truth, sorter, timing_of(rec.meta))
    sent = [e for e in events if e["decision"] == "eject" and not e["late"]]
    assert out["pulses_sent"] == len(sent) > 0
    assert out["misfires"] == 0
    # each pulse blows its own rock; neighbours may be co-ejected
    assert out["blown_out"] >= len(sent)


# ------------------------------------------------------------------ sinks
def test_event_log_holds_every_event(run32):
    result, _, log_path, _ = run32
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert logged == result.events
    required = {"particle", "first_line", "last_line", "x_min_px", "x_max_px", "centroid_line", "centroid_px",
                "area_mm2", "score", "decision", "valves", "open_s", "close_s", "latency_ms", "slack_ms", "late"}
    assert all(required <= e.keys() for e in logged)


def test_udp_datagrams_match_the_sent_ejects(sorter, run32):
    result, datagrams, _, valves = run32
    sent = [e for e in result.events if e["decision"] == "eject" and not e["late"]]
    got = [decode_valve(d) for d in datagrams]
    want = [{"seq": i, "particle": e["particle"], "open_s": e["open_s"], "close_s": e["close_s"],
             "valves": e["valves"]} for i, e in enumerate(sent)]
    assert got == want
    assert valves.sent == len(sent) and valves.errors == 0
    assert all(len(d) == 40 + (sorter.ejector.valves + 7) // 8 for d in datagrams)


def _event(pid, decision, late=False, valves=(), open_s=None, close_s=None):
    return Event(pid, 0, 1, 0, 1, 0.5, 0.5, 100.0, 0.5, decision, list(valves), open_s, close_s, 1.0,
                 -1.0 if late else 1.0, late, "sc")


def test_udp_sink_sends_only_timely_ejects_and_survives_no_listener():
    rx = UDPReceiver()
    rx.start()
    sink = UDPValveSink("127.0.0.1", rx.port, 80)
    sink.send([_event(0, "eject", valves=[6, 7], open_s=0.365, close_s=0.388),
               _event(1, "pass"),
               _event(2, "eject", late=True, valves=[9], open_s=0.4, close_s=0.41),
               _event(3, "eject", valves=[79], open_s=0.5, close_s=0.505)])
    sink.close()
    got = [decode_valve(d) for d in rx.finish()]
    assert got == [{"seq": 0, "particle": 0, "open_s": 0.365, "close_s": 0.388, "valves": [6, 7]},
                   {"seq": 1, "particle": 3, "open_s": 0.5, "close_s": 0.505, "valves": [79]}]
    # nobody listening: datagrams go nowhere, the loop goes on
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    sink = UDPValveSink("127.0.0.1", dead_port, 80)
    for _ in range(3):
        sink.send([_event(0, "eject", valves=[1], open_s=0.1, close_s=0.2)])
    assert sink.sent + sink.errors == 3
    sink.close()


def test_event_log_refuses_an_unwritable_path_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="event log"):
        EventLog(tmp_path / "file" / "events.jsonl")


def test_jets_outcome_by_hand(sorter):
    from sorting.stages.eject import Timing

    t = Timing(3750.0, 3.0, 0.8, 1250)
    # rock A: centroid line 1037, column 137 (110 mm, valve 8), arrives at 0.376533 s
    # rock B: same line, column 400 (320.4 mm, valve 25); rock C: line 3000, column 137
    truth = [
        {"centroid_line": 1037.0, "centroid_px": 137.0, "label": "sc", "sc2o3_ppm": 400.0, "mass_g": 10.0},
        {"centroid_line": 1037.0, "centroid_px": 400.0, "label": "waste", "sc2o3_ppm": 50.0, "mass_g": 30.0},
        {"centroid_line": 3000.0, "centroid_px": 137.0, "label": "sc", "sc2o3_ppm": 200.0, "mass_g": 60.0},
    ]
    events = [
        _event(0, "eject", valves=[6, 7, 8, 9], open_s=0.37, close_s=0.38),  # blows A
        _event(1, "eject", late=True, valves=[25], open_s=0.37, close_s=0.38),  # late: never sent
        _event(2, "eject", valves=[40], open_s=0.37, close_s=0.38),  # hits no rock: a misfire
        _event(3, "pass"),
    ]
    out = jets_outcome([e.to_json() for e in events], truth, sorter, t)  # as the event log holds them
    assert out["pulses_sent"] == 2 and out["blown_out"] == 1 and out["misfires"] == 1
    # product = rock A: mass pull 10 / 100; Sc recovery 10 x 400 / (4000 + 1500 + 12000)
    assert out["mass_pull"] == pytest.approx(0.10)
    assert out["sc_recovery"] == pytest.approx(4000 / 17500)
    assert out["product_grade_ppm"] == pytest.approx(400.0)


def test_replay_and_rechunk_cover_every_line_once():
    lines = _lines(0, 300)
    got = list(replay(lines, 3750.0, 32, start=10, stop=250))
    assert [f for f, _, _ in got] == list(range(10, 250, 32))
    np.testing.assert_array_equal(np.concatenate([c for _, c, _ in got]), lines[10:250])
    # blocks of any size (the live twin's), re-cut into chunks of at most 32 lines
    blocks = [(0, lines[:100]), (100, lines[100:101]), (101, lines[101:300])]
    got = list(rechunk(iter(blocks), 3750.0, 32))
    assert all(c.shape[0] <= 32 for _, c, _ in got)
    assert [f for f, _, _ in got] == [0, 32, 64, 96, 100, 101, 133, 165, 197, 229, 261, 293]
    np.testing.assert_array_equal(np.concatenate([c for _, c, _ in got]), lines)


def test_paced_replay_stamps_each_chunk_with_its_acquisition_time():
    # paced, a chunk is stamped when its last line is acquired, t0 + end_line / rate, even when
    # the consumer is late (the wait in the acquisition buffer is part of the latency)
    rate = 3750.0
    got = []
    for first, chunk, t_in in replay(_lines(0, 256), rate, 32, realtime=True, start=64):
        got.append((first + chunk.shape[0], t_in))
        if first == 96:
            threading.Event().wait(0.05)  # a slow step: the next chunks are already due
    t0 = got[0][1] - got[0][0] / rate
    for end, t_in in got:
        assert t_in == pytest.approx(t0 + end / rate, abs=1e-9)


# ------------------------------------------------------------------ TCP line stream
def _frame_plan(start: int, stop: int, rng, max_lines: int = 300) -> list[tuple[int, int]]:
    """(first_line, lines) of frames of random sizes covering start .. stop - 1."""
    out = []
    first = start
    while first < stop:
        n = int(min(rng.integers(1, max_lines + 1), stop - first))
        out.append((first, n))
        first += n
    return out


class _Client(threading.Thread):
    """An acquisition process: sends ``sessions`` (lists of byte strings), one connection each."""

    def __init__(self, address, sessions):
        super().__init__(daemon=True)
        self.address, self.sessions = address, sessions
        self.error: BaseException | None = None
        self.dropped = 0

    def run(self):
        try:
            for session in self.sessions:
                with socket.create_connection(self.address, timeout=10) as s:
                    try:
                        for msg in session:
                            s.sendall(msg)
                        s.shutdown(socket.SHUT_WR)
                        # wait until the server has read everything and dropped or ended the connection
                        while s.recv(1024):
                            pass
                    except OSError:  # reset, broken pipe, not connected
                        self.dropped += 1  # the server dropped us after a bad frame: reconnect
        except BaseException as exc:  # reported by the test
            self.error = exc


def _frames(lines, plan, seq0=0):
    return [encode_frame(seq0 + i, first, lines[first:first + n]) for i, (first, n) in enumerate(plan)]


def test_tcp_source_gives_the_same_events_as_replay(rec, model, sorter, run32):
    rng = np.random.default_rng(4)
    plan = _frame_plan(0, rec.lines.shape[0], rng)
    source = TCPLineSource(rec.lines.shape[1], max_lines=32, accept_timeout_s=20)
    assert source.address[0] == "127.0.0.1"
    client = _Client(source.address, [_frames(rec.lines, plan)])
    client.start()
    res = run_loop(iter(source), _pipeline(rec, model, sorter, 32))
    client.join(10)
    assert client.error is None
    assert (source.frames, source.rejected, source.broken, source.stale) == (len(plan), 0, 0, 0)
    assert res.summary["gaps"] == 0 and res.summary["lines"] == rec.lines.shape[0]
    assert _by_place(res.events) == _by_place(run32[0].events)


def test_dropped_lines_are_counted_and_never_stitched(rec, model, sorter, run32):
    """The acquisition sends a broken frame, reconnects and goes on 200 lines later."""
    truth = rec.truth
    n_lines, pixels = rec.lines.shape[:2]
    # the gap starts in the middle of a rock, half way through the recording
    mid = [t for t in truth if t["first_line"] > n_lines // 2 and not t.get("touching")][0]
    gap0, gap1 = int(mid["centroid_line"]), int(mid["centroid_line"]) + 200
    rng = np.random.default_rng(5)
    before, after = _frame_plan(0, gap0, rng), _frame_plan(gap1, n_lines, rng)
    garbage = b"JUNK" + bytes(LINE_HEADER.size - 4)
    client = _Client(("127.0.0.1", 0), [_frames(rec.lines, before) + [garbage],
                                        _frames(rec.lines, after, seq0=len(before))])
    source = TCPLineSource(pixels, max_lines=32, accept_timeout_s=20)
    client.address = source.address
    client.start()
    res = run_loop(iter(source), _pipeline(rec, model, sorter, 32))
    client.join(10)
    assert client.error is None
    assert (source.rejected, source.connections) == (1, 2)
    s = res.summary
    assert (s["gaps"], s["dropped_lines"]) == (1, 200)
    assert s["lines"] == n_lines - 200
    events = res.events
    # no ghost: every particle is a truth rock, or flagged cut (and then never fired)
    near = _near(truth, events)
    for e, k in zip(events, near.sum(axis=0)):
        assert k == 1 or e["cut"], e
        if e["cut"]:
            assert e["decision"] == "pass"
    # nothing spans the gap: lines gap0 .. gap1 - 1 belong to no particle
    assert not any(e["first_line"] < gap1 and e["last_line"] >= gap0 for e in events)
    # the rock the gap cuts is reported in pieces flagged cut, on both sides
    cut = [e for e in events if e["cut"]]
    assert any(e["last_line"] == gap0 - 1 for e in cut) and any(e["first_line"] == gap1 for e in cut)
    # before the gap, the same particles and decisions as the uninterrupted replay
    def before_gap(evs):
        return [e for e in _by_place(evs) if e["last_line"] < gap0 - 1]
    assert before_gap(events) == before_gap(run32[0].events)
    # after it, the same particles; the air tracker learnt from 200 fewer lines of belt, so
    # scores may move a little (the tracked level is a running mean of what was seen)
    def after_gap(evs):
        return [e for e in _by_place(evs) if e["first_line"] > gap1]
    # (an edge pixel may flip: the foreground threshold sits on the tracked level too)
    got, want = after_gap(events), after_gap(run32[0].events)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for k in ("first_line", "last_line", "x_min_px", "x_max_px"):
            assert abs(a[k] - b[k]) <= 1, (a, b)
        assert abs(a["centroid_line"] - b["centroid_line"]) < 0.2 and abs(a["centroid_px"] - b["centroid_px"]) < 0.2
        assert a["area_mm2"] == pytest.approx(b["area_mm2"], rel=0.03)
    # a rim pixel more or less moves a small rock's score a little; decisions barely change
    diffs = np.array([abs(a["score"] - b["score"]) for a, b in zip(got, want)])
    assert diffs.mean() < 0.01 and diffs.max() < 0.15
    assert np.mean([a["decision"] == b["decision"] for a, b in zip(got, want)]) >= 0.97


# ------------------------------------------------------------------ TCP hardening (no pipeline)
P_SMALL = 16


def _lines(first, n):
    return (np.arange(first * P_SMALL * 2, (first + n) * P_SMALL * 2) % 65536).astype(np.uint16).reshape(
        n, P_SMALL, 2)


def _collect(source, sessions):
    client = _Client(source.address, sessions)
    client.start()
    got = [(first, lines.copy()) for first, lines, _ in source]
    client.join(10)
    assert client.error is None
    return got


def test_tcp_source_binds_to_loopback_by_default():
    with TCPLineSource(P_SMALL) as source:
        assert source.address[0] == "127.0.0.1"


def test_bad_frames_are_rejected_and_the_source_keeps_serving():
    good = lambda seq, first, n: encode_frame(seq, first, _lines(first, n))  # noqa: E731
    head = encode_frame(0, 0, _lines(0, 1))[:LINE_HEADER.size]
    wrong_pixels = encode_frame(3, 20, np.zeros((2, P_SMALL + 1, 2), np.uint16))
    truncated = good(2, 20, 10)[:-7]
    sessions = [
        [good(0, 0, 10), good(1, 10, 10), b"XRTX" + head[4:]],  # bad magic
        [wrong_pixels],
        [head[:4] + (7).to_bytes(2, "little") + head[6:]],  # unsupported version
        [truncated],  # the peer dies inside a frame
        [good(3, 20, 10), good(4, 5, 3), good(8, 30, 20)],  # a stale frame, then 3 frames lost upstream
    ]
    source = TCPLineSource(P_SMALL, max_lines=8, accept_timeout_s=20)
    got = _collect(source, sessions)
    assert (source.rejected, source.broken, source.stale, source.connections) == (3, 1, 1, 5)
    assert source.seq_gaps == 1 + 3  # frame 2 never arrived whole; 5..7 never came
    assert len(source.errors) == 5
    # every good line came through once, in order, in pieces of at most 8 lines
    assert all(lines.shape[0] <= 8 for _, lines in got)
    firsts = [first for first, _ in got]
    assert firsts == sorted(firsts)
    stream = np.concatenate([lines for _, lines in got])
    np.testing.assert_array_equal(stream, _lines(0, 50))
    assert source.lines == 50


def test_an_oversized_header_is_refused_before_allocating():
    huge = encode_frame(0, 0, _lines(0, 1))[:LINE_HEADER.size]
    huge = huge[:24] + (2**32 - 1).to_bytes(4, "little") + huge[28:]  # 2^32 lines x 16 px = 256 GiB
    source = TCPLineSource(P_SMALL, accept_timeout_s=20)
    tracemalloc.start()
    try:
        got = _collect(source, [[huge], [encode_frame(1, 0, _lines(0, 4))]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert source.rejected == 1 and "cap" in source.errors[0]
    assert len(got) == 1 and got[0][0] == 0
    assert peak < 4 << 20


def test_the_source_ends_on_accept_timeout_and_on_stop():
    source = TCPLineSource(P_SMALL, accept_timeout_s=0.3, poll_s=0.05)
    assert list(source) == []
    # a silent peer is dropped after idle_timeout_s; then nobody reconnects
    source = TCPLineSource(P_SMALL, accept_timeout_s=0.3, idle_timeout_s=0.3, poll_s=0.05)
    peer = socket.create_connection(source.address)
    try:
        assert list(source) == []
        assert source.broken == 1
    finally:
        peer.close()
    # stop() while waiting for a connection that never comes
    source = TCPLineSource(P_SMALL, accept_timeout_s=60, poll_s=0.05)
    timer = threading.Timer(0.2, source.stop)
    timer.start()
    assert list(source) == []
    timer.join()


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def short_belt(rec, tmp_path_factory):
    """The first 900 lines of the small belt, as a recording of its own (truth: rocks ending before)."""
    n = 900
    root = tmp_path_factory.mktemp("short_belt") / "belt"
    root.mkdir()
    shutil.copytree(rec.root / "calibration", root / "calibration")
    meta = dict(rec.meta, lines=n)
    (root / "recording.json").write_text(json.dumps(meta))
    np.asarray(rec.lines[:n]).astype("<u2").tofile(root / "lines.u16")
    src = (rec.root / "truth.csv").read_text().splitlines()
    # a rock is whole (and completed) when the recording goes on past its last line
    keep = [row for row, t in zip(src[1:], rec.truth) if t["last_line"] < n - 1]
    (root / "truth.csv").write_text("\n".join([src[0]] + keep) + "\n")
    return root


def test_cli_run_paced_at_the_line_rate_is_never_late(short_belt, small_model, sorter_yaml, tmp_path, capsys):
    """`sorting run --realtime` on 0.24 s of belt: no late eject, every rock found once, datagrams out.

    A correctness check of the deadline logic (about 75 ms of slack per rock on the reference
    sorter), not a benchmark; on a badly overloaded machine it could still fail.
    """
    rx = UDPReceiver()
    rx.start()
    events, summary = tmp_path / "ev.jsonl", tmp_path / "summary.json"
    code = main(["run", str(short_belt), "--model", str(small_model), "--sorter", str(sorter_yaml),
                 "--events", str(events), "--realtime", "--quiet", "--summary-json", str(summary),
                 "--chunk-lines", "32", "--udp", f"127.0.0.1:{rx.port}"])
    datagrams = rx.finish()
    assert code == 0
    out = capsys.readouterr().out
    s = json.loads(summary.read_text())
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    # the summary says how far behind the loop was, if it was
    assert s["late"] == 0 and not any(e["late"] for e in logged if e["decision"] == "eject"), out
    assert s["ejected"] > 0 and s["particles"] == len(logged)
    assert len(datagrams) == s["ejected"] == s["valve_datagrams"]
    assert s["detection"]["missed"] == 0 and s["detection"]["duplicated"] == 0
    assert s["lines"] == 900
    assert s["undecided"] == 0, out  # nothing had to be shed for lack of time
    assert "late ejects 0, undecided (overload) 0" in out


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_run_listening_on_tcp_sorts_like_the_replay(short_belt, small_model, sorter_yaml, model, sorter,
                                                        tmp_path, capsys, workers):
    """A live stream, with one process or with a feature worker beside the loop."""
    short = read_belt_recording(short_belt)
    with socket.socket() as probe:  # a free port for --listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plan = _frame_plan(0, short.lines.shape[0], np.random.default_rng(6), max_lines=100)
    frames = _frames(short.lines, plan)

    def acquisition():
        for _ in range(200):  # until the run listens
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    for f in frames:
                        s.sendall(f)
                return
            except ConnectionRefusedError:
                threading.Event().wait(0.05)

    client = threading.Thread(target=acquisition, daemon=True)
    client.start()
    events, summary = tmp_path / "ev.jsonl", tmp_path / "summary.json"
    code = main(["run", str(short_belt), "--model", str(small_model), "--sorter", str(sorter_yaml), "--events",
                 str(events), "--quiet", "--listen", f"127.0.0.1:{port}", "--summary-json", str(summary),
                 "--workers", str(workers)])
    client.join(10)
    assert code == 0
    s = json.loads(summary.read_text())
    assert s["lines"] == short.lines.shape[0] and s["gaps"] == 0
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    ref = run_loop(replay(short.lines, short.line_rate_hz, 32), _pipeline(short, model, sorter, 32)).events
    assert _by_place(logged) == _by_place(ref) and len(ref) > 50
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def _one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_cli_run_on_a_broken_recording(small_belt, small_model, tmp_path, capsys):
    bad = tmp_path / "belt"
    bad.mkdir()
    (bad / "calibration").symlink_to(small_belt / "calibration")
    shutil.copy(small_belt / "recording.json", bad / "recording.json")
    (bad / "lines.u16").write_bytes(bytes(1000))
    _one_line_error(capsys, ["run", str(bad), "--model", str(small_model), "--sorter", str(SORTER_YAML),
                             "--events", str(tmp_path / "ev.jsonl")], "lines.u16")


def test_cli_run_with_a_missing_model(small_belt, tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    _one_line_error(capsys, ["run", str(small_belt), "--model", str(missing), "--sorter", str(SORTER_YAML),
                             "--events", str(tmp_path / "ev.jsonl")], "nope.onnx")


def test_cli_run_with_a_negative_sorter_value_exits_2(small_belt, small_model, tmp_path):
    yaml = tmp_path / "neg.yaml"
    yaml.write_text(SORTER_YAML.read_text().replace("distance_mm: 300.0", "distance_mm: -300.0"))
    assert "distance_mm: -300.0" in yaml.read_text()
    p = subprocess.run([sys.executable, "-m", "sorting.cli", "run", str(small_belt), "--model", str(small_model),
                        "--sorter", str(yaml), "--events", str(tmp_path / "ev.jsonl"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "neg.yaml" in lines[0] and "distance_mm" in lines[0], p.stderr
