"""Drift of the air level: the air reading per pixel followed from empty belt (slow tube
and gain drift), so that normalization keeps A = 0 on an empty belt."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

_U = np.uint64  # unsigned indices in the compiled loops


class AirSums(NamedTuple):
    """An epoch's empty-belt sums, as the compiled line pass adds to them."""

    margin: int  # px of belt next to a particle not counted as empty
    total: np.ndarray  # (2W,) float64, sums of A over empty-belt pixels
    count: np.ndarray  # (W,) int64, lines counted per column
    near: np.ndarray  # (W,) uint8 scratch
    keep: np.ndarray  # (2W,) uint8 scratch


class AirTracker:
    """Running estimate of the air level per pixel, from empty belt (slow tube and gain drift).

    Normalization computes ``A = log_flat - ln(raw - dark)``; on empty belt A should be 0.
    :meth:`update` accumulates, per column, the A of each line's empty-belt pixels; at the
    end of each epoch of ``epoch_lines`` stream lines (:meth:`end_epoch`, called by the
    pipeline at line indices that are multiples of ``epoch_lines``) ``log_flat`` moves
    toward that mean: ``log_flat -= alpha * mean(A)`` in columns with at least
    ``min_lines`` empty lines. Empty belt is what the foreground leaves, grown by
    ``margin_px`` along the line (rock edges below the detection threshold stay out), on
    good lines and columns. Everything is per line and per epoch, so the tracked level,
    and hence every particle, is the same however the stream is chunked. The step is
    clipped at ``max_step`` per epoch, so a missed fault cannot throw the level off.

    The Calibration is never modified: ``log_flat`` is the tracker's own (W, 2) float32 array,
    updated in place; pass it to :func:`sorting.stages.normalize.attenuation_into` instead of
    ``cal.log_flat[x0:x0 + W]``, with ``cal.dark`` and ``cal.bad`` of the same columns.

    Parameters
    ----------
    cal : Calibration (``log_flat``, ``pixels``).
    alpha : weight of one epoch of empty belt; the time constant is about
        ``epoch_lines / (alpha * line_rate)``: 256 lines, 0.2, 3750 Hz -> ~0.34 s; it lags
        a drift by about rate x time constant.
    x0, width : the detector window, as :class:`LineHealth`.
    """

    def __init__(self, cal: Calibration, alpha: float = 0.2, x0: int = 0, width: int | None = None, *,
                 epoch_lines: int = 256, margin_px: int = 3, min_lines: int = 16, max_step: float = 0.01):
        width = cal.pixels - x0 if width is None else int(width)
        if not (0 <= x0 and width >= 1 and x0 + width <= cal.pixels):
            raise ValueError(f"window x0={x0}, width={width} does not fit the calibration's {cal.pixels} pixels")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if epoch_lines < 1:
            raise ValueError(f"epoch_lines must be >= 1, got {epoch_lines!r}")
        self.alpha, self.min_lines, self.max_step = float(alpha), int(min_lines), float(max_step)
        self.epoch_lines = int(epoch_lines)
        self._start = np.ascontiguousarray(cal.log_flat[x0:x0 + width], dtype=np.float32)
        self.log_flat = self._start.copy()
        if margin_px < 0:
            raise ValueError(f"margin_px must be >= 0, got {margin_px!r}")
        self.margin_px = int(margin_px)  # along the line only: per line, whatever the chunking
        self._no_lines = np.zeros(0, bool)
        self._no_cols = np.zeros(width, bool)
        self._near, self._keep = np.zeros(width, np.uint8), np.zeros(2 * width, np.uint8)
        self._sum = np.zeros(self.log_flat.shape, np.float64)
        self._count = np.zeros(width, np.int64)
        self.updates = 0

    @property
    def gain(self) -> np.ndarray:
        """(W, 2) float32: tracked air level over the calibration's, ``(air - dark) / (air0 - dark)``."""
        return np.exp(self.log_flat - self._start)

    def update(self, a: np.ndarray, mask: np.ndarray, bad_lines: np.ndarray | None = None,
               bad_cols: np.ndarray | None = None) -> None:
        """Accumulate one chunk's empty belt (the level changes only at :meth:`end_epoch`).

        Parameters
        ----------
        a : (L, W, 2) ndarray of float32, attenuation computed with ``self.log_flat``.
        mask : (L, W) ndarray of bool, its foreground (rock pixels).
        bad_lines, bad_cols : (L,), (W,) bool from :meth:`LineHealth.check`, optional.
        """
        n = a.shape[0]
        if a.shape[1:] != self.log_flat.shape or mask.shape != a.shape[:2]:
            raise ValueError(f"`a` (shape {a.shape}) and `mask` (shape {mask.shape}) must be "
                             f"(L, {self.log_flat.shape[0]}, 2) and (L, {self.log_flat.shape[0]})")
        if bad_lines is not None and np.shape(bad_lines) != (n,) or \
                bad_cols is not None and np.shape(bad_cols) != (self.log_flat.shape[0],):
            raise ValueError(f"`bad_lines` (shape {np.shape(bad_lines)}) and `bad_cols` (shape "
                             f"{np.shape(bad_cols)}) must be ({n},) and ({self.log_flat.shape[0]},)")
        if n == 0:
            return
        _accumulate_empty(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(mask, dtype=bool),
                          self._no_lines if bad_lines is None else np.ascontiguousarray(bad_lines, dtype=bool),
                          self._no_cols if bad_cols is None else np.ascontiguousarray(bad_cols, dtype=bool),
                          self.margin_px, self._sum, self._count, self._near, self._keep)

    def retract(self, a: np.ndarray, mask: np.ndarray, bad_cols: np.ndarray | None = None) -> None:
        """Take lines back out of this epoch's empty-belt sums: lines that :meth:`update` (or the
        fused line pass) already added with this ``a`` and ``mask`` but whose "empty belt" was
        not air (a belt splice's steel). Same arguments as :meth:`update`, all lines good."""
        if a.shape[0] == 0:
            return
        total = np.zeros_like(self._sum)
        count = np.zeros_like(self._count)
        _accumulate_empty(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(mask, dtype=bool),
                          self._no_lines, self._no_cols if bad_cols is None else np.array(bad_cols, bool),  # writeable
                          self.margin_px, total, count, self._near, self._keep)
        self._sum -= total
        self._count -= count

    def accumulators(self) -> AirSums:
        """The epoch's sums for a compiled caller of :func:`accumulate_empty_line` (the fused
        line pass): what :meth:`update` adds up, on the same arrays."""
        return AirSums(self.margin_px, self._sum.reshape(-1), self._count, self._near, self._keep)

    def end_epoch(self) -> None:
        """Move the level by ``alpha`` of the epoch's mean empty-belt A, and start a new epoch."""
        count = self._count
        mean = (self._sum / np.maximum(count, 1)[:, None]).astype(np.float32)
        np.clip(mean, -self.max_step / self.alpha, self.max_step / self.alpha, out=mean)
        mean *= np.where(count >= self.min_lines, np.float32(self.alpha), np.float32(0.0))[:, None]
        self.log_flat -= mean
        self._sum.fill(0.0)
        count.fill(0)
        self.updates += 1


@numba.njit(cache=True, nogil=True)
def _accumulate_empty(a: np.ndarray, mask: np.ndarray, bad_lines: np.ndarray, bad_cols: np.ndarray, margin: int,
                      total: np.ndarray, count: np.ndarray, near: np.ndarray, keep: np.ndarray) -> None:
    """Add A of each empty-belt pixel to ``total`` (W, 2) float64 and count it in ``count`` (W,):
    pixels with no foreground within ``margin`` columns on their own line, on good lines
    (``bad_lines`` (L,) or empty: none) and good columns. Line by line, in stream order, so
    the sums are the same however the stream is chunked. Scratch: ``near`` (W,), ``keep``
    (2W,) uint8.

    Branch-free, so the column loops vectorize (3x faster than a sliding count with
    branches): the line's foreground is widened by shifted ORs, and a pixel that is not
    empty belt adds +0.0, which leaves any float64 sum but -0.0 as it was (these start at
    +0.0 and cannot become -0.0). (Unsigned indices: numba then skips negative-index
    wrapping.)"""
    n, w = mask.shape
    check_lines = bad_lines.size == n  # empty: no line is bad (shapes checked by the caller)
    m8 = mask.view(np.uint8)
    bad8 = bad_cols.view(np.uint8)
    flat_total = total.reshape(-1)
    for i in range(n):
        if check_lines and bad_lines[i]:
            continue
        accumulate_empty_line(m8[i], bad8, margin, a[i].reshape(-1), flat_total, count, near, keep)


@numba.njit(cache=True, nogil=True, inline="always")
def accumulate_empty_line(row: np.ndarray, bad8: np.ndarray, margin: int, line: np.ndarray, flat_total: np.ndarray,
                          count: np.ndarray, near: np.ndarray, keep: np.ndarray) -> None:
    """One good line of :func:`_accumulate_empty`: ``row`` (W,) uint8 foreground, ``bad8`` (W,)
    uint8 bad columns, ``line`` (2W,) its attenuation, ``flat_total`` (2W,) float64 (compiled
    callers: the streaming loop's fused line pass)."""
    w = row.size
    m = min(margin, w - 1)
    for jj in range(w):
        j = _U(jj)
        near[j] = row[j] | bad8[j]
    for d in range(1, m + 1):
        right = row[d:]
        for jj in range(w - d):  # foreground d columns to the right
            j = _U(jj)
            near[j] |= right[j]
        shifted = near[d:]
        for jj in range(w - d):  # ... and to the left
            j = _U(jj)
            shifted[j] |= row[j]
    for jj in range(w):
        j = _U(jj)
        e = near[j] == 0
        count[j] += e
        keep[_U(2) * j] = e
        keep[_U(2) * j + _U(1)] = e
    for kk in range(2 * w):
        k = _U(kk)
        flat_total[k] += line[k] if keep[k] else 0.0
