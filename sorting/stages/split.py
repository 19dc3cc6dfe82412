"""Touching rocks: split a connected component of the foreground into the rocks it holds.

A watershed on the distance to the edge, seeded at its peaks; basins are merged (a Kruskal
sweep over the necks, highest first) while the lower peak rises less than ``split_depth_mm``
above the neck, or a side is below ``min_area_mm2``. A cheap gate runs first: a component
whose convex hull has no defect deeper than the split depth is one rock
(:mod:`sorting.stages.concavity` bounds that depth without tracing the contour for most rocks).
The batch crop path and the streaming stitcher both come here through
:func:`sorting.stages.split.pieces`.
"""
from __future__ import annotations

import cv2
import numba
import numpy as np
from scipy import ndimage

from sorting.stages.concavity import (
    DEFECT_DEPTH_QUANTUM_PX,
    bound_clears_gate,
    defect_depth_bound_px,
)
from sorting.stages.particles import Particle, Particles, SegmentConfig, is_speck, pixel_area_mm2

#: particles larger than this (pixels) are flooded on max-pooled blocks of about this many
_FLOOD_PX = 1200


def _distance_mm(mask_u8: np.ndarray, pixel_pitch_mm: float, line_pitch_mm: float) -> np.ndarray:
    """Euclidean distance to the nearest background pixel, in mm (mask padded by the caller)."""
    if abs(pixel_pitch_mm - line_pitch_mm) <= 0.02 * max(pixel_pitch_mm, line_pitch_mm):
        d = cv2.distanceTransform(mask_u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # OpenCV's exact transform wobbles by ~1e-6 from call to call, which flips watershed
        # ties; the squared distance is an integer, so rounding it makes the result exact
        np.multiply(d, d, out=d)
        np.rint(d, out=d)
        np.sqrt(d, out=d)
        d *= np.float32(0.5 * (pixel_pitch_mm + line_pitch_mm))
        return d
    return ndimage.distance_transform_edt(mask_u8, sampling=(line_pitch_mm, pixel_pitch_mm)).astype(np.float32)


def _max_defect_depth_px(mask_u8: np.ndarray) -> float:
    """Deepest concavity of the outer contours, in pixels (0 for a convex shape)."""
    contours, _ = cv2.findContours(mask_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    depth = 0.0
    for c in contours:
        if len(c) < 4:
            continue
        hull = cv2.convexHull(c, returnPoints=False)
        if len(hull) < 3:
            continue
        try:
            defects = cv2.convexityDefects(c, hull)
        except cv2.error:  # self-intersecting hull order on degenerate contours
            return np.inf
        # OpenCV 4 returns None for a convex outline, OpenCV 5 an empty array
        if defects is not None and defects.size:
            depth = max(depth, float(defects.reshape(-1, 4)[:, 3].max()) * DEFECT_DEPTH_QUANTUM_PX)
    return depth


def _find(parent: dict, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def split_touching(mask: np.ndarray, pixel_pitch_mm: float, line_pitch_mm: float,
                   config: SegmentConfig | None = None) -> np.ndarray:
    """Split touching rocks: watershed on the distance to the edge, markers by dynamics.

    Parameters
    ----------
    mask : (h, w) ndarray of bool
    pixel_pitch_mm, line_pitch_mm : pixel size across and along the belt.

    Returns
    -------
    (h, w) ndarray of int32
        0 background, 1..n one label per rock, numbered in raster order of first pixel.
        Basins are merged (Kruskal sweep over necks, highest first) while the lower peak
        rises less than ``split_depth_mm`` above the neck, or a side is smaller than
        ``min_area_mm2``: a convex rock stays whole, two rocks meeting at a neck split.
        Connected components are never joined.
    """
    config = SegmentConfig() if config is None else config
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D, got shape {mask.shape}")
    min_area_px = config.min_area_mm2 / pixel_area_mm2(pixel_pitch_mm, line_pitch_mm)
    m8 = _padded(mask)
    if not (config.split_touching and _may_split(m8, pixel_pitch_mm, line_pitch_mm, config)):
        comp = cv2.connectedComponents(m8, connectivity=8, ltype=cv2.CV_32S)[1]
        return comp[1:-1, 1:-1].copy()
    return _split_padded(m8, pixel_pitch_mm, line_pitch_mm, config, min_area_px)


def _padded(mask: np.ndarray) -> np.ndarray:
    """The mask as uint8 with one row and column of background all round (the edge is outside)."""
    return cv2.copyMakeBorder(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), 1, 1, 1, 1,
                              cv2.BORDER_CONSTANT, value=0)


def _may_split(m8: np.ndarray, pixel_pitch_mm: float, line_pitch_mm: float, config: SegmentConfig) -> bool:
    """The gate of :func:`split_touching` on a padded mask: without a concavity as deep as the
    split depth, no second peak can exist (most rocks stop here, before any distance map)."""
    depth_px = _max_defect_depth_px(m8)
    return depth_px * max(pixel_pitch_mm, line_pitch_mm) >= config.gate_depth_mm


def _surely_shallow(mask: np.ndarray, pixel_pitch_mm: float, line_pitch_mm: float, config: SegmentConfig) -> bool:
    """True when :func:`_may_split` is sure to refuse: a bound on the deepest concavity (never
    below OpenCV's, whose depth is fixed point in 1/256 px) is under the gate's threshold.
    Settles ~90 % of rocks in a few us instead of tracing a contour."""
    bound_px = defect_depth_bound_px(np.ascontiguousarray(mask, dtype=bool))
    return bound_clears_gate(bound_px, max(pixel_pitch_mm, line_pitch_mm), config.gate_depth_mm)


def _split_padded(m8: np.ndarray, pixel_pitch_mm: float, line_pitch_mm: float, config: SegmentConfig,
                  min_area_px: float) -> np.ndarray:
    mask = m8[1:-1, 1:-1].view(bool)
    dist = _distance_mm(m8, pixel_pitch_mm, line_pitch_mm)
    k = int(np.ceil(np.sqrt(np.count_nonzero(mask) / _FLOOD_PX)))
    if k <= 1:
        return _watershed_by_dynamics(dist, m8.astype(bool), config.split_depth_mm, min_area_px)[1:-1, 1:-1]
    # a large particle floods on k x k max-pooled blocks (the flooding costs ~0.1-0.3 us per
    # pixel): peaks stay exact and necks can only read higher, so it splits no more readily
    # than full resolution; the labels come back block by block
    h, w = m8.shape
    padded = np.zeros((-(-h // k) * k, -(-w // k) * k), np.float32)
    padded[:h, :w] = dist
    pooled = padded[::k, ::k].copy()
    for i in range(k):
        for j in range(k):
            np.maximum(pooled, padded[i::k, j::k], out=pooled)
    coarse = _watershed_by_dynamics(pooled, pooled > 0, config.split_depth_mm, min_area_px / (k * k))
    labels = np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)[:h, :w]
    labels[m8 == 0] = 0
    ncomp, comp = cv2.connectedComponents(m8, connectivity=8, ltype=cv2.CV_32S)
    if ncomp > 2:  # blocks may bridge separate components: never join them
        labels = comp.astype(np.int64) * (int(coarse.max()) + 1) + labels
        labels[m8 == 0] = 0
    return _raster_order(labels)[1:-1, 1:-1]


def _raster_order(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in raster order of their first pixel (0 stays 0), int32."""
    flat = labels.ravel()
    present = np.flatnonzero(np.bincount(flat))
    present = present[present > 0]
    first = [int(np.argmax(flat == v)) for v in present]
    lut = np.zeros(int(flat.max()) + 1, np.int32)
    lut[present[np.argsort(first)]] = np.arange(1, present.size + 1, dtype=np.int32)
    return lut[labels]


def _watershed_by_dynamics(dist: np.ndarray, mask: np.ndarray, depth_mm: float,
                           min_area_px: float) -> np.ndarray:
    peaks = mask & (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8)))
    n, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    peak = np.zeros(n)
    np.maximum.at(peak, markers[peaks], dist[peaks])
    # flood from every peak, highest first; every component holds a peak (its maximum),
    # so every mask pixel ends up in a basin
    basins = flood(-dist, markers, mask)
    area = np.bincount(basins.ravel(), minlength=n).astype(np.float64)
    # necks: for each pair of 8-adjacent basins, the highest crossing min(d_p, d_q)
    h, w = basins.shape
    keys, heights = [], []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        cp, cq = (slice(0, w - dc), slice(dc, w)) if dc >= 0 else (slice(-dc, w), slice(0, w + dc))
        a, b = basins[0:h - dr, cp], basins[dr:h, cq]
        sel = np.flatnonzero((a != b) & (a > 0) & (b > 0))
        if sel.size:
            a, b = a.ravel()[sel], b.ravel()[sel]
            keys.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
            heights.append(np.minimum(dist[0:h - dr, cp].ravel()[sel], dist[dr:h, cq].ravel()[sel]))
    saddles: dict[tuple[int, int], float] = {}
    if keys:
        key, height = np.concatenate(keys), np.concatenate(heights)
        order = np.lexsort((height, key))
        key, height = key[order], height[order]
        last = np.r_[key[1:] != key[:-1], True]
        saddles = {divmod(k, n): v for k, v in zip(key[last].tolist(), height[last].tolist())}
    parent = {i: i for i in range(1, n)}
    top = {i: float(peak[i]) for i in range(1, n)}
    size = {i: float(area[i]) for i in range(1, n)}
    for (i, j), s in sorted(saddles.items(), key=lambda kv: -kv[1]):
        ri, rj = _find(parent, i), _find(parent, j)
        if ri == rj:
            continue
        low = min(top[ri], top[rj])
        if low - s < depth_mm or min(size[ri], size[rj]) < min_area_px:
            keep, gone = (ri, rj) if top[ri] >= top[rj] else (rj, ri)
            parent[gone] = keep
            size[keep] += size[gone]
    root = np.zeros(n, np.int64)
    for i in range(1, n):
        root[i] = _find(parent, i)
    # raster order: the result does not depend on marker numbering
    return _raster_order(root[basins])


@numba.njit(cache=True, nogil=True)
def flood(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=2)`` for a 2-D
    image as scikit-image 0.26 computes it, the same labels (tests compare them on the split's
    inputs and on arbitrary ones), without its ~0.4 ms of set-up per call on a small particle:
    priority flooding from the markers over the 8-neighbourhood, lowest value first, ties by
    push order (skimage's binary heap, the same sift steps, so ties resolve the same way); a
    pixel takes its label when it is pushed, at the higher of its own value and that of the
    pixel it was reached from. Inputs are padded by one pixel (out of the mask) as skimage
    pads them; markers outside the mask are dropped.
    """
    h, w = image.shape
    wp = w + 2
    size = (h + 2) * wp
    img = np.zeros(size, np.float64)
    inside = np.zeros(size, np.uint8)
    out = np.zeros(size, markers.dtype)
    for r in range(h):
        for c in range(w):
            k = (r + 1) * wp + c + 1
            img[k] = image[r, c]
            if mask[r, c]:
                inside[k] = 1
                out[k] = markers[r, c]
    # skimage's neighbour order: the 4 edge neighbours, then the 4 corners
    offsets = np.array([-wp, -1, 1, wp, -wp - 1, -wp + 1, wp - 1, wp + 1], np.int64)
    value = np.empty(size + 1, np.float64)  # the heap: every pixel is pushed at most once
    age = np.empty(size + 1, np.int64)
    where = np.empty(size + 1, np.int64)
    n = 0
    for k in range(size):  # the markers in raster order, age 0
        if out[k]:
            n = _push(value, age, where, n, img[k], 0, k)
    count = 1
    while n > 0:
        k, level = where[0], value[0]
        n = _pop(value, age, where, n)
        label = out[k]
        for j in range(8):
            nb = k + offsets[j]
            if not inside[nb] or out[nb]:
                continue
            count += 1
            out[nb] = label
            n = _push(value, age, where, n, max(img[nb], level), count, nb)
    result = np.empty((h, w), markers.dtype)
    for r in range(h):
        for c in range(w):
            result[r, c] = out[(r + 1) * wp + c + 1]
    return result


@numba.njit(cache=True, nogil=True, inline="always")
def _smaller(value, age, a, b):
    if value[a] != value[b]:
        return value[a] < value[b]
    return age[a] < age[b]


@numba.njit(cache=True, nogil=True, inline="always")
def _swap(value, age, where, a, b):
    value[a], value[b] = value[b], value[a]
    age[a], age[b] = age[b], age[a]
    where[a], where[b] = where[b], where[a]


@numba.njit(cache=True, nogil=True, inline="always")
def _push(value, age, where, n, v, a, k):
    """skimage's heappush: append, then sift up while strictly smaller than the parent."""
    child = n
    value[child], age[child], where[child] = v, a, k
    n += 1
    while child > 0:
        parent = (child + 1) // 2 - 1
        if _smaller(value, age, child, parent):
            _swap(value, age, where, parent, child)
            child = parent
        else:
            break
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _pop(value, age, where, n):
    """skimage's heappop (the top was read by the caller): the last item to the top, then sift
    down to the strictly smaller child (the left one on a tie)."""
    n -= 1
    if n == 0:
        return n
    _swap(value, age, where, 0, n)
    i = 0
    smallest = i
    while True:
        left, right = 2 * i + 1, 2 * i + 2
        if left < n:
            if _smaller(value, age, left, i):
                smallest = left
            if right < n and _smaller(value, age, right, smallest):
                smallest = right
        else:
            break
        if smallest == i:
            break
        _swap(value, age, where, i, smallest)
        i = smallest
    return n


def pieces(mask: np.ndarray, line0: int, col0: int, pixel_pitch_mm: float, line_pitch_mm: float,
            config: SegmentConfig, cut: bool = False, too_long: bool = False,
            pixels: int | None = None, sums: tuple[int, int, int] | None = None,
            bound_deep: bool = False) -> Particles:
    """One connected component (its tight box mask at line0, col0) -> the particles it holds.

    ``sums`` = (area, sum of lines, sum of columns) when the caller has them exactly.
    ``bound_deep``: the caller has dropped specks and found that the concavity bound of
    :func:`_surely_shallow` does not clear it (the stitcher reads the bound off its runs).
    """
    area_px = sums[0] if sums is not None else int(np.count_nonzero(mask))
    if area_px == 0:  # no pixel, no particle (whatever the speck size)
        return Particles.empty()
    if not bound_deep and is_speck(area_px, pixel_area_mm2(pixel_pitch_mm, line_pitch_mm), config.min_area_mm2):
        return Particles.empty()
    labels = None
    if config.split_touching and not too_long and (
            bound_deep or not _surely_shallow(mask, pixel_pitch_mm, line_pitch_mm, config)):
        # one connected component: unless the gate lets it through, it is one particle
        m8 = _padded(mask)
        if _may_split(m8, pixel_pitch_mm, line_pitch_mm, config):
            labels = _split_padded(m8, pixel_pitch_mm, line_pitch_mm, config,
                                   config.min_area_mm2 / pixel_area_mm2(pixel_pitch_mm, line_pitch_mm))
            if labels.max() <= 1:
                labels = None
    h, w = mask.shape
    edge = pixels is not None and (col0 == 0 or col0 + w == pixels)
    if labels is None:
        if sums is None:
            m = cv2.moments(mask.view(np.uint8), binaryImage=True)
            sums = (area_px, line0 * area_px + int(round(m["m01"])), col0 * area_px + int(round(m["m10"])))
        return Particles.from_rows([Particle(line0, line0 + h - 1, col0, col0 + w - 1, mask, area_px,
                                             sums[1] / area_px, sums[2] / area_px, cut, too_long, edge, False)])
    out = []
    for k in range(1, int(labels.max()) + 1):
        part = (labels == k).view(np.uint8)
        c0, r0, bw, bh = cv2.boundingRect(part)
        sub = part[r0:r0 + bh, c0:c0 + bw]
        m = cv2.moments(sub, binaryImage=True)
        a0 = int(round(m["m00"]))
        out.append(Particle(
            line0=line0 + r0, line1=line0 + r0 + bh - 1, col0=col0 + c0, col1=col0 + c0 + bw - 1,
            mask=sub.view(bool).copy(), area_px=a0,
            centroid_line=line0 + r0 + m["m01"] / a0, centroid_px=col0 + c0 + m["m10"] / a0,
            cut=cut, too_long=too_long,
            touches_border=pixels is not None and (col0 + c0 == 0 or col0 + c0 + bw == pixels),
            split=True))
    return Particles.from_rows(out)
