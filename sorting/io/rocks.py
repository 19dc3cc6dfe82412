"""``xrt-rocks/1`` datasets (docs/formats.md): one TIFF crop per rock, rocks.csv, dataset.json."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io.calibration import (
    CalibrationScans,
    meta_for_writer,
    read_calibration,
    write_calibration,
)
from sorting.io.tables import (
    cell,
    json_number,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from sorting.io.tiff import (
    air_tiff_shape,
    check_array,
    read_air_tiff,
    read_tiff,
    tiff_shape,
    write_air_tiff,
    write_tiff,
)

ROCKS_FORMAT = "xrt-rocks/1"
CHANNELS = ("low", "high")
ROCK_COLUMNS = ("rock_id", "file", "x0", "label", "sc2o3_ppm", "mass_g", "split")
LABELS = ("sc", "waste")
SPLITS = ("train", "test")
#: optional column (crops saved by the sorter): the float32 file of the air level, ln(air - dark)
#: per pixel, that the loop normalized the crop with (docs/formats.md)
AIR_COLUMN = "air_file"


@dataclass(frozen=True)
class RockRow:
    """One row of rocks.csv; ``extra`` holds any further columns as strings."""

    rock_id: str
    file: str
    x0: int
    label: str | None
    sc2o3_ppm: float | None
    mass_g: float | None
    split: str | None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RockDataset:
    """A validated ``xrt-rocks/1`` dataset; crops are read on demand by :meth:`crop`."""

    root: Path
    meta: dict
    calibration: CalibrationScans
    rows: tuple[RockRow, ...]

    @property
    def pixel_pitch_mm(self) -> float:
        return float(self.meta["pixel_pitch_mm"])

    @property
    def line_pitch_mm(self) -> float:
        return float(self.meta["line_pitch_mm"])

    @property
    def pixels(self) -> int:
        return self.calibration.pixels

    def crop(self, i: int) -> np.ndarray:
        """The ``(h, w, 2)`` uint16 crop of ``rows[i]``; InputError naming the file if it is bad."""
        return read_crop(self.root, self.rows[i], self.pixels)

    def air(self, i: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """The air level ``(h, w, 2)`` float32, ln(air - dark), that ``rows[i]``'s crop (of
        ``shape``) was normalized with, when the row has an ``air_file``; None otherwise (the
        calibration's flat field applies)."""
        return read_air(self.root, self.rows[i], shape)


def read_crop(root: Path, row: RockRow, pixels: int) -> np.ndarray:
    """The ``(h, w, 2)`` uint16 crop of ``row`` in the dataset at ``root`` on a detector of
    ``pixels``; InputError naming the file if it is bad or reaches past the detector."""
    path = root / row.file
    a = read_tiff(path)
    if row.x0 + a.shape[1] > pixels:
        raise InputError(path, f"x0={row.x0} + width {a.shape[1]} = {row.x0 + a.shape[1]} exceeds "
                               f"detector_pixels={pixels} (rock_id {row.rock_id})")
    return a


def read_air(root: Path, row: RockRow, shape: tuple[int, ...]) -> np.ndarray | None:
    """The air level of ``row``'s crop (``air_file``), checked against the crop's ``shape``, or
    None when the row has none."""
    name = row.extra.get(AIR_COLUMN)
    if not name:
        return None
    path = root / name
    air = read_air_tiff(path)
    _check_air_shape(path, air.shape, shape, row)
    return air


def _check_air_shape(path: Path, air_shape: tuple[int, ...], shape: tuple[int, ...], row: RockRow) -> None:
    """An air level must have its crop's shape (InputError naming the air file)."""
    if tuple(air_shape) != tuple(shape):
        raise InputError(path, f"air level of shape {tuple(air_shape)} for a crop of shape {tuple(shape)} "
                               f"(rock_id {row.rock_id})")


def check_crops(ds: RockDataset) -> None:
    """Check every crop's TIFF header (pages, layout, dtype, truncation, ``x0 + w <= P``)
    without decoding it, so a batch verb refuses a bad file before minutes of work.

    Raises
    ------
    InputError
        Naming the first bad crop file and its problem.
    """
    for row in ds.rows:
        path = ds.root / row.file
        shape = tiff_shape(path)
        if row.x0 + shape[1] > ds.pixels:
            raise InputError(path, f"x0={row.x0} + width {shape[1]} = {row.x0 + shape[1]} exceeds "
                                   f"detector_pixels={ds.pixels} (rock_id {row.rock_id})")
        if row.extra.get(AIR_COLUMN):
            air = ds.root / row.extra[AIR_COLUMN]
            _check_air_shape(air, air_tiff_shape(air), shape, row)


def _row_problem(row: RockRow, pixels: int) -> str | None:
    if not row.rock_id:
        return "rock_id is empty"
    if not row.file or Path(row.file).is_absolute():
        return f"file {row.file!r} must be a path relative to the dataset folder"
    if not 0 <= row.x0 < pixels:
        return f"x0 {row.x0} is outside the detector's columns 0..{pixels - 1}"
    if row.label not in (*LABELS, None):
        return f"label {row.label!r} is not sc, waste or empty"
    if row.split not in (*SPLITS, None):
        return f"split {row.split!r} is not train, test or empty"
    for name in ("sc2o3_ppm", "mass_g"):
        v = getattr(row, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            return f"{name} {v!r} must be a finite number >= 0 or empty"
    return None


class RockDatasetWriter:
    """Write an ``xrt-rocks/1`` dataset: crops as they come, rocks.csv and dataset.json on close.

    dataset.json is written last, so a dataset whose writing failed is not mistaken for a valid one.
    """

    def __init__(self, root: Path, meta: dict, calibration: CalibrationScans,
                 extra_columns: tuple[str, ...] = ()):
        clash = set(extra_columns) & set(ROCK_COLUMNS)
        if clash:
            raise ValueError(f"extra columns {sorted(clash)} clash with the contract columns")
        self.root = Path(root)
        self._meta = meta_for_writer(meta, calibration, ROCKS_FORMAT, ("pixel_pitch_mm", "line_pitch_mm"))
        self._meta.setdefault("channels", list(CHANNELS))
        self._pixels = calibration.pixels
        self._extra = tuple(extra_columns)
        self._rows: list[RockRow] = []
        self._ids: set[str] = set()
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        write_calibration(self.root / "calibration", calibration)

    def __enter__(self) -> RockDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def add(self, row: RockRow, crop: np.ndarray, air: np.ndarray | None = None) -> None:
        """Write ``crop`` ``(h, w, 2)`` uint16 to ``root / row.file`` and remember the row; with
        ``air`` (the crop's air level, float32 of its shape), that to ``row.extra["air_file"]``."""
        problem = _row_problem(row, self._pixels)
        if problem:
            raise ValueError(f"rock {row.rock_id!r}: {problem}")
        if row.rock_id in self._ids:
            raise ValueError(f"rock_id {row.rock_id!r} added twice")
        unknown = set(row.extra) - set(self._extra)
        if unknown:
            raise ValueError(f"rock {row.rock_id!r}: extra keys {sorted(unknown)} not in extra_columns")
        check_array(crop, f"crop of rock {row.rock_id!r}")
        if row.x0 + crop.shape[1] > self._pixels:
            raise ValueError(f"rock {row.rock_id!r}: x0 + width exceeds {self._pixels} pixels")
        if air is not None:
            if not row.extra.get(AIR_COLUMN):
                raise ValueError(f"rock {row.rock_id!r}: an air level needs its {AIR_COLUMN} column")
            if air.shape != crop.shape:
                raise ValueError(f"rock {row.rock_id!r}: air level {air.shape} is not the crop's shape {crop.shape}")
        write_tiff(self.root / row.file, crop)
        if air is not None:
            write_air_tiff(self.root / row.extra[AIR_COLUMN], air)
        self._ids.add(row.rock_id)
        self._rows.append(row)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # each file whole or not at all (written aside, then renamed): a reader never sees half a table
        tmp = self.root / "rocks.csv.tmp"
        write_csv(tmp, ROCK_COLUMNS + self._extra,
                  [{**r.extra, **{c: getattr(r, c) for c in ROCK_COLUMNS}} for r in self._rows])
        os.replace(tmp, self.root / "rocks.csv")
        tmp = self.root / "dataset.json.tmp"
        write_json(tmp, self._meta)
        os.replace(tmp, self.root / "dataset.json")


def read_rocks_dataset(root: Path) -> RockDataset:
    """Read and validate an ``xrt-rocks/1`` dataset (docs/formats.md)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder does not exist")
    jpath = root / "dataset.json"
    meta = read_json(jpath, ROCKS_FORMAT, ("detector_pixels", "pixel_pitch_mm", "line_pitch_mm"))
    pixels = json_number(jpath, meta, "detector_pixels", integer=True)
    json_number(jpath, meta, "pixel_pitch_mm")
    json_number(jpath, meta, "line_pitch_mm")
    if "channels" in meta and meta["channels"] != list(CHANNELS):
        raise InputError(jpath, f'"channels" is {meta["channels"]!r}; expected ["low", "high"]')
    calibration = read_calibration(root / "calibration")
    if calibration.pixels != pixels:
        raise InputError(jpath, f"detector_pixels={pixels} but calibration/dark.tiff has {calibration.pixels} pixels")
    cpath = root / "rocks.csv"
    header, table = read_csv(cpath, ROCK_COLUMNS)
    extra_cols = [h for h in header if h not in ROCK_COLUMNS]
    rows, seen = [], set()
    for line, r in table:
        row = RockRow(
            rock_id=cell(cpath, line, r, "rock_id", "str"),
            file=cell(cpath, line, r, "file", "str"),
            x0=cell(cpath, line, r, "x0", "int"),
            label=cell(cpath, line, r, "label", "str", optional=True, choices=LABELS),
            sc2o3_ppm=cell(cpath, line, r, "sc2o3_ppm", "nonneg_float", optional=True),
            mass_g=cell(cpath, line, r, "mass_g", "nonneg_float", optional=True),
            split=cell(cpath, line, r, "split", "str", optional=True, choices=SPLITS),
            extra={c: r[c] for c in extra_cols},
        )
        problem = _row_problem(row, pixels)
        if problem:
            raise InputError(cpath, f"line {line}: {problem}")
        if row.rock_id in seen:
            raise InputError(cpath, f"line {line}: rock_id {row.rock_id!r} is not unique")
        seen.add(row.rock_id)
        if not (root / row.file).is_file():
            raise InputError(root / row.file, f"does not exist (listed in rocks.csv line {line})")
        air = row.extra.get(AIR_COLUMN)
        if air:
            if Path(air).is_absolute():
                raise InputError(cpath, f"line {line}: {AIR_COLUMN} {air!r} must be a path relative to the "
                                        "dataset folder")
            if not (root / air).is_file():
                raise InputError(root / air, f"does not exist (listed in rocks.csv line {line})")
        rows.append(row)
    return RockDataset(root, meta, calibration, tuple(rows))
