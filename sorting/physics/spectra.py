"""Tungsten-tube spectra from the shipped SpekPy table (no SpekPy at run time)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from sorting.errors import InputError
from sorting.resources import SPECTRA_TABLE


@lru_cache(maxsize=1)
def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(SPECTRA_TABLE) as fh:
        header = next(line for line in fh if not line.startswith("#"))
    kvps = np.array([float(h.split("_")[1]) for h in header.strip().split(",")[1:]])
    data = np.loadtxt(SPECTRA_TABLE, delimiter=",", comments="#", skiprows=3)
    return data[:, 0], kvps, data[:, 1:]


def tube_spectrum(kvp: float, anode_angle_deg: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Unfiltered tungsten spectrum on a 1 keV grid.

    Returns
    -------
    energies_kev : (E,) ndarray of float64, bin centres
    fluence : (E,) ndarray of float64, photons/cm2/mAs at 1 m per bin (SpekPy units)

    Tube voltages between table columns are interpolated linearly in kVp,
    with the end point of the bremsstrahlung continuum moved to ``kvp``.
    """
    energies, kvps, table = _table()
    if not kvps[0] <= kvp <= kvps[-1]:
        raise InputError("tube.kvp", f"{kvp:g} kVp is outside the shipped spectrum table "
                         f"({kvps[0]:g}-{kvps[-1]:g} kVp); regenerate it with scripts/make_spectra.py")
    if abs(anode_angle_deg - 12.0) > 1e-6:
        raise InputError("tube.anode_angle_deg", f"the shipped table is for a 12 deg anode, got "
                         f"{anode_angle_deg:g}; regenerate it with scripts/make_spectra.py")
    j = int(np.clip(np.searchsorted(kvps, kvp) - 1, 0, kvps.size - 2))
    w = (kvp - kvps[j]) / (kvps[j + 1] - kvps[j])
    fluence = (1 - w) * table[:, j] + w * table[:, j + 1]
    fluence = np.where(energies < kvp, fluence, 0.0)
    return energies.copy(), fluence


def spectrum_kvp_range() -> tuple[float, float]:
    """The lowest and highest tube voltage (kVp) of the shipped spectrum table."""
    _, kvps, _ = _table()
    return float(kvps[0]), float(kvps[-1])
