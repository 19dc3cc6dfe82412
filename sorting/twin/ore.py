"""Ore model of the digital twin: a rock's lithotype, modal mineralogy and Sc contents.

The grade of a rock is not drawn: it follows from the mineral volumes actually
rendered (see :func:`grade_and_mass`), the densities and each mineral's Sc2O3 content.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sorting.config import OreConfig
from sorting.physics.materials import MaterialLibrary


@dataclass(frozen=True)
class RockComposition:
    lithotype: str
    minerals: tuple[str, ...]  # the ore's mineral list, fixed order
    volume_fraction: np.ndarray  # (M,) sums to 1
    sc2o3_ppm: np.ndarray  # (M,) this rock's Sc2O3 content of each mineral
    grain_minerals: tuple[str, ...]


def mineral_list(ore: OreConfig) -> tuple[str, ...]:
    """All minerals of the ore, in a fixed order (first appearance in the config)."""
    names: list[str] = []
    for lith in ore.lithotypes:
        for m in lith.minerals:
            if m not in names:
                names.append(m)
    return tuple(names)


def sample_composition(ore: OreConfig, rng: np.random.Generator) -> RockComposition:
    """Draw a lithotype by its proportion, then each mineral uniformly in its modal range,
    renormalised to 100 %."""
    minerals = mineral_list(ore)
    props = np.array([lith.proportion for lith in ore.lithotypes], dtype=float)
    lith = ore.lithotypes[rng.choice(len(props), p=props / props.sum())]
    frac = np.zeros(len(minerals))
    lo = np.array([lith.minerals[m].min_pct if m in lith.minerals else 0.0 for m in minerals])
    hi = np.array([lith.minerals[m].max_pct if m in lith.minerals else 0.0 for m in minerals])
    # rejection keeps every renormalised fraction inside its range where the ranges allow it
    for _ in range(50):
        frac = rng.uniform(lo, hi)
        frac = frac / frac.sum() * 100.0
        if np.all(frac >= lo - 1e-9) and np.all(frac <= hi + 1e-9):
            break
    sc = np.array([ore.mineral_sc2o3_ppm[m] for m in minerals])
    sc = sc * rng.lognormal(0.0, ore.sc_variability, size=sc.size)
    return RockComposition(lith.name, minerals, frac / 100.0, sc, lith.grain_minerals)


def densities(minerals: tuple[str, ...], library: MaterialLibrary) -> np.ndarray:
    return np.array([library[m].density_g_cm3 for m in minerals])


def grade_and_mass(volumes_mm3: np.ndarray, sc2o3_ppm: np.ndarray, density_g_cm3: np.ndarray) -> tuple[float, float]:
    """Sc2O3 grade (ppm, mass-weighted) and mass (g) of a rock from its mineral volumes."""
    mass_g = volumes_mm3 * density_g_cm3 * 1e-3
    total = float(mass_g.sum())
    grade = float((mass_g * sc2o3_ppm).sum() / total) if total > 0 else 0.0
    return grade, total


def label_for(grade_ppm: float, ore: OreConfig) -> str:
    return "sc" if grade_ppm >= ore.label_cutoff_ppm else "waste"
