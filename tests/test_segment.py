"""Segmentation: per-pixel foreground, touching-rock split, the crop path and the stitcher.

Expected values come from hand computation (thresholds), from geometry drawn with OpenCV
(discs, ellipses), from whole-frame connected components (an independent labelling of the
same mask) and from the simulator's truth.
"""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from sorting.stages.particles import Particles, SegmentConfig
from sorting.stages.segment import foreground, segment_crop
from sorting.stages.split import split_touching
from sorting.stages.stitch import StreamSegmenter

PITCH = 0.8  # mm, both directions: 0.64 mm2 per pixel, min_area 15 mm2 = 23.4 px


class FakeCal(SimpleNamespace):
    """Only what foreground() reads: per-pixel air noise of A and the bad-pixel flags, and
    the calibration's store of derived tables."""

    def derived(self, key, build):
        store = self.__dict__.setdefault("_derived", {})
        if key not in store:
            store[key] = build()
        return store[key]


def fake_cal(pixels: int, sigma=(0.02, 0.04), bad=()):
    s = np.tile(np.asarray(sigma, np.float32), (pixels, 1))
    b = np.zeros(pixels, bool)
    b[list(bad)] = True
    return FakeCal(air_sigma_a=s, bad=b)


def disc(shape, center, radius):
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, (int(center[1]), int(center[0])), int(radius), 1, -1)
    return m.astype(bool)


def ellipse(shape, center, axes, angle_deg):
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (int(center[1]), int(center[0])), (int(axes[0]), int(axes[1])), angle_deg, 0, 360, 1, -1)
    return m.astype(bool)


def rock_a(mask, a_low=0.8, a_high=0.4):
    a = np.zeros(mask.shape + (2,), np.float32)
    a[mask] = (a_low, a_high)
    return a


# ---------------------------------------------------------------- foreground
def test_foreground_threshold_by_hand():
    # sigma (0.02, 0.04), edge_ratio 2: w ~ (2/0.0004, 1/0.0016) = (5000, 625) -> (8/9, 1/9);
    # sigma_c = sqrt((8/9)^2 0.0004 + (1/9)^2 0.0016) = 0.018325; threshold 5 sigma_c = 0.091625
    cal = fake_cal(4)
    a = np.array([[[0.1, 0.05], [0.09, 0.05], [0.0, 0.8], [0.103, 0.0]]], np.float32)
    # scores: 0.09444, 0.08556, 0.08889, 0.09156
    assert foreground(a, cal).tolist() == [[True, False, False, False]]
    a[0, 3, 0] = 0.1032  # score 0.09173 > 0.091625
    assert foreground(a, cal)[0, 3]


def test_foreground_floor_and_nan():
    cal = fake_cal(3, sigma=(1e-4, 1e-4))  # noise-free detector: the absolute floor rules
    a = np.array([[[0.049, 0.049], [0.051, 0.051], [np.nan, 1.0]]], np.float32)
    assert foreground(a, cal, config=SegmentConfig(min_attenuation=0.05)).tolist() == [[False, True, False]]


def test_foreground_is_per_line_and_uses_x0_columns():
    rng = np.random.default_rng(0)
    cal = fake_cal(300, sigma=(0.02, 0.04))
    cal.air_sigma_a[150:] *= 3  # noisier right half: a higher threshold there
    a = rng.normal(0, 0.05, (97, 200, 2)).astype(np.float32)
    whole = foreground(a, cal, x0=100)
    parts = np.concatenate([foreground(a[i:i + k], cal, x0=100) for i, k in
                            zip((0, 1, 17, 50), (1, 16, 33, 47))])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, foreground(a, cal, x0=0))
    out = np.empty((97, 200), bool)
    assert foreground(a, cal, x0=100, out=out) is out and np.array_equal(out, whole)


def test_foreground_follows_the_calibration_it_is_given():
    a = np.full((2, 5, 2), (0.12, 0.06), np.float32)
    quiet, noisy = fake_cal(5), fake_cal(5, sigma=(0.04, 0.08))  # thresholds 0.092 and 0.183
    assert foreground(a, quiet).all() and not foreground(a, noisy).any()
    assert foreground(a, quiet).all()


def test_detection_tables_of_many_windows_stay_bounded():
    """Rock crops come at every position and width: a calibration keeps the tables of the most
    recently used windows only, and a window whose tables were dropped detects as before."""
    from sorting.stages.segment import DETECTOR_WINDOWS

    cal = fake_cal(2000, sigma=(0.02, 0.04), bad=(500, 1501))
    a = np.random.default_rng(5).normal(0, 0.1, (6, 40, 2)).astype(np.float32)
    first = foreground(a, cal, x0=480)
    for x0 in range(DETECTOR_WINDOWS + 50):
        foreground(a, cal, x0=x0 + 1000)
    windows = cal._derived["detector_windows"]
    assert len(windows) == DETECTOR_WINDOWS
    assert (480, 40, SegmentConfig()) not in windows  # the oldest went first
    assert np.array_equal(foreground(a, cal, x0=480), first)
    assert np.array_equal(first, foreground(a, fake_cal(2000, sigma=(0.02, 0.04), bad=(500, 1501)), x0=480))


def test_dead_column_neither_stripe_nor_cut():
    cal = fake_cal(60, bad=(30,))
    m = disc((60, 60), (30, 30), 12)
    a = rock_a(m)
    a[:, 30] = 20.0  # a dead pixel reads dark: huge attenuation in every line
    fg = foreground(a, cal)
    assert not fg[:10, 30].any() and not fg[-10:, 30].any()  # no stripe on the empty belt
    expect = m.copy()
    expect[:, 30] = m[:, 29] & m[:, 31]  # both good neighbours in the rock
    assert np.array_equal(fg, expect)
    assert cv2.connectedComponents(fg.view(np.uint8), connectivity=8)[0] == 2  # not cut in two
    assert np.all(a[:, 30] == 20.0)  # input untouched


# ---------------------------------------------------------------- split_touching
@pytest.mark.parametrize("r1, r2", [(30, 30), (25, 12), (30, 6)])
def test_touching_discs_split(r1, r2):
    shape = (90, 140)
    d1 = disc(shape, (45, 40), r1)
    d2 = disc(shape, (45 + 0, 40 + r1 + r2 + 1), r2)  # one pixel apart: touching in 8-connectivity
    both = d1 | d2
    assert cv2.connectedComponents(both.view(np.uint8), connectivity=8)[0] == 2  # one component
    lab = split_touching(both, PITCH, PITCH)
    assert lab.max() == 2
    for d in (d1, d2):
        best = max(np.count_nonzero((lab == k) & d) / np.count_nonzero((lab == k) | d) for k in (1, 2))
        assert best > 0.95


@pytest.mark.parametrize("axes, angle", [((60, 20), 0), ((60, 20), 33), ((50, 8), 71), ((12, 4), 10), ((30, 28), 0)])
def test_convex_rock_stays_whole(axes, angle):
    m = ellipse((140, 140), (70, 70), axes, angle)
    lab = split_touching(m, PITCH, PITCH)
    assert lab.max() == 1 and np.array_equal(lab > 0, m)


def test_split_keeps_separate_components_and_can_be_off():
    shape = (60, 120)
    a, b = disc(shape, (30, 25), 20), disc(shape, (30, 90), 20)
    lab = split_touching(a | b, PITCH, PITCH)
    assert lab.max() == 2 and set(np.unique(lab[a])) == {1} and set(np.unique(lab[b])) == {2}
    touching = disc(shape, (30, 25), 20) | disc(shape, (30, 66), 20)
    assert split_touching(touching, PITCH, PITCH, SegmentConfig(split_touching=False)).max() == 1


def test_flood_is_skimage_watershed():
    """The split's compiled flooding gives scikit-image's watershed labels (connectivity 2,
    markers, mask), ties included: on random blobs of touching discs, with the exact
    distance (the split's own input), with an L1 distance full of plateaus, and with stray
    markers inside and outside the mask; and on small random images of a few levels with
    markers anywhere (a marker off a minimum floods uphill first: the order skimage keeps)."""
    import cv2
    from skimage.segmentation import watershed

    from sorting.stages.split import flood

    rng = np.random.default_rng(11)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(8, 70, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(3, 18)), 1, -1)
        if trial % 3 == 0:
            d = cv2.distanceTransform(m, cv2.DIST_L1, 3).astype(np.float32)
        else:
            d = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        mask = m.astype(bool)
        peaks = mask & (d >= cv2.dilate(d, np.ones((3, 3), np.uint8)))
        _, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        if trial % 5 == 0:
            markers[rng.random(markers.shape) < 0.01] = 7
        want = watershed(-d, markers, mask=mask, connectivity=2)
        got = flood(-d, markers, mask)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
    for trial in range(1000):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        image = rng.integers(0, 4, (h, w)).astype(np.float32)
        mask = rng.random((h, w)) < 0.8
        markers = np.zeros((h, w), np.int32)
        for label in range(1, int(rng.integers(1, 5)) + 1):
            markers[rng.integers(0, h), rng.integers(0, w)] = label
        np.testing.assert_array_equal(flood(image, markers, mask), watershed(image, markers, mask=mask, connectivity=2),
                                      err_msg=f"random image {trial}")


def test_split_anisotropic_pitch():
    # lines twice as long as pixels: circles of 16 mm radius are ellipses of 20 x 10 px
    shape = (60, 120)
    m = ellipse(shape, (30, 30), (20, 10), 0) | ellipse(shape, (30, 71), (20, 10), 0)
    assert split_touching(m, 0.8, 1.6).max() == 2
    assert split_touching(ellipse(shape, (30, 40), (30, 10), 0), 0.8, 1.6).max() == 1


# ---------------------------------------------------------------- Particles
def test_particles_container():
    masks = [np.ones((4, 4), bool), np.ones((5, 1), bool)]
    masks[0][0, 0] = False  # 15 px
    p = Particles(line0=[0, 5], line1=[3, 9], col0=[1, 2], col1=[4, 2], area_px=[15, 5],
                  centroid_line=[1.5, 7.0], centroid_px=[2.5, 2.0], masks=masks, touches_border=[False, True])
    assert len(p) == 2 and p.line0.dtype == np.int64 and p.centroid_px.dtype == np.float64
    assert p.cut.tolist() == [False, False] and p.errors is None and not p.failed
    q = p[p.touches_border]
    assert len(q) == 1 and q.line0.tolist() == [5] and q.masks[0].shape == (5, 1)
    one = p[1]  # an integer gives one particle, as numpy gives a scalar
    assert (one.line0, one.line1, one.col0, one.col1, one.area_px) == (5, 9, 2, 2, 5) and one.touches_border
    assert [r.line0 for r in p] == [0, 5]
    assert len(Particles.empty()) == 0 and len(p[np.zeros(2, bool)]) == 0
    both = Particles.concat([p[1:], Particles.empty(), p[:1]])
    assert both.line0.tolist() == [5, 0] and both.masks[1] is masks[0]
    failed = Particles.from_rows([p[0]._replace(error="features: ValueError"), p[1]])
    assert failed.failed and failed.errors == ("features: ValueError", None)
    assert Particles.concat([failed, p]).errors == ("features: ValueError", None, None, None)
    mask = np.zeros((30, 30), bool)
    mask[5:15, 0:8] = True
    from_stream = _run(mask, 4)
    assert from_stream.line0.tolist() == [5] and from_stream.touches_border.tolist() == [True]
    assert from_stream.area_px.tolist() == [80] and from_stream.centroid_px.tolist() == [3.5]
    with pytest.raises(ValueError, match="one entry per mask"):
        Particles(line0=[0], line1=[1, 2], col0=[0], col1=[0], area_px=[1], centroid_line=[0.0],
                  centroid_px=[0.0], masks=[np.ones((2, 1), bool)])
    with pytest.raises(ValueError, match="ends before"):
        Particles(line0=[3], line1=[1], col0=[0], col1=[0], area_px=[1], centroid_line=[0.0],
                  centroid_px=[0.0], masks=[np.ones((1, 1), bool)])
    with pytest.raises(ValueError, match="its box is bool"):
        Particles(line0=[0], line1=[1], col0=[0], col1=[0], area_px=[1], centroid_line=[0.0],
                  centroid_px=[0.0], masks=[np.ones((3, 1), bool)])


# ---------------------------------------------------------------- stream
def _scene(seed=1, lines=2500, pixels=300):
    """Ellipses, touching pairs and specks drawn with OpenCV, independent of the code under test."""
    rng = np.random.default_rng(seed)
    m = np.zeros((lines, pixels), np.uint8)
    for _ in range(90):
        cy, cx = int(rng.integers(0, lines)), int(rng.integers(0, pixels))
        ax = (int(rng.integers(3, 35)), int(rng.integers(3, 35)))
        cv2.ellipse(m, (cx, cy), ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    m[rng.random((lines, pixels)) < 0.002] = 1  # specks
    return m.astype(bool)


def _run(mask, chunk, config=SegmentConfig(), max_lines=512, start=0):
    seg = StreamSegmenter(mask.shape[1], None, PITCH, PITCH, config, max_particle_lines=max_lines)
    out = [seg.push(start + i, mask[i:i + chunk]) for i in range(0, mask.shape[0], chunk)]
    return Particles.concat(out + [seg.flush()])


def _key(items):
    return sorted((c.line0, c.line1, c.col0, c.col1, c.area_px, c.centroid_line, c.centroid_px, c.cut,
                   c.split, c.mask.tobytes()) for c in items)


def test_stream_matches_whole_frame_components():
    mask = _scene()
    cfg = SegmentConfig(split_touching=False)
    n, lab, stats, cents = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] * PITCH * PITCH >= cfg.min_area_mm2]
    expect = sorted((int(stats[i, 1]), int(stats[i, 1] + stats[i, 3] - 1), int(stats[i, 0]),
                     int(stats[i, 0] + stats[i, 2] - 1), int(stats[i, 4])) for i in keep)
    got = _run(mask, 32, cfg)
    assert sorted((c.line0, c.line1, c.col0, c.col1, c.area_px) for c in got) == expect
    by_box = {(int(stats[i, 1]), int(stats[i, 0])): cents[i] for i in keep}
    for c in got:
        cx, cy = by_box[(c.line0, c.col0)]
        assert c.centroid_line == pytest.approx(cy, abs=1e-9) and c.centroid_px == pytest.approx(cx, abs=1e-9)
        sub = lab[c.line0:c.line1 + 1, c.col0:c.col1 + 1]
        assert np.array_equal(c.mask, sub == lab[c.line0 + np.argmax(c.mask[:, 0]), c.col0])
    # specks (fewer than 23.4 px) are gone
    assert all(c.area_px * PITCH * PITCH >= 15.0 for c in got)


def test_stream_chunking_invariance():
    mask = _scene(seed=2)
    ref = _key(_run(mask, 1000))
    assert len(ref) > 40 and any(k[8] for k in ref)  # some touching rocks were split
    for chunk in (1, 16, 32, 128, 7):
        assert _key(_run(mask, chunk)) == ref, chunk


def test_stream_output_passes_the_constructors_checks():
    """The stitcher builds its sets without the constructor's checks (its kernel's boxes,
    areas and masks agree by construction): they pass them, for any chunking."""
    from sorting.stages.particles import ARRAYS

    mask = _scene(seed=4)
    for chunk in (1, 7, 32, 500):
        got = _run(mask, chunk)
        assert len(got) > 40
        again = Particles(**{name: getattr(got, name) for name in ARRAYS}, masks=got.masks, errors=got.errors)
        assert all(getattr(again, name).dtype == dtype for name, dtype in ARRAYS.items())
        assert all(m.flags.c_contiguous for m in got.masks)


def test_stream_completion_is_prompt_and_once():
    # a rock on lines 10..29 completes with the chunk holding line 30, not later
    mask = np.zeros((100, 50), bool)
    mask[10:30, 5:15] = True
    seg = StreamSegmenter(50, None, PITCH, PITCH)
    assert len(seg.push(0, mask[0:30])) == 0
    done = seg.push(30, mask[30:31])
    assert len(done) == 1 and (done[0].line0, done[0].line1, done[0].col0, done[0].col1) == (10, 29, 5, 14)
    assert done[0].area_px == 200 and not done[0].cut and done[0].mask.all()
    assert len(seg.push(31, mask[31:])) == 0 and len(seg.flush()) == 0


def test_gap_cuts_and_never_stitches():
    mask = np.zeros((80, 40), bool)
    mask[10:60, 10:20] = True  # one rock, lines 10..59
    seg = StreamSegmenter(40, None, PITCH, PITCH)
    assert len(seg.push(0, mask[0:25])) == 0
    first = seg.gap(30)  # lines 25..29 lost
    assert len(first) == 1 and first[0].cut and (first[0].line0, first[0].line1) == (10, 24)
    later = Particles.concat([seg.push(30, mask[30:80]), seg.flush()])
    assert len(later) == 1 and later[0].cut and (later[0].line0, later[0].line1) == (30, 59)
    # a chunk arriving after a hole is an implicit gap; overlapping lines are refused
    seg = StreamSegmenter(40, None, PITCH, PITCH)
    seg.push(0, mask[0:25])
    implicit = seg.push(30, mask[30:80])
    assert [(c.line0, c.line1, c.cut) for c in implicit] == [(10, 24, True), (30, 59, True)]
    with pytest.raises(ValueError, match="already seen"):
        seg.push(50, mask[50:60])


def test_particles_on_the_first_line_are_cut():
    mask = np.zeros((30, 40), bool)
    mask[0:10, 0:10] = True
    mask[15:25, 20:30] = True
    got = sorted((c.line0, c.cut, c.touches_border) for c in _run(mask, 8, start=1000))
    assert got == [(1000, True, True), (1015, False, False)]


def test_too_long_is_emitted_not_hoarded():
    mask = np.zeros((700, 30), bool)
    mask[:, 10:14] = True  # a jam: one object along the whole stream
    got = _run(mask, 32, max_lines=100)
    assert all(c.too_long for c in got)
    assert sum(c.area_px for c in got) == mask.sum()
    assert max(c.line1 - c.line0 + 1 for c in got) <= 100 + 32
    lines = sorted((c.line0, c.line1) for c in got)
    assert all(b[0] == a[1] + 1 for a, b in zip(lines, lines[1:]))  # nothing lost, nothing twice


def test_push_validates():
    seg = StreamSegmenter(40, None, PITCH, PITCH)
    with pytest.raises(ValueError, match="40"):
        seg.push(0, np.zeros((4, 39), bool))
    with pytest.raises(ValueError):
        StreamSegmenter(0, None, PITCH, PITCH)


# ---------------------------------------------------------------- segment_crop
def test_segment_crop_problems():
    cal = fake_cal(500)
    shape = (80, 100)
    one = disc(shape, (40, 50), 20)
    mask, problem = segment_crop(rock_a(one), cal, 200, PITCH, PITCH)
    assert problem is None and np.array_equal(mask, one)
    cases = {
        "no rock": np.zeros(shape, bool),
        "separate": disc(shape, (40, 25), 15) | disc(shape, (40, 75), 15),
        "touching": disc(shape, (40, 30), 18) | disc(shape, (40, 67), 18),
        "border": disc(shape, (40, 90), 15),
    }
    for name, m in cases.items():
        mask, problem = segment_crop(rock_a(m), cal, 200, PITCH, PITCH)
        assert problem is not None and not mask.any(), name
        assert name.split()[0] in problem or (name == "separate" and "separate" in problem), problem
    speck = one.copy()
    speck[5:8, 5:8] = True  # 9 px = 5.8 mm2: a speck, ignored
    mask, problem = segment_crop(rock_a(speck), cal, 200, PITCH, PITCH)
    assert problem is None and np.array_equal(mask, one)


def test_segment_crop_dead_column_through_rock():
    cal = fake_cal(500, bad=(250,))
    one = disc((80, 100), (40, 50), 20)
    a = rock_a(one)
    a[:, 50] = np.inf  # detector column 200 + 50, dead
    mask, problem = segment_crop(a, cal, 200, PITCH, PITCH)
    expect = one.copy()
    expect[:, 50] = one[:, 49] & one[:, 51]
    assert problem is None and np.array_equal(mask, expect)


# ---------------------------------------------------------------- the simulated belt
@pytest.fixture(scope="module")
def belt():
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials
    from sorting.stages.calibrate import calibrate
    from sorting.twin.belt import BeltTwin

    machine = load_machine()
    # 1 s of belt: ~800 rocks, ~100 of them in touching pairs (the twin costs ~5 s per s of belt)
    twin = BeltTwin(1.0, 7, machine, load_ore(), load_materials(), occupancy=0.3, touching=0.15, workers=1)
    cal = calibrate(twin.calibration_scans())
    raw = np.concatenate([block for _, block in twin.chunks()])
    return machine, cal, raw, twin.truth


def test_belt_rocks_found_once(belt):
    from sorting.stages.normalize import attenuation

    machine, cal, raw, truth = belt
    pitch, line_pitch = machine.detector.pixel_pitch_mm, machine.line_pitch_mm
    seg = StreamSegmenter(raw.shape[1], cal, pitch, line_pitch)
    got = []
    for i in range(0, raw.shape[0], 32):
        a = attenuation(raw[i:i + 32], cal, 0)
        got += seg.push(i, foreground(a, cal, 0))
    got += seg.flush()
    assert not any(c.cut or c.too_long for c in got)  # the twin starts and ends on empty belt
    cl = np.array([c.centroid_line for c in got])
    cp = np.array([c.centroid_px for c in got])
    tl = np.array([t["centroid_line"] for t in truth])
    tp = np.array([t["centroid_px"] for t in truth])
    touching = np.array([bool(t["touching"]) for t in truth])
    d = np.hypot(cl[:, None] - tl[None, :], cp[:, None] - tp[None, :])  # (particles, rocks)
    hit = d <= 2.0
    assert (~touching).sum() > 150
    # every rock that touches nothing: exactly one particle, centroid within 2 px
    assert np.all(hit[:, ~touching].sum(axis=0) == 1)
    # no particle stands for two rocks, and none is a stray fragment: a particle that matches
    # no rock can only be a touching pair left whole (its centroid lies between the two)
    assert np.all(hit.sum(axis=1) <= 1)
    for j in np.flatnonzero(~hit.any(axis=1)):
        c = got[j]
        near = [t for t in truth if t["touching"] and t["first_line"] <= c.line1 and c.line0 <= t["last_line"]
                and t["x_min_px"] <= c.col1 and c.col0 <= t["x_max_px"]]
        assert near, (c.line0, c.col0, c.area_px)
    rate = hit[:, touching].any(axis=0).mean()
    print(f"touching rocks separated (centroid within 2 px): {hit[:, touching].any(axis=0).sum()}"
          f"/{touching.sum()} = {rate:.1%}")
    assert touching.sum() > 50 and rate > 0.85


def test_simulated_crop(belt):
    """A rock crop as xrt-rocks/1 holds it: the mask covers the rendered rock."""
    from sorting.config import load_ore
    from sorting.physics import load_materials
    from sorting.stages.normalize import attenuation
    from sorting.twin.ore import densities, mineral_list
    from sorting.twin.render import Renderer
    from sorting.twin.rocks import crop_signal, make_rock

    machine, cal, _, _ = belt
    ore, lib = load_ore(), load_materials()
    minerals = mineral_list(ore)
    renderer = Renderer.create(machine, lib, minerals)
    rng = np.random.default_rng(3)
    pitch, line_pitch = machine.detector.pixel_pitch_mm, machine.line_pitch_mm
    ious = []
    for _ in range(25):
        rock = make_rock(ore, machine, densities(minerals, lib), rng)
        mean, var = crop_signal(renderer, rock.image, 8)
        x0 = int(rng.integers(0, machine.detector.pixels - mean.shape[1]))
        a = attenuation(renderer.counts(mean, var, x0, rng), cal, x0)
        mask, problem = segment_crop(a, cal, x0, pitch, line_pitch)
        assert problem is None
        truth = np.zeros(mask.shape, bool)
        truth[8:-8, 8:-8] = rock.image.mask
        ious.append(np.count_nonzero(mask & truth) / np.count_nonzero(mask | truth))
    assert np.median(ious) > 0.95 and min(ious) > 0.8
