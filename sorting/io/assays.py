"""The laboratory's results of a rock-by-rock test: ``ASSAYS.csv`` (``seq,sc2o3_ppm,mass_g``).

``seq`` is the feed number (1 = the first rock fed to the sorter), ``sc2o3_ppm`` the rock's
assay and ``mass_g`` the mass the laboratory weighed. A sample lost in the laboratory has no
row. Extra columns are allowed and ignored. Checks that need the recording (how many feed
numbers the particles found could explain) are made by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io.tables import cell, read_csv

ASSAY_COLUMNS = ("seq", "sc2o3_ppm", "mass_g")


@dataclass(frozen=True, eq=False)
class Assays:
    """The rows of an assay file, sorted by feed number.

    seq : (m,) int64, strictly increasing, >= 1
    sc2o3_ppm : (m,) float64, >= 0
    mass_g : (m,) float64, > 0
    """

    path: Path
    seq: np.ndarray
    sc2o3_ppm: np.ndarray
    mass_g: np.ndarray

    def __len__(self) -> int:
        return int(self.seq.size)


def read_assays(path: Path) -> Assays:
    """Read and validate ``ASSAYS.csv``.

    Raises
    ------
    InputError
        Naming the file: missing file or columns, a feed number that is not an integer >= 1,
        a feed number listed twice, a grade or mass that is not a finite number (grades
        >= 0, masses > 0), or no rows at all.
    """
    path = Path(path)
    _, table = read_csv(path, ASSAY_COLUMNS)
    seq, grade, mass = [], [], []
    first_line: dict[int, int] = {}
    for line, r in table:
        s = cell(path, line, r, "seq", "int")
        if s < 1:
            raise InputError(path, f"line {line}: seq is {r['seq']!r}; feed numbers start at 1")
        if s in first_line:
            raise InputError(path, f"line {line}: seq {s} is listed twice (also on line {first_line[s]})")
        first_line[s] = line
        g = cell(path, line, r, "sc2o3_ppm", "nonneg_float")
        m = cell(path, line, r, "mass_g", "nonneg_float")
        if m <= 0:
            raise InputError(path, f"line {line}: mass_g is {r['mass_g']!r}; a weighed rock has a mass > 0")
        seq.append(s)
        grade.append(g)
        mass.append(m)
    if not seq:
        raise InputError(path, "has no rows: nothing to tie to the recording")
    order = np.argsort(np.array(seq), kind="stable")
    return Assays(path, np.array(seq, np.int64)[order], np.array(grade, np.float64)[order],
                  np.array(mass, np.float64)[order])
