"""Property tests: any uint16 input of valid shape gives finite maps and
never raises, through normalization, segmentation, features and the streaming stitcher.

Deterministic (``derandomize=True``): CI sees the same examples every run. The expected
partition of foreground pixels in the stitcher test comes from an independent labelling
of the whole stream (scipy.ndimage, 8-connectivity), not from the code under test.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from test_calibrate import make_scans

from sorting.config import load_machine
from sorting.stages.calibrate import calibrate
from sorting.stages.features import FEATURE_NAMES, particle_features
from sorting.stages.maps import material_maps, ratio
from sorting.stages.normalize import attenuation
from sorting.stages.particles import SegmentConfig
from sorting.stages.segment import foreground, segment_crop
from sorting.stages.stitch import StreamSegmenter
from sorting.testing import starved

settings.register_profile("sorting-properties", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
PROPS = settings.get_profile("sorting-properties")

PIXELS = 64  # a small detector: the calibration is cheap and x0 ranges over all of it
PITCH_MM = 0.8


@pytest.fixture(scope="module")
def cal():
    """A 64-pixel reference machine with its dead, stuck and noisy pixels (repair paths run)."""
    ref = load_machine()
    small = dataclasses.replace(ref, detector=dataclasses.replace(ref.detector, pixels=PIXELS))
    c = calibrate(make_scans(small, seed=5))
    assert c.bad.any()
    return c


# ---------------------------------------------------------------- strategies
@st.composite
def raw_blocks(draw, max_lines: int = 12, max_width: int = 24) -> tuple[np.ndarray, int]:
    """(raw (L, W, 2) uint16, x0): either any 16-bit values, or readings around the machine's
    own range (from below dark to saturation) where the maps are meaningful."""
    lines = draw(st.integers(1, max_lines))
    width = draw(st.integers(1, max_width))
    x0 = draw(st.integers(0, PIXELS - width))
    values = st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 900, 1000, 1100, 15000, 31000, 41000, 65534,
                                                               65535]))
    raw = draw(hnp.arrays(np.uint16, (lines, width, 2), elements=values))
    return raw, x0


@st.composite
def raw_and_mask(draw, max_lines: int = 12, max_width: int = 24) -> tuple[np.ndarray, int, np.ndarray]:
    raw, x0 = draw(raw_blocks(max_lines, max_width))
    mask = draw(hnp.arrays(bool, raw.shape[:2], elements=st.booleans()))
    return raw, x0, mask


@st.composite
def stream_masks(draw) -> tuple[np.ndarray, list[int], float]:
    """A foreground stream (N, P) bool, a split of its N lines into chunks, and a speck size.

    Masks are either pixel noise or blobs (thresholded smoothed noise: rocks that touch,
    merge, branch and end), so components span chunks and get split as touching rocks."""
    n = draw(st.integers(1, 60))
    p = draw(st.integers(1, 40))
    if draw(st.booleans()):
        mask = draw(hnp.arrays(bool, (n, p), elements=st.booleans()))
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        sigma = draw(st.sampled_from([1.0, 2.0, 3.0]))
        level = draw(st.floats(-0.5, 0.8))
        noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((n, p)), sigma)
        mask = noise > level * noise.std()
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=8))) - {n})
    sizes = list(np.diff([0, *cuts, n]))
    min_area = draw(st.sampled_from([0.0, 3.0, 15.0]))
    return mask, [int(s) for s in sizes], min_area


# ---------------------------------------------------------------- normalization
@PROPS
@given(block=raw_blocks())
def test_attenuation_and_ratio_finite(cal, block):
    raw, x0 = block
    before = raw.copy()
    a = attenuation(raw, cal, x0)
    np.testing.assert_array_equal(raw, before)
    assert a.shape == raw.shape and a.dtype == np.float32
    assert np.isfinite(a).all()
    # the floor of 1 ADU above dark bounds A from above by ln(air - dark) of the pixel
    # (a bad column takes its neighbours' values instead)
    good = ~cal.bad[x0:x0 + raw.shape[1]]
    assert (a[:, good] <= cal.log_flat[x0:x0 + raw.shape[1]][good] + 1e-4).all()
    r = ratio(a)
    assert r.shape == raw.shape[:2] and r.dtype == np.float32 and np.isfinite(r).all()


@PROPS
@given(data=raw_and_mask(), smooth=st.sampled_from([0.0, 1.0, 2.5]))
def test_material_maps_finite_with_any_mask(cal, data, smooth):
    raw, x0, mask = data
    a = attenuation(raw, cal, x0)
    st_mask = starved(raw, a, cal, x0)
    maps = material_maps(a, mask, cal, smooth_px=smooth, starved_mask=st_mask)
    for f in dataclasses.fields(maps):
        m = getattr(maps, f.name)
        assert m.shape == mask.shape, f.name
        if m.dtype != bool:
            assert np.isfinite(m).all(), f.name
    for name in ("r", "t_pom_mm", "t_fe_mm", "fe_frac", "mafic_frac", "thickness_mm"):
        assert not getattr(maps, name)[~mask].any(), name  # zero outside the mask
    assert not (maps.starved & ~mask).any()


# ---------------------------------------------------------------- segmentation and features
@PROPS
@given(block=raw_blocks())
def test_foreground_is_per_line(cal, block):
    raw, x0 = block
    a = attenuation(raw, cal, x0)
    fg = foreground(a, cal, x0)
    assert fg.shape == raw.shape[:2] and fg.dtype == bool
    for i in range(a.shape[0]):  # each line on its own: independent of chunking
        np.testing.assert_array_equal(fg[i], foreground(a[i:i + 1], cal, x0)[0])


@PROPS
@given(block=raw_blocks(max_lines=24, max_width=24))
def test_segment_crop_never_raises(cal, block):
    raw, x0 = block
    a = attenuation(raw, cal, x0)
    mask, problem = segment_crop(a, cal, x0, PITCH_MM, PITCH_MM)
    assert mask.shape == raw.shape[:2] and mask.dtype == bool
    if problem is None:
        assert mask.any()
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert not (mask & ~foreground(a, cal, x0)).any()
    else:
        assert isinstance(problem, str) and not mask.any()


@PROPS
@given(data=raw_and_mask())
def test_particle_features_finite(cal, data):
    raw, x0, mask = data
    a = attenuation(raw, cal, x0)
    a_before, m_before = a.copy(), mask.copy()
    x = particle_features(a, mask, cal, PITCH_MM, PITCH_MM)
    assert x.shape == (len(FEATURE_NAMES),) and x.dtype == np.float32
    assert np.isfinite(x).all(), dict(zip(FEATURE_NAMES, x.tolist()))
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(mask, m_before)


# ---------------------------------------------------------------- the streaming stitcher
def _stream(mask: np.ndarray, sizes: list[int], config: SegmentConfig, first: int = 0):
    seg = StreamSegmenter(mask.shape[1], None, PITCH_MM, PITCH_MM, config,
                          max_particle_lines=mask.shape[0] + 1)  # no jam splitting here
    out, at = [], 0
    for k in sizes:
        out.extend(seg.push(first + at, mask[at:at + k]))
        at += k
    out.extend(seg.flush())
    return out


@PROPS
@given(data=stream_masks())
def test_stream_partitions_foreground(data):
    """Every foreground pixel lands in exactly one emitted particle, or in a component
    too small to keep (a speck); nothing else is emitted; chunking changes nothing."""
    mask, sizes, min_area = data
    config = SegmentConfig(min_area_mm2=min_area)
    first = 1000
    parts = _stream(mask, sizes, config, first)
    hits = np.zeros(mask.shape, np.int32)
    for p in parts:
        assert p.mask.shape == (p.line1 - p.line0 + 1, p.col1 - p.col0 + 1)
        assert p.area_px == int(p.mask.sum()) > 0
        rows, cols = np.nonzero(p.mask)
        assert p.centroid_line == pytest.approx(p.line0 + rows.mean(), abs=1e-6)
        assert p.centroid_px == pytest.approx(p.col0 + cols.mean(), abs=1e-6)
        hits[p.line0 - first:p.line1 - first + 1, p.col0:p.col1 + 1] += p.mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    area = np.bincount(labels.ravel(), minlength=n + 1)
    kept = (area * PITCH_MM * PITCH_MM >= min_area)
    kept[0] = False
    expected = kept[labels].astype(np.int32)
    np.testing.assert_array_equal(hits, expected)
    whole = _stream(mask, [mask.shape[0]], config, first)

    def key(ps):
        return sorted((p.line0, p.col0, p.line1, p.col1, p.area_px, p.mask.tobytes()) for p in ps)

    assert key(parts) == key(whole)
