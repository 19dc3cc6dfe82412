"""Line health: what the detector's raw lines say about the detector, before normalization.

:class:`LineHealth` classifies each incoming chunk of raw lines:

``saturated``
    a large share of a line's pixels read full scale (65535) in either channel.
``dark``
    tube trip: both channels near the dark level (transmission below ~2 %) over nearly
    every pixel of the line, belt edges included. Rocks never do that: even a belt fully
    covered by rocks keeps gaps, and the high channel of a thick rock stays well above dark
    (on the simulated belt, at most ~7 % of a line's pixels are that dark).
``stuck_module``
    a contiguous block of >= 16 detector columns whose readings (both channels) equal the
    previous line's exactly: a frozen detector module. Photon noise makes even one such
    pixel rare (2e-6 per pixel and line on the simulated belt); 16 side by side never happen.
``dropped``
    lines missing between chunks (the pipeline counts these gaps too).

It looks at a strided subsample of columns first (1 in 8, bad pixels avoided) and
examines full lines only where the sample suggests a fault, so a healthy chunk costs a
few tens of microseconds. Bad lines act as a gap for segmentation: what was open comes
out cut, and a particle bordering a frozen module is passed, never ejected.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

from sorting.stages.counts import FAULT_KINDS, FULL_SCALE, runs

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

_U = np.uint64  # unsigned indices in the compiled loops


class ChunkHealth(NamedTuple):
    """What :meth:`LineHealth.check` found in one chunk.

    bad_lines : (L,) bool, lines not to segment (saturated, dark, or just after either).
    bad_cols : (W,) bool, columns of a stuck module in this chunk (window columns).
    counts : lines of this chunk per fault kind (``dropped``: lines missing before it).
    """

    bad_lines: np.ndarray
    bad_cols: np.ndarray
    counts: dict[str, int]


def good_runs(bad_lines: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of the runs of good lines of a chunk, in order."""
    starts, stops = runs(~np.asarray(bad_lines, dtype=bool))
    return list(zip(starts.tolist(), stops.tolist()))


class LineHealth:
    """Per-chunk fault detector for one detector window (default: the whole belt).

    Parameters
    ----------
    cal : Calibration; ``dark``, ``air`` and ``bad`` are read once here.
    x0, width : the detector columns the chunks hold.
    stride : columns between screened samples; must not exceed ``stuck_cols // 2``
        so that a stuck block always holds two adjacent samples.
    saturated_share : share of a line's good pixels at full scale (either channel) that
        makes it a saturated line.
    dark_transmission, dark_share : a line is dark when this share of its good pixels
        reads below ``dark + dark_transmission * (air - dark)`` in both channels.
    stuck_cols : columns of the smallest frozen block reported as a stuck module.
    guard_lines : lines after a saturated or dark episode also reported bad (the tube or
        the amplifiers settle), without counting them to a fault kind.

    Attributes
    ----------
    episodes : dict kind -> fault episodes so far (alarms; one per contiguous run of lines).
    lines : dict kind -> lines so far.
    """

    def __init__(self, cal: Calibration, x0: int = 0, width: int | None = None, *, stride: int = 8,
                 saturated_share: float = 0.25, dark_transmission: float = 0.02, dark_share: float = 0.98,
                 stuck_cols: int = 16, guard_lines: int = 2):
        width = cal.pixels - x0 if width is None else int(width)
        if not (0 <= x0 and width >= 1 and x0 + width <= cal.pixels):
            raise ValueError(f"window x0={x0}, width={width} does not fit the calibration's {cal.pixels} pixels")
        if not (1 <= stride <= max(stuck_cols // 2, 1)):
            raise ValueError(f"stride {stride} must be in 1..stuck_cols // 2 = {stuck_cols // 2}")
        if not (0 < saturated_share <= 1 and 0 < dark_share <= 1 and 0 < dark_transmission < 1):
            raise ValueError("shares must be in (0, 1] and dark_transmission in (0, 1)")
        self.x0, self.width = int(x0), width
        cols = slice(x0, x0 + width)
        self._bad = np.asarray(cal.bad[cols], dtype=bool).copy()
        self._good = ~self._bad
        self._n_good = max(int(self._good.sum()), 1)
        dark, air = cal.dark[cols], cal.air[cols]
        # readings at or below this are "dark" (integers: the raw counts compare exactly)
        self._dark_thr = np.floor(dark + dark_transmission * (air - dark)).clip(0, FULL_SCALE).astype(np.uint16)
        self.saturated_share, self.dark_share = float(saturated_share), float(dark_share)
        self.stuck_cols, self.guard_lines = int(stuck_cols), int(guard_lines)
        # the screened samples: every stride-th column, moved off bad pixels (a stuck pixel
        # would look frozen in every chunk)
        good_idx = np.flatnonzero(self._good)
        want = np.arange(0, width, stride)
        pos = np.clip(np.searchsorted(good_idx, want), 0, max(good_idx.size - 1, 0))
        self._sample = np.unique(good_idx[pos]) if good_idx.size else want
        self._sample_thr = self._dark_thr[self._sample]
        self._prev: np.ndarray | None = None  # (W, 2), the last line seen
        self._prev32: np.ndarray | None = None  # the same line, one uint32 per pixel
        self._screen = np.empty((32, 3), np.int64)  # per line: full-scale, dark-high, frozen-pair samples
        self._healthy_lines = np.zeros(32, bool)
        self._healthy_cols = np.zeros(width, bool)
        self._healthy_lines.flags.writeable = self._healthy_cols.flags.writeable = False
        self._no_prev = np.zeros((0, 2), np.uint16)
        self._sample_thr_high = np.ascontiguousarray(self._sample_thr[:, 1])
        self._col_last_bad = np.full(width, -(1 << 62), np.int64)  # last stream line a column was stuck
        self._last_bad_line = -(1 << 62)  # ... and of any column
        self._next_line: int | None = None
        self._active = dict.fromkeys(FAULT_KINDS, False)
        self._guard_left = 0
        self.episodes = dict.fromkeys(FAULT_KINDS, 0)
        self.lines = dict.fromkeys(FAULT_KINDS, 0)

    # ------------------------------------------------------------ per chunk
    def check(self, raw: np.ndarray, first_line: int | None = None) -> ChunkHealth:
        """Classify the lines of one chunk.

        Parameters
        ----------
        raw : (L, W, 2) ndarray of uint16, the window's raw counts.
        first_line : stream index of ``raw[0]``; None = right after the previous chunk.

        Returns
        -------
        ChunkHealth; also updates ``episodes`` and ``lines``.
        """
        n = raw.shape[0]
        if raw.ndim != 3 or raw.shape[2] != 2 or raw.shape[1] != self.width:
            raise ValueError(f"`raw` (shape {raw.shape}) must be (L, {self.width}, 2)")
        if first_line is None:
            first_line = 0 if self._next_line is None else self._next_line
        counts = dict.fromkeys(FAULT_KINDS, 0)
        if self._next_line is not None and first_line > self._next_line:
            counts["dropped"] = first_line - self._next_line
            self.episodes["dropped"] += 1
            self.lines["dropped"] += counts["dropped"]
        self._next_line = first_line + n
        if n == 0:
            return ChunkHealth(np.zeros(0, bool), np.zeros(self.width, bool), counts)
        raw = np.ascontiguousarray(raw, dtype=np.uint16)  # a recording's lines already are: no copy
        if self._screen.shape[0] < n:
            self._screen = np.empty((n, 3), np.int64)
            self._healthy_lines = np.zeros(n, bool)
            self._healthy_lines.flags.writeable = False
        screen = self._screen[:n]
        sat_max, dark_max, pairs_max = _screen_samples(
            raw, self._sample, self._sample_thr_high, self._no_prev if self._prev is None else self._prev, screen)
        s = self._sample.size
        if sat_max == 0 and dark_max < (self.dark_share - 0.1) * s and pairs_max == 0 \
                and self._guard_left == 0 and not any(self._active.values()):
            self._remember(raw[-1])
            # the healthy path, nearly every chunk: shared read-only "nothing bad" flags
            return ChunkHealth(self._healthy_lines[:n], self._healthy_cols, counts)
        # a pixel's two channels as one uint32: "both channels equal" is one comparison
        raw32 = raw.reshape(n, -1).view(np.uint32)
        bad_cols = np.zeros(self.width, bool)
        sat_suspect = dark_suspect = None
        if screen[:, 0].any():
            sat_suspect = screen[:, 0] >= 0.5 * self.saturated_share * s
        dark_high = screen[:, 1]
        if dark_high.max() >= (self.dark_share - 0.1) * s:
            dark_suspect = dark_high >= (self.dark_share - 0.1) * s
        # a frozen block of >= stuck_cols columns holds two adjacent samples equal to the line before
        # (saturated lines are all alike; they are not judged as frozen)
        adjacent = screen[:, 2] != 0
        sat = self._line_flags(raw, sat_suspect, self._saturated_lines)
        dark = self._line_flags(raw, dark_suspect, self._dark_lines)
        stuck = np.zeros(n, bool)
        if (adjacent & ~sat).any():
            stuck, bad_cols = self._stuck(raw32, sat)
        self._remember(raw[-1])
        bad_lines = sat | dark
        bad_lines |= self._guard(bad_lines)
        for kind, flags in (("saturated", sat), ("dark", dark), ("stuck_module", stuck)):
            self._tally(kind, flags, counts)
        if bad_cols.any():
            # the pipeline blanks these columns over the whole chunk: a particle anywhere in it
            # may have lost pixels there
            self._col_last_bad[bad_cols] = self._last_bad_line = first_line + raw.shape[0] - 1
        return ChunkHealth(bad_lines, bad_cols, counts)

    def _remember(self, line: np.ndarray) -> None:
        """Keep the chunk's last line: the next chunk's first line is compared with it."""
        if self._prev is None:
            self._prev = line.copy()
            self._prev32 = self._prev.reshape(-1).view(np.uint32)
        else:
            self._prev[...] = line

    def _line_flags(self, raw: np.ndarray, suspect: np.ndarray | None, full) -> np.ndarray:
        """Lines the sample marks as suspect, confirmed on all their good pixels."""
        flags = np.zeros(raw.shape[0], bool)
        if suspect is not None and suspect.any():
            idx = np.flatnonzero(suspect)
            flags[idx] = full(raw[idx])
        return flags

    # the per-channel tests give (k, W, 2) bools; viewed as one uint16 per pixel, 0 means
    # neither channel and 0x0101 both (no slow reduction over an axis of length 2)
    def _saturated_lines(self, lines: np.ndarray) -> np.ndarray:
        pair = (lines == FULL_SCALE).view(np.uint16)[..., 0]
        hit = (pair != 0) & self._good
        return np.count_nonzero(hit, axis=1) >= self.saturated_share * self._n_good

    def _dark_lines(self, lines: np.ndarray) -> np.ndarray:
        pair = (lines <= self._dark_thr).view(np.uint16)[..., 0]
        hit = (pair == 0x0101) & self._good
        return np.count_nonzero(hit, axis=1) >= self.dark_share * self._n_good

    def _stuck(self, raw32: np.ndarray, saturated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full check: per line, blocks of >= stuck_cols columns equal to the line before
        (bad pixels bridge a block; saturated lines are not judged here)."""
        n = raw32.shape[0]
        eq = np.empty(raw32.shape, bool)
        np.equal(raw32[1:], raw32[:-1], out=eq[1:])
        if self._prev is None:
            eq[0] = False
        else:
            np.equal(raw32[0], self._prev32, out=eq[0])
        eq[saturated] = False
        w = self.width
        padded = np.zeros((n, w + 1), bool)  # a False column ends every line's runs
        padded[:, :w] = eq | self._bad  # isolated bad pixels bridge a block
        starts, stops = runs(padded.ravel())
        long = stops - starts >= self.stuck_cols
        lines = np.zeros(n, bool)
        cols = np.zeros(w, bool)
        for a, b in zip(starts[long].tolist(), stops[long].tolist()):
            i, c0 = divmod(a, w + 1)
            lines[i] = True
            cols[c0:c0 + b - a] = True
        cols &= self._good
        return lines, cols

    def _guard(self, bad: np.ndarray) -> np.ndarray:
        """Lines within guard_lines after the end of a saturated or dark run (also across chunks)."""
        out = np.zeros(bad.size, bool)
        left = self._guard_left
        for i, b in enumerate(bad.tolist()):
            if b:
                left = self.guard_lines
            elif left > 0:
                out[i] = True
                left -= 1
        self._guard_left = left
        return out

    def _tally(self, kind: str, flags: np.ndarray, counts: dict[str, int]) -> None:
        k = int(flags.sum())
        counts[kind] = k
        self.lines[kind] += k
        if k:
            starts, _ = runs(flags)
            self.episodes[kind] += starts.size - int(self._active[kind] and flags[0])
        self._active[kind] = bool(flags[-1])

    # ------------------------------------------------------------ per particle
    @property
    def last_bad_line(self) -> int:
        """The last stream line on which some column was stuck (a large negative number: never)."""
        return self._last_bad_line

    def suspect(self, line0: int, line1: int, col0: int, col1: int) -> bool:
        """Whether a particle (window columns) borders a column that was stuck while it passed:
        it may be a fragment of a rock cut by the frozen module (pass it, do not eject)."""
        if self._last_bad_line < line0:  # the common case: no frozen column since it began
            return False
        lo, hi = max(col0 - 1, 0), min(col1 + 2, self.width)
        return bool(self._col_last_bad[lo:hi].max(initial=-(1 << 62)) >= line0)


@numba.njit(cache=True, nogil=True)
def _screen_samples(raw: np.ndarray, sample: np.ndarray, dark_thr_high: np.ndarray, prev: np.ndarray,
                    out: np.ndarray) -> None:
    """The cheap screen of :meth:`LineHealth.check` on the sampled columns, per line into ``out``
    (L, 3): samples with either channel at full scale; samples with the high channel at or
    below its dark level; pairs of adjacent samples equal (both channels) to the line before.
    Returns the maximum of each over the chunk.
    ``raw`` (L, W, 2) uint16; the chunk's first line is compared with ``prev`` (W, 2), or with
    nothing when ``prev`` is empty."""
    n = raw.shape[0]
    s = sample.size
    sat_max = dark_max = pairs_max = 0
    for i in range(n):
        sat = dark = pairs = 0
        was_equal = False
        for k in range(s):
            c = sample[k]
            lo = raw[i, c, 0]
            hi = raw[i, c, 1]
            sat += (lo == FULL_SCALE) + (hi == FULL_SCALE)
            dark += hi <= dark_thr_high[k]
            if i > 0:
                equal = lo == raw[i - 1, c, 0] and hi == raw[i - 1, c, 1]
            elif prev.size:
                equal = lo == prev[c, 0] and hi == prev[c, 1]
            else:
                equal = False
            pairs += equal and was_equal
            was_equal = equal
        out[i, 0] = sat
        out[i, 1] = dark
        out[i, 2] = pairs
        sat_max, dark_max, pairs_max = max(sat_max, sat), max(dark_max, dark), max(pairs_max, pairs)
    return sat_max, dark_max, pairs_max
