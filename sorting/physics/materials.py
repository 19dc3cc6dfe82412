"""Material library (YAML; default: the shipped ``configs/materials.yaml``) and linear attenuation from xraydb."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import xraydb

from sorting.config import read_yaml
from sorting.errors import InputError
from sorting.resources import MATERIALS


@dataclass(frozen=True)
class Material:
    name: str
    formula: str
    density_g_cm3: float


@dataclass(frozen=True)
class MaterialLibrary:
    materials: dict[str, Material] = field(default_factory=dict)
    source: str = ""

    def __getitem__(self, name: str) -> Material:
        try:
            return self.materials[name.lower()]
        except KeyError:
            raise InputError(self.source, f"unknown material {name!r} (known: {', '.join(self.materials)})") from None

    def mu_per_mm(self, names: list[str] | tuple[str, ...], energies_kev: np.ndarray) -> np.ndarray:
        """Linear attenuation coefficients, (len(names), E) float64, in 1/mm.

        Total attenuation (photoelectric + Compton + Rayleigh), as a narrow fan beam
        with a line detector sees it: scattered photons leave the beam.
        """
        energies = tuple(np.asarray(energies_kev, dtype=float).tolist())
        return np.stack([_mu(self[n].formula, self[n].density_g_cm3, energies) for n in names])


@lru_cache(maxsize=256)
def _mu(formula: str, density: float, energies_kev: tuple[float, ...]) -> np.ndarray:
    e_ev = np.asarray(energies_kev) * 1000.0
    mu = xraydb.material_mu(formula, e_ev, density=density, kind="total") / 10.0  # 1/cm -> 1/mm
    mu.setflags(write=False)
    return mu


def load_materials(path: str | Path | None = None) -> MaterialLibrary:
    path = Path(path) if path is not None else MATERIALS
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, "must map material names to {formula, density_g_cm3}")
    mats = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"formula", "density_g_cm3"}:
            raise InputError(path, f"{name}: needs exactly the keys formula and density_g_cm3")
        dens = entry["density_g_cm3"]
        if isinstance(dens, bool) or not isinstance(dens, (int, float)) or not np.isfinite(dens) or dens <= 0:
            raise InputError(path, f"{name}.density_g_cm3: must be a positive number, got {dens!r}")
        try:
            xraydb.chemparse(str(entry["formula"]))
        except Exception:
            raise InputError(path, f"{name}.formula: cannot parse {entry['formula']!r}") from None
        mats[str(name).lower()] = Material(str(name).lower(), str(entry["formula"]), float(dens))
    return MaterialLibrary(mats, str(path))
