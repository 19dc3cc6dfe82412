"""What a run counts: particles, decisions, faults, and the latency histogram."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class LatencyHistogram:
    """Latency percentiles over a run of any length in fixed memory: 10 us bins up to 2 s
    (slower decisions land in the last bin; the exact maximum is kept aside)."""

    BIN_MS = 0.01
    BINS = 200_000

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, np.int64)
        self.max_ms = 0.0
        self.n = 0

    def add(self, latency_ms: float) -> None:
        i = int(latency_ms / self.BIN_MS)
        self.counts[min(max(i, 0), self.BINS - 1)] += 1
        self.max_ms = max(self.max_ms, latency_ms)
        self.n += 1

    def add_many(self, latency_ms: np.ndarray) -> None:
        """:meth:`add` for each value of a (n,) float array (one chunk's particles)."""
        if latency_ms.size == 0:
            return
        values = latency_ms.tolist()
        counts, top, bin_ms = self.counts, self.BINS - 1, self.BIN_MS
        for v in values:  # a handful per chunk: in Python scalars, ~0.2 us each (np.clip alone costs ~5 us)
            counts[min(max(int(v / bin_ms), 0), top)] += 1
        self.max_ms = max(self.max_ms, max(values))
        self.n += len(values)

    def percentile(self, q: float) -> float:
        if self.n == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100.0 * self.n, side="left"))
        return min((k + 1) * self.BIN_MS, self.max_ms)  # upper edge of the bin: never optimistic

    def summary(self) -> dict:
        return {"p50": self.percentile(50), "p99": self.percentile(99), "p999": self.percentile(99.9),
                "max": self.max_ms}


@dataclass
class Counters:
    chunks: int = 0
    lines: int = 0
    particles: int = 0
    ejected: int = 0
    passed: int = 0
    late_ejects: int = 0  # ejects whose command could not be sent in time (logged, never sent)
    cut: int = 0
    too_long: int = 0
    gaps: int = 0
    dropped_lines: int = 0
    valve_errors: int = 0
    undecided: int = 0
    particle_errors: int = 0  # particles passed because their own processing raised
    error_episodes: int = 0  # ... alarms: runs of consecutive chunks with such particles
    tramp: int = 0
    over_cap: int = 0
    splices: int = 0
    splice_lines: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def summary(self) -> dict:
        return {
            "chunks": self.chunks, "lines": self.lines, "particles": self.particles,
            "ejected": self.ejected, "passed": self.passed, "late_ejects": self.late_ejects,
            # the same count under its earlier name, for existing readers of the summary
            "late": self.late_ejects, "cut": self.cut,
            "too_long": self.too_long, "gaps": self.gaps, "dropped_lines": self.dropped_lines,
            "valve_errors": self.valve_errors,
            "undecided": self.undecided,
            "particle_errors": self.particle_errors,
            "tramp": self.tramp, "over_cap": self.over_cap, "splices": self.splices,
            "splice_lines": self.splice_lines,
            "latency_ms": self.latency.summary(),
        }
