"""Belt splices: lines where a thin steel layer covers the whole belt width.

A mechanical splice (steel lacing: fastener plates on both faces of the belt and a hinge
pin) passes the scan line once per belt revolution. For the few lines it takes, every
column, the belt edges included, is attenuated by the steel, so the plain per-pixel
foreground would see one particle as wide as the belt (and a wall of air). Rocks never
cover a whole line: even a crowded belt keeps gaps between rocks and bare belt at its edges.

Per line, a splice line is recognised and taken out like this:

1. **Screen** (every chunk, compiled, a few microseconds): a line is a candidate when the
   foreground covers at least ``screen_share`` of a strided sample of its columns *and* of
   the outermost ``edge_px`` columns on each side.
2. **Confirm**: in units of each column's detection threshold, the line's 30 % quantile
   must reach ``confirm_level`` (the belt between the rocks is raised; rocks alone would
   have to cover 70 % of the line, the twin's most crowded belts reach 69 %) and its 25 %
   quantile at least half of that (the raise is even across the belt, as a steel layer is,
   gaps between clips up to ~20 % of the columns aside; rock edges and the gaps between
   rocks are not). The ``guard`` lines either side of a splice line, also across the chunk
   boundary that follows, are confirmed at a third of that level: a splice's partly
   covered first and last lines.
3. **Take it out**: the steel's own attenuation is that of the line's bare belt, estimated
   per channel as the 30 % quantile of the line (robust while rocks cover less than 70 %
   of it). Attenuations add along the beam (Beer-Lambert), so it is subtracted from every
   pixel of the line: the rocks on the splice keep about their own attenuation, for
   segmentation and features alike. The line is then segmented again with the matched
   detection of :mod:`sorting.stages.segment` re-derived for the noise behind the steel:
   the photons left fall by exp(-A), so each channel's noise in A grows by exp(A / 2);
   the weights shift to the less starved channel and the threshold, ``k_sigma`` times the
   new noise, rises with it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

from sorting.stages.particles import SegmentConfig
from sorting.stages.segment import detect_row, detector_arrays

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

#: quantile of a splice line taken as its bare belt (the steel's attenuation)
LEVEL_QUANTILE = 0.30
#: a splice line's UNIFORM_QUANTILE quantile is at least UNIFORM_SHARE of its LEVEL_QUANTILE one
UNIFORM_QUANTILE = 0.25
UNIFORM_SHARE = 0.5


class SpliceFinder:
    """Finds and corrects splice lines in the chunks of one detector window.

    Parameters
    ----------
    cal : Calibration (``bad`` and the detection weights of :mod:`sorting.stages.segment`).
    x0, width : the window's detector columns.
    config : the segmentation settings (``k_sigma``).
    screen_share : share of sampled columns (and of each edge strip) in the foreground that
        makes a line a candidate.
    edge_px : columns of each edge strip.
    confirm_level : the line's 30 % quantile, in units of the detection threshold, that
        confirms a splice line.
    guard : lines either side of a confirmed line also confirmed when their own 30 %
        quantile reaches a third of ``confirm_level`` (the partly covered first and last
        line of a splice).

    Attributes
    ----------
    lines : splice lines corrected so far; ``episodes`` : splices (runs of such lines).
    """

    def __init__(self, cal: Calibration, x0: int, width: int, config: SegmentConfig = SegmentConfig(), *,
                 stride: int = 4, screen_share: float = 0.5, edge_px: int = 16, confirm_level: float = 0.3,
                 guard: int = 2):
        if not (0 < screen_share <= 1 and confirm_level > 0 and guard >= 0 and stride >= 1 and edge_px >= 1):
            raise ValueError("screen_share must be in (0, 1], confirm_level > 0, guard >= 0, stride and edge_px >= 1")
        self.x0, self.width = int(x0), int(width)
        self.k_sigma = float(config.k_sigma)
        self.edge_ratio, self.min_attenuation = float(config.edge_ratio), float(config.min_attenuation)
        sig = np.asarray(cal.air_sigma_a, dtype=np.float64)[self.x0:self.x0 + self.width]
        self._var = np.maximum(sig * sig, 1e-12)  # (W, 2): the air noise of A per channel
        self.screen_share, self.confirm_level, self.guard = float(screen_share), float(confirm_level), int(guard)
        self._det = detector_arrays(cal, self.x0, self.width, config)
        self._w = np.stack([self._det[0], self._det[1]], axis=1)  # (W, 2) float32
        self._thr = self._det[2]
        self._good = ~np.asarray(cal.bad[self.x0:self.x0 + self.width], dtype=bool)
        good_idx = np.flatnonzero(self._good)
        if good_idx.size == 0:
            good_idx = np.arange(self.width)
        e = min(edge_px, max(good_idx.size // 4, 1))
        self._left = np.ascontiguousarray(good_idx[:e])
        self._right = np.ascontiguousarray(good_idx[-e:])
        self._sample = np.ascontiguousarray(good_idx[::stride])
        self._carry = 0  # lines at the start of the next chunk within guard of a splice line
        self._was_splice = False  # the previous chunk's last line was a splice line
        self.lines = 0
        self.episodes = 0

    def _behind_steel(self, level: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The matched detection (:func:`sorting.stages.segment.detection_weights`) behind a steel
        layer of attenuation ``level`` (k, 2): the photons left fall by exp(-A), so each
        channel's noise in A grows by exp(A / 2); the weights follow the noise (the low channel
        loses more) and the threshold is ``k_sigma`` of the new noise, never below the floor.
        Returns w_low, w_high, thr, each (k, W) float32."""
        var = self._var[None] * np.exp(level.astype(np.float64))[:, None, :]  # (k, W, 2)
        w_low = self.edge_ratio / var[..., 0]
        w_high = 1.0 / var[..., 1]
        total = w_low + w_high
        w_low /= total
        w_high /= total
        thr = np.maximum(self.k_sigma * np.sqrt(w_low ** 2 * var[..., 0] + w_high ** 2 * var[..., 1]),
                         self.min_attenuation)
        return w_low.astype(np.float32), w_high.astype(np.float32), thr.astype(np.float32)

    def _confirm(self, a: np.ndarray, idx: np.ndarray, good: np.ndarray, level: float) -> np.ndarray:
        """Which lines ``idx`` of ``a`` are splice lines: in units of the detection threshold,
        their 30 % quantile reaches ``level`` and their UNIFORM_QUANTILE quantile at least
        UNIFORM_SHARE of that (the raise covers the belt evenly: gaps between clips narrower
        than that share of the columns are allowed; rock edges and the gaps between rocks
        are not even)."""
        ag = a[idx][:, good]
        w, thr = self._w[good], self._thr[good]
        z = (ag[..., 0] * w[:, 0] + ag[..., 1] * w[:, 1]) / thr
        low, q30 = np.quantile(z, [UNIFORM_QUANTILE, LEVEL_QUANTILE], axis=1)
        return (q30 >= level) & (low >= UNIFORM_SHARE * q30)

    def screen(self, mask: np.ndarray) -> bool:
        """Whether this chunk needs :meth:`correct` (candidates, or the guard of a splice
        that ended in the previous chunk): the cheap per-chunk test."""
        if self._carry:
            return True
        return _screen(mask.view(np.uint8), self._sample, self._left, self._right, self.screen_share) >= 0

    def correct(self, a: np.ndarray, mask: np.ndarray, bad_lines: np.ndarray, bad_cols: np.ndarray) -> np.ndarray:
        """Find the splice lines of a chunk and take the splice out of them, in place.

        Parameters
        ----------
        a : (L, W, 2) float32, the chunk's attenuation; splice lines lose the steel's.
        mask : (L, W) bool, its foreground; splice lines are segmented again.
        bad_lines : (L,) bool or empty, lines not segmented anyway; bad_cols : (W,) bool,
            columns of a frozen module (kept out of the estimates and of the foreground).

        Returns
        -------
        (L,) bool, the corrected lines.
        """
        n = mask.shape[0]
        cand = np.zeros(n, bool)
        _candidates(mask.view(np.uint8), self._sample, self._left, self._right, self.screen_share, cand)
        if bad_lines.size == n:
            cand &= ~bad_lines
        done = np.zeros(n, bool)
        good = self._good & ~bad_cols
        if not good.any():
            good = self._good
        if np.count_nonzero(good) < 8:  # no belt left to measure the steel on
            self._carry, self._was_splice = 0, False
            return done
        # the candidates at the full level, then the lines next to a splice line (and the first
        # lines of the chunk after one) at a third of it: the partly covered ends of a splice
        near = np.zeros(n, bool)
        near[:min(self._carry, n)] = True
        for need, lines in ((self.confirm_level, cand), (self.confirm_level / 3.0, None)):
            if lines is None:
                for d in range(1, self.guard + 1):
                    near[d:] |= done[:-d]
                    near[:-d] |= done[d:]
                lines = near & ~done
                if bad_lines.size == n:
                    lines &= ~bad_lines
            idx = np.flatnonzero(lines)
            if idx.size:
                done[idx[self._confirm(a, idx, good, need)]] = True
        rows = np.flatnonzero(done)
        if rows.size:
            level = np.quantile(a[rows][:, good], LEVEL_QUANTILE, axis=1).astype(np.float32)  # (k, 2)
            a[rows] -= level[:, None, :]
            w_low, w_high, thr_k = self._behind_steel(np.maximum(level, 0.0))
            _redetect(a, rows, w_low, w_high, thr_k, *self._det[3:], np.array(bad_cols, dtype=bool), mask)
        # the guard carries over a splice that reaches the chunk's last lines
        last = np.flatnonzero(done)
        self._carry = max(self.guard - (n - 1 - int(last[-1])), 0) if last.size else 0
        if last.size:
            starts = np.flatnonzero(done & ~np.concatenate(([self._was_splice], done[:-1])))
            self.episodes += starts.size
            self.lines += last.size
        self._was_splice = bool(done[-1]) if n else self._was_splice
        return done


@numba.njit(cache=True, nogil=True)
def _line_candidate(row: np.ndarray, sample: np.ndarray, left: np.ndarray, right: np.ndarray, share: float) -> bool:
    hit = 0
    for k in range(sample.size):
        hit += row[sample[k]]
    if hit < share * sample.size:
        return False
    hit = 0
    for k in range(left.size):
        hit += row[left[k]]
    if hit < share * left.size:
        return False
    hit = 0
    for k in range(right.size):
        hit += row[right[k]]
    return hit >= share * right.size


@numba.njit(cache=True, nogil=True)
def _screen(m8: np.ndarray, sample: np.ndarray, left: np.ndarray, right: np.ndarray, share: float) -> int:
    """The first candidate line of a chunk's foreground (uint8 (L, W)), or -1."""
    for i in range(m8.shape[0]):
        if _line_candidate(m8[i], sample, left, right, share):
            return i
    return -1


@numba.njit(cache=True, nogil=True)
def _candidates(m8: np.ndarray, sample: np.ndarray, left: np.ndarray, right: np.ndarray, share: float,
                out: np.ndarray) -> None:
    for i in range(m8.shape[0]):
        out[i] = _line_candidate(m8[i], sample, left, right, share)


@numba.njit(cache=True, nogil=True)
def _redetect(a: np.ndarray, rows: np.ndarray, w_low: np.ndarray, w_high: np.ndarray, thr: np.ndarray,
              bad_idx: np.ndarray, left: np.ndarray, right: np.ndarray, bad_cols: np.ndarray,
              mask: np.ndarray) -> None:
    """The foreground of lines ``rows`` of ``a`` (L, W, 2) again (:func:`detect_row`), with the
    weights and thresholds of each (``w_low``, ``w_high``, ``thr``: (k, W)); a frozen
    module's columns cleared."""
    w = mask.shape[1]
    for k in range(rows.size):
        i = rows[k]
        detect_row(a[i].reshape(-1), w_low[k], w_high[k], thr[k], bad_idx, left, right, mask[i])
        for j in range(w):
            if bad_cols[j]:
                mask[i, j] = False
