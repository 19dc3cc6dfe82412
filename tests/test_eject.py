"""Valve geometry and ejection timing (sorting/stages/eject.py), against hand computation.

Reference sorter (configs/sorter_reference.yaml) on the reference belt: 3750 lines/s,
3 m/s, 0.8 mm pixels, 1250 pixels (1000 mm), 80 valves of 12.5 mm (1000 mm), nozzles
300 mm downstream (100 ms of flight), margin 5 mm (1.6667 ms at 3 m/s), response 3 ms,
minimum pulse 5 ms.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sorting.config import EjectorConfig, load_sorter
from sorting.errors import InputError
from sorting.stages.eject import Timing, check_geometry, covers, plan

REF = load_sorter(None).ejector
T = Timing(line_rate_hz=3750.0, belt_speed_m_s=3.0, pixel_pitch_mm=0.8, pixels=1250)


def _plan(first, last, xmin, xmax, ej=REF, timing=T):
    a = lambda v: np.atleast_1d(np.asarray(v, np.int64))  # noqa: E731
    return plan(a(first), a(last), a(xmin), a(xmax), ej, timing)


def test_reference_sorter_is_what_the_contract_says():
    assert REF == EjectorConfig(distance_mm=300.0, valve_pitch_mm=12.5, valves=80, offset_mm=0.0,
                                response_ms=3.0, min_pulse_ms=5.0, margin_mm=5.0)


def test_particle_by_hand():
    # lines 1000..1074: leading edge at the scan line at 1000/3750 = 0.266667 s, trailing
    # edge (end of line 1074) at 1075/3750 = 0.286667 s; 300 mm at 3 m/s = 0.1 s of flight;
    # margin 5 mm / 3000 mm/s = 1.6667 ms on each side.
    e = _plan(1000, 1074, 100, 174)
    assert e.open_s[0] == pytest.approx(0.266667 + 0.1 - 0.0016667, abs=1e-6)  # 0.365
    assert e.close_s[0] == pytest.approx(0.286667 + 0.1 + 0.0016667, abs=1e-6)  # 0.388333
    assert e.open_s[0] == pytest.approx(0.365, abs=1e-9)
    assert e.close_s[0] == pytest.approx(0.3883333333, abs=1e-9)
    # command leaves 3 ms before the air: 0.362 s
    assert e.command_s[0] == pytest.approx(0.362, abs=1e-9)
    # budget after the last line (1074 / 3750 = 0.2864 s): 75.6 ms
    assert e.deadline_ms[0] == pytest.approx(75.6, abs=1e-6)
    # columns 100..174 span 80..140 mm; plus margin 75..145 mm; valve k spans
    # [12.5 k, 12.5 (k+1)): 75 mm starts valve 6, 145 mm lies in valve 11
    assert (e.valve_lo[0], e.valve_hi[0]) == (6, 11)


def test_short_particle_gets_the_minimum_pulse_centred_on_it():
    # lines 2000..2001: 2 lines = 0.5333 ms + 2 x 1.6667 ms margin = 3.8667 ms < 5 ms.
    # The pulse grows to 5 ms centred on the particle: centre at 2001/3750 + 0.1 = 0.6336 s.
    e = _plan(2000, 2001, 600, 601)
    assert e.close_s[0] - e.open_s[0] == pytest.approx(0.005, abs=1e-12)
    assert e.open_s[0] == pytest.approx(0.6336 - 0.0025, abs=1e-9)
    assert e.close_s[0] == pytest.approx(0.6336 + 0.0025, abs=1e-9)
    assert e.command_s[0] == pytest.approx(0.6336 - 0.0025 - 0.003, abs=1e-9)
    # 600..601 -> 480..481.6 mm; with margin 475..486.6 mm -> valves 38 (475 = 38 x 12.5) .. 38
    assert (e.valve_lo[0], e.valve_hi[0]) == (38, 38)


def test_pulse_exactly_at_the_minimum_is_not_stretched():
    # a window of exactly 5 ms: n lines + 3.3333 ms = 5 ms -> n = 1.6667 ms x 3750 = 6.25 lines;
    # 7 lines give 1.8667 + 3.3333 = 5.2 ms: no stretch.
    e = _plan(0, 6, 0, 0)
    assert e.close_s[0] - e.open_s[0] == pytest.approx(7 / 3750 + 2 * 5 / 3000, abs=1e-12)
    assert e.open_s[0] == pytest.approx(0.1 - 5 / 3000, abs=1e-12)


def test_vectorised_particles_are_independent():
    first, last = np.array([1000, 2000, 0]), np.array([1074, 2001, 6])
    xmin, xmax = np.array([100, 600, 0]), np.array([174, 601, 0])
    e = plan(first, last, xmin, xmax, REF, T)
    for i in range(3):
        one = _plan(first[i], last[i], xmin[i], xmax[i])
        assert (e.valve_lo[i], e.valve_hi[i]) == (one.valve_lo[0], one.valve_hi[0])
        assert (e.open_s[i], e.close_s[i]) == (one.open_s[0], one.close_s[0])
    assert e.open_s.shape == (3,)


def test_empty_input_gives_empty_plan():
    e = plan(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), REF, T)
    assert e.valve_lo.shape == e.open_s.shape == (0,)


def test_valves_clip_at_the_belt_edges():
    # left edge: columns 0..10 = 0..8.8 mm, margin -> -5..13.8 mm: valves 0..1 (valve -1 does not exist)
    e = _plan(0, 10, 0, 10)
    assert (e.valve_lo[0], e.valve_hi[0]) == (0, 1)
    # right edge: columns 1240..1249 = 992..1000 mm, margin -> 987..1005 mm: valves 78..79
    e = _plan(0, 10, 1240, 1249)
    assert (e.valve_lo[0], e.valve_hi[0]) == (78, 79)
    # a particle whose margin edge lands exactly on a valve boundary does not open the next valve:
    # columns 0..8 -> right edge 7.2 + 5 = 12.2 mm; columns 0..9 -> 8 + 5 = 13 mm
    assert _plan(0, 1, 0, 8).valve_hi[0] == 0
    assert _plan(0, 1, 0, 9).valve_hi[0] == 1
    # 12.5 mm exactly: right edge (x_max + 1) x 0.8 + 5 = 12.5 -> x_max = 8.375, not a pixel;
    # use 1.0 mm pixels: (x_max + 1) + 5 = 12.5 -> x_max = 6.5; use margin 4.5: x_max = 7 -> 8 + 4.5 = 12.5
    ej = dataclasses.replace(REF, margin_mm=4.5)
    t1 = dataclasses.replace(T, pixel_pitch_mm=1.0, pixels=1000)
    assert _plan(0, 1, 0, 7, ej, t1).valve_hi[0] == 0
    assert _plan(0, 1, 0, 8, ej, t1).valve_hi[0] == 1


def test_offset_shifts_the_valve_row():
    # offset 6.25 mm: valve k spans [6.25 + 12.5 k, 6.25 + 12.5 (k + 1)) mm.
    # 75..145 mm -> 68.75..138.75 mm from the row's left edge -> valves 5 (68.75 / 12.5 = 5.5) .. 11 (11.1)
    ej = dataclasses.replace(REF, offset_mm=6.25)
    e = _plan(1000, 1074, 100, 174, ej)
    assert (e.valve_lo[0], e.valve_hi[0]) == (5, 11)
    # timing does not depend on the valve row's position
    moved = _plan(1000, 1074, 100, 174)
    assert (e.open_s[0], e.close_s[0]) == (moved.open_s[0], moved.close_s[0])


def test_particle_outside_a_narrow_valve_row_gets_no_valve():
    # 8 valves from 100 mm to 200 mm
    ej = dataclasses.replace(REF, offset_mm=100.0, valves=8)
    left = _plan(0, 10, 0, 10, ej)  # -5..13.8 mm: entirely left of the row
    right = _plan(0, 10, 1000, 1010, ej)  # 795..813.8 mm: entirely right of it
    inside = _plan(0, 10, 150, 160, ej)  # 115..133.8 mm -> 15..33.8 mm into the row: valves 1..2
    straddle = _plan(0, 10, 110, 130, ej)  # 83..109.8 mm -> valves 0..0 (the part over the row)
    assert left.valve_hi[0] < left.valve_lo[0]
    assert right.valve_hi[0] < right.valve_lo[0]
    assert (inside.valve_lo[0], inside.valve_hi[0]) == (1, 2)
    assert (straddle.valve_lo[0], straddle.valve_hi[0]) == (0, 0)


def test_other_belt_speed_and_line_rate():
    # 2 m/s, 5000 Hz, 500 mm to the nozzles: 0.25 s of flight, margin 10 mm = 5 ms
    t = Timing(5000.0, 2.0, 1.0, 600)
    ej = dataclasses.replace(REF, distance_mm=500.0, margin_mm=10.0, response_ms=4.0, valves=60, valve_pitch_mm=10.0)
    e = _plan(500, 549, 200, 259, ej, t)
    assert e.open_s[0] == pytest.approx(0.1 + 0.25 - 0.005, abs=1e-12)
    assert e.close_s[0] == pytest.approx(0.11 + 0.25 + 0.005, abs=1e-12)
    assert e.deadline_ms[0] == pytest.approx((0.345 - 0.004 - 549 / 5000) * 1000, abs=1e-9)
    assert (e.valve_lo[0], e.valve_hi[0]) == (19, 26)  # 190..270 mm


def test_check_geometry():
    check_geometry(REF, T, "sorter.yaml")
    with pytest.raises(InputError, match="sorter.yaml.*miss"):
        check_geometry(dataclasses.replace(REF, offset_mm=1000.0), T, "sorter.yaml")
    with pytest.raises(InputError, match="miss"):
        check_geometry(dataclasses.replace(REF, offset_mm=-1000.0), T, "sorter.yaml")
    with pytest.raises(ValueError, match="distance_mm"):  # refused where the config is made
        dataclasses.replace(REF, distance_mm=0.0)


def _covers(rocks, pulses, ej=REF, timing=T):
    """rocks: [(centroid_line, centroid_px)]; pulses: [(lo, hi, open_s, close_s)]."""
    r = np.array(rocks, np.float64).reshape(-1, 2)
    p = np.array(pulses, np.float64).reshape(-1, 4)
    return covers(r[:, 0], r[:, 1], p[:, 0].astype(int), p[:, 1].astype(int), p[:, 2], p[:, 3], ej, timing)


def test_covers_by_hand():
    # the particle of test_particle_by_hand: valves 6..11, air 0.365..0.388333 s
    pulse = (6, 11, 0.365, 0.3883333)
    # a rock centred on line 1037, column 137: centroid arrives at 1037.5 / 3750 + 0.1 = 0.376533 s,
    # its centre is at 137.5 x 0.8 = 110 mm -> valve 8: blown out
    # same column, centred on line 1200: arrives at 0.42013 s, after the air: stays
    # same line, column 200 (160.4 mm, valve 12): beside the air: stays
    # column 93 (74.8 mm, valve 5): stays; column 94 (75.6 mm, valve 6): blown out
    rocks = [(1037, 137), (1200, 137), (1037, 200), (1037, 93), (1037, 94)]
    np.testing.assert_array_equal(_covers(rocks, [pulse]), [True, False, False, False, True])


def test_covers_at_the_window_edges():
    # a rock whose centroid arrives while the air is on is covered, a microsecond outside is not.
    # centroid line c arrives at (c + 0.5) / 3750 + 0.1: line 999.5 -> 0.3666667 s
    arrive = (999.5 + 0.5) / 3750 + 0.1
    rocks = [(999.5, 137)]
    assert _covers(rocks, [(8, 8, arrive - 1e-9, arrive + 0.01)])[0]
    assert _covers(rocks, [(8, 8, arrive - 0.01, arrive + 1e-9)])[0]
    assert not _covers(rocks, [(8, 8, arrive + 1e-6, arrive + 0.01)])[0]
    assert not _covers(rocks, [(8, 8, arrive - 0.01, arrive - 1e-6)])[0]


def test_covers_with_many_pulses_in_any_order():
    # a long pulse that opened early and still blows, a short one that missed, in unsorted order
    arrive = (1037 + 0.5) / 3750 + 0.1  # 0.376533
    long_early = (8, 8, arrive - 0.05, arrive + 0.001)
    short_missed = (8, 8, arrive - 0.01, arrive - 0.005)
    other_valve = (9, 12, arrive - 0.001, arrive + 0.001)
    assert _covers([(1037, 137)], [short_missed, other_valve, long_early])[0]
    assert not _covers([(1037, 137)], [short_missed, other_valve])[0]
    # no pulse, no rock
    assert _covers([(1037, 137)], np.zeros((0, 4))).tolist() == [False]
    assert _covers(np.zeros((0, 2)), [long_early]).shape == (0,)


def test_covers_with_an_offset_valve_row():
    # offset 6.25: column 94 centre 75.6 mm -> 69.35 mm into the row -> valve 5
    ej = dataclasses.replace(REF, offset_mm=6.25)
    arrive = (1037 + 0.5) / 3750 + 0.1
    assert _covers([(1037, 94)], [(5, 5, arrive - 0.001, arrive + 0.001)], ej)[0]
    assert not _covers([(1037, 94)], [(6, 6, arrive - 0.001, arrive + 0.001)], ej)[0]


def test_every_planned_pulse_covers_its_own_particle_centre():
    # for any box, the air covers the box centre: the plan is consistent with covers()
    rng = np.random.default_rng(3)
    n = 500
    first = rng.integers(0, 100000, n)
    last = first + rng.integers(0, 200, n)
    xmin = rng.integers(0, 1250, n)
    xmax = np.minimum(xmin + rng.integers(0, 150, n), 1249)
    # (a row from -3 mm to 1009.5 mm still spans the whole 1000 mm belt)
    for ej in (REF, dataclasses.replace(REF, offset_mm=-3.0, valves=81, margin_mm=0.0, min_pulse_ms=0.0)):
        e = plan(first, last, xmin, xmax, ej, T)
        cl, cx = (first + last) / 2, (xmin + xmax) / 2
        for i in range(0, n, 5):
            got = covers(cl[i:i + 1], cx[i:i + 1], e.valve_lo[i:i + 1], e.valve_hi[i:i + 1],
                         e.open_s[i:i + 1], e.close_s[i:i + 1], ej, T)
            assert got[0], (first[i], last[i], xmin[i], xmax[i])


def test_the_loops_chunk_kernel_plans_as_plan_does():
    """The streaming loop's per-chunk kernel gives plan's valves and times bit for bit, and each
    particle's box in the ring."""
    from sorting.realtime.stream import _chunk_plan
    from sorting.stages.eject import plan_parameters

    rng = np.random.default_rng(4)
    n = 5000
    first = rng.integers(0, 10**7, n)
    last = first + rng.integers(0, 300, n)
    col0 = rng.integers(0, 1050, n)
    col1 = col0 + rng.integers(0, 200, n)
    ints = np.column_stack((first, col0, last, col1, rng.integers(1, 5000, n))).astype(np.int64)
    for timing in (T, Timing(1234.5, 1.7, 1.1, 1250)):
        lo, hi, times, boxes = _chunk_plan(ints, plan_parameters(REF, timing))
        want = plan(first, last, col0, col1, REF, timing)
        np.testing.assert_array_equal(lo, want.valve_lo)
        np.testing.assert_array_equal(hi, want.valve_hi)
        for row, name in enumerate(("open_s", "close_s", "command_s", "deadline_ms")):
            np.testing.assert_array_equal(times[row], getattr(want, name))
        np.testing.assert_array_equal(boxes, np.column_stack((first, col0, last - first + 1, col1 - col0 + 1)))
