"""Tramp metal: steel on the belt (bolts, plates, 10-20 mm of iron), told from rock by shape.

Dual energy cannot tell 15 mm of steel from a dense rock: behind that much iron both
channels are near starvation, and the ratio of iron and of magnetite differ by a few
hundredths where the beam is that hard. What differs is geometry:

* a **plate** is equally thick all over: its high-channel attenuation is flat, the 25 %
  quantile over its pixels at least ``flat_ratio`` of the 75 % quantile. A rock, however
  dense, is a rounded body whose thickness falls off towards its rim (the twin's rocks:
  at most 0.72 where dense);
* a **bolt** (a rod lying on the belt) is far thicker in iron than it is wide: the iron
  that attenuates like its 90 % quantile, in mm, is at least ``narrow_ratio`` of its width.
  A rock lies on its flattest side, so it is at most about as thick as it is wide, and even
  a magnetite-rich rock holds well under half its thickness in iron equivalent (the twin's
  rocks: at most 0.41 of their width).

Both apply only to dense particles: the median high-channel attenuation must reach that
of ``min_iron_mm`` of iron. The iron scale comes from the calibration's own iron-only
wedge steps (POM 0 mm), extended linearly past the thickest step; a calibration without
such steps finds no tramp.

The statistics come from the stream's ring buffer, one compiled pass over each particle's
pixels (a histogram of the high channel; the quantiles to ``BIN_A``), for the particles
whose features already show them dense (``GATE_*``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numba
import numpy as np

from sorting.stages.features import FEATURE_NAMES

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

#: histogram bin of the high-channel attenuation, and its top (starved pixels land there)
BIN_A = 0.02
TOP_A = 16.0
_N_BINS = int(round(TOP_A / BIN_A))
_WIDTH = FEATURE_NAMES.index("width_mm")
_A_HIGH_MEAN = FEATURE_NAMES.index("a_high_mean")
_STARVED = FEATURE_NAMES.index("starved_share")
#: boxes of this many pixels or more are sampled on every other line and column
SUBSAMPLE_PX = 2048
#: the quantiles of the high channel judged: 25, 50, 75 and 90 %
_QS = np.array([0.25, 0.50, 0.75, 0.90])
#: only particles the features already show as dense are looked at: mean high-channel A of the
#: interior at least this share of the dense level, or this share of pixels starved (every
#: piece of 10-20 mm steel on the twin passes with room; ~85 % of rocks are spared the pass)
GATE_MEAN_SHARE = 0.7
GATE_STARVED = 0.1


def iron_scale(cal: Calibration) -> tuple[np.ndarray, np.ndarray] | None:
    """(iron mm, high-channel A) of the calibration's iron-only wedge steps, ascending, with
    iron 0 at A 0; None when there are fewer than two such steps above 0 mm."""
    t, a = cal.lut.wedge_t_mm, cal.lut.wedge_a
    sel = (t[:, 0] == 0) & (t[:, 1] > 0) & np.isfinite(a[:, 1])
    if np.count_nonzero(sel) < 2:
        return None
    fe, ah = t[sel, 1].astype(np.float64), a[sel, 1].astype(np.float64)
    order = np.argsort(fe)
    fe, ah = np.concatenate(([0.0], fe[order])), np.concatenate(([0.0], np.maximum.accumulate(ah[order])))
    return fe, ah


class TrampFinder:
    """Which particles of a chunk are tramp metal (see the module's description)."""

    def __init__(self, cal: Calibration, *, min_iron_mm: float = 8.0, flat_ratio: float = 0.8,
                 narrow_ratio: float = 0.5):
        if not (min_iron_mm > 0 and 0 < flat_ratio <= 1 and narrow_ratio > 0):
            raise ValueError("min_iron_mm and narrow_ratio must be > 0, flat_ratio in (0, 1]")
        self.flat_ratio, self.narrow_ratio = float(flat_ratio), float(narrow_ratio)
        scale = iron_scale(cal)
        self.enabled = scale is not None
        if scale is None:
            self._fe = self._ah = np.zeros(2)
            self.min_a_high = np.inf
            self._gate, self._rules = np.zeros(2, np.float32), np.zeros(4)
            return
        self._fe, self._ah = scale
        self.min_a_high = float(self.iron_mm(np.array([min_iron_mm]), inverse=True)[0])
        # the compiled pass's settings: the gate on the float32 features (compared in float32),
        # the rules in float64
        self._gate = np.array([GATE_MEAN_SHARE * self.min_a_high, GATE_STARVED], np.float32)
        self._rules = np.array([self.min_a_high, self.flat_ratio, self.narrow_ratio, 1.0 / BIN_A], np.float64)

    def warm_up(self, ring: np.ndarray) -> None:
        """Load the compiled statistics (or compile them, on a fresh install) with the loop's
        argument types, on a throwaway 2 x 2 box of ``ring`` (only read)."""
        x = np.full((1, len(FEATURE_NAMES)), np.nan, np.float32)  # passes the gate
        self.find(ring, np.array([[ring.shape[0] - 1, 0, 2, 2]], np.int64), [np.ones((2, 2), bool)], x)

    def iron_mm(self, a_high: np.ndarray, inverse: bool = False) -> np.ndarray:
        """Iron (mm) that attenuates the high channel like ``a_high`` (or, ``inverse``, the A of
        that many mm): the wedge steps, linear past the thickest."""
        x, y = (self._fe, self._ah) if inverse else (self._ah, self._fe)
        slope = (y[-1] - y[-2]) / max(x[-1] - x[-2], 1e-9)
        v = np.asarray(a_high, np.float64)
        return np.where(v <= x[-1], np.interp(v, x, y), y[-1] + (v - x[-1]) * slope)

    def find(self, ring: np.ndarray, boxes: np.ndarray, masks: Sequence[np.ndarray], features: np.ndarray,
             use: np.ndarray | None = None) -> np.ndarray:
        """(n,) bool: tramp among the particles ``boxes`` (n, 4: first stream line, first
        column, height, width) with ``masks``, whose attenuation is in ``ring`` (R, W, 2),
        R a power of two; ``features`` (n, F) float32 their feature rows (``width_mm``); ``use``
        (n,) bool, the particles to judge (default all). One compiled pass: the gate, the
        quantiles and the two shape rules (a chunk's worth of numpy calls cost the loop more
        than the pass itself)."""
        n = boxes.shape[0]
        out = np.zeros(n, bool)
        if not self.enabled or n == 0:
            return out
        flat = np.concatenate([m.reshape(-1) for m in masks]).view(np.uint8)
        _find(ring, boxes, flat, features, np.ones(n, bool) if use is None else use, self._gate, self._rules,
              self._fe, self._ah, _QS, out)
        return out


@numba.njit(cache=True, nogil=True)
def _find(ring, boxes, flat_masks, features, use, gate, rules, fe, ah, qs, out) -> None:
    """:meth:`TrampFinder.find`'s pass. ``gate`` (float32): dense mean A, starved share;
    ``rules`` (float64): min high-channel A, flat ratio, narrow ratio, 1 / BIN_A."""
    q = np.empty(qs.size, np.float64)
    hist = np.zeros(_N_BINS, np.int32)
    slope = (fe[-1] - fe[-2]) / max(ah[-1] - ah[-2], 1e-9)
    off = 0
    for i in range(boxes.shape[0]):
        size = boxes[i, 2] * boxes[i, 3]
        a_mean = features[i, _A_HIGH_MEAN]
        if use[i] and (a_mean >= gate[0] or features[i, _STARVED] >= gate[1] or np.isnan(a_mean)):
            _quantiles(ring, boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3], flat_masks[off:off + size],
                       np.float32(rules[3]), hist, qs, q)
            # iron (mm) attenuating the high channel like the 90 % quantile: the wedge steps,
            # linear past the thickest (TrampFinder.iron_mm)
            v = q[3]
            iron = np.interp(v, ah, fe) if v <= ah[-1] else fe[-1] + (v - ah[-1]) * slope
            dense = q[1] >= rules[0]
            flat_top = q[0] >= rules[1] * q[2]
            narrow = iron >= rules[2] * np.float64(features[i, _WIDTH])
            out[i] = dense and (flat_top or narrow)
        off += size


@numba.njit(cache=True, nogil=True, inline="always")
def _quantiles(ring, line0, col0, h, w, m, inv_bin, hist, qs, q) -> None:
    """The quantiles ``qs`` (ascending) of the high-channel attenuation of one particle's pixels
    (its box at ``line0, col0``, its flat mask ``m``) into ``q``, from a histogram of
    ``hist.size`` bins of ``1 / inv_bin`` (the upper edge of the bin where the cumulative count
    reaches the quantile; NaN and values above the top count in the top bin). A box of
    SUBSAMPLE_PX or more is sampled on every other line and column (still hundreds of pixels)."""
    n_bins = hist.size
    r_mask = ring.shape[0] - 1
    top = np.float32(n_bins)
    hist[:] = 0
    count = 0
    step = 2 if h * w >= SUBSAMPLE_PX else 1  # a large particle: every other line and column
    for r in range(0, h, step):
        row = ring[(line0 + r) & r_mask, col0:col0 + w, 1]
        mr = m[r * w:(r + 1) * w]
        for c in range(0, w, step):
            if mr[c]:
                v = row[c] * inv_bin
                k = n_bins - 1
                if v < top:  # False for NaN
                    k = int(v) if v > 0 else 0
                hist[k] += 1
                count += 1
    cum = 0
    j = 0
    for k in range(n_bins):
        cum += hist[k]
        while j < qs.size and count > 0 and cum >= qs[j] * count:
            q[j] = (k + 1) / inv_bin
            j += 1
        if j == qs.size:
            break
    while j < qs.size:
        q[j] = 0.0
        j += 1
