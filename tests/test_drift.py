"""Drift: the twin's drift option and the air tracker of sorting/stages/air.py.

Expected values by hand: a relative drift d reached at stream fraction f multiplies the
signal above dark by ``1 + d f`` (low) and ``1 + 0.7 d f`` (high), so a normalization
that keeps the start's air reads empty belt at ``A = -ln(1 + d f)``; a tracker following
the air brings it back to 0. The tracker's own recursion is checked exactly.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from sorting.stages.air import AirTracker
from sorting.stages.normalize import attenuation_into
from sorting.stages.segment import foreground
from sorting.twin.belt import DRIFT_HIGH_SHARE, BeltTwin, drift_factors

PIXELS = 256
SECONDS = 1.5
DRIFT = -0.05  # the air level falls 5 %: untracked, empty belt drifts toward the detection threshold


@pytest.fixture(scope="module")
def drifted():
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials
    from sorting.stages.calibrate import calibrate

    ref = load_machine()
    machine = dataclasses.replace(ref, detector=dataclasses.replace(ref.detector, pixels=PIXELS))
    twin = BeltTwin(SECONDS, 3, machine, load_ore(), load_materials(), occupancy=0.3, workers=1, drift=DRIFT)
    cal = calibrate(twin.calibration_scans())
    raw = np.concatenate([block for _, block in twin.chunks()])
    return twin, cal, raw


def test_drift_factors_by_hand():
    g = drift_factors(0, 5, 5, 0.08)
    assert g.shape == (5, 1, 2) and g.dtype == np.float32
    np.testing.assert_allclose(g[:, 0, 0], [1.0, 1.02, 1.04, 1.06, 1.08], rtol=1e-6)
    np.testing.assert_allclose(g[:, 0, 1], 1 + DRIFT_HIGH_SHARE * np.array([0, 0.02, 0.04, 0.06, 0.08]), rtol=1e-6)
    np.testing.assert_allclose(drift_factors(3, 2, 5, 0.08)[:, 0, 0], [1.06, 1.08], rtol=1e-6)


def _truth_belt(twin, n: int, grow: int = 2) -> np.ndarray:
    """(n, P) bool: pixels outside every truth rock's box grown by ``grow`` (empty belt, known
    from the simulation, not from the code under test)."""
    belt = np.ones((n, PIXELS), bool)
    for r in twin.truth:
        belt[max(r["first_line"] - grow, 0):r["last_line"] + grow + 1,
             max(r["x_min_px"] - grow, 0):r["x_max_px"] + grow + 1] = False
    return belt


def test_twin_drift_moves_the_air_level(drifted):
    """Empty belt at the start reads the calibration's air; at the end of the stream the
    signal above dark is scaled by the hand-computed factors."""
    twin, cal, raw = drifted
    assert twin.meta["drift"] == DRIFT
    n = raw.shape[0]
    belt = _truth_belt(twin, n) & ~cal.bad
    ratio = (raw.astype(np.float64) - cal.dark) / (cal.air - cal.dark)
    for rows in (slice(0, 100), slice(n - 100, n)):
        f = (rows.start + 49.5) / (n - 1)
        got = ratio[rows][belt[rows]].mean(axis=0)
        np.testing.assert_allclose(got, 1 + DRIFT * f * np.array([1, DRIFT_HIGH_SHARE]), atol=0.002)


def _normalize(cal, raw, tracker: AirTracker | None):
    a = np.empty(raw.shape, np.float32)
    mask = np.empty(raw.shape[:2], bool)
    for first in range(0, raw.shape[0], 32):
        block = a[first:first + 32]
        attenuation_into(raw[first:first + 32], cal.dark, cal.log_flat if tracker is None else tracker.log_flat,
                         cal.bad, block)
        foreground(block, cal, 0, out=mask[first:first + 32])
        if tracker is not None:
            tracker.update(block, mask[first:first + 32])
            if (first + 32) % tracker.epoch_lines == 0:
                tracker.end_epoch()
    return a, mask


def test_tracker_follows_the_drift_and_keeps_the_calibration(drifted):
    twin, cal, raw = drifted
    before = cal.log_flat.copy()
    n = raw.shape[0]
    tail = slice(n - n // 10, n)
    f = (n - n / 20) / (n - 1)  # the tail's mean stream fraction
    expected_a = -np.log(1 + DRIFT * f * np.array([1, DRIFT_HIGH_SHARE]))  # ~ +0.049, +0.034

    a_fixed, mask_fixed = _normalize(cal, raw, None)
    # 5 % in 1.5 s is a drift squeezed 400x; a tracker lags it by about rate x time constant,
    # so it runs faster here (32-line epochs, time constant ~0.03 s: lag ~0.1 %) than by default
    tracker = AirTracker(cal, alpha=0.25, epoch_lines=32)
    a_tracked, mask_tracked = _normalize(cal, raw, tracker)
    np.testing.assert_array_equal(cal.log_flat, before)  # the Calibration is never touched

    belt = _truth_belt(twin, n)[tail] & ~cal.bad
    np.testing.assert_allclose(a_fixed[tail][belt].mean(axis=0), expected_a, atol=0.003)
    np.testing.assert_allclose(a_tracked[tail][belt].mean(axis=0), 0.0, atol=0.003)
    # the tracked air level is the drift itself, pixel by pixel
    gain = tracker.gain[~cal.bad]
    np.testing.assert_allclose(np.median(gain, axis=0), 1 + DRIFT * np.array([1, DRIFT_HIGH_SHARE]), atol=0.004)
    # pixel to pixel it scatters by the air scan's noise and the tracker's own (fast here):
    # well below one line's noise
    scatter = np.percentile(np.abs(gain - np.median(gain, axis=0)), 99, axis=0)
    assert (scatter < 0.5 * np.median(cal.air_sigma_a, axis=0)).all()
    # foreground on empty belt (specks, swollen rims): untracked it grows with the drift,
    # tracked it stays at the undrifted start's level
    head = slice(0, n // 3)
    belt_head = _truth_belt(twin, n)[head] & ~cal.bad

    def false_fg(m, rows, b):
        return m[rows][b].mean()

    start = false_fg(mask_tracked, head, belt_head)
    assert false_fg(mask_tracked, tail, belt) < 2 * start + 1e-4
    assert false_fg(mask_fixed, tail, belt) > 5 * false_fg(mask_tracked, tail, belt) + 1e-4


def test_tracker_without_drift_stays_put(small_belt):
    """On the undrifted belt (rocks everywhere), rock edges do not pull the air level."""
    from sorting.io import read_belt_recording
    from sorting.stages.calibrate import calibrate

    rec = read_belt_recording(small_belt)
    cal = calibrate(rec.calibration)
    tracker = AirTracker(cal)
    _normalize(cal, np.asarray(rec.lines[:2048]), tracker)
    gain = tracker.gain[~cal.bad]
    assert np.abs(np.median(gain, axis=0) - 1).max() < 0.001
    # per pixel, the tracker replaces the noise of the 64-line air scan, sigma_A / 8 ~ 0.002
    # (low) and 0.004 (high): the tracked level differs from it by about that, not more
    sd = np.median(cal.air_sigma_a, axis=0) / 8
    assert (np.percentile(np.abs(gain - 1), 99, axis=0) < 3.5 * sd).all()


# ---------------------------------------------------------------- the recursion by hand
def _cal(p: int = 40):
    return SimpleNamespace(pixels=p, log_flat=np.full((p, 2), 10.0, np.float32))


def test_tracker_recursion_exact():
    """Empty belt of true log level 10 + ln g, read with the tracked level L_k: A = L_k - 10 - ln g,
    so L_{k+1} - (10 + ln g) = (1 - alpha) (L_k - (10 + ln g)): a geometric approach."""
    cal = _cal()
    ln_g = np.float32(np.log(1.03))
    t = AirTracker(cal, alpha=0.25)
    mask = np.zeros((32, 40), bool)
    for _ in range(6):
        a = np.broadcast_to(t.log_flat - (10.0 + ln_g), (32, 40, 2)).astype(np.float32)
        t.update(a, mask)
        t.end_epoch()
    np.testing.assert_allclose(t.log_flat - (10.0 + ln_g), -ln_g * 0.75**6, rtol=1e-4)


def test_tracker_learns_only_from_empty_belt():
    cal = _cal()
    t = AirTracker(cal, alpha=0.5, margin_px=2, min_lines=4)
    a = np.full((32, 40, 2), -0.01, np.float32)  # belt reads 1 % brighter than the air
    mask = np.zeros((32, 40), bool)
    mask[:, 10:15] = True  # a rock over all lines of columns 10-14 ...
    a[:, 10:15] = 3.0
    mask[:20, 30] = True  # ... and one over lines 0-19 of column 30
    a[:20, 30] = 3.0
    bad_lines = np.zeros(32, bool)
    bad_lines[:8] = True  # a tube trip: these lines teach nothing
    a[:8] = 9.0
    bad_cols = np.zeros(40, bool)
    bad_cols[36:] = True  # a frozen module
    a[:, 36:] = -5.0
    t.update(a, mask, bad_lines, bad_cols)
    assert (t.log_flat == 10.0).all()  # nothing moves before the epoch ends
    t.end_epoch()
    step = t.log_flat - 10.0
    expect = np.full(40, 0.5 * 0.01)  # alpha x the empty belt's mean |A|, wherever belt was seen
    expect[8:17] = 0.0  # the rock and its 2-column margin along the line: never empty
    expect[36:] = 0.0  # the frozen module
    np.testing.assert_allclose(step[:, 0], expect, atol=1e-6)
    np.testing.assert_allclose(step[:, 1], expect, atol=1e-6)
    # columns 28-32 saw empty belt on lines 20-31 only (12 lines): too few for min_lines=13
    t2 = AirTracker(cal, alpha=0.5, margin_px=2, min_lines=13)
    t2.update(a, mask, bad_lines, bad_cols)
    t2.end_epoch()
    assert (t2.log_flat[28:33] == 10.0).all() and (t2.log_flat[17:28] > 10.0).all()


@pytest.mark.parametrize("margin", [0, 1, 3, 60])
def test_tracker_sums_match_dilated_mask(margin):
    """The tracker's sums and counts against an independent reading: empty = the mask dilated
    along the line by OpenCV, minus bad lines and columns; sums in float64 of the kept A."""
    import cv2
    rng = np.random.default_rng(margin)
    cal = _cal(50)
    a = rng.normal(0.0, 0.02, (32, 50, 2)).astype(np.float32)
    mask = rng.random((32, 50)) < 0.1
    bad_lines = rng.random(32) < 0.2
    bad_cols = rng.random(50) < 0.1
    t = AirTracker(cal, margin_px=margin)
    t.update(a, mask, bad_lines, bad_cols)
    empty = cv2.dilate(mask.view(np.uint8), np.ones((1, 2 * margin + 1), np.uint8)) == 0
    empty[bad_lines] = False
    empty[:, bad_cols] = False
    np.testing.assert_array_equal(t._count, empty.sum(axis=0))
    np.testing.assert_allclose(t._sum, (a * empty[..., None]).sum(axis=0, dtype=np.float64), rtol=0, atol=1e-12)


def test_tracker_refuses_flags_of_another_shape():
    t = AirTracker(_cal(50))
    a, mask = np.zeros((8, 50, 2), np.float32), np.zeros((8, 50), bool)
    with pytest.raises(ValueError, match="bad_lines"):
        t.update(a, mask, np.zeros(7, bool), None)
    with pytest.raises(ValueError, match="bad_cols"):
        t.update(a, mask, None, np.zeros(49, bool))
