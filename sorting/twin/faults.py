"""Faults injected into a line stream (the twin's misbehaving detector): dropped lines,
saturated lines, a tube trip, a frozen detector module; recorded exactly as injected."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sorting.stages.counts import FAULT_KINDS, FULL_SCALE, runs

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration


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
        return {k: int(runs(_line_mask(v))[0].size) for k, v in self.injected.items()}

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, float]]:
        drops = [f for f in self.faults if f.kind == "dropped"]
        for first, lines, t_in in self._chunks:
            n = lines.shape[0]
            stream = np.arange(first, first + n)
            keep = np.ones(n, bool)
            for f in drops:
                keep &= ~((stream >= f.first_line) & (stream < f.first_line + f.n_lines))
            self.injected["dropped"].extend(stream[~keep].tolist())
            starts, stops = runs(keep)
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
    """Wrap a chunk iterator (as :mod:`sorting.realtime.sources` yields them) with faults.

    ``dropped`` lines are skipped (a chunk may come out in pieces); ``saturated`` lines
    read 65535; ``dark`` lines read the calibration's dark level plus read noise
    (``read_noise_adu`` sigma, seeded by ``seed``); ``stuck_module`` holds a column block.
    Later faults in ``faults`` overwrite earlier ones where they overlap.
    """
    return FaultInjector(chunks, faults, cal, seed, read_noise_adu)
