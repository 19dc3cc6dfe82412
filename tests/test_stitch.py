"""The streaming stitcher's compiled run tracking (sorting.stages.stitch, sorting.stages.stitch_kernels).

Expected particles come from an independent labelling of the whole mask at once
(scipy.ndimage.label, 8-connectivity) and from hand-worked examples of the emission rules.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sorting.stages.particles import Particles, SegmentConfig
from sorting.stages.stitch import StreamSegmenter

PITCH = 0.8
# every component is a particle: no speck filter, no touching-rock split
RAW = SegmentConfig(min_area_mm2=0.0, split_touching=False)


def _run(mask, chunk, config=RAW, max_lines=10_000, gaps=()):
    seg = StreamSegmenter(mask.shape[1], None, PITCH, PITCH, config, max_particle_lines=max_lines)
    out = [seg.push(i, mask[i:i + chunk]) for i in range(0, mask.shape[0], chunk) if i not in gaps]
    return list(Particles.concat(out + [seg.flush()]))


def _expected(mask):
    """Each 8-connected component of the whole mask: box, area, centroid, mask, cut."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    out = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(lab), start=1):
        sub = lab[rows, cols] == k
        r, c = np.nonzero(lab == k)
        # cut: on the first line, or still open at the end of the stream (on the last line)
        cut = bool(r.min() == 0 or r.max() == mask.shape[0] - 1)
        out.append((rows.start, rows.stop - 1, cols.start, cols.stop - 1, int(r.size), r.mean(), c.mean(),
                    cut, sub.tobytes()))
    return sorted(out)


def _got(items):
    return sorted((c.line0, c.line1, c.col0, c.col1, c.area_px, c.centroid_line, c.centroid_px, c.cut,
                   c.mask.tobytes()) for c in items)


def _same(got, expect):
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        assert g[:5] == e[:5] and g[7:] == e[7:]
        assert g[5] == pytest.approx(e[5], abs=1e-9) and g[6] == pytest.approx(e[6], abs=1e-9)


@pytest.mark.parametrize("density", [0.1, 0.45, 0.6])
@pytest.mark.parametrize("chunk", [1, 7, 16, 32, 128, 500])
def test_components_match_whole_frame_labelling(density, chunk):
    rng = np.random.default_rng(int(density * 100) + chunk)
    mask = rng.random((300, 140)) < density
    mask[:, 0] |= rng.random(300) < 0.5  # runs touching both edges
    mask[:, -1] |= rng.random(300) < 0.5
    _same(_got(_run(mask, chunk)), _expected(mask))


def test_blobs_merging_across_chunks_match():
    """U shapes and combs: parts that start apart and join many lines later."""
    mask = np.zeros((120, 90), bool)
    mask[10:60, 5:8] = mask[10:60, 20:23] = True
    mask[57:62, 5:23] = True  # a U, joined 47 lines below its tops
    for c in range(30, 80, 6):  # a comb of 9 teeth joined at the bottom
        mask[20:90, c:c + 2] = True
    mask[88:95, 30:80] = True
    mask[100:103, 40:45] = True  # alone
    for chunk in (4, 9, 32):
        _same(_got(_run(mask, chunk)), _expected(mask))


def test_many_open_particles_grow_the_tables():
    # 625 vertical stripes open at once over 300 lines: ~190 000 stored runs
    mask = np.zeros((300, 1250), bool)
    mask[5:290, ::2] = True
    got = _run(mask, 32)
    _same(_got(got), _expected(mask))
    # and the segmenter is reusable after the flush
    again = _run(mask, 17)
    assert _got(again) == _got(got)


def test_gap_splits_a_component_in_two():
    mask = np.zeros((96, 30), bool)
    mask[10:80, 4:9] = True
    got = sorted((c.line0, c.line1, c.area_px, c.cut) for c in _run(mask, 16, gaps=(32,)))
    # lines 32..47 are lost: lines 10..31 (cut at the gap) and 48..79 (cut after it)
    assert got == [(10, 31, 22 * 5, True), (48, 79, 32 * 5, True)]


def test_emission_order_within_a_chunk():
    mask = np.zeros((20, 40), bool)
    mask[5:10, 20:26] = True  # A: first line 5
    mask[3:9, 30:36] = True  # B: first line 3, column 30
    mask[3:7, 2:6] = True  # C: first line 3, column 2
    seg = StreamSegmenter(40, None, PITCH, PITCH, RAW)
    got = seg.push(0, mask[:12])
    assert [(c.line0, c.col0) for c in got] == [(3, 2), (3, 30), (5, 20)]


def test_too_long_in_order_of_first_appearance():
    # two jams; X appears first (line 0), Y a line later but further left. With 10 lines
    # at most and 4-line chunks both are emitted with the chunk of lines 8..11, then their
    # continuations (both from line 12) with the chunk of lines 20..23: X first each time,
    # although Y's continuation comes first by (first line, first column)
    mask = np.zeros((40, 50), bool)
    mask[0:40, 30:33] = True  # X
    mask[1:40, 5:8] = True  # Y
    seg = StreamSegmenter(50, None, PITCH, PITCH, RAW, max_particle_lines=10)
    rounds = {}
    for i in range(0, 40, 4):
        done = seg.push(i, mask[i:i + 4])
        if done:
            rounds[i] = [(c.line0, c.line1, c.col0, c.too_long) for c in done]
    assert rounds == {8: [(0, 11, 30, True), (1, 11, 5, True)],
                      20: [(12, 23, 30, True), (12, 23, 5, True)],
                      32: [(24, 35, 30, True), (24, 35, 5, True)]}
    tail = seg.flush()
    assert [(c.line0, c.line1, c.col0, c.cut, c.too_long) for c in tail] == [
        (36, 39, 5, True, True), (36, 39, 30, True, True)]


def test_masks_are_independent_contiguous_bool():
    mask = np.zeros((30, 30), bool)
    mask[2:8, 2:8] = mask[2:8, 20:26] = True
    a, b = _run(mask, 30)
    assert a.mask.dtype == bool and a.mask.flags.c_contiguous and a.mask.shape == (6, 6)
    a.mask[:] = False
    assert b.mask.all()


def test_non_bool_mask_reads_nonzero():
    rng = np.random.default_rng(3)
    mask = rng.random((64, 50)) < 0.4
    as_int = mask.astype(np.int16) * 7
    seg = StreamSegmenter(50, None, PITCH, PITCH, RAW)
    got = [*seg.push(0, as_int[:32]), *seg.push(32, as_int[32:]), *seg.flush()]
    _same(_got(got), _expected(mask))


# ---------------------------------------------------------------- the split gate's bound
def _opencv_depth_px(mask):
    """The full gate's measure: deepest convexity defect of the outer contour (OpenCV)."""
    import cv2

    m8 = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    (c,), _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(c, returnPoints=False)
    defects = cv2.convexityDefects(c, hull) if len(hull) >= 3 and len(c) >= 4 else None
    # OpenCV 4 returns None for a convex outline, OpenCV 5 an empty array
    return 0.0 if defects is None or not defects.size else defects.reshape(-1, 4)[:, 3].max() / 256.0


def test_defect_bound_by_hand():
    from sorting.stages.concavity import defect_depth_bound_px

    rect = np.ones((6, 9), bool)
    assert defect_depth_bound_px(rect) == 0.0  # convex: every contour point on the hull
    notch = np.ones((10, 10), bool)
    notch[:4, 3:7] = False  # a 4-deep slot from the top: not column-convex, no bound
    assert defect_depth_bound_px(notch) == np.inf
    ell = np.ones((10, 10), bool)
    ell[:5, 5:] = False  # an L: hull edge (0,4)-(5,9) over the corner (4,4)..(5,5)
    # the bound covers the inner corner (4, 5): 4 px below the edge's line along a
    # 45-degree direction, distance |5*(5-4) - 5*(4-0)| / sqrt(50) = 15/7.07 = 2.12 px
    assert defect_depth_bound_px(ell) >= 2.12
    hole = np.ones((7, 7), bool)
    hole[3, 3] = False  # row 3 is two runs
    assert defect_depth_bound_px(hole) == np.inf
    pinch = np.zeros((4, 8), bool)
    pinch[:2, :4] = pinch[2:, 4:] = True  # two blocks meeting at a corner: contour passes twice
    assert defect_depth_bound_px(pinch) == np.inf


def test_defect_bound_never_below_opencv():
    import cv2

    from sorting.stages.concavity import defect_depth_bound_px

    rng = np.random.default_rng(7)
    finite = 0
    for t in range(600):
        h, w = (int(v) for v in rng.integers(4, 40, 2))
        m = np.zeros((h + 4, w + 4), np.uint8)
        cv2.ellipse(m, (w // 2 + 2, h // 2 + 2), (w // 2, h // 2), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if t % 2:  # ragged edges, as foreground noise leaves them
            edge = cv2.dilate(m, np.ones((3, 3), np.uint8)) - cv2.erode(m, np.ones((3, 3), np.uint8))
            m[(edge > 0) & (rng.random(m.shape) < 0.3)] ^= 1
        n, lab, st, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        k = 1 + int(np.argmax(st[1:, 4]))
        x, y, bw, bh = st[k, :4]
        sub = lab[y:y + bh, x:x + bw] == k
        bound = defect_depth_bound_px(sub)
        if np.isfinite(bound):
            finite += 1
            assert bound + 1 / 256 >= _opencv_depth_px(sub)
    assert finite > 200  # smooth shapes get a bound (ragged ones often are not HV-convex)


def test_warm_up_leaves_nothing_behind():
    from sorting.stages.stitch import warm_up

    warm_up()  # a throwaway segmenter: a fresh one still gives the whole-frame components
    mask = np.zeros((20, 16), bool)
    mask[3:9, 2:7] = True
    _same(_got(_run(mask, 8)), _expected(mask))


# ---------------------------------------------------------------- compiled pieces of push
def _runs_numpy(mask):
    """(line, first column, last column) of every horizontal run, from the row differences."""
    out = []
    for r, row in enumerate(mask):
        d = np.diff(np.r_[0, row.astype(np.int8), 0])
        out += [(r, int(a), int(b) - 1) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]
    return out


@pytest.mark.parametrize("width", [1, 7, 8, 16, 37, 64])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_scan_runs_matches_row_differences(width, offset):
    from sorting.stages.stitch_kernels import _scan_runs

    rng = np.random.default_rng(width * 10 + offset)
    lines = 12
    # long runs (whole 8-byte words set or clear) as well as ragged ones, at any alignment
    runs = np.repeat(rng.random((lines, width // 9 + 2)) < 0.5, 9, axis=1)[:, :width]
    mask = runs ^ (rng.random((lines, width)) < 0.05)
    buf = np.zeros(lines * width + offset, np.uint8)
    m8 = buf[offset:].reshape(lines, width)  # offset: the 8-byte path cannot be taken
    m8[:] = mask
    cr = np.zeros((lines * width + 1, 4), np.int64)
    row_start = np.zeros(lines + 2, np.int64)
    n = _scan_runs(m8, cr, row_start, 0)
    got = [(int(r) - 1, int(a), int(b)) for r, a, b, _ in cr[:n]]
    assert got == _runs_numpy(mask)
    assert list(cr[:n, 3]) == list(range(n))
    assert [row_start[r + 1] for r in range(lines + 1)] == \
        [sum(1 for x in got if x[0] < r) for r in range(lines + 1)]


def test_columns_from_rows_match_the_mask():
    from sorting.stages.concavity import _columns_from_rows, _rows_adjacent

    rng = np.random.default_rng(11)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        lo = np.empty(h, np.int64)
        hi = np.empty(h, np.int64)
        lo[0] = rng.integers(0, w)
        hi[0] = rng.integers(lo[0], w)
        for r in range(1, h):  # each run touches the one above (8-connected)
            lo[r] = rng.integers(0, min(hi[r - 1] + 2, w))
            hi[r] = rng.integers(max(lo[r], lo[r - 1] - 1), w)
        assert _rows_adjacent(lo, hi)
        mask = np.zeros((h, w), bool)
        for r in range(h):
            mask[r, lo[r]:hi[r] + 1] = True
        top, bottom, count = np.full(w, -1, np.int64), np.full(w, -1, np.int64), np.zeros(w, np.int64)
        _columns_from_rows(lo, hi, top, bottom, count)
        has = mask.any(axis=0)
        assert np.array_equal(count, mask.sum(axis=0))
        assert np.array_equal(top, np.where(has, mask.argmax(axis=0), -1))
        assert np.array_equal(bottom, np.where(has, h - 1 - mask[::-1].argmax(axis=0), -1))
    assert not _rows_adjacent(np.array([0, 3]), np.array([1, 4]))  # a column apart


def test_stream_gate_matches_the_batch_steps():
    """Specks, the bound and the touching-rock split as split.pieces does them on each whole
    component's mask (the stitcher settles specks and the bound in its kernel)."""
    import cv2

    from sorting.stages.split import pieces

    rng = np.random.default_rng(5)
    cfg = SegmentConfig(min_area_mm2=20.0)  # 31 px at 0.8 mm
    m = np.zeros((400, 120), np.uint8)
    for _ in range(60):  # discs, ellipses and touching pairs; small ones are specks
        r, c = int(rng.integers(5, 395)), int(rng.integers(5, 115))
        a, b = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        cv2.ellipse(m, (c, r), (a, b), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    mask = m.astype(bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    expect = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(lab), start=1):
        sub = lab[rows, cols] == k
        cut = rows.start == 0 or rows.stop == mask.shape[0]
        expect += pieces(sub, rows.start, cols.start, PITCH, PITCH, cfg, cut=cut, pixels=mask.shape[1])

    def key(c):
        return (c.line0, c.col0, c.line1, c.col1)

    fields = ("line0", "line1", "col0", "col1", "area_px", "cut", "too_long", "touches_border", "split")
    for chunk in (1, 13, 32):
        got = _run(mask, chunk, config=cfg)
        assert len(got) == len(expect)
        assert any(c.split for c in got) and len(expect) < n  # both paths taken: splits, specks
        for g, e in zip(sorted(got, key=key), sorted(expect, key=key)):
            assert [getattr(g, f) for f in fields] == [getattr(e, f) for f in fields]
            assert g.centroid_line == pytest.approx(e.centroid_line, abs=1e-9)
            assert g.centroid_px == pytest.approx(e.centroid_px, abs=1e-9)
            assert np.array_equal(g.mask, e.mask)


def test_runs_of_finished_particles_are_reused():
    """A long stream of rocks in bounded memory: every run of a finished particle (whole, speck
    or too long) goes back to the free list, whose counted length is its walked length, so the
    run table never grows past what the open particles need at once."""
    import sorting.stages.stitch_kernels as K

    rng = np.random.default_rng(8)
    seg = StreamSegmenter(64, None, PITCH, PITCH, SegmentConfig(min_area_mm2=2.0), max_particle_lines=30)
    size = seg._runs.shape[0]
    yy, xx = np.mgrid[:12, :12]
    disc = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 < 30
    for first in range(0, 20_000, 16):
        chunk = np.zeros((16, 64), bool)
        for _ in range(2):  # discs (some cut across chunks, some touching), specks, long bars
            r, c = rng.integers(0, 8), rng.integers(0, 52)
            chunk[r:r + 8, c:c + 12] |= disc[:8]
        chunk[rng.integers(0, 16), rng.integers(0, 64)] = True
        if first % 640 < 160:
            chunk[:, 60:62] = True
        seg.push(first, chunk)
    seg.flush()

    def walked() -> int:
        n, i = 0, seg._sc[K.S_FREE_RUN]
        while i >= 0:
            n, i = n + 1, seg._runs[i, K.R_NEXT]
        return n

    assert seg._runs.shape[0] == size  # ~150,000 runs went through a table of this size
    assert seg._sc[K.S_NFREE_RUN] == walked() == size  # all free after the flush
