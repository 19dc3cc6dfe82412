"""Line health (realtime/health.py), fault injection (twin/faults.py) and air tracking (stages/air.py).

Hand-made chunks on a hand-made 200-pixel calibration: noisy air, rocks of known
transmission, and faults drawn by hand; then the injector and the detector together on
the simulated belt, where the counters must match exactly what was injected.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sorting.realtime.health import FAULT_KINDS, LineHealth, good_runs
from sorting.twin.faults import FaultSpec, inject

P = 200
DARK = np.full((P, 2), 1000.0, np.float32)
AIR = np.tile(np.array([30000.0, 40000.0], np.float32), (P, 1))
BAD = np.zeros(P, bool)
BAD[[50, 120]] = True  # 50 reads stuck at 65535, 120 is dead (reads dark)


def _cal():
    return SimpleNamespace(dark=DARK, air=AIR, bad=BAD, pixels=P,
                           log_flat=np.log(AIR - DARK).astype(np.float32))


def lines(n: int, rng: np.random.Generator, transmission: np.ndarray | float = 1.0) -> np.ndarray:
    """Raw counts (n, P, 2): dark + T * (air - dark) with photon-like noise (~1 % of air)."""
    t = np.broadcast_to(np.asarray(transmission, np.float32), (n, P))[..., None]
    mean = DARK + t * (AIR - DARK)
    sd = 0.01 * (AIR - DARK) * np.sqrt(t) + 3.0
    raw = np.clip(np.rint(rng.normal(mean, sd)), 0, 65535).astype(np.uint16)
    raw[:, 50] = 65535
    raw[:, 120] = np.rint(rng.normal(1000.0, 3.0, (n, 2)))
    return raw


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ---------------------------------------------------------------- healthy data
def test_healthy_chunks_raise_nothing(rng):
    health = LineHealth(_cal())
    t = np.ones((32, P), np.float32)
    t[5:25, 20:60] = 0.3  # a rock
    t[10:30, 70:190] = 0.005  # a huge, very thick slab: low and high channel at 0.5 % ...
    t[:, :10] = 1.0  # ... but the belt edges still see air
    for first in range(0, 320, 32):
        h = health.check(lines(32, rng, t), first)
        assert not h.bad_lines.any() and not h.bad_cols.any()
        assert h.counts == dict.fromkeys(FAULT_KINDS, 0)
    assert health.episodes == dict.fromkeys(FAULT_KINDS, 0)


def test_belt_covered_but_for_its_edges_is_not_a_tube_trip(rng):
    """97 % of the line below 1 % transmission in both channels: still rock, not a trip."""
    t = np.full((4, P), 0.01, np.float32)
    t[:, :3] = t[:, -3:] = 1.0
    h = LineHealth(_cal()).check(lines(4, rng, t), 0)
    assert h.counts["dark"] == 0 and not h.bad_lines.any()


# ---------------------------------------------------------------- saturated, dark
def test_saturated_share_in_either_channel(rng):
    raw = lines(8, rng)
    raw[2, :60, 0] = 65535  # 60 of 198 good pixels (30 %) in the low channel: saturated
    raw[5, :40, 1] = 65535  # 40 of 198 (20 %) in the high channel: below the 25 % share
    raw[6] = 65535  # the whole line
    h = LineHealth(_cal()).check(raw, 0)
    assert np.flatnonzero(h.bad_lines).tolist() == [2, 3, 4, 6, 7]  # with 2 guard lines after each
    assert h.counts["saturated"] == 2


def test_dark_lines_episodes_and_guard(rng):
    health = LineHealth(_cal(), guard_lines=2)
    stream = lines(96, rng)
    stream[10:20] = np.rint(rng.normal(1000.0, 3.0, (10, P, 2)))  # tube trip: dark + read noise
    stream[30:40] = np.rint(rng.normal(1000.0, 3.0, (10, P, 2)))  # a second one, across a chunk boundary
    bad, counts = [], []
    for first in range(0, 96, 32):
        h = health.check(stream[first:first + 32], first)
        bad.append(h.bad_lines)
        counts.append(h.counts["dark"])
    bad = np.concatenate(bad)
    expected = np.zeros(96, bool)
    expected[10:22] = expected[30:42] = True  # each trip plus 2 guard lines
    np.testing.assert_array_equal(bad, expected)
    assert counts == [12, 8, 0]  # lines 10-19 and 30-31 | 32-39
    assert health.episodes["dark"] == 2 and health.lines["dark"] == 20


# ---------------------------------------------------------------- stuck module
def _frozen(raw: np.ndarray, rows: slice, cols: slice, value_row: int) -> np.ndarray:
    out = raw.copy()
    out[rows, cols] = raw[value_row, cols]
    return out


def test_stuck_module_of_16_columns(rng):
    raw = _frozen(lines(32, rng), slice(9, 32), slice(100, 116), 8)  # lines 9.. equal line 8
    h = LineHealth(_cal()).check(raw, 0)
    assert np.flatnonzero(h.bad_cols).tolist() == list(range(100, 116))
    assert h.counts["stuck_module"] == 23  # lines 9-31
    assert not h.bad_lines.any()  # a frozen module is masked by column, not by line


def test_15_frozen_columns_are_not_a_module(rng):
    raw = _frozen(lines(32, rng), slice(0, 32), slice(100, 115), 0)
    h = LineHealth(_cal()).check(raw, 0)
    assert not h.bad_cols.any() and h.counts["stuck_module"] == 0


def test_stuck_module_bridges_a_bad_pixel_and_spans_chunks(rng):
    """Columns 40-59 frozen (the stuck pixel 50 inside), fed one line at a time."""
    stream = _frozen(lines(40, rng), slice(5, 40), slice(40, 60), 4)
    health = LineHealth(_cal())
    flagged = []
    for i in range(40):
        h = health.check(stream[i:i + 1], i)
        flagged.append(h.counts["stuck_module"])
        if h.counts["stuck_module"]:
            assert np.flatnonzero(h.bad_cols).tolist() == [c for c in range(40, 60) if c != 50]
    assert np.flatnonzero(flagged).tolist() == list(range(5, 40))
    assert health.episodes["stuck_module"] == 1
    assert health.suspect(30, 38, 60, 80)  # borders column 59 while it was stuck
    assert health.suspect(10, 20, 20, 39)  # borders column 40
    assert not health.suspect(30, 38, 61, 80)  # column 60 was never stuck
    assert not health.suspect(10, 20, 20, 38)  # nor was column 39
    assert not health.suspect(41, 50, 60, 80)  # it passed after the last stuck line (39)


def test_stuck_at_full_scale_is_a_stuck_module_not_a_saturated_line(rng):
    raw = lines(16, rng)
    raw[:, 150:182] = 65535
    h = LineHealth(_cal()).check(raw, 0)
    assert h.counts["saturated"] == 0 and h.counts["stuck_module"] == 15
    assert h.bad_cols[150:182].all()


# ---------------------------------------------------------------- gaps, windows, helpers
def test_dropped_lines_and_window(rng):
    health = LineHealth(_cal(), x0=100, width=80)
    raw = lines(64, rng)[:, 100:180]
    health.check(raw[:16], 1000)
    h = health.check(raw[40:], 1040)
    assert h.counts["dropped"] == 24 and health.episodes["dropped"] == 1
    with pytest.raises(ValueError, match="must be"):
        health.check(raw[:, :50], 1064)


def test_good_runs():
    bad = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0], bool)
    assert good_runs(bad) == [(2, 4), (5, 6), (8, 9)]
    assert good_runs(np.ones(3, bool)) == []
    assert good_runs(np.zeros(3, bool)) == [(0, 3)]


# ---------------------------------------------------------------- injection
def _chunks(stream: np.ndarray, size: int = 32):
    for first in range(0, stream.shape[0], size):
        yield first, stream[first:first + size], float(first)


def test_injector_applies_and_records_exactly(rng):
    stream = lines(200, rng)
    stream.flags.writeable = False  # as a memmap: the injector must copy
    faults = [FaultSpec("dropped", 40, 10), FaultSpec("saturated", 60, 3), FaultSpec("dark", 90, 20),
              FaultSpec("stuck_module", 130, 40, col0=20, n_cols=30), FaultSpec("dropped", 150, 5)]
    inj = inject(_chunks(stream), faults, _cal(), seed=3)
    out = {}
    for first, chunk, _ in inj:
        for i in range(chunk.shape[0]):
            out[first + i] = chunk[i]
    assert sorted(set(range(200)) - set(out)) == list(range(40, 50)) + list(range(150, 155))
    assert all((out[i] == 65535).all() for i in range(60, 63))
    dark = np.stack([out[i] for i in range(90, 110)]).astype(float)
    assert abs(dark.mean() - 1000.0) < 0.5 and 2.5 < dark.std() < 3.5
    for i in range(130, 170):
        if i in out:
            np.testing.assert_array_equal(out[i][20:50], stream[129, 20:50])
    np.testing.assert_array_equal(out[170], stream[170])
    assert inj.injected["dropped"] == list(range(40, 50)) + list(range(150, 155))
    assert inj.injected["saturated"] == [60, 61, 62]
    assert inj.injected["dark"] == list(range(90, 110))
    assert inj.injected["stuck_module"] == [i for i in range(130, 170) if not 150 <= i < 155]
    assert inj.episodes() == {"dropped": 2, "saturated": 1, "dark": 1, "stuck_module": 2}


def test_injector_rejects_bad_specs():
    with pytest.raises(ValueError, match="kind"):
        FaultSpec("smoke", 0, 1)
    with pytest.raises(ValueError, match="extent"):
        FaultSpec("dark", 0, 0)


def test_detector_counts_match_injection(rng):
    stream = lines(640, rng, np.where(np.random.default_rng(1).random((640, P)) < 0.3, 0.2, 1.0))
    faults = [FaultSpec("saturated", 33, 4), FaultSpec("dark", 100, 50), FaultSpec("dropped", 200, 7),
              FaultSpec("stuck_module", 300, 90, col0=130, n_cols=40), FaultSpec("dark", 500, 1),
              FaultSpec("saturated", 600, 30)]
    inj = inject(_chunks(stream), faults, _cal(), seed=5)
    health = LineHealth(_cal())
    for first, chunk, _ in inj:
        health.check(chunk, first)
    for kind in FAULT_KINDS:
        assert health.lines[kind] == len(inj.injected[kind]), kind
    assert health.episodes == inj.episodes()


# ---------------------------------------------------------------- on the simulated belt
def test_faults_on_the_simulated_belt(small_belt):
    """The twin's belt with every kind of fault; the documented per-chunk recipe: counters
    match the injection, no particle forms on a bad line or a frozen module, particles
    the faults touch come out cut or suspect, and particles form again afterwards."""
    from sorting.io import read_belt_recording
    from sorting.realtime.sources import replay
    from sorting.stages.calibrate import calibrate
    from sorting.stages.normalize import attenuation
    from sorting.stages.segment import foreground
    from sorting.stages.stitch import StreamSegmenter

    rec = read_belt_recording(small_belt)
    cal = calibrate(rec.calibration)
    faults = [FaultSpec("dropped", 700, 20), FaultSpec("saturated", 1500, 10), FaultSpec("dark", 2500, 200),
              FaultSpec("stuck_module", 3500, 600, col0=600, n_cols=64), FaultSpec("dark", 5000, 1)]
    inj = inject(replay(rec.lines, rec.line_rate_hz, 32), faults, cal, seed=1)
    health = LineHealth(cal)
    seg = StreamSegmenter(rec.pixels, cal, rec.pixel_pitch_mm, rec.line_pitch_mm)
    parts, bad_line_set, seen = [], set(), 0
    for first, raw, _ in inj:
        h = health.check(raw, first)
        mask = foreground(attenuation(raw, cal, 0), cal, 0)
        mask[:, h.bad_cols] = False
        bad_line_set.update((first + np.flatnonzero(h.bad_lines)).tolist())
        for start, stop in good_runs(h.bad_lines):
            parts += seg.push(first + start, mask[start:stop])
        seen += raw.shape[0]
    parts += seg.flush()
    assert seen == rec.n_lines - 20
    for kind in FAULT_KINDS:
        assert health.lines[kind] == len(inj.injected[kind]), kind
    assert health.episodes == inj.episodes() == {"dropped": 1, "saturated": 1, "dark": 2, "stuck_module": 1}
    guards = {1510, 1511, 2700, 2701, 5001, 5002}
    assert bad_line_set == set(inj.injected["saturated"]) | set(inj.injected["dark"]) | guards
    stuck_cols = np.zeros(rec.pixels, bool)
    stuck_cols[600:664] = True
    for p in parts:
        rows = set(range(p.line0, p.line1 + 1))
        assert not rows & bad_line_set, (p.line0, p.line1)
        frozen_rows = slice(max(3500 - p.line0, 0), max(4100 - p.line0, 0))
        assert not p.mask[frozen_rows, stuck_cols[p.col0:p.col1 + 1]].any()
        # a particle next to a bad run (or the gap) may be a fragment: the segmenter says so
        if rows & {699, 720, 1499, 1512, 2499, 2702, 4999, 5003}:
            assert p.cut
        if p.col0 <= 664 and p.col1 >= 599 and 3500 <= p.line1 and p.line0 < 4100:
            assert p.cut or health.suspect(p.line0, p.line1, p.col0, p.col1)
    # sorting goes on after each fault
    for end in (720, 1512, 2702, 4100):
        assert any(end < p.line0 < end + 300 and not p.cut for p in parts), end
