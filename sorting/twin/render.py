"""From mineral path lengths to raw detector counts: the twin's X-ray rendering.

Only rock pixels go through the spectral integral (docs/physics.md): empty belt
is the air level, known in closed form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sorting.config import MachineConfig
from sorting.io import CalibrationScans, WedgeScan
from sorting.physics import MaterialLibrary
from sorting.twin.detector import (
    DetectorResponse,
    PixelPattern,
    build_response,
    pixel_pattern,
    sample_counts,
)

#: the crossed wedge grid (docs/formats.md: POM 0-250 mm, Fe 0-12 mm)
WEDGE_POM_MM = (0.0, 10.0, 20.0, 35.0, 50.0, 70.0, 90.0, 120.0, 150.0, 200.0, 250.0)
WEDGE_FE_MM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0)


@dataclass(frozen=True)
class Renderer:
    machine: MachineConfig
    library: MaterialLibrary
    response: DetectorResponse
    pattern: PixelPattern
    minerals: tuple[str, ...]
    mu: np.ndarray  # (M, E) float32, 1/mm

    @classmethod
    def create(cls, machine: MachineConfig, library: MaterialLibrary, minerals: tuple[str, ...]) -> "Renderer":
        resp = build_response(machine, library)
        mu = library.mu_per_mm(list(minerals), resp.energies_kev).astype(np.float32)
        return cls(machine, library, resp, pixel_pattern(machine), tuple(minerals), mu)

    @property
    def air_mean(self) -> np.ndarray:
        return self.response.weights.sum(axis=0).astype(np.float32)

    @property
    def air_var(self) -> np.ndarray:
        return self.response.weights_sq.sum(axis=0).astype(np.float32)

    def signal(self, paths_mm: np.ndarray, mu: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance (n, 2) float32 above dark for path lengths (n, M) in mm."""
        mu = self.mu if mu is None else mu
        line_integral = np.asarray(paths_mm, dtype=np.float32) @ mu
        np.exp(-line_integral, out=line_integral)
        return self.response.mean_var(line_integral)

    def blank(self, lines: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of empty belt, (lines, width, 2) float32."""
        mean = np.broadcast_to(self.air_mean, (lines, width, 2)).copy()
        var = np.broadcast_to(self.air_var, (lines, width, 2)).copy()
        return mean, var

    def counts(self, mean: np.ndarray, var: np.ndarray, x0: int, rng: np.random.Generator) -> np.ndarray:
        cols = slice(x0, x0 + mean.shape[1])
        return sample_counts(mean, var, self.pattern, rng, cols)

    def calibration_scans(self, rng: np.random.Generator, lines: int = 64, wedge_lines: int = 64,
                          wedge_width: int = 48) -> CalibrationScans:
        """Dark, air and crossed POM x Fe wedge scans, as the machine would record them."""
        p = self.machine.detector.pixels
        zero = np.zeros((lines, p, 2), np.float32)
        dark = self.counts(zero, zero, 0, rng)
        air = self.counts(*self.blank(lines, p), 0, rng)
        mu = self.library.mu_per_mm(["pom", "iron"], self.response.energies_kev).astype(np.float32)
        width = min(wedge_width, p)
        wedges = []
        i = 0
        for pom in WEDGE_POM_MM:
            for fe in WEDGE_FE_MM:
                mean, var = self.signal(np.array([[pom, fe]], np.float32), mu)
                m = np.broadcast_to(mean[0], (wedge_lines, width, 2))
                v = np.broadcast_to(var[0], (wedge_lines, width, 2))
                # walk the scans across the detector so every column sees the wedge
                x0 = int((i * 97) % max(p - width + 1, 1))
                wedges.append(WedgeScan(f"wedge_{i:03d}.tiff", x0, pom, fe, self.counts(m, v, x0, rng)))
                i += 1
        return CalibrationScans(dark, air, tuple(wedges))
