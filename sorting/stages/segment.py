"""Particles from attenuation maps: per-pixel foreground, the particles of a component, the
batch crop path. The touching-rock split lives in :mod:`sorting.stages.split`, the streaming
stitcher that follows particles across chunks in :mod:`sorting.stages.stitch`.

Both paths run the same steps on the same connected component (8-connectivity of the
foreground), so a model trained on rock crops sees the particles the belt produces:
component -> drop specks below ``min_area_mm2`` -> :func:`split_touching` -> particles.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numba
import numpy as np

from sorting.stages.particles import SegmentConfig, is_speck, pixel_area_mm2
from sorting.stages.split import pieces

if TYPE_CHECKING:  # only attributes ``air_sigma_a`` and ``bad`` are used
    from sorting.stages.calibrate import Calibration


# ---------------------------------------------------------------- foreground
def detection_weights(cal: Calibration, x0: int, width: int,
                      config: SegmentConfig = SegmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Per-column channel weights (W, 2) float32 and threshold (W,) float32 of :func:`foreground`.

    The weights are the matched filter for a signal in the direction (edge_ratio, 1)
    under independent channel noise: w_c ~ contrast_c / sigma_c**2, normalised to sum 1,
    so the statistic is in attenuation units; its noise sigma is known in closed form.
    """
    sig = np.asarray(cal.air_sigma_a, dtype=np.float64)[x0:x0 + width]
    if sig.shape != (width, 2):
        raise ValueError(f"columns {x0}..{x0 + width - 1} are outside the calibration "
                         f"(air_sigma_a shape {np.shape(cal.air_sigma_a)})")
    var = np.maximum(sig * sig, 1e-12)
    w = np.stack([config.edge_ratio / var[:, 0], 1.0 / var[:, 1]], axis=1)
    w /= w.sum(axis=1, keepdims=True)
    sigma = np.sqrt((w * w * var).sum(axis=1))
    thr = np.maximum(config.k_sigma * sigma, config.min_attenuation)
    return w.astype(np.float32), thr.astype(np.float32)


def _bad_column_sources(bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each bad column: its nearest good column on the left and on the right (-1: none)."""
    bad_idx = np.flatnonzero(bad)
    good_idx = np.flatnonzero(~bad)
    if good_idx.size == 0:
        return bad_idx, np.full(bad_idx.size, -1), np.full(bad_idx.size, -1)
    pos = np.searchsorted(good_idx, bad_idx)
    left = np.where(pos > 0, good_idx[np.maximum(pos - 1, 0)], -1)
    right = np.where(pos < good_idx.size, good_idx[np.minimum(pos, good_idx.size - 1)], -1)
    return bad_idx, left, right


class _Detector:
    """What :func:`foreground` needs for one column window, computed once per calibration."""

    def __init__(self, cal: Calibration, x0: int, width: int, config: SegmentConfig):
        w, self.thr = detection_weights(cal, x0, width, config)
        self.w = w
        self.w_low, self.w_high = np.ascontiguousarray(w[:, 0]), np.ascontiguousarray(w[:, 1])
        bad = np.asarray(cal.bad, dtype=bool)[x0:x0 + width]
        self.bad = _bad_column_sources(bad)  # empty arrays when no column is bad


#: column windows whose detection tables a calibration keeps: the belt uses one, rock crops
#: come at every position and width, so the least recently used are dropped beyond this
DETECTOR_WINDOWS = 256


def _detector(cal: Calibration, x0: int, width: int, config: SegmentConfig) -> _Detector:
    """The detection weights of this column window, built once per calibration and window
    (the :data:`DETECTOR_WINDOWS` most recently used are kept)."""
    windows = cal.derived("detector_windows", OrderedDict)
    key = (x0, width, config)
    det = windows.get(key)
    if det is None:
        det = windows[key] = _Detector(cal, x0, width, config)
        if len(windows) > DETECTOR_WINDOWS:
            windows.popitem(last=False)
    else:
        windows.move_to_end(key)
    return det


def foreground(a: np.ndarray, cal: Calibration, x0: int = 0, config: SegmentConfig = SegmentConfig(),
               *, out: np.ndarray | None = None) -> np.ndarray:
    """Rock pixels of an attenuation frame.

    Parameters
    ----------
    a : (L, W, 2) ndarray of float32
        Attenuation, channel 0 low, 1 high; column j is detector column ``x0 + j``.
    cal : Calibration
        Uses ``air_sigma_a`` (P, 2) and ``bad`` (P,) (the weights derived from them are
        kept on the calibration, per column window).
    out : (L, W) ndarray of bool, optional

    Returns
    -------
    (L, W) ndarray of bool
        Per pixel (each line on its own, so identical however the stream is chunked).
        NaN reads as empty belt. A bad detector column takes the AND of its nearest good
        neighbours in the same line: it neither cuts a rock in two nor draws a stripe.
    """
    if a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(f"`a` must be (lines, width, 2), got shape {a.shape}")
    lines, width = a.shape[:2]
    det = _detector(cal, x0, width, config)
    if out is None:
        out = np.empty((lines, width), bool)
    elif out.shape != (lines, width) or out.dtype != bool:
        raise ValueError(f"`out` must be bool of shape {(lines, width)}, got {out.dtype} {out.shape}")
    _detect(np.ascontiguousarray(a, dtype=np.float32).reshape(lines, 2 * width), det.w_low, det.w_high, det.thr,
            *det.bad, out)
    return out


@numba.njit(cache=True, nogil=True)
def _detect(a: np.ndarray, w_low: np.ndarray, w_high: np.ndarray, thr: np.ndarray, bad_idx: np.ndarray,
            left: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = w_low[j] A_low + w_high[j] A_high > thr[j] in float32 (NaN: False), ``a``
    (L, 2W) with a pixel's channels side by side (flat rows vectorise); then bad column
    ``bad_idx[k]`` takes the AND of its good neighbours ``left[k]``, ``right[k]`` (-1: none;
    with neither, False). ~5x faster than numpy's temporaries and fancy indexing."""
    for i in range(a.shape[0]):
        detect_row(a[i], w_low, w_high, thr, bad_idx, left, right, out[i])


@numba.njit(cache=True, nogil=True, inline="always")
def detect_row(row: np.ndarray, w_low: np.ndarray, w_high: np.ndarray, thr: np.ndarray, bad_idx: np.ndarray,
               left: np.ndarray, right: np.ndarray, o: np.ndarray) -> None:
    """One line of :func:`_detect` (compiled callers: the streaming loop's fused line pass)."""
    for j in range(o.size):
        o[j] = row[2 * j] * w_low[j] + row[2 * j + 1] * w_high[j] > thr[j]
    for k in range(bad_idx.size):
        lo, hi = left[k], right[k]
        o[bad_idx[k]] = (lo >= 0 or hi >= 0) and (lo < 0 or o[lo]) and (hi < 0 or o[hi])


class DetectionArrays(NamedTuple):
    """What :func:`detect_row` needs for a column window (compiled kernels take it by name)."""

    w_low: np.ndarray  # (W,) float32, weight of the low channel in the matched statistic
    w_high: np.ndarray  # (W,) float32
    thr: np.ndarray  # (W,) float32, the statistic's threshold per column
    bad_idx: np.ndarray  # (B,) int64, bad columns, which take the AND of ...
    bad_left: np.ndarray  # (B,) int64 ... their nearest good neighbours
    bad_right: np.ndarray  # (B,) int64


def detector_arrays(cal: Calibration, x0: int, width: int, config: SegmentConfig) -> DetectionArrays:
    """The detection arrays of this column window (computed once per calibration and window)."""
    det = _detector(cal, x0, width, config)
    return DetectionArrays(det.w_low, det.w_high, det.thr, *det.bad)


# ---------------------------------------------------------------- batch: one rock crop
def segment_crop(a: np.ndarray, cal: Calibration, x0: int, pixel_pitch_mm: float, line_pitch_mm: float,
                 config: SegmentConfig = SegmentConfig()) -> tuple[np.ndarray, str | None]:
    """The rock of one ``xrt-rocks/1`` crop.

    Parameters
    ----------
    a : (h, w, 2) ndarray of float32, attenuation of the crop; column j is detector column x0 + j.

    Returns
    -------
    mask : (h, w) ndarray of bool, the rock (all False when there is a problem)
    problem : None, or why the crop holds no usable rock: no rock, several rocks (apart
        or touching), or a rock touching the crop border (it may be cut). Never a guess.
    """
    fg = foreground(a, cal, x0, config)
    h, w = fg.shape
    empty = np.zeros((h, w), bool)
    n, lab, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
        fg.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA)
    px_area = pixel_area_mm2(pixel_pitch_mm, line_pitch_mm)
    keep = [i for i in range(1, n) if not is_speck(stats[i, cv2.CC_STAT_AREA], px_area, config.min_area_mm2)]
    if not keep:
        return empty, "no rock in the crop"
    if len(keep) > 1:
        return empty, f"{len(keep)} separate rocks in the crop"
    i = keep[0]
    x, y, bw, bh = (int(v) for v in stats[i, :4])
    if x == 0 or y == 0 or x + bw == w or y + bh == h:
        return empty, "the rock touches the crop border"
    sub = lab[y:y + bh, x:x + bw] == i
    parts = pieces(sub, y, x, pixel_pitch_mm, line_pitch_mm, config)
    if len(parts) > 1:
        return empty, f"{len(parts)} touching rocks in the crop"
    mask = empty
    mask[y:y + bh, x:x + bw] = sub
    return mask, None
