"""Per-particle features (pipeline stage 3): one fixed-order vector of physical quantities.

Every feature is in physical units (mm, mm2, cm3, attenuation, material fractions), so a
model means the same on another machine with its own pitch and calibration. Material
statistics come from the rock's interior (mask eroded by ``EDGE_PX``) without starved
pixels: the thin rim reads noise-dominated material values, a starved pixel none at all. Distributions are thickness-weighted where that is the
physical quantity (the share of the rock's volume, not of its projected pixels).

The batch path (:func:`dataset_features`) and the belt (the streaming loop cutting a
``Completed`` box out of its ring buffer) both call :func:`particle_features` on the
particle's box, so a model trained on rock crops sees the numbers the belt produces.
Results do not depend on a margin around the box: the crop is trimmed to the mask and
padded with empty belt internally.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from .normalize import attenuation, material_maps
from .segment import SegmentConfig, segment_crop

if TYPE_CHECKING:
    from .calibrate import Calibration
    from .formats import RockDataset

#: bump when any definition changes: models carry it and are refused on a mismatch
FEATURE_VERSION = "1"

_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
_MAFIC_Q_NAMES = tuple(f"mafic_p{int(q * 100):02d}" for q in _QUANTILES)
FEATURE_NAMES: tuple[str, ...] = (
    "area_mm2",
    "equiv_diameter_mm",
    "length_mm",  # major axis of the moment ellipse (full length)
    "width_mm",  # minor axis
    "elongation",  # length / width
    "solidity",  # contour area / convex hull area
    "convexity",  # hull perimeter / contour perimeter
    "thickness_mean_mm",  # equivalent rock thickness on the syenite->hedenbergite line
    "thickness_p90_mm",
    "volume_cm3",  # sum of equivalent thickness x pixel area
    "a_low_mean",
    "a_high_mean",
    "r_mean",  # A_low / A_high of the interior sums
    "mafic_mean",  # thickness-weighted: the rock's volume share on the syenite->hedenbergite line
    "mafic_std",
    *_MAFIC_Q_NAMES,
    "fe_frac_mean",
    "fe_frac_std",
    "fe_frac_p10",
    "fe_frac_p50",
    "fe_frac_p90",
    "fayalite_share",  # volume share with mafic_frac above FAYALITE_LEVEL
    "oxide_share",  # volume share with mafic_frac above OXIDE_LEVEL
    "mafic_texture",  # rms of the high-passed mafic_frac (thickness-weighted)
    "a_high_contrast",  # rms of the high-passed A_high (thickness-weighted) / mean A_high
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
#: width (mm) of the box whose mean inside the rock is the local background of the texture
TEXTURE_WINDOW_MM = 4.0
_Q = np.array(_QUANTILES)
_Q_FE = np.array((0.10, 0.50, 0.90))
_PAD = 4
_DISK = {r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in (1, 2)}


class _Histogram:
    """Fixed bins for weighted quantiles in O(n) (no sort): the cumulative weight at the bin
    edges, interpolated linearly inside the bin where it crosses q."""

    def __init__(self, lo: float, hi: float, step: float):
        self.n_bins = int(round((hi - lo) / step))
        self.scale = np.float32(1.0 / step)
        self.shift = np.float32(-lo / step)
        self.top = np.float32(self.n_bins - 0.5)
        self.edges = lo + step * np.arange(self.n_bins + 1)

    def quantiles(self, values: np.ndarray, weights: np.ndarray, q: np.ndarray) -> np.ndarray:
        v = values * self.scale
        v += self.shift
        np.clip(v, 0.0, self.top, out=v)
        cum = np.zeros(self.n_bins + 1)
        np.cumsum(np.bincount(v.astype(np.intp), weights=weights, minlength=self.n_bins), out=cum[1:])
        return np.interp(q * cum[-1], cum, self.edges)


#: weighted quantiles: value range and bin width of each distribution
_MAFIC_HIST = _Histogram(-1.0, 8.0, 0.02)
_FE_HIST = _Histogram(-0.5, 1.5, 0.01)


def _weighted_mean_std(values: np.ndarray, weights: np.ndarray, total: float) -> tuple[float, float]:
    mean = float(values @ weights) / total
    dev = values - np.float32(mean)
    dev *= dev
    return mean, math.sqrt(max(float(dev @ weights) / total, 0.0))


def _shape_features(m8: np.ndarray, area_px: int, pixel_pitch_mm: float, line_pitch_mm: float,
                    f: dict[str, float]) -> None:
    area = area_px * pixel_pitch_mm * line_pitch_mm
    f["area_mm2"] = area
    f["equiv_diameter_mm"] = math.sqrt(4.0 * area / math.pi)
    mo = cv2.moments(m8, binaryImage=True)
    # central second moments in mm2 per unit area; + pitch^2/12: each pixel is a square, not a point
    cxx = mo["mu20"] / mo["m00"] * pixel_pitch_mm ** 2 + pixel_pitch_mm ** 2 / 12.0
    cyy = mo["mu02"] / mo["m00"] * line_pitch_mm ** 2 + line_pitch_mm ** 2 / 12.0
    cxy = mo["mu11"] / mo["m00"] * pixel_pitch_mm * line_pitch_mm
    half_tr, det = 0.5 * (cxx + cyy), cxx * cyy - cxy * cxy
    root = math.sqrt(max(half_tr * half_tr - det, 0.0))
    lam1, lam2 = half_tr + root, max(half_tr - root, 0.0)
    # a uniform ellipse of semi-axis s has variance s^2/4 along it: full length = 4 sqrt(lambda)
    f["length_mm"] = 4.0 * math.sqrt(lam1)
    f["width_mm"] = 4.0 * math.sqrt(lam2)
    f["elongation"] = f["length_mm"] / max(f["width_mm"], 1e-6)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=len)
    f["solidity"] = f["convexity"] = 1.0
    if len(c) >= 3:
        # in mm: the ratios are scale-free, but not free of an anisotropic pitch
        cm = c if pixel_pitch_mm == line_pitch_mm else \
            c.reshape(-1, 2).astype(np.float32) * np.float32([pixel_pitch_mm, line_pitch_mm])
        hull = cv2.convexHull(cm)
        hull_area = cv2.contourArea(hull)
        if hull_area > 0:
            f["solidity"] = min(cv2.contourArea(cm) / hull_area, 1.0)
        per = cv2.arcLength(cm, True)
        if per > 0:
            f["convexity"] = min(cv2.arcLength(hull, True) / per, 1.0)


def _reliable(m8: np.ndarray, starved: np.ndarray) -> np.ndarray:
    """Pixels for the material statistics, (h, w) uint8: the mask eroded by EDGE_PX (less
    when nothing would be left), without starved pixels; if that leaves nothing, the
    unstarved rim; if the whole rock is starved, the interior all the same."""
    interior = m8
    for r in (EDGE_PX, 1):
        eroded = cv2.erode(m8, _DISK[r], borderType=cv2.BORDER_CONSTANT, borderValue=0)
        if cv2.countNonZero(eroded):
            interior = eroded
            break
    if not starved.any():
        return interior
    fed = (~starved).view(np.uint8)
    for region in (interior, m8):
        ok = cv2.bitwise_and(region, fed)
        if cv2.countNonZero(ok):
            return ok
    return interior


def particle_features(a: np.ndarray, mask: np.ndarray, cal: Calibration, pixel_pitch_mm: float,
                      line_pitch_mm: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The feature vector of one particle.

    Parameters
    ----------
    a : (h, w, 2) ndarray of float32
        Attenuation of the particle's box (a margin of belt around it is allowed).
    mask : (h, w) ndarray of bool
        The particle's pixels.
    cal : Calibration (its basis table, through :func:`sorting.normalize.material_maps`).
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
    if not (pixel_pitch_mm > 0 and line_pitch_mm > 0):
        raise ValueError(f"pitches must be > 0, got pixel {pixel_pitch_mm!r}, line {line_pitch_mm!r} mm")
    if out is None:
        out = np.zeros(N_FEATURES, np.float32)
    elif out.shape != (N_FEATURES,) or out.dtype != np.float32:
        raise ValueError(f"`out` (shape {out.shape}, {out.dtype}) must be float32 of shape ({N_FEATURES},)")
    m_in = np.ascontiguousarray(mask).view(np.uint8)
    c0, r0, bw, bh = cv2.boundingRect(m_in)
    if bw == 0 or bh == 0:
        out[:] = 0.0
        return out
    # trim to the mask and pad with empty belt: the result cannot depend on the caller's margin
    h, w = bh + 2 * _PAD, bw + 2 * _PAD
    inner = (slice(_PAD, _PAD + bh), slice(_PAD, _PAD + bw))
    m8 = np.zeros((h, w), np.uint8)
    m8[inner] = m_in[r0:r0 + bh, c0:c0 + bw]
    ab = np.zeros((h, w, 2), np.float32)
    ab[inner] = a[r0:r0 + bh, c0:c0 + bw]
    if not math.isfinite(float(ab.sum())):  # a broken pixel must not poison the whole rock
        np.nan_to_num(ab, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    rock = m8.view(bool)
    area_px = int(cv2.countNonZero(m8))
    px_area = pixel_pitch_mm * line_pitch_mm
    f: dict[str, float] = {}
    _shape_features(m8, area_px, pixel_pitch_mm, line_pitch_mm, f)

    maps = material_maps(ab, rock, cal)  # its maps are 0 outside the mask
    thick = maps.thickness_mm[rock]
    k90 = int(0.9 * (thick.size - 1))
    f["thickness_mean_mm"] = float(thick.sum()) / thick.size
    f["thickness_p90_mm"] = float(np.partition(thick, k90)[k90])
    f["volume_cm3"] = float(np.maximum(thick, 0.0).sum()) * px_area * 1e-3

    idx = np.flatnonzero(_reliable(m8, maps.starved))
    n_core = idx.size
    f["interior_share"] = n_core / area_px
    a_low, a_high = maps.a_low.ravel()[idx], maps.a_high.ravel()[idx]
    sum_low, sum_high = float(a_low.sum()), float(a_high.sum())
    f["a_low_mean"] = sum_low / n_core
    f["a_high_mean"] = sum_high / n_core
    f["r_mean"] = sum_low / max(sum_high, 1e-3 * n_core)

    wts = np.maximum(maps.thickness_mm.ravel()[idx], np.float32(0.0))
    total = float(wts.sum())
    if not total > 0:  # a noise-level rock: weight its pixels equally
        wts = np.ones_like(wts)
        total = float(n_core)
    mafic = maps.mafic_frac.ravel()[idx]
    fe = maps.fe_frac.ravel()[idx]
    f["mafic_mean"], f["mafic_std"] = _weighted_mean_std(mafic, wts, total)
    f["fe_frac_mean"], f["fe_frac_std"] = _weighted_mean_std(fe, wts, total)
    f.update(zip(_MAFIC_Q_NAMES, _MAFIC_HIST.quantiles(mafic, wts, _Q).tolist()))
    f["fe_frac_p10"], f["fe_frac_p50"], f["fe_frac_p90"] = _FE_HIST.quantiles(fe, wts, _Q_FE).tolist()
    f["fayalite_share"] = float(wts[mafic > FAYALITE_LEVEL].sum()) / total
    f["oxide_share"] = float(wts[mafic > OXIDE_LEVEL].sum()) / total

    # texture: what is left after removing the local background (box mean inside the rock,
    # so the belt does not leak in), thickness-weighted so the noisy rim does not dominate
    win = (2 * max(int(round(0.5 * TEXTURE_WINDOW_MM / pixel_pitch_mm)), 1) + 1,
           2 * max(int(round(0.5 * TEXTURE_WINDOW_MM / line_pitch_mm)), 1) + 1)
    den = cv2.boxFilter(rock.astype(np.float32), -1, win, borderType=cv2.BORDER_CONSTANT).ravel()[idx]
    for src, vals, name in ((maps.mafic_frac, mafic, "mafic_texture"), (maps.a_high, a_high, "a_high_contrast")):
        bg = cv2.boxFilter(src, -1, win, borderType=cv2.BORDER_CONSTANT).ravel()[idx]
        bg /= den  # den > 0: every interior pixel is its own neighbour
        hp = vals - bg
        hp *= hp
        f[name] = math.sqrt(max(float(hp @ wts), 0.0) / total)
    f["a_high_contrast"] /= max(f["a_high_mean"], 1e-3)
    f["starved_share"] = float(cv2.countNonZero(maps.starved.view(np.uint8))) / area_px

    out[:] = [f[name] for name in FEATURE_NAMES]
    if not np.isfinite(out).all():
        out[~np.isfinite(out)] = 0.0
    return out


def feature_table(crops: Iterable[tuple[np.ndarray, np.ndarray]], cal: Calibration, pixel_pitch_mm: float,
                  line_pitch_mm: float) -> np.ndarray:
    """Features of many particles.

    Parameters
    ----------
    crops : iterable of (a (h, w, 2) float32, mask (h, w) bool)

    Returns
    -------
    (n, F) ndarray of float32; no input gives shape (0, F).
    """
    rows = [particle_features(a, m, cal, pixel_pitch_mm, line_pitch_mm) for a, m in crops]
    if not rows:
        return np.zeros((0, N_FEATURES), np.float32)
    return np.stack(rows)


def dataset_features(ds: RockDataset, cal: Calibration, indices: Iterable[int] | None = None,
                     progress: bool = True, config: SegmentConfig = SegmentConfig()
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The batch path over an ``xrt-rocks/1`` dataset: crop -> attenuation -> segment_crop
    -> particle_features on the rock's box.

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
    for k, i in enumerate(tqdm(idx, desc="features", unit="rock", disable=not progress)):
        row = ds.rows[i]
        a = attenuation(ds.crop(i), cal, row.x0)
        mask, problem = segment_crop(a, cal, row.x0, pp, lp, config)
        if problem is not None:
            problems.append(f"{row.rock_id}: {problem}")
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        particle_features(a[box], mask[box], cal, pp, lp, out=x[k])
        ok[k] = True
    return x, ok, problems
