"""Fuzzing the stream's stages: no exception may escape stitching, splitting, normalization
or features, whatever the masks and counts, and the loop never needs its fail-safe.

Masks are drawn as the shapes that break geometry code: empty, one pixel, full, thin
lines (straight and diagonal), rings, checkerboards, noise and blobs, and unions of them,
fed chunk by chunk. Counts are any uint16, with 0 and 65535 drawn often. Deterministic
(``derandomize=True``): CI sees the same examples every run. Expected partitions come from
an independent labelling (scipy.ndimage, 8-connectivity), not from the code under test.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from test_calibrate import make_scans

from sorting.config import load_machine, load_sorter
from sorting.realtime.stream import Pipeline
from sorting.stages.calibrate import calibrate
from sorting.stages.eject import Timing
from sorting.stages.features import N_FEATURES, features_from_ring, particle_features
from sorting.stages.normalize import attenuation
from sorting.stages.particles import SegmentConfig
from sorting.stages.split import pieces, split_touching
from sorting.stages.stitch import StreamSegmenter

FUZZ = settings(derandomize=True, max_examples=60, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PIXELS = 64
SORTER_YAML = Path(__file__).resolve().parents[1] / "configs" / "sorter_reference.yaml"
EIGHT = np.ones((3, 3), bool)


# ---------------------------------------------------------------- strategies
KINDS = ("empty", "pixel", "full", "hline", "vline", "diagonal", "ring", "checker", "noise", "blobs", "rect", "discs")
#: the kinds that hold rocks worth splitting
ROCKS = ("discs", "discs", "blobs", "ring")


@st.composite
def shape(draw, h: int, w: int, kinds=KINDS) -> np.ndarray:
    """One (h, w) bool mask of a kind that breaks geometry code."""
    kind = draw(st.sampled_from(kinds))
    event(f"shape {kind}")
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    if kind == "pixel":
        m[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    elif kind == "full":
        m[:] = True
    elif kind == "hline":
        m[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1)):draw(st.integers(1, w))] = True
    elif kind == "vline":
        m[draw(st.integers(0, h - 1)):draw(st.integers(1, h)), draw(st.integers(0, w - 1))] = True
    elif kind == "diagonal":  # pixels touching only at corners
        k = draw(st.integers(-max(h, w), max(h, w)))
        m = (yy - xx == k) if draw(st.booleans()) else (yy + xx == k + max(h, w))
    elif kind == "ring":
        cy, cx = draw(st.floats(-2, h + 2)), draw(st.floats(-2, w + 2))
        r = draw(st.floats(0.5, 24))
        t = draw(st.floats(0.5, 4))
        d = np.hypot(yy - cy, xx - cx)
        m = (d <= r) & (d > r - t)
    elif kind == "discs":  # touching rocks: a chain of discs, each meeting the last at a neck
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # spread evenly, not at the bounds
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
        m |= np.hypot(yy - cy, xx - cx) < r
        for _ in range(rng.integers(1, 4)):
            r2, angle, overlap = rng.uniform(3, 10), rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 0.95)
            cy, cx = cy + overlap * (r + r2) * np.sin(angle), cx + overlap * (r + r2) * np.cos(angle)
            r = r2
            m |= np.hypot(yy - cy, xx - cx) < r
    elif kind == "checker":
        p = draw(st.integers(1, 3))
        m = (yy // p + xx // p) % 2 == draw(st.integers(0, 1))
    elif kind == "noise":
        m = draw(hnp.arrays(bool, (h, w), elements=st.booleans()))
    elif kind == "blobs":
        noise = ndimage.gaussian_filter(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((h, w)),
                                        draw(st.sampled_from([1.0, 2.0, 3.0])))
        m = noise > draw(st.floats(-0.5, 0.8)) * noise.std()
    elif kind == "rect":
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        m[r0:draw(st.integers(r0 + 1, h)), c0:draw(st.integers(c0 + 1, w))] = True
    return m


@st.composite
def masks(draw, max_h: int = 48, max_w: int = 40) -> np.ndarray:
    """Any kind at any size (the degenerate cases), or rocks large enough to split."""
    if draw(st.booleans()):
        h, w, kinds = draw(st.integers(1, max_h)), draw(st.integers(1, max_w)), KINDS
    else:
        h, w, kinds = draw(st.integers(24, max_h)), draw(st.integers(24, max_w)), ROCKS
    m = draw(shape(h, w, kinds))
    if draw(st.booleans()):
        m = m | draw(shape(h, w))
    return np.ascontiguousarray(m)


def configs():
    return st.builds(SegmentConfig, min_area_mm2=st.sampled_from([0.0, 3.0, 15.0]),
                     split_touching=st.sampled_from([True, True, True, False]),
                     split_depth_mm=st.sampled_from([0.1, 0.75, 1.5, 5.0]))


pitches = st.sampled_from([(0.8, 0.8), (1.0, 1.0), (0.5, 0.8), (1.6, 0.8)])  # unequal: the other distance code


def chunking(n: int):
    return st.lists(st.integers(1, max(n - 1, 1)), max_size=6).map(lambda cuts: sorted(set(cuts) - {n}))


# ---------------------------------------------------------------- stitching
@settings(FUZZ, max_examples=100)
@given(mask=masks(), config=configs(), pitch=pitches, data=st.data())
def test_stream_segmenter_never_raises(mask, config, pitch, data):
    """Any mask, any chunking, jams cut short: every particle is a valid piece of the
    foreground, each pixel in at most one, and none needed the fail-safe."""
    n, p = mask.shape
    cuts = data.draw(chunking(n))
    max_lines = data.draw(st.integers(1, n + 1))
    first = data.draw(st.integers(0, 10_000))
    seg = StreamSegmenter(p, None, *pitch, config, max_particle_lines=max_lines)
    out, at = [], 0
    for stop in [*cuts, n]:
        out.extend(seg.push(first + at, mask[at:stop]))
        at = stop
    out.extend(seg.flush())
    assert seg.errors == 0 and all(q.error is None for q in out)
    hits = np.zeros(mask.shape, np.int32)
    for q in out:
        assert q.mask.shape == (q.line1 - q.line0 + 1, q.col1 - q.col0 + 1)
        assert q.area_px == int(q.mask.sum()) > 0
        assert first <= q.line0 <= q.line1 < first + n and 0 <= q.col0 <= q.col1 < p
        assert np.isfinite(q.centroid_line) and np.isfinite(q.centroid_px)
        hits[q.line0 - first:q.line1 - first + 1, q.col0:q.col1 + 1] += q.mask
    assert hits.max(initial=0) <= 1 and not (hits.astype(bool) & ~mask).any()
    if config.min_area_mm2 == 0 and max_lines > n:
        np.testing.assert_array_equal(hits.astype(bool), mask)  # nothing is a speck, nothing jams


# ---------------------------------------------------------------- splitting
@settings(FUZZ, max_examples=150)
@given(mask=masks(), config=configs(), pitch=pitches)
def test_split_touching_never_raises(mask, config, pitch):
    """Labels cover exactly the foreground, numbered 1..n, and never join two components."""
    labels = split_touching(mask, *pitch, config)
    assert labels.shape == mask.shape and labels.dtype == np.int32
    np.testing.assert_array_equal(labels > 0, mask)
    present = np.unique(labels[mask])
    np.testing.assert_array_equal(present, np.arange(1, present.size + 1))
    comp, _ = ndimage.label(mask, EIGHT)
    for k in present.tolist():
        assert np.unique(comp[labels == k]).size == 1


@settings(FUZZ, max_examples=150)
@given(mask=masks(), config=configs(), pitch=pitches, bound_deep=st.booleans(), too_long=st.booleans(),
       line0=st.integers(0, 10_000), col0=st.integers(0, 100))
def test_pieces_never_raises(mask, config, pitch, bound_deep, too_long, line0, col0):
    """Each connected component of the mask, in its tight box (as the stitcher gives it), and
    the whole mask as it is (empty, or several components): the pieces partition the pixels."""
    comp, n = ndimage.label(mask, EIGHT)
    boxes = [(mask, line0, col0)]
    for k, (rs, cs) in enumerate(ndimage.find_objects(comp), start=1):
        boxes.append((comp[rs, cs] == k, line0 + rs.start, col0 + cs.start))
    for m, l0, c0 in boxes:
        out = pieces(m, l0, c0, *pitch, config, too_long=too_long, pixels=col0 + mask.shape[1] + 5,
                     bound_deep=bound_deep)
        hits = np.zeros(m.shape, np.int32)
        for q in out:
            assert q.area_px == int(q.mask.sum()) > 0 and q.error is None
            hits[q.line0 - l0:q.line1 - l0 + 1, q.col0 - c0:q.col1 - c0 + 1] += q.mask
        assert hits.max(initial=0) <= 1 and not (hits.astype(bool) & ~m).any()
        if out:
            np.testing.assert_array_equal(hits.astype(bool), m)


# ---------------------------------------------------------------- counts -> normalization -> features
@pytest.fixture(scope="module")
def cal():
    """A 64-pixel reference machine with its dead, stuck and noisy pixels (repair paths run)."""
    ref = load_machine()
    small = dataclasses.replace(ref, detector=dataclasses.replace(ref.detector, pixels=PIXELS))
    return calibrate(make_scans(small, seed=5))


counts = st.one_of(st.sampled_from([0, 1, 65534, 65535]), st.integers(0, 65535))


@FUZZ
@given(data=st.data(), lines=st.integers(1, 24), width=st.integers(1, 40))
def test_counts_to_features_never_raise(cal, data, lines, width):
    """Any uint16 counts, normalized, and any mask on them: features are finite, and the
    stream's ring read (wrapping round its end) gives the numbers of the particle alone."""
    x0 = data.draw(st.integers(0, PIXELS - width))
    raw = data.draw(hnp.arrays(np.uint16, (lines, width, 2), elements=counts))
    mask = data.draw(shape(lines, width)) | data.draw(shape(lines, width))
    a = attenuation(raw, cal, x0)
    assert np.isfinite(a).all()
    alone = particle_features(a, mask, cal, 0.8, 0.8)
    assert np.isfinite(alone).all()
    ring = np.zeros((32, width, 2), np.float32)
    start = data.draw(st.integers(0, 31))
    ring[(start + np.arange(lines)) % 32] = a
    out = np.empty((1, N_FEATURES), np.float32)
    features_from_ring(ring, np.array([[start + 32 * data.draw(st.integers(0, 3)), 0, lines, width]], np.int64),
                       [np.ascontiguousarray(mask)], cal, 0.8, 0.8, out=out)
    np.testing.assert_array_equal(out[0], alone)


# ---------------------------------------------------------------- the whole loop
@pytest.fixture(scope="module")
def pipeline_parts(cal, small_model):
    from sorting.stages.inference import load_model

    return cal, load_model(small_model), load_sorter(SORTER_YAML), Timing(3750.0, 3.0, 0.8, PIXELS)


@settings(FUZZ, max_examples=30)
@given(data=st.data(), n=st.integers(1, 96))
def test_the_loop_never_raises_on_any_counts(pipeline_parts, data, n):
    """Counts through Pipeline.step, chunk by chunk: any uint16 values, or rocks (the shapes
    above, at any transmission) on a noisy belt with extreme pixels (0, 65535) sprinkled in.
    Every particle is decided with finite numbers, and none needed the fail-safe."""
    cal, model, sorter, timing = pipeline_parts
    if data.draw(st.sampled_from(["any", "rocks", "rocks"])) == "any":
        raw = data.draw(hnp.arrays(np.uint16, (n, PIXELS, 2), elements=counts))
    else:
        rock = data.draw(shape(n, PIXELS, data.draw(st.sampled_from([KINDS, ROCKS, ROCKS]))))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        transmission = np.where(rock, rng.uniform(0.0, 0.95), 1.0)[..., None]
        mean = cal.dark + transmission * (cal.air - cal.dark)
        raw = rng.normal(mean, np.sqrt(mean + 1.0)).round().clip(0, 65535).astype(np.uint16)
        spikes = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, PIXELS - 1),
                                              st.sampled_from([0, 65535])), max_size=20))
        for i, j, v in spikes:
            raw[i, j] = v
    pipe = Pipeline(cal, model, sorter, timing, chunk_lines=8, max_particle_lines=32)
    events, at = [], 0
    first = data.draw(st.integers(0, 1000))
    for stop in [*data.draw(chunking(n)), n]:
        events += pipe.step(first + at, raw[at:stop], float(at))
        at = stop
    events += pipe.finish()
    event(f"particles: {'none' if not events else 'some' if len(events) < 4 else '4 or more'}")
    assert pipe.counters.particle_errors == 0 and not any(e.error for e in events)
    assert pipe.counters.particles == len(events) and pipe.counters.lines == n
    for e in events:
        assert all(np.isfinite(getattr(e, k)) for k in ("centroid_line", "centroid_px", "area_mm2", "score",
                                                        "slack_ms"))
