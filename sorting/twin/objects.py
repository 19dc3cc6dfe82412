"""What real belts carry besides ore: belt splices, tramp metal and slabs.

Each object is a map of path lengths on the (line, pixel) grid of its bounding box, in the
ore's minerals followed by one steel column (iron), so rocks lying on or under it add
their own paths and the sum goes through the same spectral integral (Beer-Lambert: path
lengths add). Thicknesses are chords at pixel centres, as for rocks.

``splice``
    mechanical lacing across the whole belt width, belt edges included: a band of steel
    plates (top and bottom of the belt, 1-3 mm of steel in all) with slightly thinner
    joins between the clips, and the hinge pin (a 2-4 mm steel rod) along its middle.
    The same splice comes by once per belt revolution.
``tramp``
    a steel plate (10-20 mm thick) or a bolt (a 10-20 mm steel rod with a head): the
    detector is starved behind it.
``slab``
    a slab of ore rock longer than the loop's particle limit (700 mm by default), lying
    along the belt, 25-50 mm thick with bevelled edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sorting.config import MachineConfig, OreConfig
from sorting.twin.ore import sample_composition

#: the material of splices and tramp metal (must be in the material library)
STEEL = "iron"
OBJECT_COLUMNS = ("object_id", "kind", "shape", "first_line", "last_line", "x_min_px", "x_max_px",
                  "steel_mm", "thickness_mm", "length_mm", "width_mm")


@dataclass
class BeltObject:
    """One object on the belt.

    paths_mm : (h, w, M + 1) float32, path length through each of the ore's M minerals and,
        last, through steel (may be shared between objects: the same splice every revolution).
    rocks_mm : (h, w, M) float32 or None: paths of the rocks lying in its box, added as the
        rocks are placed (the object's pixels are rendered with them).
    """

    kind: str
    shape: str
    line0: int
    col0: int
    paths_mm: np.ndarray
    rocks_mm: np.ndarray | None = None

    @property
    def height(self) -> int:
        return self.paths_mm.shape[0]

    @property
    def width(self) -> int:
        return self.paths_mm.shape[1]

    @property
    def line1(self) -> int:
        """One past its last line."""
        return self.line0 + self.height

    def footprint(self) -> np.ndarray:
        return self.paths_mm.sum(axis=2) > 0

    def add_rock(self, paths_mm: np.ndarray, mask: np.ndarray, line0: int, col0: int) -> None:
        """A rock (paths (h, w, M), mask) at ``line0, col0`` adds its paths where it meets this box."""
        h, w = mask.shape
        r0, r1 = max(line0, self.line0), min(line0 + h, self.line1)
        c0, c1 = max(col0, self.col0), min(col0 + w, self.col0 + self.width)
        if r0 >= r1 or c0 >= c1:
            return
        if self.rocks_mm is None:
            self.rocks_mm = np.zeros((self.height, self.width, self.paths_mm.shape[2] - 1), np.float32)
        sub = paths_mm[r0 - line0:r1 - line0, c0 - col0:c1 - col0]
        self.rocks_mm[r0 - self.line0:r1 - self.line0, c0 - self.col0:c1 - self.col0] += sub

    def truth_row(self, i: int, machine: MachineConfig) -> dict:
        fp = self.footprint()
        rows, cols = np.nonzero(fp)
        total = self.paths_mm.sum(axis=2)
        return {
            "object_id": f"o{i + 1:04d}",
            "kind": self.kind,
            "shape": self.shape,
            "first_line": self.line0 + int(rows.min()),
            "last_line": self.line0 + int(rows.max()),
            "x_min_px": self.col0 + int(cols.min()),
            "x_max_px": self.col0 + int(cols.max()),
            "steel_mm": round(float(self.paths_mm[..., -1].max()), 2),
            "thickness_mm": round(float(total.max()), 2),
            "length_mm": round((int(rows.max()) - int(rows.min()) + 1) * machine.line_pitch_mm, 1),
            "width_mm": round((int(cols.max()) - int(cols.min()) + 1) * machine.detector.pixel_pitch_mm, 1),
        }


def _grid(half_len_mm: float, half_wid_mm: float, line_pitch_mm: float,
          pixel_pitch_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (mm, along and across the belt) of a box centred on 0."""
    ys = np.arange(-half_len_mm, half_len_mm + 1e-9, line_pitch_mm)
    xs = np.arange(-half_wid_mm, half_wid_mm + 1e-9, pixel_pitch_mm)
    return np.meshgrid(ys, xs, indexing="ij")


def _tight(t: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(t.any(axis=1))
    cols = np.flatnonzero(t.any(axis=0))
    return t[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _with_steel(steel_mm: np.ndarray, n_minerals: int) -> np.ndarray:
    paths = np.zeros(steel_mm.shape + (n_minerals + 1,), np.float32)
    paths[..., -1] = steel_mm
    return paths


def lacing(machine: MachineConfig, n_minerals: int, rng: np.random.Generator) -> np.ndarray:
    """Paths (h, P, M + 1) of one belt splice across the whole detector width."""
    lp, pp, p = machine.line_pitch_mm, machine.detector.pixel_pitch_mm, machine.detector.pixels
    length_mm = rng.uniform(4.0, 30.0)
    plate_mm = rng.uniform(1.0, 3.0)  # top and bottom plates together
    clip_mm = rng.uniform(15.0, 30.0)
    joint = 0.15  # share of a clip's pitch at the thinner joint between clips
    pin_r = rng.uniform(1.0, 2.0)
    ys = (np.arange(int(np.ceil(length_mm / lp))) + 0.5) * lp
    xs = (np.arange(p) + 0.5) * pp
    phase = rng.uniform(0.0, clip_mm)
    across = np.where(((xs + phase) % clip_mm) < joint * clip_mm, 0.7, 1.0)
    steel = plate_mm * np.broadcast_to(across, (ys.size, p))
    dy = ys - ys.mean()
    pin = 2.0 * np.sqrt(np.clip(pin_r ** 2 - dy ** 2, 0.0, None))
    steel = steel + pin[:, None]
    return _with_steel(steel.astype(np.float32), n_minerals)


def plate(machine: MachineConfig, n_minerals: int, rng: np.random.Generator) -> np.ndarray:
    """A steel plate 10-20 mm thick, 30-120 mm on a side, at a random angle."""
    a = rng.uniform(30.0, 120.0)
    b = rng.uniform(30.0, a)
    t = rng.uniform(10.0, 20.0)
    theta = rng.uniform(0, np.pi)
    half = 0.5 * np.hypot(a, b) + 1.0
    yy, xx = _grid(half, half, machine.line_pitch_mm, machine.detector.pixel_pitch_mm)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    steel = np.where((np.abs(u) <= a / 2) & (np.abs(v) <= b / 2), t, 0.0)
    return _with_steel(_tight(steel).astype(np.float32), n_minerals)


def bolt(machine: MachineConfig, n_minerals: int, rng: np.random.Generator) -> np.ndarray:
    """A steel bolt lying on the belt: a rod 10-20 mm across, 3-8 diameters long, with a head."""
    d = rng.uniform(10.0, 20.0)
    length = min(rng.uniform(3.0, 8.0) * d, 150.0)
    head_r, head_len = 0.7 * d, 0.65 * d
    theta = rng.uniform(0, np.pi)
    half = 0.5 * length + head_len + d
    yy, xx = _grid(half, half, machine.line_pitch_mm, machine.detector.pixel_pitch_mm)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    shank = np.where(np.abs(u) <= length / 2, 2.0 * np.sqrt(np.clip((d / 2) ** 2 - v ** 2, 0, None)), 0.0)
    in_head = (u > length / 2) & (u <= length / 2 + head_len)
    head = np.where(in_head, 2.0 * np.sqrt(np.clip(head_r ** 2 - v ** 2, 0, None)), 0.0)
    steel = np.maximum(shank, head)
    steel[steel < 0.3] = 0.0
    return _with_steel(_tight(steel).astype(np.float32), n_minerals)


def slab(machine: MachineConfig, ore: OreConfig, rng: np.random.Generator, length_mm: float = 700.0) -> np.ndarray:
    """A slab of ore rock lying along the belt: ``length_mm`` long, 120-250 mm wide, 25-50 mm
    thick with 10 mm bevels, turned up to 5 degrees off the belt's axis."""
    comp = sample_composition(ore, rng)
    width = rng.uniform(120.0, 250.0)
    thick = rng.uniform(25.0, 50.0)
    bevel = 10.0
    theta = np.deg2rad(rng.uniform(-5.0, 5.0))
    half_len = 0.5 * (length_mm * abs(np.cos(theta)) + width * abs(np.sin(theta))) + 1.0
    half_wid = 0.5 * (length_mm * abs(np.sin(theta)) + width * abs(np.cos(theta))) + 1.0
    yy, xx = _grid(half_len, half_wid, machine.line_pitch_mm, machine.detector.pixel_pitch_mm)
    along = yy * np.cos(theta) + xx * np.sin(theta)
    across = -yy * np.sin(theta) + xx * np.cos(theta)
    edge = np.minimum(length_mm / 2 - np.abs(along), width / 2 - np.abs(across))
    t = np.where(edge > 0, thick * np.clip(edge / bevel, 0.2, 1.0), 0.0)
    t = _tight(t).astype(np.float32)
    paths = np.zeros(t.shape + (comp.volume_fraction.size + 1,), np.float32)
    paths[..., :-1] = t[..., None] * comp.volume_fraction.astype(np.float32)
    return paths
