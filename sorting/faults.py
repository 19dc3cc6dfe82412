"""Faults on the belt (issue 6 items 3-4): line health, a fault injector, air tracking.

:class:`LineHealth` classifies each incoming chunk of raw lines, before normalization:

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
few tens of microseconds.

:func:`inject` wraps a chunk iterator and applies faults at given lines, recording exactly
what it injected. :class:`AirTracker` follows slow tube and gain drift from empty belt.

Integration in ``Pipeline`` (the lead owns sorting/stream.py). At construction, on the
pipeline's window (``x0``, ``width`` = ``self.pixels``)::

    self.health = LineHealth(cal, x0, width)
    self.air = AirTracker(cal, x0=x0, width=width)
    self._dark_w, self._bad_w = cal.dark[x0:x0 + width], cal.bad[x0:x0 + width]

Per chunk, in ``step(first_line, raw, t_in)``::

    health = self.health.check(raw, first_line)        # before anything else
    attenuation_into(raw, self._dark_w, self.air.log_flat, self._bad_w, a)  # tracked air
    # ... ring buffer as now (bad lines too: no particle will ever read them) ...
    foreground(a, self.cal, self.x0, self.seg, out=mask)
    mask[:, health.bad_cols] = False                    # no particle on a frozen module
    self.air.update(a, mask, health.bad_lines, health.bad_cols)
    done = []
    for start, stop in good_runs(health.bad_lines):     # bad lines act as a gap: what was
        done += self.segmenter.push(first_line + start, mask[start:stop])   # open comes out cut,
    # what starts right after comes out cut too; an all-bad chunk pushes nothing.
    # per particle, in _decide: pass (never eject) if p.cut or
    #     self.health.suspect(p.line0, p.line1, p.col0, p.col1)   (borders a stuck module)
    # counters: alarms = self.health.episodes (one per fault episode, per kind),
    #     fault lines = self.health.lines; dropped lines = health.counts["dropped"]

Count dropped lines from ``health.counts["dropped"]`` (or the pipeline's own expected
next line), not from ``segmenter.next_line``: after a chunk that ends in bad lines the
segmenter is behind by those lines, which are not dropped. Recovery needs nothing: the
first good lines after a fault are segmented again (the guard lines just after a
saturated or dark episode excepted).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

if TYPE_CHECKING:
    from .calibrate import Calibration

FAULT_KINDS = ("dropped", "saturated", "dark", "stuck_module")
FULL_SCALE = 65535
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


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops (exclusive) of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate(([0], flags.view(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def good_runs(bad_lines: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of the runs of good lines of a chunk, in order."""
    starts, stops = _runs(~np.asarray(bad_lines, dtype=bool))
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
        self._pixels = cal.pixels
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
        raw : (L, W, 2) ndarray of uint16, the window's raw counts; or whole lines (L, P, 2)
            of the detector's P pixels, of which the window's columns are read in place.
        first_line : stream index of ``raw[0]``; None = right after the previous chunk.

        Returns
        -------
        ChunkHealth; also updates ``episodes`` and ``lines``.
        """
        n = raw.shape[0]
        if raw.ndim != 3 or raw.shape[2] != 2 or raw.shape[1] not in (self.width, self._pixels):
            raise ValueError(f"`raw` (shape {raw.shape}) must be (L, {self.width}, 2) or whole lines "
                             f"(L, {self._pixels}, 2)")
        off = 0 if raw.shape[1] == self.width else self.x0
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
            raw, self._sample, self._sample_thr_high, self._no_prev if self._prev is None else self._prev, screen, off)
        s = self._sample.size
        if off or raw.shape[1] != self.width:
            raw = raw[:, off:off + self.width]
        if sat_max == 0 and dark_max < (self.dark_share - 0.1) * s and pairs_max == 0 \
                and self._guard_left == 0 and not any(self._active.values()):
            self._remember(raw[-1])
            # the healthy path, nearly every chunk: shared read-only "nothing bad" flags
            return ChunkHealth(self._healthy_lines[:n], self._healthy_cols, counts)
        raw = np.ascontiguousarray(raw)  # the window of whole lines: the rare faulty chunk copies it
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
        starts, stops = _runs(padded.ravel())
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
            starts, _ = _runs(flags)
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


# ---------------------------------------------------------------- fault injection
@dataclass(frozen=True)
class FaultSpec:
    """One fault over stream lines ``first_line .. first_line + n_lines - 1``.

    ``stuck_module`` freezes detector columns ``col0 .. col0 + n_cols - 1`` at their
    reading on the last line before the fault.
    """

    kind: str
    first_line: int
    n_lines: int
    col0: int = 0
    n_cols: int = 64

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {FAULT_KINDS}")
        if self.first_line < 0 or self.n_lines < 1 or self.col0 < 0 or self.n_cols < 1:
            raise ValueError(f"bad fault extent {self}")

    def lines(self) -> range:
        return range(self.first_line, self.first_line + self.n_lines)


class FaultInjector:
    """Iterates ``(first_line, lines, t_in)`` chunks with the faults applied (see :func:`inject`).

    ``injected[kind]`` lists the stream lines that carried each kind, filled during
    iteration; :meth:`episodes` counts their contiguous runs.
    """

    def __init__(self, chunks: Iterable[tuple[int, np.ndarray, float]], faults: list[FaultSpec],
                 cal: Calibration, seed: int = 0, read_noise_adu: float = 3.0):
        self._chunks = chunks
        self.faults = list(faults)
        self._dark = np.asarray(cal.dark, np.float32)
        self._read = float(read_noise_adu)
        self._rng = np.random.default_rng(seed)
        self.injected: dict[str, list[int]] = {k: [] for k in FAULT_KINDS}
        self._held: dict[int, np.ndarray] = {}  # stuck fault index -> frozen values (n_cols, 2)
        self._last: np.ndarray | None = None  # the last line passed on

    def episodes(self) -> dict[str, int]:
        return {k: int(_runs(_line_mask(v))[0].size) for k, v in self.injected.items()}

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, float]]:
        drops = [f for f in self.faults if f.kind == "dropped"]
        for first, lines, t_in in self._chunks:
            n = lines.shape[0]
            stream = np.arange(first, first + n)
            keep = np.ones(n, bool)
            for f in drops:
                keep &= ~((stream >= f.first_line) & (stream < f.first_line + f.n_lines))
            self.injected["dropped"].extend(stream[~keep].tolist())
            starts, stops = _runs(keep)
            for a, b in zip(starts.tolist(), stops.tolist()):
                yield first + a, self._apply(first + a, lines[a:b]), t_in

    def _apply(self, first: int, lines: np.ndarray) -> np.ndarray:
        n = lines.shape[0]
        out = None
        for k, f in enumerate(self.faults):
            lo, hi = max(f.first_line, first), min(f.first_line + f.n_lines, first + n)
            if f.kind == "dropped" or lo >= hi:
                continue
            if out is None:
                out = np.array(lines)  # never write into the source (a read-only memmap)
            rows = slice(lo - first, hi - first)
            if f.kind == "saturated":
                out[rows] = FULL_SCALE
                self.injected["saturated"].extend(range(lo, hi))
            elif f.kind == "dark":
                noise = self._rng.standard_normal((hi - lo,) + self._dark.shape, dtype=np.float32)
                out[rows] = np.clip(np.rint(self._dark + self._read * noise), 0, FULL_SCALE)
                self.injected["dark"].extend(range(lo, hi))
            else:
                cols = slice(f.col0, f.col0 + f.n_cols)
                held = self._held.get(k)
                frozen_from = lo
                if held is None:  # the reading of the last line before the fault
                    if lo > first:
                        src = out[lo - first - 1]
                    elif self._last is not None:
                        src = self._last
                    else:  # the fault starts the stream: its first line is itself real
                        src = out[lo - first]
                        frozen_from = lo + 1
                    held = self._held[k] = np.array(src[cols])
                out[rows, cols] = held
                self.injected["stuck_module"].extend(range(frozen_from, hi))
        result = lines if out is None else out
        self._last = np.array(result[-1])
        return result


def _line_mask(lines: list[int]) -> np.ndarray:
    if not lines:
        return np.zeros(0, bool)
    v = np.unique(np.asarray(lines))
    m = np.zeros(v[-1] - v[0] + 1, bool)
    m[v - v[0]] = True
    return m


def inject(chunks: Iterable[tuple[int, np.ndarray, float]], faults: list[FaultSpec], cal: Calibration,
           seed: int = 0, read_noise_adu: float = 3.0) -> FaultInjector:
    """Wrap a chunk iterator (as :mod:`sorting.sources` yields them) with faults.

    ``dropped`` lines are skipped (a chunk may come out in pieces); ``saturated`` lines
    read 65535; ``dark`` lines read the calibration's dark level plus read noise
    (``read_noise_adu`` sigma, seeded by ``seed``); ``stuck_module`` holds a column block.
    Later faults in ``faults`` overwrite earlier ones where they overlap.
    """
    return FaultInjector(chunks, faults, cal, seed, read_noise_adu)


# ---------------------------------------------------------------- drift of the air level
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
    updated in place; pass it to :func:`sorting.normalize.attenuation_into` instead of
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

    def accumulators(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(margin_px, sums (2W,) float64, counts, and the two scratch arrays) for a compiled
        caller of :func:`accumulate_empty_line` (the streaming loop's fused line pass): what
        :meth:`update` adds up, on the same arrays."""
        return self.margin_px, self._sum.reshape(-1), self._count, self._near, self._keep

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


@numba.njit(cache=True, nogil=True)
def _screen_samples(raw: np.ndarray, sample: np.ndarray, dark_thr_high: np.ndarray, prev: np.ndarray,
                    out: np.ndarray, off: int) -> None:
    """The cheap screen of :meth:`LineHealth.check` on the sampled columns, per line into ``out``
    (L, 3): samples with either channel at full scale; samples with the high channel at or
    below its dark level; pairs of adjacent samples equal (both channels) to the line before.
    Returns the maximum of each over the chunk.
    ``raw`` (L, W, 2) uint16, or whole lines of which the window starts at pixel ``off``; the
    chunk's first line is compared with ``prev`` (W, 2), or with nothing when ``prev`` is empty."""
    n = raw.shape[0]
    s = sample.size
    sat_max = dark_max = pairs_max = 0
    for i in range(n):
        sat = dark = pairs = 0
        was_equal = False
        for k in range(s):
            c = sample[k]
            lo = raw[i, c + off, 0]
            hi = raw[i, c + off, 1]
            sat += (lo == FULL_SCALE) + (hi == FULL_SCALE)
            dark += hi <= dark_thr_high[k]
            if i > 0:
                equal = lo == raw[i - 1, c + off, 0] and hi == raw[i - 1, c + off, 1]
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
