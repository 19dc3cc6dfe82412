"""Calibration folders (docs/formats.md): dark, air and step-wedge scans."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io.tables import cell, read_csv, relative, write_csv
from sorting.io.tiff import check_array, read_tiff, write_tiff

MIN_CALIBRATION_LINES = 16
WEDGE_COLUMNS = ("file", "x0", "pom_mm", "fe_mm")


@dataclass(frozen=True, eq=False)
class WedgeScan:
    """One uniform scan through the step wedge: ``counts`` is ``(n, w, 2)`` uint16."""

    file: str
    x0: int
    pom_mm: float
    fe_mm: float
    counts: np.ndarray


@dataclass(frozen=True, eq=False)
class CalibrationScans:
    """Dark, air ``(n, P, 2)`` uint16 and the step-wedge scans of one machine."""

    dark: np.ndarray
    air: np.ndarray
    wedges: tuple[WedgeScan, ...]
    source: str = ""

    @property
    def pixels(self) -> int:
        return int(self.dark.shape[1])


def write_calibration(folder: Path, scans: CalibrationScans) -> None:
    """Write dark.tiff, air.tiff, wedge TIFFs and wedges.csv into ``folder``."""
    folder = Path(folder)
    check_array(scans.dark, "dark")
    check_array(scans.air, "air", scans.pixels)
    files = [w.file for w in scans.wedges]
    if len(set(files)) != len(files):
        raise ValueError(f"wedge file names repeat: {files}")
    for w in scans.wedges:
        check_array(w.counts, f"wedge {w.file}")
        if Path(w.file).is_absolute() or not 0 <= w.x0 <= scans.pixels - w.counts.shape[1]:
            raise ValueError(f"wedge {w.file}: relative file and 0 <= x0, x0 + w <= {scans.pixels} required")
    folder.mkdir(parents=True, exist_ok=True)
    write_tiff(folder / "dark.tiff", scans.dark)
    write_tiff(folder / "air.tiff", scans.air)
    for w in scans.wedges:
        write_tiff(folder / w.file, w.counts)
    write_csv(folder / "wedges.csv", WEDGE_COLUMNS,
               [{"file": w.file, "x0": int(w.x0), "pom_mm": float(w.pom_mm), "fe_mm": float(w.fe_mm)}
                for w in scans.wedges])


def _read_scan(path: Path) -> np.ndarray:
    a = read_tiff(path)
    if a.shape[0] < MIN_CALIBRATION_LINES:
        raise InputError(path, f"has {a.shape[0]} lines; calibration scans need at least {MIN_CALIBRATION_LINES}")
    return a


def read_calibration(folder: Path) -> CalibrationScans:
    """Read and validate a calibration folder (docs/formats.md)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "calibration folder does not exist")
    dark = _read_scan(folder / "dark.tiff")
    air = _read_scan(folder / "air.tiff")
    pixels = dark.shape[1]
    if air.shape[1] != pixels:
        raise InputError(folder / "air.tiff", f"has {air.shape[1]} pixels but dark.tiff has {pixels}")
    csv_path = folder / "wedges.csv"
    _, rows = read_csv(csv_path, WEDGE_COLUMNS)
    if not rows:
        raise InputError(csv_path, "lists no wedge scans; the basis calibration needs them")
    wedges, seen = [], set()
    for line, row in rows:
        name = cell(csv_path, line, row, "file", "str")
        if name in seen:
            raise InputError(csv_path, f"line {line}: file {name} is listed twice")
        seen.add(name)
        x0 = cell(csv_path, line, row, "x0", "nonneg_int")
        pom = cell(csv_path, line, row, "pom_mm", "nonneg_float")
        fe = cell(csv_path, line, row, "fe_mm", "nonneg_float")
        wpath = relative(csv_path, line, name)
        counts = _read_scan(wpath)
        if x0 + counts.shape[1] > pixels:
            raise InputError(wpath, f"x0={x0} + width {counts.shape[1]} exceeds the detector's {pixels} pixels "
                                    f"(wedges.csv line {line})")
        wedges.append(WedgeScan(name, x0, pom, fe, counts))
    return CalibrationScans(dark, air, tuple(wedges), source=str(folder))


def meta_for_writer(meta: dict, calibration: CalibrationScans, fmt: str, keys: tuple[str, ...]) -> dict:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)}")
    p = meta.get("detector_pixels", calibration.pixels)
    if p != calibration.pixels:
        raise ValueError(f"meta detector_pixels={p} but the calibration has {calibration.pixels} pixels")
    return {"format": fmt, **{k: v for k, v in meta.items() if k != "format"}, "detector_pixels": calibration.pixels}
