"""The fused line pass: normalization and foreground detection of a chunk, line by line,
each line's steps while it is in cache.

For every line: its attenuation from ln(counts - dark) (:func:`sorting.stages.normalize.from_log_row`,
dead columns repaired), its foreground (:func:`sorting.stages.segment.detect_row`), a frozen
detector module's columns cleared, and on a good line the air tracker's empty-belt sums
(:func:`sorting.stages.air.accumulate_empty_line`). The same per-line code as those stages'
own passes, so the same numbers; the streaming loop only orchestrates.
"""
from __future__ import annotations

import numba
import numpy as np

from sorting.stages.air import AirSums, accumulate_empty_line
from sorting.stages.counts import RepairPlan
from sorting.stages.normalize import counts_log_into, from_log_row
from sorting.stages.segment import DetectionArrays, detect_row


@numba.njit(cache=True, nogil=True)
def line_pass(flat: np.ndarray, log_flat: np.ndarray, repair: RepairPlan, det: DetectionArrays,
              bad_cols: np.ndarray, bad_lines: np.ndarray, sums: AirSums, mask: np.ndarray) -> None:
    """``flat`` (L, 2W) holds ln(counts - dark) and becomes the attenuation; ``mask`` (L, W)
    gets the foreground. ``bad_cols`` (W,) bool: a frozen module's columns (never foreground);
    ``bad_lines`` (L,) bool, or empty when no line is bad: lines left out of the air sums."""
    n, w = mask.shape
    check_lines = bad_lines.size == n
    bad8 = bad_cols.view(np.uint8)
    m8 = mask.view(np.uint8)
    any_bad = False
    for j in range(w):
        any_bad |= bad_cols[j]
    for i in range(n):
        row = flat[i]
        from_log_row(log_flat, repair.bad_idx, repair.left, repair.right, repair.w_left, repair.w_right, row)
        detect_row(row, det.w_low, det.w_high, det.thr, det.bad_idx, det.bad_left, det.bad_right, mask[i])
        if any_bad:
            o = m8[i]
            for j in range(w):
                o[j] &= 1 - bad8[j]
        if not (check_lines and bad_lines[i]):
            accumulate_empty_line(m8[i], bad8, sums.margin, row, sums.total, sums.count, sums.near, sums.keep)


def normalize_lines(raw: np.ndarray, dark_flat: np.ndarray, log_flat: np.ndarray, repair: RepairPlan,
                    det: DetectionArrays, bad_cols: np.ndarray, bad_lines: np.ndarray, sums: AirSums,
                    a: np.ndarray, mask: np.ndarray) -> None:
    """A chunk of uint16 counts ``raw`` (L, W, 2) into attenuation ``a`` (L, W, 2) float32 and
    foreground ``mask`` (L, W) bool, adding to the air tracker's ``sums``. Trusted inputs: the
    loop prepares them once."""
    n = raw.shape[0]
    flat = a.reshape(n, -1)
    counts_log_into(raw.reshape(n, -1), dark_flat, flat)
    line_pass(flat, log_flat, repair, det, bad_cols, bad_lines, sums, mask)
