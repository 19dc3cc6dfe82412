"""The streaming stitcher: per-chunk foreground masks -> whole particles, each emitted once.

It follows connected components across chunk boundaries and hands each finished one to
the same speck filter and touching-rock split as the batch path (:mod:`sorting.segment`),
so the belt and the rock crops give the same particles.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .segment import Completed, SegmentConfig, _pieces, _pixel_area_mm2

if TYPE_CHECKING:  # the calibration is only kept for the caller
    from .calibrate import Calibration


class _Open:
    """Accumulators of one particle still open at the newest line."""

    __slots__ = ("line0", "line1", "col0", "col1", "area", "sum_line", "sum_col", "pieces", "too_long", "cut")

    def __init__(self) -> None:
        self.line0 = self.col0 = 1 << 62
        self.line1 = self.col1 = -1
        self.area = self.sum_line = self.sum_col = 0
        self.pieces: list[tuple[int, int, np.ndarray]] = []
        self.too_long = False
        self.cut = False

    def absorb(self, other: _Open) -> None:
        self.line0 = min(self.line0, other.line0)
        self.line1 = max(self.line1, other.line1)
        self.col0 = min(self.col0, other.col0)
        self.col1 = max(self.col1, other.col1)
        self.area += other.area
        self.sum_line += other.sum_line
        self.sum_col += other.sum_col
        self.pieces.extend(other.pieces)
        self.too_long |= other.too_long
        self.cut |= other.cut

    def mask(self) -> np.ndarray:
        m = np.zeros((self.line1 - self.line0 + 1, self.col1 - self.col0 + 1), bool)
        for line, col, piece in self.pieces:
            r, c = line - self.line0, col - self.col0
            view = m[r:r + piece.shape[0], c:c + piece.shape[1]]
            np.logical_or(view, piece, out=view)
        return m


class StreamSegmenter:
    """Stitches per-chunk foreground masks into whole particles, each emitted exactly once.

    A connected component (8-connectivity) is complete when a line after its last line
    has arrived without extending it, so the result does not depend on chunk sizes. Each
    chunk is labelled together with the previous chunk's last line; components meeting
    that line join the open particles that own its pixels (several of them merge when a
    chunk connects them). Open particles keep bbox, area, integer coordinate sums and their
    mask pieces; completed ones go through the same speck filter and touching-rock split
    as :func:`segment_crop`.

    Parameters
    ----------
    pixels : detector columns P.
    cal : the calibration (kept for the caller's convenience; masks come in ready-made).
    max_particle_lines : a particle still open after this many lines is emitted with
        ``too_long=True`` and its continuation starts afresh (also flagged), so a jam on
        the belt cannot hold memory or the deadline.
    claim : optional ``claim(col0, col1) -> bool`` on each whole component's columns; a
        component it refuses is dropped (lane-parallel mode: another lane owns it).
    """

    def __init__(self, pixels: int, cal: Calibration | None, pixel_pitch_mm: float, line_pitch_mm: float,
                 config: SegmentConfig = SegmentConfig(), max_particle_lines: int = 512,
                 claim: Callable[[int, int], bool] | None = None):
        if pixels < 1 or max_particle_lines < 1:
            raise ValueError(f"pixels and max_particle_lines must be >= 1, got {pixels}, {max_particle_lines}")
        _pixel_area_mm2(pixel_pitch_mm, line_pitch_mm)
        self.pixels = int(pixels)
        self.cal = cal
        self.pixel_pitch_mm = float(pixel_pitch_mm)
        self.line_pitch_mm = float(line_pitch_mm)
        self.config = config
        self.max_particle_lines = int(max_particle_lines)
        # lane-parallel mode: only components this lane owns (decided on the whole component,
        # before touching rocks are split, so two lanes never split the same blob differently)
        self.claim = claim
        self._buf = np.zeros((33, self.pixels + 2), np.uint8)  # a background column each side
        self._reset(None)

    def _reset(self, next_line: int | None) -> None:
        self._next = next_line
        self._start = next_line  # first line after a (re)start: what touches it may have begun earlier
        self._buf[0] = 0
        self._prev_ids = np.zeros(self.pixels, np.int64)  # open particle owning each pixel of the last line
        self._open: dict[int, _Open] = {}
        self._next_id = 1

    @property
    def next_line(self) -> int | None:
        """The line the next chunk must start at (None before the first chunk)."""
        return self._next

    def push(self, first_line: int, mask: np.ndarray) -> list[Completed]:
        """Feed the foreground of lines ``first_line .. first_line + L - 1``.

        Parameters
        ----------
        mask : (L, P) ndarray of bool, L >= 1

        Returns
        -------
        The particles completed by this chunk, in completion order (within a chunk: by
        first line, then first column). A chunk that starts after the expected line
        implies a gap (see :meth:`gap`); one that starts before it is an error.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape[1] != self.pixels or mask.shape[0] < 1:
            raise ValueError(f"mask must be (L >= 1, {self.pixels}), got shape {mask.shape}")
        out: list[Completed] = []
        if self._next is None:
            self._start = first_line
        elif first_line != self._next:
            if first_line < self._next:
                raise ValueError(f"chunk starts at line {first_line}, but line {self._next - 1} was already seen")
            out = self.gap(first_line)
        n_lines = mask.shape[0]
        if self._buf.shape[0] < n_lines + 1:
            prev = self._buf[0].copy()
            self._buf = np.zeros((n_lines + 1, self.pixels + 2), np.uint8)
            self._buf[0] = prev
        buf = self._buf[:n_lines + 1]
        buf[1:, 1:-1] = mask.view(np.uint8) if mask.dtype == bool else (mask != 0)
        self._next = first_line + n_lines
        # labels only: OpenCV's per-pixel statistics cost 5x the labelling; the stitcher
        # takes its statistics from the horizontal runs instead (columns padded by one)
        n, lab = cv2.connectedComponentsWithAlgorithm(buf, 8, cv2.CV_32S, cv2.CCL_GRANA)
        if n > 1 or self._open:
            out.extend(self._absorb(n, lab[:, 1:-1], _run_stats(buf, lab, n), first_line - 1))
        buf[0] = buf[n_lines]
        return out

    def _absorb(self, n: int, lab: np.ndarray, stats: tuple[list, ...], base: int) -> list[Completed]:
        """Merge labels of (previous line + chunk) into the open particles; emit the finished."""
        owner = np.zeros(n, np.int64)  # label -> open particle id
        cnt0 = colsum0 = None
        if self._open:
            prev = np.flatnonzero(self._prev_ids)
            row0 = lab[0, prev]
            ids = self._prev_ids[prev]
            cnt0 = np.bincount(row0, minlength=n)
            colsum0 = np.bincount(row0, weights=prev, minlength=n)
            key = np.unique(row0 * (self._next_id + 1) + ids)
            alias: dict[int, int] = {}
            for k in key.tolist():
                label, pid = divmod(k, self._next_id + 1)
                pid = _resolve(alias, pid)
                have = int(owner[label])
                if have == 0:
                    owner[label] = pid
                elif _resolve(alias, have) != pid:  # this chunk connects two open particles
                    keep = _resolve(alias, have)
                    self._open[keep].absorb(self._open.pop(pid))
                    alias[pid] = keep
            if alias:
                for label in range(1, n):
                    owner[label] = _resolve(alias, int(owner[label]))
        xs, ys, x1s, y1s, areas, row_sums, col_sums = stats
        own = owner.tolist()
        c0 = cnt0.tolist() if cnt0 is not None else None
        s0 = colsum0.tolist() if cnt0 is not None else None
        for label in range(1, n):
            area = areas[label]
            new = area - c0[label] if c0 is not None else area
            if new <= 0:
                continue
            pid = own[label]
            if pid == 0:
                pid = own[label] = self._next_id
                self._next_id += 1
                self._open[pid] = _Open()
            rec = self._open[pid]
            x, y, x1, y1 = xs[label], ys[label], x1s[label], y1s[label]
            top = max(y, 1)
            if base + top == self._start:
                rec.cut = True
            rec.pieces.append((base + top, x, lab[top:y1 + 1, x:x1 + 1] == label))
            if base + top < rec.line0:
                rec.line0 = base + top
            if base + y1 > rec.line1:
                rec.line1 = base + y1
            if x < rec.col0:
                rec.col0 = x
            if x1 > rec.col1:
                rec.col1 = x1
            rec.area += new
            # integer sums: centroids come out identical however the stream is chunked
            rec.sum_line += row_sums[label] + new * base
            rec.sum_col += col_sums[label] - (round(s0[label]) if s0 is not None else 0)
        owner = np.asarray(own, np.int64)
        last = lab[-1]
        self._prev_ids = owner[last]
        alive = set(owner[np.flatnonzero(np.bincount(last, minlength=n))].tolist())
        alive.discard(0)
        out: list[Completed] = []
        done = sorted((rec.line0, rec.col0, pid) for pid, rec in self._open.items() if pid not in alive)
        for _, _, pid in done:
            rec = self._open.pop(pid)
            out.extend(self._emit(rec, cut=rec.cut))
        newest = base + lab.shape[0] - 1
        for pid in sorted(alive):
            rec = self._open[pid]
            if newest - rec.line0 + 1 >= self.max_particle_lines:
                rec.too_long = True
                out.extend(self._emit(rec, cut=rec.cut))
                fresh = _Open()
                fresh.too_long = True
                self._open[pid] = fresh
        return out

    def _emit(self, rec: _Open, cut: bool) -> list[Completed]:
        if rec.area == 0:
            return []
        if self.claim is not None and not self.claim(rec.col0, rec.col1):
            return []
        return _pieces(rec.mask(), rec.line0, rec.col0, self.pixel_pitch_mm, self.line_pitch_mm,
                       self.config, cut=cut, too_long=rec.too_long, pixels=self.pixels,
                       sums=(rec.area, rec.sum_line, rec.sum_col))

    def _emit_all_cut(self) -> list[Completed]:
        out: list[Completed] = []
        for _, _, pid in sorted((r.line0, r.col0, pid) for pid, r in self._open.items()):
            out.extend(self._emit(self._open[pid], cut=True))
        return out

    def gap(self, next_line: int) -> list[Completed]:
        """Lines before ``next_line`` were lost: particles open at the last line seen are
        returned with ``cut=True``; nothing is stitched across the gap, and particles on
        ``next_line`` itself will come out ``cut=True`` too."""
        if self._next is not None and next_line < self._next:
            raise ValueError(f"gap to line {next_line}, but line {self._next - 1} was already seen")
        out = self._emit_all_cut()
        self._reset(next_line)
        return out

    def flush(self) -> list[Completed]:
        """End of stream: particles still open reach the last line and come out ``cut=True``.
        The segmenter is then ready for a new stream."""
        out = self._emit_all_cut()
        self._reset(None)
        return out


def _run_stats(buf: np.ndarray, lab: np.ndarray, n: int) -> tuple[list, ...]:
    """Per label of a padded chunk (background columns first and last): first column, first
    row, last column, last row, area, sum of rows and sum of columns (exact integers, in
    unpadded columns), as lists indexed by label, from the horizontal runs of foreground.
    A chunk holds ~100x fewer runs than pixels."""
    flat = buf.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # a run starts, then ends, and so on
    edges += 1
    start, stop = edges[0::2], edges[1::2]
    out = [np.zeros(n, np.int64) for _ in range(7)]
    if start.size == 0:
        return tuple(o.tolist() for o in out)
    row, col = np.divmod(start, buf.shape[1])
    col -= 1
    length = stop - start
    label = lab.reshape(-1)[start]
    # CCL numbers labels in raster order of their first pixel: sorting by label keeps
    # each label's runs in raster order
    order = np.argsort(label, kind="stable")
    label, row, col, length = label[order], row[order], col[order], length[order]
    change = np.flatnonzero(label[1:] != label[:-1])
    first = np.empty(change.size + 1, np.intp)
    first[0] = 0
    first[1:] = change + 1
    last = np.empty_like(first)
    last[:-1] = change
    last[-1] = label.size - 1
    ids = label[first]
    out[0][ids] = np.minimum.reduceat(col, first)
    out[1][ids] = row[first]  # the first run of a label is on its first row
    out[2][ids] = np.maximum.reduceat(col + length - 1, first)
    out[3][ids] = row[last]
    out[4][ids] = np.add.reduceat(length, first)
    out[5][ids] = np.add.reduceat(row * length, first)
    out[6][ids] = np.add.reduceat(col * length + (length * (length - 1)) // 2, first)
    return tuple(o.tolist() for o in out)


def _resolve(alias: dict[int, int], pid: int) -> int:
    while pid in alias:
        pid = alias[pid]
    return pid
