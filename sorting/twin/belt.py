"""A belt of rocks streaming through the scan line (``xrt-belt/1`` with ``truth.csv``).

Rocks are placed one after another along the belt at a rate that gives the asked
occupancy (share of belt area covered), never overlapping in projection; a share of
them is pushed against the previous rock until they touch. On a crowded belt a rock that
finds no random place settles at the first free line of a column, as a dense feed does. Rendering runs through a
rolling buffer of lines, so a recording of any length is written chunk by chunk in
bounded memory.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sorting.config import MachineConfig, OreConfig
from sorting.errors import ParameterError
from sorting.io import BeltRecordingWriter
from sorting.io.tables import write_csv
from sorting.physics import MaterialLibrary
from sorting.twin.objects import (
    OBJECT_COLUMNS,
    STEEL,
    BeltObject,
    bolt,
    lacing,
    plate,
    slab,
)
from sorting.twin.ore import densities, mineral_list
from sorting.twin.render import Renderer
from sorting.twin.rocks import SimulatedRock, make_rock

LEAD_IN_LINES = 128  # empty belt at the start: lets a streaming loop see air first
#: drift of the high channel's signal per unit drift of the low channel's: tube output and
#: detector gain drift move the two layers differently (harder beam, the back layer's own gain)
DRIFT_HIGH_SHARE = 0.7
GAP_PX = 2  # free pixels kept around a rock that is not meant to touch
EXTRA_TRUTH = ("lithotype", "size_mm", "area_mm2", "touching")


@dataclass
class _Placed:
    rock: SimulatedRock
    line0: int
    col0: int
    touching: bool = False


class _Occupancy:
    """Rolling label image of the placed rocks (lines base .. base+n)."""

    def __init__(self, lines: int, pixels: int):
        self.base = 0
        self.grid = np.zeros((lines, pixels), np.uint8)
        self._grown: tuple[np.ndarray, int, np.ndarray] | None = None  # (mask, gap, grown mask)

    def _grow(self, mask: np.ndarray, gap: int) -> np.ndarray:
        # a rock tries many places: grow its mask once, not at every try
        if self._grown is None or self._grown[0] is not mask or self._grown[1] != gap:
            m = mask.view(np.uint8)
            if gap:
                m = cv2.dilate(np.pad(m, gap), np.ones((2 * gap + 1, 2 * gap + 1), np.uint8))
            self._grown = (mask, gap, m)
        return self._grown[2]

    def free(self, mask: np.ndarray, line0: int, col0: int, gap: int) -> bool:
        h, w = mask.shape
        r0, c0 = line0 - self.base - gap, col0 - gap
        if r0 < 0 or c0 < 0 or c0 + w + 2 * gap > self.grid.shape[1] or r0 + h + 2 * gap > self.grid.shape[0]:
            return False
        window = self.grid[r0:r0 + h + 2 * gap, c0:c0 + w + 2 * gap]
        return not np.any(window & self._grow(mask, gap))

    def first_free(self, mask: np.ndarray, lo: int, hi: int, col0: int, gap: int) -> int | None:
        """The first line in ``lo .. hi - 1`` where the rock fits at ``col0``, or None."""
        h, w = mask.shape
        c0 = col0 - gap
        if c0 < 0 or c0 + w + 2 * gap > self.grid.shape[1]:
            return None
        grown = self._grow(mask, gap)
        # lines where the window's columns hold no rock at all: skip the 2-D test there
        busy = self.grid[:, c0:c0 + w + 2 * gap].any(axis=1)
        for line0 in range(max(lo, self.base + gap), hi):
            r0 = line0 - self.base - gap
            if r0 + h + 2 * gap > self.grid.shape[0]:
                return None
            if not busy[r0:r0 + h + 2 * gap].any() or not np.any(self.grid[r0:r0 + h + 2 * gap,
                                                                          c0:c0 + w + 2 * gap] & grown):
                return line0
        return None

    def mark(self, mask: np.ndarray, line0: int, col0: int) -> None:
        h, w = mask.shape
        self.grid[line0 - self.base:line0 - self.base + h, col0:col0 + w] |= mask.view(np.uint8)

    def advance(self, to_line: int) -> None:
        k = to_line - self.base
        if k <= 0:
            return
        self.grid[:-k] = self.grid[k:].copy() if k < self.grid.shape[0] else 0
        self.grid[-k:] = 0
        self.base = to_line


def _truth_row(i: int, pl: _Placed, machine: MachineConfig) -> dict:
    mask = pl.rock.image.mask
    rows, cols = np.nonzero(mask)
    px_area = machine.line_pitch_mm * machine.detector.pixel_pitch_mm
    return {
        "rock_id": f"{i + 1:06d}",
        "first_line": pl.line0 + int(rows.min()),
        "last_line": pl.line0 + int(rows.max()),
        "x_min_px": pl.col0 + int(cols.min()),
        "x_max_px": pl.col0 + int(cols.max()),
        "centroid_line": round(pl.line0 + float(rows.mean()), 3),
        "centroid_px": round(pl.col0 + float(cols.mean()), 3),
        "label": pl.rock.label,
        "sc2o3_ppm": round(pl.rock.sc2o3_ppm, 2),
        "mass_g": round(pl.rock.mass_g, 3),
        "lithotype": pl.rock.lithotype,
        "size_mm": round(pl.rock.image.size_mm, 1),
        "area_mm2": round(rows.size * px_area, 1),
        "touching": int(pl.touching),
    }


def _make_rock(ore, machine, rho, seed_seq) -> SimulatedRock:
    return make_rock(ore, machine, rho, np.random.default_rng(seed_seq))


def _make_batch(make, seeds) -> list[SimulatedRock]:
    return [make(s) for s in seeds]


class BeltTwin:
    """A belt of ore streaming past the detector, generated on the fly.

    ``chunks()`` yields ``(first_line, lines)`` blocks of raw counts, (L, P, 2) uint16,
    in order; ``truth`` fills as rocks are placed. Same seed, same bytes.

    Objects other than ore (:mod:`sorting.twin.objects`): a belt splice every
    ``splice_every_s`` seconds (0: none), ``tramp`` pieces of tramp steel and ``slabs`` slabs
    ``slab_mm`` long, listed in ``objects``. They lie on top of the same rocks as the belt
    without them (same seed), and their pixels get their own noise: every pixel outside an
    object reads the same counts as on the clean belt.
    """

    def __init__(self, seconds: float, seed: int, machine: MachineConfig, ore: OreConfig,
                 library: MaterialLibrary, occupancy: float = 0.3, touching: float = 0.0,
                 block_lines: int = 2048, workers: int | None = None, drift: float = 0.0,
                 splice_every_s: float = 0.0, tramp: int = 0, slabs: int = 0, slab_mm: float = 700.0):
        if not -0.5 < drift < 0.5:
            raise ParameterError("drift", f"must be in (-0.5, 0.5), got {drift}")
        if not 0.0 < occupancy < 0.8:
            raise ParameterError("occupancy", f"must be in (0, 0.8), got {occupancy}")
        if not 0.0 <= touching <= 1.0:
            raise ParameterError("touching", f"must be in [0, 1], got {touching}")
        if not seconds > 0:
            raise ParameterError("seconds", f"must be positive, got {seconds}")
        if not (splice_every_s == 0 or 0.05 <= splice_every_s < 1e6):
            raise ParameterError("splice_every_s", f"must be 0 (no splice) or at least 0.05 s, got {splice_every_s}")
        if not 0 <= tramp <= 10_000:
            raise ParameterError("tramp", f"must be in 0..10000, got {tramp}")
        if not 0 <= slabs <= 1000:
            raise ParameterError("slabs", f"must be in 0..1000, got {slabs}")
        if not 50.0 <= slab_mm <= 5000.0:
            raise ParameterError("slab_mm", f"must be in 50..5000 mm, got {slab_mm}")
        self.machine, self.ore = machine, ore
        self.occupancy, self.touching = occupancy, touching
        self.drift = float(drift)
        self.block_lines = block_lines
        # worker processes pay off only for longer belts
        self.workers = workers if workers is not None else (min(os.cpu_count() or 1, 4) if seconds >= 4 else 1)
        minerals = mineral_list(ore)
        self.renderer = Renderer.create(machine, library, minerals)
        self.rho = densities(minerals, library)
        self.n_lines = int(round(seconds * machine.belt.line_rate_hz))
        root = np.random.SeedSequence(seed)
        self._cal_seq, self._place_seq, self._noise_seq, self._rock_seq = root.spawn(4)
        # objects draw from a fifth stream: the rocks and their noise stay those of the clean belt
        shape_seq, self._object_noise_seq = root.spawn(1)[0].spawn(2)
        self.mu_steel = np.vstack([self.renderer.mu, library.mu_per_mm(
            [STEEL], self.renderer.response.energies_kev).astype(np.float32)])
        self._object_rng = np.random.default_rng(shape_seq)
        self.objects: list[BeltObject] = []  # placed, in the order they were placed
        self._pending: list[tuple[int, str, str, np.ndarray]] = []  # (target line, kind, shape, paths)
        self._draw_objects(splice_every_s, tramp, slabs, slab_mm)
        self.truth: list[dict] = []
        self.covered_px = 0
        self.meta = {
            "detector_pixels": machine.detector.pixels,
            "pixel_pitch_mm": machine.detector.pixel_pitch_mm,
            "line_rate_hz": machine.belt.line_rate_hz,
            "belt_speed_m_s": machine.belt.speed_m_s,
            "channels": ["low", "high"],
            "simulated": True,
            "machine": machine.name,
            "ore": ore.name,
            "seed": seed,
            "occupancy_target": occupancy,
            "touching_target": touching,
            "label_cutoff_ppm": ore.label_cutoff_ppm,
            "tube_kvp": machine.tube.kvp,
        }
        if self.drift:
            self.meta["drift"] = self.drift
        if splice_every_s or tramp or slabs:
            self.meta.update(splice_every_s=splice_every_s, tramp_target=tramp, slabs_target=slabs, slab_mm=slab_mm)

    @property
    def object_rows(self) -> list[dict]:
        """The objects placed so far, as rows of ``objects.csv`` (by first line)."""
        placed = sorted(self.objects, key=lambda o: (o.line0, o.col0))
        return [o.truth_row(i, self.machine) for i, o in enumerate(placed)]

    def _draw_objects(self, splice_every_s: float, tramp: int, slabs: int, slab_mm: float) -> None:
        """Splices at their period from a random phase, and slabs at random places 8 lines and
        columns clear of each other: both lie over the rocks (placed now). Tramp is drawn now
        with a random target line and laid into free belt later (:meth:`_settle`), where the
        rocks are already final, so the rocks stay those of the belt without it."""
        machine, n_lines, rng = self.machine, self.n_lines, self._object_rng
        m = len(self.renderer.minerals)
        tail = LEAD_IN_LINES // 4
        if splice_every_s > 0:
            band = lacing(machine, m, rng)
            period = max(int(round(splice_every_s * machine.belt.line_rate_hz)), band.shape[0] + 1)
            line = LEAD_IN_LINES + int(rng.integers(0, period))
            while line + band.shape[0] + tail <= n_lines:
                self.objects.append(BeltObject("splice", "lacing", line, 0, band))
                line += period
        p = machine.detector.pixels
        for _ in range(slabs):
            paths = slab(machine, self.ore, rng, slab_mm)
            h, w = paths.shape[:2]
            for _ in range(200 if w <= p and n_lines - h - tail > LEAD_IN_LINES else 0):
                line0 = int(rng.integers(LEAD_IN_LINES, n_lines - h - tail))
                col0 = int(rng.integers(0, p - w + 1))
                if not any(_near(o, line0, col0, h, w, 8) for o in self.objects):
                    self.objects.append(BeltObject("slab", "slab", line0, col0, paths))
                    break
        for _ in range(tramp):
            shape = "plate" if rng.random() < 0.5 else "bolt"
            paths = (plate if shape == "plate" else bolt)(machine, m, rng)
            if paths.shape[1] <= p:
                target = int(rng.integers(LEAD_IN_LINES, max(n_lines - paths.shape[0] - tail, LEAD_IN_LINES + 1)))
                self._pending.append((target, "tramp", shape, paths))
        self._pending.sort(key=lambda t: t[0])

    def _settle(self, occ: _Occupancy, written: int, upto: int) -> None:
        """Lay the pending slabs and tramp whose target line has come into free belt of lines
        ``written .. upto - 1`` (final: no rock is placed there any more), ``GAP_PX`` clear of
        rocks and objects and 8 lines clear of splices; one that finds no place waits for the
        next block."""
        rng, p = self._object_rng, self.machine.detector.pixels
        tail = LEAD_IN_LINES // 4
        still = []
        for target, kind, shape, paths in self._pending:
            fp = paths.sum(axis=2) > 0
            h, w = fp.shape
            lo, hi = max(target, written), min(upto, self.n_lines - tail) - h
            placed = None
            for line0 in range(lo, hi + 1, 8):
                if any(o.kind == "splice" and line0 - 8 < o.line1 and o.line0 < line0 + h + 8 for o in self.objects):
                    continue
                for _ in range(6):
                    col0 = int(rng.integers(0, p - w + 1))
                    if occ.free(fp, line0, col0, GAP_PX) and not any(
                            o.kind == "slab" and _near(o, line0, col0, h, w, GAP_PX) for o in self.objects):
                        placed = BeltObject(kind, shape, line0, col0, paths)
                        break
                if placed is not None:
                    break
            if placed is None:
                if hi + h < self.n_lines - tail:  # the belt goes on: try the next block
                    still.append((max(target, upto - h), kind, shape, paths))
                continue
            occ.mark(fp, placed.line0, placed.col0)
            self.objects.append(placed)
        self._pending = still

    def _overlay(self, block: np.ndarray, first: int, mean: np.ndarray, var: np.ndarray,
                 rng: np.random.Generator) -> None:
        """Render the objects' pixels of ``block`` (lines ``first ..``, raw counts, in place):
        steel and slab paths plus the paths of the rocks in their boxes, through the same
        spectral integral; ``mean``, ``var`` are the block's clean (drifted) signal, kept
        around the objects' pixels; the noise comes from ``rng`` (the objects' own stream)."""
        n = block.shape[0]
        for obj in self.objects:
            if obj.line1 <= first or obj.line0 >= first + n:
                continue
            r0, r1 = max(first, obj.line0), min(first + n, obj.line1)
            if r0 >= r1:
                continue
            paths = obj.paths_mm[r0 - obj.line0:r1 - obj.line0]
            fp = paths.sum(axis=2) > 0
            if not fp.any():
                continue
            total = paths[fp]
            if obj.rocks_mm is not None:
                total = total.copy()
                total[:, :-1] += obj.rocks_mm[r0 - obj.line0:r1 - obj.line0][fp]
            m_fp, v_fp = self.renderer.signal(total, self.mu_steel)
            if self.drift:
                g = drift_factors(r0, r1 - r0, self.n_lines, self.drift)
                rows = np.nonzero(fp)[0]
                m_fp, v_fp = m_fp * g[rows, 0], v_fp * g[rows, 0]
            c0, c1 = obj.col0, obj.col0 + obj.width
            m = mean[r0 - first:r1 - first, c0:c1].copy()
            v = var[r0 - first:r1 - first, c0:c1].copy()
            m[fp], v[fp] = m_fp, v_fp
            counts = self.renderer.counts(m, v, c0, rng)
            block[r0 - first:r1 - first, c0:c1][fp] = counts[fp]

    def _rocks(self):
        """Rocks in seed order; made by worker processes when there are spare cores (same rocks either way)."""
        make = partial(_make_rock, self.ore, self.machine, self.rho)
        if self.workers <= 1:
            while True:
                yield make(self._rock_seq.spawn(1)[0])
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(self.workers, mp_context=ctx) as pool:
            ahead = deque()
            while True:
                while len(ahead) < 4:
                    ahead.append(pool.submit(_make_batch, make, self._rock_seq.spawn(32)))
                yield from ahead.popleft().result()

    def calibration_scans(self):
        return self.renderer.calibration_scans(np.random.default_rng(self._cal_seq))

    def chunks(self):
        # the small matrix products of the renderer run on one BLAS thread: with rock-making
        # worker processes on the other cores, a multi-threaded BLAS spins and runs 30x slower
        with threadpool_limits(limits=1, user_api="blas"):
            yield from self._chunks()

    def _chunks(self):
        machine, ore, renderer = self.machine, self.ore, self.renderer
        p = machine.detector.pixels
        n_lines = self.n_lines
        place_rng = np.random.default_rng(self._place_seq)
        noise_rng = np.random.default_rng(self._noise_seq)
        max_len = int(np.ceil(ore.size_max_mm * 1.05 / min(machine.line_pitch_mm, machine.detector.pixel_pitch_mm))) + 4
        # room for a block waiting to be flushed plus the placement window ahead of the cursor
        buf_lines = self.block_lines + 6 * max_len
        occ = _Occupancy(buf_lines, p)
        mean, var = renderer.blank(buf_lines, p)
        air_mean, air_var = renderer.air_mean, renderer.air_var
        truth = self.truth
        written = 0
        cursor = float(LEAD_IN_LINES)
        prev: _Placed | None = None
        object_rng = np.random.default_rng(self._object_noise_seq)

        def flush(upto: int):
            nonlocal written
            k = upto - written
            if k <= 0:
                return None
            if self._pending:
                self._settle(occ, written, upto)
            m, v = mean[:k], var[:k]
            if self.drift:
                m, v = _drifted(m, v, written, n_lines, self.drift)
            block = renderer.counts(m, v, 0, noise_rng)
            if self.objects:
                self._overlay(block, written, m, v, object_rng)
            mean[:-k] = mean[k:].copy()
            var[:-k] = var[k:].copy()
            mean[-k:] = air_mean
            var[-k:] = air_var
            first, written = written, upto
            occ.advance(upto)
            return first, block

        rocks = self._rocks()
        rock = None
        while cursor < n_lines:
            if rock is None:
                rock = next(rocks)
            mask = rock.image.mask
            h, w = mask.shape
            placed = None
            if prev is not None and place_rng.random() < self.touching:
                at = _touch(prev, mask, occ, place_rng, p)
                placed = _Placed(rock, at[0], at[1], touching=True) if at and at[0] >= written else None
            if placed is None:
                for _ in range(30):
                    # centres spread over a window ahead of the cursor, so rocks do not queue on one line
                    line0 = int(cursor + 2 * max_len * place_rng.random()) - h // 2
                    col0 = int(place_rng.integers(0, max(p - w, 0) + 1))
                    if line0 >= written and occ.free(mask, line0, col0, GAP_PX):
                        placed = _Placed(rock, line0, col0)
                        break
                else:
                    # a crowded feed: the rock settles at the first free line of a column near the
                    # cursor, filling holes that random tries miss (dense belts reach ~0.6 cover)
                    col0 = int(place_rng.integers(0, max(p - w, 0) + 1))
                    line0 = occ.first_free(mask, max(written, int(cursor) - max_len), int(cursor) + 2 * max_len,
                                           col0, GAP_PX)
                    placed = None if line0 is None else _Placed(rock, line0, col0)
            if placed is None or placed.line0 + h + LEAD_IN_LINES // 4 > n_lines:
                cursor += 4  # jammed: move on along the belt and try the same rock again
                continue
            rock = None
            occ.mark(mask, placed.line0, placed.col0)
            r, c = np.nonzero(mask)
            m, v = renderer.signal(placed.rock.image.paths_mm[mask])
            rr, cc = r + placed.line0 - written, c + placed.col0
            mean[rr, cc] = m
            var[rr, cc] = v
            for obj in self.objects:
                if obj.line0 < placed.line0 + h and placed.line0 < obj.line1:
                    obj.add_rock(placed.rock.image.paths_mm, mask, placed.line0, placed.col0)
            if placed.touching:
                truth[-1]["touching"] = 1
            truth.append(_truth_row(len(truth), placed, machine))
            self.covered_px += r.size
            # advance by the belt length this rock's area takes at the asked occupancy
            cursor += place_rng.exponential(r.size / (self.occupancy * p))
            prev = placed
            target = min(max(int(cursor) - 2 * max_len, written), n_lines)
            while target - written >= self.block_lines:
                yield flush(written + self.block_lines)
        while written < n_lines:
            yield flush(min(written + self.block_lines, n_lines))
        self.meta.update(rocks=len(truth), occupancy=round(self.covered_px / (n_lines * p), 4))
        if "splice_every_s" in self.meta:
            kinds = [o.kind for o in self.objects]
            self.meta.update(splices=kinds.count("splice"), tramp=kinds.count("tramp"), slabs=kinds.count("slab"))


def _near(obj: BeltObject, line0: int, col0: int, h: int, w: int, gap: int) -> bool:
    """Whether the box ``line0, col0, h, w`` comes within ``gap`` lines and columns of ``obj``'s box."""
    return (line0 < obj.line1 + gap and obj.line0 < line0 + h + gap
            and col0 < obj.col0 + obj.width + gap and obj.col0 < col0 + w + gap)


def drift_factors(first_line: int, n: int, n_lines: int, drift: float) -> np.ndarray:
    """(n, 1, 2) float32 factors on the mean signal above dark of lines ``first_line ..``:
    linear in stream time from 1 at line 0 to ``(1 + drift, 1 + DRIFT_HIGH_SHARE * drift)``
    (low, high) at the last line ``n_lines - 1``."""
    f = (first_line + np.arange(n, dtype=np.float64)) / max(n_lines - 1, 1)
    per_channel = np.array([1.0, DRIFT_HIGH_SHARE])
    return (1.0 + drift * f[:, None, None] * per_channel).astype(np.float32)


def _drifted(mean: np.ndarray, var: np.ndarray, first_line: int, n_lines: int,
             drift: float) -> tuple[np.ndarray, np.ndarray]:
    """Tube output and gain drift on a block (new arrays): the mean scales by the factor, and
    so does the variance, as when the photon flux changes (equivalent quanta scale with it)."""
    g = drift_factors(first_line, mean.shape[0], n_lines, drift)
    return mean * g, var * g


def simulate_belt(out: Path, seconds: float, seed: int, machine: MachineConfig, ore: OreConfig,
                  library: MaterialLibrary, occupancy: float = 0.3, touching: float = 0.0,
                  progress: bool = True, drift: float = 0.0, splice_every_s: float = 0.0, tramp: int = 0,
                  slabs: int = 0, slab_mm: float = 700.0) -> Path:
    """Write an ``xrt-belt/1`` recording with ``truth.csv`` (chunk by chunk, bounded memory).
    ``drift``: relative change of the air level over the run (see :func:`drift_factors`).
    Splices, tramp metal and slabs (see :class:`BeltTwin`) are listed in ``objects.csv``."""
    twin = BeltTwin(seconds, seed, machine, ore, library, occupancy, touching, drift=drift,
                    splice_every_s=splice_every_s, tramp=tramp, slabs=slabs, slab_mm=slab_mm)
    bar_off = None if progress else True  # None: tqdm shows the bar on a terminal only
    with tqdm(total=twin.n_lines, desc="belt", unit="line", unit_scale=True, disable=bar_off) as bar, \
            BeltRecordingWriter(out, twin.meta, twin.calibration_scans(), truth_columns=EXTRA_TRUTH) as writer:
        for _, block in twin.chunks():
            writer.append(block)
            bar.update(block.shape[0])
        late = ('rocks', 'occupancy', 'splices', 'tramp', 'slabs')  # known only at the end
        writer.close(twin.truth, extra_meta={k: twin.meta[k] for k in late if k in twin.meta})
    if twin.objects:
        write_csv(Path(out) / "objects.csv", OBJECT_COLUMNS, twin.object_rows)
    return out


def _touch(prev: _Placed, mask: np.ndarray, occ: _Occupancy, rng: np.random.Generator,
           p: int) -> tuple[int, int] | None:
    """Slide a new rock from the previous rock's centre outward until it no longer overlaps:
    at that position the two touch (no gap in projection). Returns (line0, col0) or None."""
    pm = prev.rock.image.mask
    cy = prev.line0 + pm.shape[0] / 2
    cx = prev.col0 + pm.shape[1] / 2
    h, w = mask.shape
    angle = rng.uniform(0, np.pi)  # downstream half-plane: lines already written stay untouched
    dy, dx = np.sin(angle), np.cos(angle)
    for step in range(0, 2 * (max(pm.shape) + max(h, w))):
        line0 = int(round(cy + dy * step - h / 2))
        col0 = int(round(cx + dx * step - w / 2))
        if line0 < occ.base or col0 < 0 or col0 + w > p:
            return None
        if occ.free(mask, line0, col0, 0):
            # it touches only if a one-pixel dilation meets a rock; otherwise it slid past one
            return None if occ.free(mask, line0, col0, 1) else (line0, col0)
    return None
