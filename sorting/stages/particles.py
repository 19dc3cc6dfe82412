"""The particle: the segmentation settings that define one, and the one representation of
finished particles that the batch path and the belt share, from segmentation to the event log:
parallel arrays (:class:`Particles`), whose single entries are :class:`Particle` tuples."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from sorting.stages.concavity import GATE_DEPTH_SHARE


@dataclass(frozen=True)
class SegmentConfig:
    """Segmentation settings, in physical units.

    k_sigma : foreground when the matched two-channel attenuation exceeds this many
        standard deviations of the pixel's own air noise (``cal.air_sigma_a``).
    min_attenuation : absolute floor on that threshold (attenuation units).
    min_area_mm2 : components smaller than this are specks and dropped.
    split_touching : split touching rocks (watershed on the distance to the edge).
    split_depth_mm : a rock is split off its neighbour only if its distance-to-edge peak
        rises at least this far above the neck between them. A convex rock has a single
        peak (its distance function is concave), so only pixelization (< 1 px) competes.
    edge_ratio : expected A_low / A_high at a thin rock edge; sets the weights of the
        two channels in the matched detection statistic (rock-forming minerals: ~1.6-2.4).
    """

    k_sigma: float = 5.0
    min_attenuation: float = 0.05
    min_area_mm2: float = 15.0
    split_touching: bool = True
    split_depth_mm: float = 1.5
    edge_ratio: float = 2.0

    @property
    def gate_depth_mm(self) -> float:
        """The touching-rock gate's depth: a component goes to the watershed only with a
        concavity at least this deep (:data:`sorting.stages.concavity.GATE_DEPTH_SHARE`)."""
        return GATE_DEPTH_SHARE * self.split_depth_mm

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "split_touching" and not (np.isfinite(v) and v >= 0):
                raise ValueError(f"SegmentConfig.{f.name} must be finite and >= 0, got {v!r}")
        if self.edge_ratio <= 0 or self.split_depth_mm <= 0:
            raise ValueError("SegmentConfig.edge_ratio and split_depth_mm must be > 0")


def is_speck(area_px: float, px_area_mm2: float, min_area_mm2: float) -> bool:
    """A component too small to be a rock: the one speck rule of the batch path, the split
    and the stitcher (whose compiled emit runs this same function)."""
    return area_px * px_area_mm2 < min_area_mm2


def pixel_area_mm2(pixel_pitch_mm: float, line_pitch_mm: float) -> float:
    if not (pixel_pitch_mm > 0 and line_pitch_mm > 0):
        raise ValueError(f"pitches must be > 0, got pixel {pixel_pitch_mm!r}, line {line_pitch_mm!r} mm")
    return float(pixel_pitch_mm) * float(line_pitch_mm)


class Particle(NamedTuple):
    """One particle of a :class:`Particles` set (``particles[i]``), in absolute coordinates.

    line0..line1 : inclusive stream lines; col0..col1 : inclusive detector columns.
    mask : (line1 - line0 + 1, col1 - col0 + 1) bool, the particle's pixels in its box.
    area_px : its pixels. centroid_line, centroid_px : unweighted mask centroid (index units).
    cut : it may be incomplete: it touches the first line of the stream or the first line
        after a gap, or was still open at a gap or at the end of the stream.
    too_long : emitted after ``max_particle_lines`` without ending.
    touches_border : it reaches detector column 0 or P-1 (the belt edge may hide part).
    split : it was split off a touching neighbour.
    error : ``"stage: ExceptionType"`` when its own processing raised (it is then passed,
        never ejected); None on the normal path.
    """

    line0: int
    line1: int
    col0: int
    col1: int
    mask: np.ndarray
    area_px: int
    centroid_line: float
    centroid_px: float
    cut: bool = False
    too_long: bool = False
    touches_border: bool = False
    split: bool = False
    error: str | None = None


#: the per-particle arrays of :class:`Particles` and their dtypes
ARRAYS = {name: np.dtype(t) for name, t in (
    ("line0", np.int64), ("line1", np.int64), ("col0", np.int64), ("col1", np.int64), ("area_px", np.int64),
    ("centroid_line", np.float64), ("centroid_px", np.float64), ("cut", bool), ("too_long", bool),
    ("touches_border", bool), ("split", bool))}
_FLAGS = ("cut", "too_long", "touches_border", "split")


@dataclass(frozen=True, eq=False)
class Particles:
    """Finished particles as parallel arrays, one entry per particle: what segmentation gives
    (the belt's stitcher, a recording's particles, a component's pieces) and what planning,
    features and the event log read. The fields are those of :class:`Particle`; ``masks`` is
    a tuple of each particle's (height, width) bool mask in its box, ``errors`` a tuple of
    ``"stage: ExceptionType"`` or None per particle, or None when no particle failed.

    ``particles[i]`` is one :class:`Particle`; a slice, boolean mask or index array gives a new
    set. The constructor checks lengths, dtypes, boxes and mask shapes.
    """

    line0: np.ndarray
    line1: np.ndarray
    col0: np.ndarray
    col1: np.ndarray
    area_px: np.ndarray
    centroid_line: np.ndarray
    centroid_px: np.ndarray
    masks: tuple
    cut: np.ndarray | None = None
    too_long: np.ndarray | None = None
    touches_border: np.ndarray | None = None
    split: np.ndarray | None = None
    errors: tuple | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        masks = self.masks
        if type(masks) is not tuple:
            masks = tuple(masks)
            set_(self, "masks", masks)
        n = len(masks)
        for name, dtype in ARRAYS.items():
            v = getattr(self, name)
            if v is None:
                v = np.zeros(n, dtype)
            elif type(v) is not np.ndarray or (v.dtype is not dtype and v.dtype != dtype):
                v = np.asarray(v).astype(dtype, copy=False)
            if v.ndim != 1 or v.shape[0] != n:
                raise ValueError(f"Particles.{name} must have one entry per mask ({n}), got shape {v.shape}")
            set_(self, name, v)
        if self.errors is not None:
            set_(self, "errors", tuple(self.errors))
            if len(self.errors) != n:
                raise ValueError(f"Particles.errors must have one entry per mask ({n}), got {len(self.errors)}")
        if n == 0:
            return
        # (a chunk holds a handful of particles: Python scalars beat numpy reductions here)
        h = (self.line1 - self.line0 + 1).tolist()
        w = (self.col1 - self.col0 + 1).tolist()
        if min(h) < 1 or min(w) < 1:
            raise ValueError("Particles: a box ends before it starts (line1 < line0 or col1 < col0)")
        if min(self.area_px.tolist()) < 1:
            raise ValueError("Particles: area_px must be >= 1")
        boolean = ARRAYS["cut"]
        for i, (m, shape) in enumerate(zip(masks, zip(h, w))):
            if m.shape != shape or m.dtype != boolean:
                raise ValueError(f"Particles: mask {i} is {m.dtype} {m.shape}, its box is bool {shape}")

    @classmethod
    def unchecked(cls, arrays: dict, masks: tuple, errors: tuple | None = None) -> Particles:
        """A set whose arrays are known to be valid, made without the constructor's checks: a
        selection or concatenation of valid sets, or the stitcher's compiled output (whose
        invariants its tests check). ``arrays``: every name of :data:`ARRAYS`, 1-D arrays of
        that dtype, one entry per mask, owned by the set. Everything else goes through the
        checked constructor."""
        out = object.__new__(cls)
        out.__dict__.update(arrays, masks=masks, errors=errors)
        return out

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: Any) -> Particle | Particles:
        """An integer: that :class:`Particle`; a slice, boolean mask or index array: a new set."""
        if isinstance(index, (int, np.integer)):
            i = int(index)
            return Particle(int(self.line0[i]), int(self.line1[i]), int(self.col0[i]), int(self.col1[i]),
                            self.masks[i], int(self.area_px[i]), float(self.centroid_line[i]),
                            float(self.centroid_px[i]), bool(self.cut[i]), bool(self.too_long[i]),
                            bool(self.touches_border[i]), bool(self.split[i]),
                            None if self.errors is None else self.errors[i])
        at = np.arange(len(self))[index]
        picked = at.tolist()
        masks, errors = self.masks, self.errors
        return Particles.unchecked({name: getattr(self, name)[at] for name in ARRAYS},
                                  tuple(masks[i] for i in picked),
                                  None if errors is None else tuple(errors[i] for i in picked))

    def __iter__(self) -> Iterator[Particle]:
        return (self[i] for i in range(len(self)))

    @property
    def failed(self) -> bool:
        """Some particle's own processing raised (its ``errors`` entry is set)."""
        return self.errors is not None and any(e is not None for e in self.errors)

    @classmethod
    def empty(cls) -> Particles:
        return cls(**{name: np.zeros(0, dtype) for name, dtype in ARRAYS.items()}, masks=())

    @classmethod
    def from_rows(cls, rows: Sequence[Particle]) -> Particles:
        """A set from single particles (e.g. the pieces of components split one at a time)."""
        if not rows:
            return cls.empty()
        cols = list(zip(*rows))
        index = Particle._fields.index
        errors = cols[index("error")]
        return cls(**{name: np.array(cols[index(name)], dtype) for name, dtype in ARRAYS.items()},
                   masks=cols[index("mask")], errors=None if all(e is None for e in errors) else errors)

    @classmethod
    def concat(cls, parts: Sequence[Particles]) -> Particles:
        """The sets one after the other."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        errors = None
        if any(p.errors is not None for p in parts):
            errors = tuple(e for p in parts for e in (p.errors or (None,) * len(p)))
        return cls.unchecked({name: np.concatenate([getattr(p, name) for p in parts]) for name in ARRAYS},
                            tuple(m for p in parts for m in p.masks), errors)
