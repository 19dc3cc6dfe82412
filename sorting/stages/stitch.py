"""The streaming stitcher: per-chunk foreground masks -> whole particles, each emitted once.

It follows connected components across chunk boundaries and hands each finished one to
the same speck filter and touching-rock split as the batch path (:mod:`sorting.stages.segment`),
so the belt and the rock crops give the same particles. The run tracking is compiled
(:mod:`sorting.stages.stitch_kernels`): the loop has ~0.85 ms per 32-line chunk for everything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sorting.stages import stitch_kernels as K
from sorting.stages.particles import Particle, Particles, SegmentConfig, pixel_area_mm2
from sorting.stages.split import pieces

if TYPE_CHECKING:  # the calibration is only kept for the caller
    from sorting.stages.calibrate import Calibration

#: what a chunk that completes nothing gives (shared: a Particles set is immutable)
_NONE = Particles.empty()
_SLOTS0 = 256  # open particles, grown by doubling
_RUNS0 = 8192  # stored runs of open particles, grown by doubling
#: the stage named in a particle's ``error`` when splitting its component raised
SPLIT_STAGE = "splitting"


class StreamSegmenter:
    """Stitches per-chunk foreground masks into whole particles, each emitted exactly once.

    A connected component (8-connectivity) is complete when a line after its last line
    has arrived without extending it, so the result does not depend on chunk sizes. The
    horizontal runs of each line are joined to those of the line before; open particles
    keep bbox, area, integer coordinate sums and their runs, and a particle's mask is built
    once, when it is complete. Completed ones go through the same speck filter and
    touching-rock split as :func:`segment_crop`.

    Parameters
    ----------
    pixels : detector columns P.
    cal : the calibration (kept for the caller's convenience; masks come in ready-made).
    max_particle_lines : a particle still open after this many lines is emitted with
        ``too_long=True`` and its continuation starts afresh (also flagged), so a jam on
        the belt cannot hold memory or the deadline.
    """

    def __init__(self, pixels: int, cal: Calibration | None, pixel_pitch_mm: float, line_pitch_mm: float,
                 config: SegmentConfig = SegmentConfig(), max_particle_lines: int = 512):
        if pixels < 1 or max_particle_lines < 1:
            raise ValueError(f"pixels and max_particle_lines must be >= 1, got {pixels}, {max_particle_lines}")
        self.pixels = int(pixels)
        self.cal = cal
        self.pixel_pitch_mm = float(pixel_pitch_mm)
        self.line_pitch_mm = float(line_pitch_mm)
        self.config = config
        self.max_particle_lines = int(max_particle_lines)
        #: components whose split raised, so far (each emitted whole, with ``error`` set)
        self.errors = 0
        self._parts = np.zeros((_SLOTS0, K.N_PART_COLS), np.int64)
        self._emit_rows = np.zeros((_SLOTS0, K.N_EMIT_COLS), np.int64)
        self._runs = np.zeros((_RUNS0, 4), np.int64)
        self._prev = np.zeros(((self.pixels + 1) // 2, 3), np.int64)  # runs of the last line seen
        self._sc = np.zeros(K.N_SCALARS, np.int64)
        self._gate = np.zeros(K.N_GATE, np.float64)
        self._gate[K.G_SPLIT] = config.split_touching
        self._gate[K.G_PIXEL_AREA] = pixel_area_mm2(pixel_pitch_mm, line_pitch_mm)
        self._gate[K.G_MIN_AREA] = config.min_area_mm2
        self._gate[K.G_PITCH] = max(self.pixel_pitch_mm, self.line_pitch_mm)
        self._gate[K.G_DEPTH] = config.gate_depth_mm
        self._gate[K.G_PIXELS] = self.pixels
        self._scratch_lines = 0
        self._scratch(32)
        self._reset(None)

    def _scratch(self, n_lines: int) -> None:
        """Run buffer of one chunk (plus the line before), like a label image but ~100x smaller."""
        if n_lines > self._scratch_lines:
            self._scratch_lines = n_lines
            self._cr = np.zeros(((n_lines + 1) * ((self.pixels + 1) // 2), 4), np.int64)
            self._row_start = np.zeros(n_lines + 2, np.int64)

    def _reset(self, next_line: int | None) -> None:
        self._next = next_line
        self._start = next_line  # first line after a (re)start: what touches it may have begun earlier
        K.reset_state(self._parts, self._runs, self._sc)

    @property
    def next_line(self) -> int | None:
        """The line the next chunk must start at (None before the first chunk)."""
        return self._next

    def push(self, first_line: int, mask: np.ndarray) -> Particles:
        """Feed the foreground of lines ``first_line .. first_line + L - 1``.

        Parameters
        ----------
        mask : (L, P) ndarray of bool, L >= 1

        Returns
        -------
        The particles completed by this chunk, in completion order (within a chunk: by
        first line, then first column; then particles emitted as too long). A chunk that
        starts after the expected line implies a gap (see :meth:`gap`); one that starts
        before it is an error.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape[1] != self.pixels or mask.shape[0] < 1:
            raise ValueError(f"mask must be (L >= 1, {self.pixels}), got shape {mask.shape}")
        out = None
        if self._next is None:
            self._start = first_line
        elif first_line != self._next:
            if first_line < self._next:
                raise ValueError(f"chunk starts at line {first_line}, but line {self._next - 1} was already seen")
            out = self.gap(first_line)
        n_lines = mask.shape[0]
        m8 = np.ascontiguousarray(mask if mask.dtype == bool else mask != 0).view(np.uint8)
        self._scratch(n_lines)
        self._next = first_line + n_lines
        self._sc[K.S_START] = self._start
        while True:
            status, n_emit, flat = K.track_chunk(m8, first_line, self._parts, self._runs, self._prev, self._sc,
                                                 self._cr, self._row_start, self.max_particle_lines,
                                                 self._emit_rows, self._gate)
            if status == 0:
                break
            self._grow(int(self._sc[K.S_NEED_SLOTS]), int(self._sc[K.S_NEED_RUNS]))
        if n_emit:
            done = self._completed(n_emit, flat)
            return done if out is None else Particles.concat([out, done])
        return _NONE if out is None else out

    def _grow(self, slots: int, runs: int) -> None:
        """Room for ``slots`` more particles and ``runs`` more runs (free lists extended)."""
        sc = self._sc
        if sc[K.S_NFREE_SLOT] < slots:
            self._parts = _extended(self._parts, slots, K.HEAD, sc, K.S_FREE_SLOT, K.S_NFREE_SLOT)
            self._emit_rows = np.zeros((self._parts.shape[0], K.N_EMIT_COLS), np.int64)
        if sc[K.S_NFREE_RUN] < runs:
            self._runs = _extended(self._runs, runs, K.R_NEXT, sc, K.S_FREE_RUN, K.S_NFREE_RUN)

    def _completed(self, n_emit: int, flat: np.ndarray) -> Particles:
        # the kernel has dropped specks and settled the touching-rock gate of most rocks
        # (split.pieces does the same steps for the others and for the batch path)
        rows = self._emit_rows[:n_emit]
        kind = rows[:, K.E_KIND]
        if (kind == K.KIND_GATE).any():
            return self._completed_gated(rows, flat)
        rows = rows[kind == K.KIND_WHOLE]
        area = rows[:, K.E_AREA]
        h = (rows[:, K.E_LINE1] - rows[:, K.E_LINE0] + 1).tolist()
        w = (rows[:, K.E_COL1] - rows[:, K.E_COL0] + 1).tolist()
        offsets = rows[:, K.E_OFFSET].tolist()
        masks = tuple(flat[off:off + hi * wi].reshape(hi, wi) for off, hi, wi in zip(offsets, h, w))
        # (the rows were copied out of the kernel's reused table by the selection above; the
        # kernel's boxes, areas and masks agree by construction, as the stitcher's tests check)
        return Particles.unchecked({
            "line0": rows[:, K.E_LINE0], "line1": rows[:, K.E_LINE1], "col0": rows[:, K.E_COL0],
            "col1": rows[:, K.E_COL1], "area_px": area, "centroid_line": rows[:, K.E_SUM_LINE] / area,
            "centroid_px": rows[:, K.E_SUM_COL] / area, "cut": rows[:, K.E_CUT] == 1,
            "too_long": rows[:, K.E_TOO_LONG] == 1, "touches_border": rows[:, K.E_EDGE] == 1,
            "split": np.zeros(len(masks), bool)}, masks)

    def _completed_gated(self, rows: np.ndarray, flat: np.ndarray) -> Particles:
        """:meth:`_completed` when some component needs the full touching-rock gate (one at a time)."""
        out: list[Particle] = []
        for line0, line1, col0, col1, area, sum_line, sum_col, cut, too_long, off, kind, edge, _ in rows.tolist():
            if kind == K.KIND_SPECK:
                continue
            h, w = line1 - line0 + 1, col1 - col0 + 1
            mask = flat[off:off + h * w].reshape(h, w)
            whole = Particle(line0, line1, col0, col1, mask, area, sum_line / area, sum_col / area,
                             cut == 1, too_long == 1, edge == 1, False)
            if kind == K.KIND_WHOLE:
                out.append(whole)
                continue
            try:
                out.extend(pieces(mask, line0, col0, self.pixel_pitch_mm, self.line_pitch_mm, self.config,
                                  cut=cut == 1, too_long=too_long == 1, pixels=self.pixels,
                                  sums=(area, sum_line, sum_col), bound_deep=True))
            except Exception as exc:  # noqa: BLE001 - one rock's shape must never stop the belt
                # the component comes out whole, flagged: the loop passes it and logs why
                self.errors += 1
                out.append(whole._replace(error=f"{SPLIT_STAGE}: {type(exc).__name__}"))
        return Particles.from_rows(out)

    def _emit_all_cut(self) -> Particles:
        n_emit, flat = K.emit_all(self._parts, self._runs, self._sc, self._emit_rows, self._gate)
        return self._completed(n_emit, flat) if n_emit else _NONE

    def gap(self, next_line: int) -> Particles:
        """Lines before ``next_line`` were lost: particles open at the last line seen are
        returned with ``cut=True``; nothing is stitched across the gap, and particles on
        ``next_line`` itself will come out ``cut=True`` too."""
        if self._next is not None and next_line < self._next:
            raise ValueError(f"gap to line {next_line}, but line {self._next - 1} was already seen")
        out = self._emit_all_cut()
        self._reset(next_line)
        return out

    def flush(self) -> Particles:
        """End of stream: particles still open reach the last line and come out ``cut=True``.
        The segmenter is then ready for a new stream."""
        out = self._emit_all_cut()
        self._reset(None)
        return out


def warm_up() -> None:
    """Load the stitcher's compiled kernels from their cache (or compile them on a fresh
    install: seconds) with the loop's argument types, so the first rock's deadline does not
    pay it: a throwaway segmenter pushes, completes a rock (split-gate bound included),
    meets a gap and flushes."""
    seg = StreamSegmenter(16, None, 1.0, 1.0, SegmentConfig(min_area_mm2=0.0))
    mask = np.zeros((8, 16), bool)
    mask[1:5, 2:7] = True
    seg.push(0, mask)
    seg.push(8, mask)
    seg.gap(20)
    seg.push(20, mask)
    seg.flush()


def _extended(table: np.ndarray, more: int, next_col: int, sc: np.ndarray, free: int, n_free: int) -> np.ndarray:
    """``table`` grown to at least ``more`` more rows (doubling), the new rows chained in front of
    its free list (column ``next_col`` links a row to the next free one; ``sc[free]`` is the
    list's head, ``sc[n_free]`` its length)."""
    old = table.shape[0]
    new = max(2 * old, old + more)
    grown = np.zeros((new, table.shape[1]), table.dtype)
    grown[:old] = table
    grown[old:, next_col] = np.arange(old + 1, new + 1)
    grown[new - 1, next_col] = sc[free]
    sc[free] = old
    sc[n_free] += new - old
    return grown
