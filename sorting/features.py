"""Per-particle features (pipeline stage 3): one fixed-order vector of physical quantities.

Every feature is in physical units (mm, mm2, cm3, attenuation, material fractions), so a
model means the same on another machine with its own pitch and calibration. Material
statistics come from the rock's interior (mask eroded by ``EDGE_PX``) without starved
pixels: the thin rim reads noise-dominated material values, a starved pixel none at all. Distributions are thickness-weighted where that is the
physical quantity (the share of the rock's volume, not of its projected pixels).

The batch path (:func:`dataset_features`) and the belt (the streaming loop cutting each
``Completed`` box out of its ring buffer) both call :func:`features_batch` on the
particles' boxes, so a model trained on rock crops sees the numbers the belt produces.
It lays the boxes out on one canvas with empty belt between them and computes every
map and filter once for all of them; a particle's numbers do not depend on its
neighbours on the canvas, nor on a margin around its box (the crop is trimmed to the
mask), so :func:`particle_features` (a batch of one) gives the same numbers.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from .normalize import attenuation, basis_thickness, blurred_transmission, mafic_line, smoothed_attenuation
from .segment import SegmentConfig, segment_crop

if TYPE_CHECKING:
    from .calibrate import Calibration
    from .formats import RockDataset

#: bump when any definition changes: models carry it and are refused on a mismatch
FEATURE_VERSION = "3"

_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
_MAFIC_Q_NAMES = tuple(f"mafic_p{int(q * 100):02d}" for q in _QUANTILES)
FEATURE_NAMES: tuple[str, ...] = (
    "area_mm2",
    "equiv_diameter_mm",
    "length_mm",  # major axis of the moment ellipse (full length)
    "width_mm",  # minor axis
    "elongation",  # length / width
    "thickness_mean_mm",  # equivalent rock thickness on the syenite->hedenbergite line
    "volume_cm3",  # sum of equivalent thickness x pixel area
    "a_low_mean",
    "a_high_mean",
    "r_mean",  # A_low / A_high of the interior sums
    "mafic_mean",  # thickness-weighted: the rock's volume share on the syenite->hedenbergite line
    "mafic_std",
    *_MAFIC_Q_NAMES,
    "fe_frac_mean",
    "fe_frac_std",
    "fayalite_share",  # volume share with mafic_frac above FAYALITE_LEVEL
    "oxide_share",  # volume share with mafic_frac above OXIDE_LEVEL
    "mafic_texture",  # thickness-weighted rms of mafic_frac minus its local mean (TEXTURE_WINDOW_MM)
    "starved_share",  # share of rock pixels with a starved low channel
    "interior_share",  # share of rock pixels in the material statistics (not rim, not starved)
)
N_FEATURES = len(FEATURE_NAMES)

#: rim pixels kept out of the material statistics
EDGE_PX = 2
#: mafic_frac above this: denser / higher Z than any pyroxene-amphibole-feldspar mix (pure
#: hedenbergite reads 1 by definition, hastingsite 1.1, fayalite and ilmenite 3.0-3.1)
FAYALITE_LEVEL = 1.3
#: ... and above this: magnetite (reads 6.6); halfway from fayalite and ilmenite (3.0-3.1),
#: so it takes pixels dominated by magnetite grains
OXIDE_LEVEL = 4.5
#: width (mm) of the box whose mean mafic fraction inside the rock is the local background of
#: ``mafic_texture``: grain-scale heterogeneity (disseminated oxide grains, pyroxene clots of
#: a few mm in an ore rock) stays above it, rock-scale banding and thickness gradients are
#: taken out; a homogeneous syenite reads only noise
TEXTURE_WINDOW_MM = 4.0
_Q = np.array(_QUANTILES)
#: empty belt around each particle's box: at least the smoothing Gaussian's radius (sigma 1 px,
#: a 9-tap kernel), so a rock sees only empty belt around it, as on the belt
_PAD = 4
_DISK = {r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in (1, 2)}
#: particles per canvas, and canvas pixels: one pass per chunk of the stream, bounded memory in batch
_BATCH_PARTICLES = 64
_BATCH_PIXELS = 1 << 20
#: canvas width before a new shelf of boxes starts (px)
_SHELF_PX = 1024

_C = {name: i for i, name in enumerate(FEATURE_NAMES)}
_C_MAFIC_Q = [_C[name] for name in _MAFIC_Q_NAMES]


class _Histogram:
    """Fixed bins for weighted quantiles in O(n) (no sort): the cumulative weight at the bin
    edges, interpolated linearly inside the bin where it crosses q."""

    def __init__(self, lo: float, hi: float, step: float):
        self.n_bins = int(round((hi - lo) / step))
        self.scale = np.float32(1.0 / step)
        self.shift = np.float32(-lo / step)
        self.top = np.float32(self.n_bins - 0.5)
        self.edges = lo + step * np.arange(self.n_bins + 1)

    def quantiles(self, values: np.ndarray, weights: np.ndarray, label: np.ndarray, n: int,
                  q: np.ndarray) -> np.ndarray:
        """Weighted quantiles ``q`` of each of ``n`` groups (``label`` 0..n-1 per value): (n, len(q))."""
        v = values * self.scale
        v += self.shift
        np.maximum(v, np.float32(0.0), out=v)
        np.minimum(v, self.top, out=v)
        nb = self.n_bins
        key = label * nb
        key += v.astype(np.intp)
        cum = np.zeros((n, nb + 1))
        np.cumsum(np.bincount(key, weights=weights, minlength=n * nb).reshape(n, nb), axis=1, out=cum[:, 1:])
        x = q * cum[:, -1:]  # (n, nq)
        return np.array([np.interp(x[i], cum[i], self.edges) for i in range(n)])


#: weighted quantiles of the mafic fraction: value range and bin width
_MAFIC_HIST = _Histogram(-1.0, 8.0, 0.02)


def _texture_window(pixel_pitch_mm: float, line_pitch_mm: float) -> tuple[int, int]:
    """Odd box (columns, rows) closest to TEXTURE_WINDOW_MM on this machine's pitches, at least 3 px."""
    def odd(pitch: float) -> int:
        return 2 * max(int(math.floor(0.5 * (TEXTURE_WINDOW_MM / pitch - 1.0) + 0.5)), 1) + 1

    return odd(pixel_pitch_mm), odd(line_pitch_mm)


class _Layout:
    """Particle boxes side by side on one canvas, shelf by shelf (tallest first), ``gap`` px
    of empty belt between them and around the canvas: no filter reaches from one rock to
    the next, so each reads as if it were alone on the belt."""

    def __init__(self, heights: list[int], widths: list[int], gap: int):
        order = sorted(range(len(heights)), key=lambda i: -heights[i])
        self.y = [0] * len(heights)
        self.x = [0] * len(heights)
        limit = max(_SHELF_PX, max(widths) + 2 * gap)
        y = x = gap
        shelf = width = 0
        for i in order:
            if x > gap and x + widths[i] + gap > limit:
                y += shelf + gap
                x, shelf = gap, 0
            shelf = max(shelf, heights[i])
            self.y[i], self.x[i] = y, x
            x += widths[i] + gap
            width = max(width, x)
        self.shape = (y + shelf + gap, width)


class _Workspace:
    """Scratch canvases, grown on demand and reused from chunk to chunk (one per thread)."""

    def __init__(self) -> None:
        self.size = 0

    def canvases(self, h: int, w: int) -> tuple[np.ndarray, ...]:
        """(h, w, 2) float32, (h, w, 4) float32 x 2 and an (h, w) uint8 mask; contents undefined."""
        if h * w > self.size:
            self.size = max(h * w, 2 * self.size, 1 << 15)
            self._a = np.empty(2 * self.size, np.float32)
            self._f1 = np.empty(4 * self.size, np.float32)
            self._f2 = np.empty(4 * self.size, np.float32)
            self._m8 = np.empty(self.size, np.uint8)
        n = h * w
        return (self._a[:2 * n].reshape(h, w, 2), self._f1[:4 * n].reshape(h, w, 4),
                self._f2[:4 * n].reshape(h, w, 4), self._m8[:n].reshape(h, w))


_LOCAL = threading.local()


def _workspace() -> _Workspace:
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = _Workspace()
    return ws


def features_batch(crops: Sequence[tuple[np.ndarray, np.ndarray]], cal: Calibration, pixel_pitch_mm: float,
                   line_pitch_mm: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The feature vectors of several particles, computed together.

    The particles' boxes are laid out on one canvas with empty belt between them, so the
    material maps, smoothing and filters run once for all of them and the statistics come
    out per particle from sums over its pixels; each particle's numbers are those it gets
    alone (:func:`particle_features` is this function on one crop).

    Parameters
    ----------
    crops : sequence of (a, mask)
        ``a`` (h, w, 2) float32, attenuation of the particle's box (a margin of belt around
        it is allowed; it may be a strided view), ``mask`` (h, w) bool, its pixels.
    cal : Calibration (its basis table and starved level).
    pixel_pitch_mm, line_pitch_mm : pixel size across and along the belt.
    out : (n, F) ndarray of float32, optional

    Returns
    -------
    (n, F) ndarray of float32 in :data:`FEATURE_NAMES` order; always finite (an empty mask
    gives zeros). Inputs are not modified.
    """
    if not (pixel_pitch_mm > 0 and line_pitch_mm > 0):
        raise ValueError(f"pitches must be > 0, got pixel {pixel_pitch_mm!r}, line {line_pitch_mm!r} mm")
    n = len(crops)
    if out is None:
        out = np.empty((n, N_FEATURES), np.float32)
    elif out.shape != (n, N_FEATURES) or out.dtype != np.float32:
        raise ValueError(f"`out` (shape {out.shape}, {out.dtype}) must be float32 of shape ({n}, {N_FEATURES})")
    win = _texture_window(pixel_pitch_mm, line_pitch_mm)
    # no filter may reach from one rock to the next: the blur's radius, the texture box's half-width
    gap = max(_PAD, win[0] // 2, win[1] // 2)
    group: list[tuple] = []
    pixels = 0
    for i, (a, mask) in enumerate(crops):
        a = np.asarray(a)
        mask = np.asarray(mask, dtype=bool)
        if a.ndim != 3 or a.shape[2] != 2 or mask.shape != a.shape[:2]:
            raise ValueError(f"crop {i}: `a` (shape {a.shape}) must be (h, w, 2) and `mask` (shape {mask.shape}) (h, w)")
        m8 = mask.view(np.uint8)
        c0, r0, bw, bh = cv2.boundingRect(m8)
        if bw == 0 or bh == 0:
            out[i] = 0.0
            continue
        # trim to the mask: the result cannot depend on the caller's margin
        group.append((i, a[r0:r0 + bh, c0:c0 + bw], m8[r0:r0 + bh, c0:c0 + bw]))
        pixels += (bh + gap) * (bw + gap)
        if len(group) >= _BATCH_PARTICLES or pixels >= _BATCH_PIXELS:
            _batch(group, cal, pixel_pitch_mm, line_pitch_mm, win, gap, out)
            group, pixels = [], 0
    if group:
        _batch(group, cal, pixel_pitch_mm, line_pitch_mm, win, gap, out)
    return out


def _batch(group: list[tuple], cal: Calibration, pp: float, lp: float, win: tuple[int, int], gap: int,
           out: np.ndarray) -> None:
    n = len(group)
    lay = _Layout([m.shape[0] for _, _, m in group], [m.shape[1] for _, _, m in group], gap)
    h, w = lay.shape
    canvas_a, t4, t4b, m8 = _workspace().canvases(h, w)
    m8.fill(0)
    # rock pixels grouped by particle, each in raster order (per-particle sums are segment
    # sums): a box's own raster indices, moved to where the box sits on the canvas
    rock_parts = []
    for k, (_, a, m) in enumerate(group):
        bh, bw = m.shape
        y, x = lay.y[k], lay.x[k]
        canvas_a[y:y + bh, x:x + bw] = a  # only the rock's pixels are read back
        m8[y:y + bh, x:x + bw] = m
        local = np.flatnonzero(m.view(bool))
        if bw != w:
            local += (local // bw) * (w - bw)
        local += y * w + x
        rock_parts.append(local)
    rock = np.concatenate(rock_parts) if n > 1 else rock_parts[0]
    area_px = np.array([r.size for r in rock_parts])
    start = np.cumsum(area_px) - area_px
    lab = np.repeat(np.arange(n), area_px)
    # pixels of 2 or 4 float32 channels move as one complex64 / complex128 number
    a_rock = np.take(canvas_a.reshape(-1).view(np.complex64), rock).view(np.float32).reshape(-1, 2)
    if not np.isfinite(a_rock.sum()):  # a broken pixel must not poison the whole rock
        np.nan_to_num(a_rock, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    f = np.zeros((n, N_FEATURES))
    _shape(group, area_px, pp, lp, f)

    # material maps inside each rock (normalize._smooth_inside, on the whole canvas at once):
    # channels T_low, T_high, 1 on the rock, 0 elsewhere
    trans = np.negative(a_rock)
    cv2.exp(trans, dst=trans)
    ones = np.zeros((rock.size, 1, 2), np.float32)
    ones[:, 0, 0] = 1.0
    rows = cv2.merge((trans.reshape(-1, 1, 2), ones))
    t4.fill(0.0)
    t4.reshape(-1).view(np.complex128)[rock] = rows.reshape(-1).view(np.complex128)
    blurred_transmission(t4, 1.0, dst=t4b)
    blurred = np.take(t4b.reshape(-1).view(np.complex128), rock).view(np.float32).reshape(-1, 4)
    a_low, a_high = smoothed_attenuation(blurred)
    t_pom, t_fe = basis_thickness(a_low, a_high, cal)
    fe, mafic, thick = mafic_line(t_pom, t_fe)
    starved = a_rock[:, 0] > np.float32(cal.starved_a_low)

    # per-particle sums: float32 segment sums are pairwise, as accurate as ndarray.sum
    seg = np.add.reduceat
    f[:, _C["thickness_mean_mm"]] = seg(thick, start).astype(np.float64) / area_px
    f[:, _C["volume_cm3"]] = seg(np.maximum(thick, 0.0), start).astype(np.float64) * (pp * lp * 1e-3)
    f[:, _C["starved_share"]] = seg(starved, start, dtype=np.intp) / area_px

    core = _reliable(m8, rock, lab, start, area_px, starved)
    c_lab = lab[core]
    n_core = seg(core, start, dtype=np.intp)
    c_start = np.cumsum(n_core) - n_core
    f[:, _C["interior_share"]] = n_core / area_px
    sum_low = seg(a_low[core], c_start).astype(np.float64)
    sum_high = seg(a_high[core], c_start).astype(np.float64)
    f[:, _C["a_low_mean"]] = sum_low / n_core
    f[:, _C["a_high_mean"]] = sum_high / n_core
    f[:, _C["r_mean"]] = sum_low / np.maximum(sum_high, 1e-3 * n_core)

    wts = np.maximum(thick[core], np.float32(0.0))
    total = seg(wts, c_start).astype(np.float64)
    flat = ~(total > 0)  # a noise-level rock: weight its pixels equally
    if flat.any():
        wts[flat[c_lab]] = 1.0
        total[flat] = n_core[flat]
    mafic_c = mafic[core]
    f[:, _C["mafic_mean"]], f[:, _C["mafic_std"]] = _weighted_mean_std(mafic_c, wts, c_lab, c_start, total)
    f[:, _C["fe_frac_mean"]], f[:, _C["fe_frac_std"]] = _weighted_mean_std(fe[core], wts, c_lab, c_start, total)
    f[:, _C_MAFIC_Q] = _MAFIC_HIST.quantiles(mafic_c, wts, c_lab, n, _Q)
    f[:, _C["fayalite_share"]] = seg(wts * (mafic_c > FAYALITE_LEVEL), c_start).astype(np.float64) / total
    f[:, _C["oxide_share"]] = seg(wts * (mafic_c > OXIDE_LEVEL), c_start).astype(np.float64) / total
    f[:, _C["mafic_texture"]] = _texture(mafic_c, rock[core], wts, c_start, total, win, canvas_a, t4b)

    f[~np.isfinite(f)] = 0.0
    out[[i for i, _, _ in group]] = f


def _texture(mafic_c: np.ndarray, core_px: np.ndarray, wts: np.ndarray, c_start: np.ndarray,
             total: np.ndarray, win: tuple[int, int], t2: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Grain-scale heterogeneity: the thickness-weighted rms of mafic_frac minus its mean over
    the core pixels in a ``win`` box around each core pixel (normalized convolution, so neither
    the belt nor the noisy rim enters the local mean). Oxide grains and pyroxene clots of a few
    mm in a Sc-bearing or trap rock read high; a homogeneous syenite reads its noise only.

    One pass on the canvas: channels (mafic x core, core), summed over the box by a separable
    kernel of ones: a direct sum of the same pixels in the same order wherever the rock sits
    (OpenCV's running box sums would carry round-off from what lies left of and above it).
    ``core_px``: canvas indices of the core pixels; ``t2`` (h, w, 2) float32 and ``scratch``
    (at least h * w * 2 float32): scratch canvases, contents undefined."""
    h, w = t2.shape[:2]
    t2.fill(0.0)
    rows = np.empty((core_px.size, 2), np.float32)
    rows[:, 0] = mafic_c
    rows[:, 1] = 1.0
    t2.reshape(-1).view(np.complex64)[core_px] = rows.reshape(-1).view(np.complex64)
    box_sums = scratch.reshape(-1)[:2 * h * w].reshape(h, w, 2)
    cv2.sepFilter2D(t2, -1, np.ones(win[0], np.float32), np.ones(win[1], np.float32), dst=box_sums,
                    borderType=cv2.BORDER_CONSTANT)
    box = np.take(box_sums.reshape(-1).view(np.complex64), core_px).view(np.float32).reshape(-1, 2)
    dev = box[:, 0] / box[:, 1]  # >= 1 core pixel in every box: the pixel itself
    np.subtract(mafic_c, dev, out=dev)
    dev *= dev
    dev *= wts
    return np.sqrt(np.maximum(np.add.reduceat(dev, c_start).astype(np.float64) / total, 0.0))


def _weighted_mean_std(values: np.ndarray, weights: np.ndarray, label: np.ndarray, start: np.ndarray,
                       total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seg = np.add.reduceat
    mean = seg(values * weights, start).astype(np.float64) / total
    dev = values - mean.astype(np.float32)[label]
    dev *= dev
    dev *= weights
    return mean, np.sqrt(np.maximum(seg(dev, start).astype(np.float64) / total, 0.0))


def _shape(group: list[tuple], area_px: np.ndarray, pp: float, lp: float, f: np.ndarray) -> None:
    area = area_px * (pp * lp)
    f[:, _C["area_mm2"]] = area
    f[:, _C["equiv_diameter_mm"]] = np.sqrt(4.0 * area / math.pi)
    mu = np.array([[(mo := cv2.moments(m, binaryImage=True))["mu20"], mo["mu02"], mo["mu11"]]
                   for _, _, m in group]) / area_px[:, None]
    # central second moments in mm2; + pitch^2/12: each pixel is a square, not a point
    cxx = mu[:, 0] * pp ** 2 + pp ** 2 / 12.0
    cyy = mu[:, 1] * lp ** 2 + lp ** 2 / 12.0
    cxy = mu[:, 2] * pp * lp
    half_tr, det = 0.5 * (cxx + cyy), cxx * cyy - cxy * cxy
    root = np.sqrt(np.maximum(half_tr * half_tr - det, 0.0))
    lam1, lam2 = half_tr + root, np.maximum(half_tr - root, 0.0)
    # a uniform ellipse of semi-axis s has variance s^2/4 along it: full length = 4 sqrt(lambda)
    length, width = 4.0 * np.sqrt(lam1), 4.0 * np.sqrt(lam2)
    f[:, _C["length_mm"]] = length
    f[:, _C["width_mm"]] = width
    f[:, _C["elongation"]] = length / np.maximum(width, 1e-6)


def _reliable(m8: np.ndarray, rock: np.ndarray, lab: np.ndarray, start: np.ndarray, area_px: np.ndarray,
              starved: np.ndarray) -> np.ndarray:
    """Which rock pixels enter the material statistics, (N,) bool over ``rock``: per rock, the
    mask eroded by EDGE_PX (less when nothing would be left), without starved pixels; if
    that leaves nothing, the unstarved rim; if the whole rock is starved, the interior all
    the same."""
    seg = np.add.reduceat
    flat = m8.ravel()
    e2 = np.take(cv2.erode(m8, _DISK[EDGE_PX], borderType=cv2.BORDER_CONSTANT, borderValue=0).ravel(), rock)
    no2 = seg(e2, start, dtype=np.intp) == 0
    interior = e2.view(bool)
    if no2.any():
        e1 = np.take(cv2.erode(m8, _DISK[1], borderType=cv2.BORDER_CONSTANT, borderValue=0).ravel(), rock)
        no1 = seg(e1, start, dtype=np.intp) == 0
        interior = interior | (e1.view(bool) & no2[lab]) | no1[lab]
    del flat
    n_starved = seg(starved, start, dtype=np.intp)
    if not n_starved.any():
        return interior
    fed = ~starved
    ok = interior & fed
    has_ok = seg(ok, start, dtype=np.intp) > 0
    has_fed = n_starved < area_px
    # 0: the interior as it is, 1: its unstarved pixels, 2: the unstarved rim
    mode = np.where(n_starved == 0, 0, np.where(has_ok, 1, np.where(has_fed, 2, 0)))[lab]
    return np.where(mode == 0, interior, np.where(mode == 1, ok, fed))


def particle_features(a: np.ndarray, mask: np.ndarray, cal: Calibration, pixel_pitch_mm: float,
                      line_pitch_mm: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The feature vector of one particle: :func:`features_batch` of one crop.

    Parameters
    ----------
    a : (h, w, 2) ndarray of float32
        Attenuation of the particle's box (a margin of belt around it is allowed).
    mask : (h, w) ndarray of bool
        The particle's pixels.
    cal : Calibration (its basis table and starved level).
    pixel_pitch_mm, line_pitch_mm : pixel size across and along the belt.
    out : (F,) ndarray of float32, optional

    Returns
    -------
    (F,) ndarray of float32 in :data:`FEATURE_NAMES` order; always finite (an empty mask
    gives zeros). Inputs are not modified.
    """
    a = np.asarray(a)
    mask = np.asarray(mask, dtype=bool)
    if a.ndim != 3 or a.shape[2] != 2 or mask.shape != a.shape[:2]:
        raise ValueError(f"`a` (shape {a.shape}) must be (h, w, 2) and `mask` (shape {mask.shape}) (h, w)")
    if out is None:
        out = np.zeros(N_FEATURES, np.float32)
    elif out.shape != (N_FEATURES,) or out.dtype != np.float32:
        raise ValueError(f"`out` (shape {out.shape}, {out.dtype}) must be float32 of shape ({N_FEATURES},)")
    features_batch([(a, mask)], cal, pixel_pitch_mm, line_pitch_mm, out=out.reshape(1, N_FEATURES))
    return out


def feature_table(crops: Iterable[tuple[np.ndarray, np.ndarray]], cal: Calibration, pixel_pitch_mm: float,
                  line_pitch_mm: float) -> np.ndarray:
    """Features of many particles (:func:`features_batch` on any iterable).

    Parameters
    ----------
    crops : iterable of (a (h, w, 2) float32, mask (h, w) bool)

    Returns
    -------
    (n, F) ndarray of float32; no input gives shape (0, F).
    """
    return features_batch(list(crops), cal, pixel_pitch_mm, line_pitch_mm)


#: rocks whose features are computed together in the batch path
_DATASET_BATCH = 32


def dataset_features(ds: RockDataset, cal: Calibration, indices: Iterable[int] | None = None,
                     progress: bool = True, config: SegmentConfig = SegmentConfig()
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The batch path over an ``xrt-rocks/1`` dataset: crop -> attenuation -> segment_crop
    -> features of the rock's box (:func:`features_batch`, a few dozen rocks at a time).

    Returns
    -------
    X : (n, F) float32, NaN rows where the crop gave no usable rock
    ok : (n,) bool
    problems : one line per failed row, ``"rock_id: problem"``
    """
    idx = list(range(len(ds.rows))) if indices is None else [int(i) for i in indices]
    x = np.full((len(idx), N_FEATURES), np.nan, np.float32)
    ok = np.zeros(len(idx), bool)
    problems: list[str] = []
    pp, lp = float(ds.pixel_pitch_mm), float(ds.line_pitch_mm)
    pending: list[int] = []
    crops: list[tuple[np.ndarray, np.ndarray]] = []
    for k, i in enumerate(tqdm(idx, desc="features", unit="rock", disable=not progress)):
        row = ds.rows[i]
        a = attenuation(ds.crop(i), cal, row.x0)
        mask, problem = segment_crop(a, cal, row.x0, pp, lp, config)
        if problem is not None:
            problems.append(f"{row.rock_id}: {problem}")
            continue
        pending.append(k)
        crops.append((a, mask))
        if len(pending) >= _DATASET_BATCH:
            x[pending] = features_batch(crops, cal, pp, lp)
            ok[pending] = True
            pending, crops = [], []
    if pending:
        x[pending] = features_batch(crops, cal, pp, lp)
        ok[pending] = True
    return x, ok, problems
