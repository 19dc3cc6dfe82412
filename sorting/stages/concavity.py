"""A cheap upper bound on the deepest convexity defect of a particle's outer contour.

The touching-rock gate (:func:`sorting.stages.split._may_split`) traces the contour with OpenCV
and measures its convexity defects (~35 us per particle). Most rocks are HV-convex (every
row and every column one run), and for those the bound below settles the gate in a few
microseconds: it is never below OpenCV's depth, so a particle it clears would also have
been cleared by the full gate.

Why it bounds OpenCV's depth: the outer contour runs through the centres of border pixels
(pixels with a background 4-neighbour). In an HV-convex set those are row or column
extremes. When every such pixel has a single run of set pixels around it, the contour is a
simple closed curve, and between two consecutive hull vertices it is monotone in rows and
columns, so it stays in the box spanned by the two vertices. The defect depth of that hull
edge is the largest distance of those contour points from the edge's line, hence at most
the largest distance of any row or column extreme inside that box.
"""
from __future__ import annotations

import numba
import numpy as np

#: OpenCV gives a convexity defect's depth in fixed point: this is its resolution, px
DEFECT_DEPTH_QUANTUM_PX = 1.0 / 256.0
#: the touching-rock gate lets a component through to the watershed when its deepest
#: concavity reaches this share of the split depth (no second peak can rise the split depth
#: above a neck without a concavity about as deep; the quarter below it is margin for the
#: pixel grid's outline)
GATE_DEPTH_SHARE = 0.75

# 8-neighbours in circular order (row, column offsets)
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


@numba.njit(cache=True, nogil=True, inline="always")
def _single_ring_run(lo, hi, r, c):
    """True if the set 8-neighbours of (r, c) form exactly one circular run (row q of the set
    is the single run lo[q]..hi[q])."""
    h = lo.size
    starts = 0
    dr, dc = _RING[7]
    rr, cc = r + dr, c + dc
    before = 0 <= rr < h and lo[rr] <= cc <= hi[rr]
    for k in range(8):
        dr, dc = _RING[k]
        rr, cc = r + dr, c + dc
        now = 0 <= rr < h and lo[rr] <= cc <= hi[rr]
        if now and not before:
            starts += 1
        before = now
    return starts == 1


@numba.njit(cache=True, nogil=True)
def defect_depth_bound_px(mask):
    """Upper bound (pixels) on the deepest convexity defect of the outer contour of ``mask``,
    as ``cv2.convexityDefects`` measures it; ``inf`` when no bound is offered (not HV-convex,
    or a border pixel the contour would pass twice).

    Parameters
    ----------
    mask : (h, w) ndarray of bool, one 8-connected component in its tight box
    """
    h, w = mask.shape
    if h == 0 or w == 0:
        return np.inf
    lo = np.empty(h, np.int64)
    hi = np.empty(h, np.int64)
    for r in range(h):
        first, last, count = -1, -1, 0
        for c in range(w):
            if mask[r, c]:
                if first < 0:
                    first = c
                last = c
                count += 1
        if count == 0 or count != last - first + 1:
            return np.inf
        lo[r], hi[r] = first, last
    return defect_depth_bound_rows(lo, hi, w)


@numba.njit(cache=True, nogil=True)
def defect_depth_bound_rows(lo, hi, w):
    """:func:`defect_depth_bound_px` of a set whose row r is the single run of columns
    ``lo[r]..hi[r]`` in a box of ``w`` columns (the stitcher has the runs: no mask to scan).

    Parameters
    ----------
    lo, hi : (h,) ndarray of int64, 0 <= lo <= hi < w
    """
    h = lo.size
    if h == 0 or w == 0:
        return np.inf
    top = np.full(w, -1, np.int64)
    bottom = np.full(w, -1, np.int64)
    count_c = np.zeros(w, np.int64)
    if _rows_adjacent(lo, hi):
        _columns_from_rows(lo, hi, top, bottom, count_c)
    else:
        for r in range(h):
            for c in range(lo[r], hi[r] + 1):
                if top[c] < 0:
                    top[c] = r
                bottom[c] = r
                count_c[c] += 1
    for c in range(w):
        if count_c[c] == 0 or count_c[c] != bottom[c] - top[c] + 1:
            return np.inf
    for r in range(h):
        if not (_single_ring_run(lo, hi, r, lo[r]) and _single_ring_run(lo, hi, r, hi[r])):
            return np.inf
    for c in range(w):
        if not (_single_ring_run(lo, hi, top[c], c) and _single_ring_run(lo, hi, bottom[c], c)):
            return np.inf
    # convex hull of the row extremes (Andrew's monotone chain, collinear points dropped);
    # points come sorted by (row, column)
    n_pts = 0
    pr = np.empty(2 * h, np.int64)
    pc = np.empty(2 * h, np.int64)
    for r in range(h):
        pr[n_pts], pc[n_pts] = r, lo[r]
        n_pts += 1
        if hi[r] != lo[r]:
            pr[n_pts], pc[n_pts] = r, hi[r]
            n_pts += 1
    hull = np.empty(2 * n_pts + 1, np.int64)
    m = 0
    for i in range(n_pts):
        while m >= 2 and _cross(pr, pc, hull[m - 2], hull[m - 1], i) <= 0:
            m -= 1
        hull[m] = i
        m += 1
    lower = m + 1
    for i in range(n_pts - 2, -1, -1):
        while m >= lower and _cross(pr, pc, hull[m - 2], hull[m - 1], i) <= 0:
            m -= 1
        hull[m] = i
        m += 1
    m -= 1  # the first point closes the chain
    if m < 3:
        return 0.0  # all points on one line: no defect
    best = 0.0
    for e in range(m):
        a, b = hull[e], hull[(e + 1) % m]
        ar, ac, br, bc = pr[a], pc[a], pr[b], pc[b]
        dr, dc = br - ar, bc - ac
        norm = np.sqrt(float(dr * dr + dc * dc))
        r0, r1 = min(ar, br), max(ar, br)
        c0, c1 = min(ac, bc), max(ac, bc)
        far = 0
        for r in range(r0, r1 + 1):
            for c in (lo[r], hi[r]):
                if c0 <= c <= c1:
                    far = max(far, abs(dr * (c - ac) - dc * (r - ar)))
        for c in range(c0, c1 + 1):
            for r in (top[c], bottom[c]):
                if r0 <= r <= r1:
                    far = max(far, abs(dr * (c - ac) - dc * (r - ar)))
        best = max(best, far / norm)
    return best


@numba.njit(cache=True, nogil=True, inline="always")
def _rows_adjacent(lo, hi):
    """True if each row's run touches the one above (8-connectivity), as in a particle."""
    for r in range(1, lo.size):
        if lo[r] > hi[r - 1] + 1 or hi[r] < lo[r - 1] - 1:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _columns_from_rows(lo, hi, top, bottom, count_c):
    """First row, last row and number of rows of each column, in O(h + w) rather than per pixel:
    with adjacent rows, the rows above (or below) any line cover one interval of columns, so a
    row first reaches only the columns beyond it. Columns no row reaches keep -1, -1, 0."""
    h = lo.size
    for r in range(h):
        count_c[lo[r]] += 1
        if hi[r] + 1 < count_c.size:
            count_c[hi[r] + 1] -= 1
    for c in range(1, count_c.size):
        count_c[c] += count_c[c - 1]
    u0, u1 = lo[0], hi[0]
    top[u0:u1 + 1] = 0
    for r in range(1, h):
        top[lo[r]:u0] = r
        top[u1 + 1:hi[r] + 1] = r
        u0, u1 = min(u0, lo[r]), max(u1, hi[r])
    u0, u1 = lo[h - 1], hi[h - 1]
    bottom[u0:u1 + 1] = h - 1
    for r in range(h - 2, -1, -1):
        bottom[lo[r]:u0] = r
        bottom[u1 + 1:hi[r] + 1] = r
        u0, u1 = min(u0, lo[r]), max(u1, hi[r])


@numba.njit(cache=True, nogil=True, inline="always")
def _cross(pr, pc, o, a, b):
    return (pr[a] - pr[o]) * (pc[b] - pc[o]) - (pc[a] - pc[o]) * (pr[b] - pr[o])


@numba.njit(cache=True, nogil=True, inline="always")
def bound_clears_gate(bound_px: float, pitch_mm: float, gate_depth_mm: float) -> bool:
    """True when a bound on the deepest concavity (px, as :func:`defect_depth_bound_px`) is
    surely under the gate's depth (mm, ``GATE_DEPTH_SHARE * split_depth_mm``) on a grid of
    ``pitch_mm`` (the coarser pitch): OpenCV's depth, never above the bound but rounded to its
    fixed point, cannot reach the gate either. Shared by the batch and the stitcher's gate."""
    return (bound_px + DEFECT_DEPTH_QUANTUM_PX) * pitch_mm < gate_depth_mm
