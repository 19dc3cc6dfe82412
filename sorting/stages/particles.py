"""The particle: the segmentation settings that define one, and its two representations
(a finished particle of the stream with its mask, and parallel arrays of many)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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


@dataclass(frozen=True)
class Completed:
    """One finished particle of the stream, in absolute coordinates.

    line0..line1 : inclusive stream lines; col0..col1 : inclusive detector columns.
    mask : (line1 - line0 + 1, col1 - col0 + 1) bool, the particle's pixels in its box.
    centroid_line, centroid_px : unweighted mask centroid (line / column index units).
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


_PARTICLE_DTYPES = {"line0": np.int64, "line1": np.int64, "col0": np.int64, "col1": np.int64,
                    "area_px": np.int64, "centroid_line": np.float64, "centroid_px": np.float64,
                    "touches_border": bool}


@dataclass(frozen=True)
class Particles:
    """Parallel arrays, one entry per particle (inclusive boxes, frame coordinates)."""

    line0: np.ndarray
    line1: np.ndarray
    col0: np.ndarray
    col1: np.ndarray
    area_px: np.ndarray
    centroid_line: np.ndarray
    centroid_px: np.ndarray
    touches_border: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for name, dtype in _PARTICLE_DTYPES.items():
            v = np.asarray(getattr(self, name))
            if v.ndim != 1:
                raise ValueError(f"Particles.{name} must be 1-D, got shape {v.shape}")
            if n is not None and v.shape[0] != n:
                raise ValueError(f"Particles.{name} has {v.shape[0]} entries, line0 has {n}")
            n = v.shape[0]
            object.__setattr__(self, name, v.astype(dtype, copy=False))
        if np.any(self.line1 < self.line0) or np.any(self.col1 < self.col0):
            raise ValueError("Particles: a box ends before it starts (line1 < line0 or col1 < col0)")
        if np.any(self.area_px < 1):
            raise ValueError("Particles: area_px must be >= 1")

    def __len__(self) -> int:
        return int(self.line0.shape[0])

    def __getitem__(self, index: Any) -> Particles:
        """Boolean mask, index array or slice -> a new Particles."""
        if isinstance(index, (int, np.integer)):
            index = [index]
        return Particles(**{name: getattr(self, name)[index] for name in _PARTICLE_DTYPES})

    @classmethod
    def empty(cls) -> Particles:
        return cls(**{name: np.zeros(0, dtype) for name, dtype in _PARTICLE_DTYPES.items()})

    @classmethod
    def from_completed(cls, items: list[Completed]) -> Particles:
        if not items:
            return cls.empty()
        return cls(**{name: np.array([getattr(c, name) for c in items]) for name in _PARTICLE_DTYPES})
