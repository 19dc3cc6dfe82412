"""Read, write and validate the project's files (CONTRACT.md sections 2-4).

The one place that touches calibration folders, ``xrt-rocks/1`` datasets and
``xrt-belt/1`` recordings. Readers check everything once, at the edge, and turn
every problem into :class:`InputError` naming the offending file; code behind
them can trust the arrays. Writers check their arguments with ``ValueError``
(a bad array there is a bug in the caller, not bad user input).

Arrays are ``uint16`` counts ``(lines, pixels, 2)``: axis 0 is time, the last axis
is the energy channel (0 = low, 1 = high).
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .errors import InputError

ROCKS_FORMAT = "xrt-rocks/1"
BELT_FORMAT = "xrt-belt/1"
CHANNELS = ("low", "high")
MIN_CALIBRATION_LINES = 16
WEDGE_COLUMNS = ("file", "x0", "pom_mm", "fe_mm")
ROCK_COLUMNS = ("rock_id", "file", "x0", "label", "sc2o3_ppm", "mass_g", "split")
TRUTH_COLUMNS = ("rock_id", "first_line", "last_line", "x_min_px", "x_max_px",
                 "centroid_line", "centroid_px", "label", "sc2o3_ppm", "mass_g")
LABELS = ("sc", "waste")
SPLITS = ("train", "test")


# ------------------------------------------------------------ low-level readers
def _oneline(text: object) -> str:
    return " ".join(str(text).split())


def _require(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist")


def _read_tiff(path: Path) -> np.ndarray:
    """One single-page ``(h, w, 2)`` uint16 TIFF, channels as samples; native byte order."""
    _require(path)
    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            page = tif.pages[0]
            shape, spp, planar = tuple(page.shape), page.samplesperpixel, page.planarconfig
            data = page.asarray() if n_pages == 1 else None
    except Exception as exc:  # tifffile raises many types on corrupt files; all mean bad input
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {_oneline(exc)})") from None
    if n_pages != 1:
        raise InputError(path, f"has {n_pages} pages of shape {shape}; expected one page (h, w, 2) "
                               "with the low and high channels as the 2 samples of each pixel")
    if spp > 1 and planar == tifffile.PLANARCONFIG.SEPARATE:
        raise InputError(path, f"channels are stored as separate planes (shape {shape}); expected "
                               "(h, w, 2) with planarconfig contig (samples interleaved per pixel)")
    return _check_counts(path, data, "TIFF")


def _check_layout(path: Path, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if len(shape) != 3:
        raise InputError(path, f"{what} has shape {shape} ({len(shape)}-D); expected (h, w, 2): "
                               "rows, columns, 2 energy channels (low, high)")
    if shape[2] != 2:
        raise InputError(path, f"{what} has {shape[2]} channels (shape {shape}); expected 2 (low, high)")
    if dtype.kind != "u" or dtype.itemsize != 2:
        raise InputError(path, f"{what} has dtype {dtype.name}; expected uint16 raw counts")
    if shape[0] < 1 or shape[1] < 1:
        raise InputError(path, f"{what} is empty (shape {shape})")


def _check_counts(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    _check_layout(path, a.shape, a.dtype, what)
    return a.astype(np.uint16, copy=False)


def _tiff_shape(path: Path) -> tuple[int, ...]:
    """The checks of :func:`_read_tiff` that need no decoding: pages, layout, dtype, and
    that the pixel data lies inside the file (a truncated copy fails here). Returns the shape."""
    _require(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            spp, planar = page.samplesperpixel, page.planarconfig
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception as exc:  # as in _read_tiff: every failure to parse is bad input
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {_oneline(exc)})") from None
    if n_pages != 1:
        raise InputError(path, f"has {n_pages} pages of shape {shape}; expected one page (h, w, 2) "
                               "with the low and high channels as the 2 samples of each pixel")
    if spp > 1 and planar == tifffile.PLANARCONFIG.SEPARATE:
        raise InputError(path, f"channels are stored as separate planes (shape {shape}); expected "
                               "(h, w, 2) with planarconfig contig (samples interleaved per pixel)")
    _check_layout(path, shape, dtype, "TIFF")
    if end > size:
        raise InputError(path, f"is truncated: its pixel data ends at byte {end}, the file has {size} bytes")
    return shape


def _read_json(path: Path, fmt: str | None, keys: tuple[str, ...]) -> dict:
    _require(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({_oneline(exc)})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "must hold a JSON object {...}")
    if fmt is not None and meta.get("format") != fmt:
        raise InputError(path, f'"format" is {meta.get("format")!r}; expected "{fmt}"')
    missing = [k for k in keys if k not in meta]
    if missing:
        raise InputError(path, f"missing key(s) {', '.join(missing)}")
    return meta


def _json_number(path: Path, meta: dict, key: str, *, integer: bool = False, minimum: float = 0.0,
                 strict: bool = True) -> float:
    value = meta[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        raise InputError(path, f'"{key}" is {value!r}; expected {kind} {">" if strict else ">="} {minimum:g}')
    return int(value) if integer else float(value)


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line_number, row)`` pairs; values stripped, never None."""
    _require(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise InputError(path, f"line {reader.line_num} has {len(values)} fields; "
                                           f"the header has {len(header)}")
                rows.append((reader.line_num, {h: v.strip() for h, v in zip(header, values)}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read as CSV ({_oneline(exc)})") from None
    if not header:
        raise InputError(path, f"is empty; expected the header {','.join(required)}")
    dupes = sorted(h for h, c in Counter(header).items() if c > 1)
    if dupes:
        raise InputError(path, f"duplicate column(s) {', '.join(dupes)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    return header, rows


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "12.0" from tools that write every number as float
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def _cell(path: Path, line: int, row: dict, key: str, kind: str, *, optional: bool = False,
          choices: tuple[str, ...] = ()) -> Any:
    """One typed CSV value; kind is 'int', 'nonneg_int', 'float', 'nonneg_float' or 'str'."""
    text = row[key]
    if text == "":
        if optional:
            return None
        raise InputError(path, f"line {line}: {key} is empty")
    if kind == "str":
        if choices and text not in choices:
            allowed = ", ".join(choices) + (" or empty" if optional else "")
            raise InputError(path, f"line {line}: {key} is {text!r}; expected {allowed}")
        return text
    try:
        value = _parse_int(text) if kind.endswith("int") else float(text)
    except ValueError:
        raise InputError(path, f"line {line}: {key} is {text!r}; expected {'an integer' if kind.endswith('int') else 'a number'}") from None
    if not math.isfinite(value) or (kind.startswith("nonneg") and value < 0):
        raise InputError(path, f"line {line}: {key} is {text!r}; expected a finite number >= 0")
    return value


def _relative(path: Path, line: int, text: str) -> Path:
    if Path(text).is_absolute():
        raise InputError(path, f"line {line}: file {text!r} must be relative to {path.parent}")
    return path.parent / text


# ------------------------------------------------------------ writer helpers
def _check_array(a: np.ndarray, name: str, pixels: int | None = None) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[2] != 2 or a.dtype != np.uint16:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a (n, w, 2) uint16 array, got {desc}")
    if pixels is not None and a.shape[1] != pixels:
        raise ValueError(f"{name} has {a.shape[1]} pixels; the calibration has {pixels}")


def _write_tiff(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, a, photometric="minisblack", planarconfig="contig")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, tuple)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _write_json(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(columns)
        for row in rows:
            out.writerow([_fmt(row.get(c)) for c in columns])


def _meta_for_writer(meta: dict, calibration: CalibrationScans, fmt: str, keys: tuple[str, ...]) -> dict:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)}")
    p = meta.get("detector_pixels", calibration.pixels)
    if p != calibration.pixels:
        raise ValueError(f"meta detector_pixels={p} but the calibration has {calibration.pixels} pixels")
    return {"format": fmt, **{k: v for k, v in meta.items() if k != "format"}, "detector_pixels": calibration.pixels}


# ------------------------------------------------------------ calibration
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
    _check_array(scans.dark, "dark")
    _check_array(scans.air, "air", scans.pixels)
    files = [w.file for w in scans.wedges]
    if len(set(files)) != len(files):
        raise ValueError(f"wedge file names repeat: {files}")
    for w in scans.wedges:
        _check_array(w.counts, f"wedge {w.file}")
        if Path(w.file).is_absolute() or not 0 <= w.x0 <= scans.pixels - w.counts.shape[1]:
            raise ValueError(f"wedge {w.file}: relative file and 0 <= x0, x0 + w <= {scans.pixels} required")
    folder.mkdir(parents=True, exist_ok=True)
    _write_tiff(folder / "dark.tiff", scans.dark)
    _write_tiff(folder / "air.tiff", scans.air)
    for w in scans.wedges:
        _write_tiff(folder / w.file, w.counts)
    _write_csv(folder / "wedges.csv", WEDGE_COLUMNS,
               [{"file": w.file, "x0": int(w.x0), "pom_mm": float(w.pom_mm), "fe_mm": float(w.fe_mm)}
                for w in scans.wedges])


def _read_scan(path: Path) -> np.ndarray:
    a = _read_tiff(path)
    if a.shape[0] < MIN_CALIBRATION_LINES:
        raise InputError(path, f"has {a.shape[0]} lines; calibration scans need at least {MIN_CALIBRATION_LINES}")
    return a


def read_calibration(folder: Path) -> CalibrationScans:
    """Read and validate a calibration folder (CONTRACT.md section 2)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "calibration folder does not exist")
    dark = _read_scan(folder / "dark.tiff")
    air = _read_scan(folder / "air.tiff")
    pixels = dark.shape[1]
    if air.shape[1] != pixels:
        raise InputError(folder / "air.tiff", f"has {air.shape[1]} pixels but dark.tiff has {pixels}")
    csv_path = folder / "wedges.csv"
    _, rows = _read_csv(csv_path, WEDGE_COLUMNS)
    if not rows:
        raise InputError(csv_path, "lists no wedge scans; the basis calibration needs them")
    wedges, seen = [], set()
    for line, row in rows:
        name = _cell(csv_path, line, row, "file", "str")
        if name in seen:
            raise InputError(csv_path, f"line {line}: file {name} is listed twice")
        seen.add(name)
        x0 = _cell(csv_path, line, row, "x0", "nonneg_int")
        pom = _cell(csv_path, line, row, "pom_mm", "nonneg_float")
        fe = _cell(csv_path, line, row, "fe_mm", "nonneg_float")
        wpath = _relative(csv_path, line, name)
        counts = _read_scan(wpath)
        if x0 + counts.shape[1] > pixels:
            raise InputError(wpath, f"x0={x0} + width {counts.shape[1]} exceeds the detector's {pixels} pixels "
                                    f"(wedges.csv line {line})")
        wedges.append(WedgeScan(name, x0, pom, fe, counts))
    return CalibrationScans(dark, air, tuple(wedges), source=str(folder))


# ------------------------------------------------------------ xrt-rocks/1
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
        row = self.rows[i]
        path = self.root / row.file
        a = _read_tiff(path)
        if row.x0 + a.shape[1] > self.pixels:
            raise InputError(path, f"x0={row.x0} + width {a.shape[1]} = {row.x0 + a.shape[1]} exceeds "
                                   f"detector_pixels={self.pixels} (rock_id {row.rock_id})")
        return a


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
        shape = _tiff_shape(path)
        if row.x0 + shape[1] > ds.pixels:
            raise InputError(path, f"x0={row.x0} + width {shape[1]} = {row.x0 + shape[1]} exceeds "
                                   f"detector_pixels={ds.pixels} (rock_id {row.rock_id})")


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
        self._meta = _meta_for_writer(meta, calibration, ROCKS_FORMAT, ("pixel_pitch_mm", "line_pitch_mm"))
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

    def add(self, row: RockRow, crop: np.ndarray) -> None:
        """Write ``crop`` ``(h, w, 2)`` uint16 to ``root / row.file`` and remember the row."""
        problem = _row_problem(row, self._pixels)
        if problem:
            raise ValueError(f"rock {row.rock_id!r}: {problem}")
        if row.rock_id in self._ids:
            raise ValueError(f"rock_id {row.rock_id!r} added twice")
        unknown = set(row.extra) - set(self._extra)
        if unknown:
            raise ValueError(f"rock {row.rock_id!r}: extra keys {sorted(unknown)} not in extra_columns")
        _check_array(crop, f"crop of rock {row.rock_id!r}")
        if row.x0 + crop.shape[1] > self._pixels:
            raise ValueError(f"rock {row.rock_id!r}: x0 + width exceeds {self._pixels} pixels")
        _write_tiff(self.root / row.file, crop)
        self._ids.add(row.rock_id)
        self._rows.append(row)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _write_csv(self.root / "rocks.csv", ROCK_COLUMNS + self._extra,
                   [{**r.extra, **{c: getattr(r, c) for c in ROCK_COLUMNS}} for r in self._rows])
        _write_json(self.root / "dataset.json", self._meta)


def read_rocks_dataset(root: Path) -> RockDataset:
    """Read and validate an ``xrt-rocks/1`` dataset (CONTRACT.md section 3)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder does not exist")
    jpath = root / "dataset.json"
    meta = _read_json(jpath, ROCKS_FORMAT, ("detector_pixels", "pixel_pitch_mm", "line_pitch_mm"))
    pixels = _json_number(jpath, meta, "detector_pixels", integer=True)
    _json_number(jpath, meta, "pixel_pitch_mm")
    _json_number(jpath, meta, "line_pitch_mm")
    if "channels" in meta and meta["channels"] != list(CHANNELS):
        raise InputError(jpath, f'"channels" is {meta["channels"]!r}; expected ["low", "high"]')
    calibration = read_calibration(root / "calibration")
    if calibration.pixels != pixels:
        raise InputError(jpath, f"detector_pixels={pixels} but calibration/dark.tiff has {calibration.pixels} pixels")
    cpath = root / "rocks.csv"
    header, table = _read_csv(cpath, ROCK_COLUMNS)
    extra_cols = [h for h in header if h not in ROCK_COLUMNS]
    rows, seen = [], set()
    for line, r in table:
        row = RockRow(
            rock_id=_cell(cpath, line, r, "rock_id", "str"),
            file=_cell(cpath, line, r, "file", "str"),
            x0=_cell(cpath, line, r, "x0", "int"),
            label=_cell(cpath, line, r, "label", "str", optional=True, choices=LABELS),
            sc2o3_ppm=_cell(cpath, line, r, "sc2o3_ppm", "nonneg_float", optional=True),
            mass_g=_cell(cpath, line, r, "mass_g", "nonneg_float", optional=True),
            split=_cell(cpath, line, r, "split", "str", optional=True, choices=SPLITS),
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
        rows.append(row)
    return RockDataset(root, meta, calibration, tuple(rows))


# ------------------------------------------------------------ xrt-belt/1
@dataclass(frozen=True, eq=False)
class BeltRecording:
    """A validated ``xrt-belt/1`` recording; ``lines`` is a read-only ``(N, P, 2)`` memmap."""

    root: Path
    meta: dict
    calibration: CalibrationScans
    lines: np.ndarray
    truth: list[dict] | None

    @property
    def line_rate_hz(self) -> float:
        return float(self.meta["line_rate_hz"])

    @property
    def belt_speed_m_s(self) -> float:
        return float(self.meta["belt_speed_m_s"])

    @property
    def pixel_pitch_mm(self) -> float:
        return float(self.meta["pixel_pitch_mm"])

    @property
    def line_pitch_mm(self) -> float:
        return self.belt_speed_m_s * 1000.0 / self.line_rate_hz

    @property
    def pixels(self) -> int:
        return int(self.lines.shape[1])

    @property
    def n_lines(self) -> int:
        return int(self.lines.shape[0])


_BELT_KEYS = ("pixel_pitch_mm", "line_rate_hz", "belt_speed_m_s")


class BeltRecordingWriter:
    """Write an ``xrt-belt/1`` recording chunk by chunk; recording.json is written last, on close."""

    def __init__(self, root: Path, meta: dict, calibration: CalibrationScans,
                 truth_columns: tuple[str, ...] = ()):
        clash = set(truth_columns) & set(TRUTH_COLUMNS)
        if clash:
            raise ValueError(f"truth columns {sorted(clash)} clash with the contract columns")
        self.root = Path(root)
        self._meta = _meta_for_writer(meta, calibration, BELT_FORMAT, _BELT_KEYS)
        self._pixels = calibration.pixels
        self._truth_columns = TRUTH_COLUMNS + tuple(truth_columns)
        self._n = 0
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        write_calibration(self.root / "calibration", calibration)
        self._fh = (self.root / "lines.u16").open("wb")

    def __enter__(self) -> BeltRecordingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()

    def append(self, lines: np.ndarray) -> None:
        """Append ``(L, P, 2)`` uint16 lines to lines.u16."""
        _check_array(lines, "lines", self._pixels)
        self._fh.write(np.ascontiguousarray(lines, dtype="<u2").data)
        self._n += lines.shape[0]

    def close(self, truth: list[dict] | None = None, extra_meta: dict | None = None) -> None:
        """Finish lines.u16, write truth.csv (if given) and recording.json with ``"lines": N``
        (plus ``extra_meta``, keys known only at the end such as the realised occupancy)."""
        if self._closed:
            return
        self._closed = True
        self._fh.close()
        if truth is not None:
            for rec in truth:
                unknown = set(rec) - set(self._truth_columns)
                if unknown:
                    raise ValueError(f"truth keys {sorted(unknown)} not in the truth columns")
            _write_csv(self.root / "truth.csv", self._truth_columns, truth)
        _write_json(self.root / "recording.json", {**self._meta, **(extra_meta or {}), "lines": self._n})


def _typed(text: str) -> int | float | str | None:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_TRUTH_KINDS = {"rock_id": "str", "first_line": "nonneg_int", "last_line": "nonneg_int",
                "x_min_px": "nonneg_int", "x_max_px": "nonneg_int", "centroid_line": "float",
                "centroid_px": "float", "label": "str", "sc2o3_ppm": "nonneg_float", "mass_g": "nonneg_float"}


def _read_truth(path: Path) -> list[dict]:
    header, table = _read_csv(path, TRUTH_COLUMNS)
    out, seen = [], set()
    for line, r in table:
        rec = {h: _typed(r[h]) for h in header if h not in TRUTH_COLUMNS}
        for key, kind in _TRUTH_KINDS.items():
            optional = key in ("label", "sc2o3_ppm", "mass_g")
            rec[key] = _cell(path, line, r, key, kind, optional=optional,
                             choices=LABELS if key == "label" else ())
        if rec["first_line"] > rec["last_line"] or rec["x_min_px"] > rec["x_max_px"]:
            raise InputError(path, f"line {line}: first_line > last_line or x_min_px > x_max_px")
        if rec["rock_id"] in seen:
            raise InputError(path, f"line {line}: rock_id {rec['rock_id']!r} is not unique")
        seen.add(rec["rock_id"])
        out.append({k: rec[k] for k in header})
    return out


def read_belt_recording(root: Path) -> BeltRecording:
    """Read and validate an ``xrt-belt/1`` recording (CONTRACT.md section 4); lines are memory-mapped."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "recording folder does not exist")
    jpath = root / "recording.json"
    meta = _read_json(jpath, BELT_FORMAT, ("detector_pixels", "lines") + _BELT_KEYS)
    pixels = _json_number(jpath, meta, "detector_pixels", integer=True)
    n = _json_number(jpath, meta, "lines", integer=True, strict=False)
    for key in _BELT_KEYS:
        _json_number(jpath, meta, key)
    calibration = read_calibration(root / "calibration")
    if calibration.pixels != pixels:
        raise InputError(jpath, f"detector_pixels={pixels} but calibration/dark.tiff has {calibration.pixels} pixels")
    lpath = root / "lines.u16"
    _require(lpath)
    expected = n * pixels * 2 * 2
    size = lpath.stat().st_size
    if size != expected:
        raise InputError(lpath, f"has {size} bytes, recording.json says N={n} P={pixels} -> "
                                f"N*P*2 channels*2 bytes = {expected} bytes")
    if n == 0:  # np.memmap cannot map an empty file
        lines = np.zeros((0, pixels, 2), "<u2")
        lines.flags.writeable = False
    else:
        try:
            lines = np.memmap(lpath, dtype="<u2", mode="r", shape=(n, pixels, 2))
        except (OSError, ValueError) as exc:
            raise InputError(lpath, f"cannot memory-map ({_oneline(exc)})") from None
    tpath = root / "truth.csv"
    truth = _read_truth(tpath) if tpath.exists() else None
    return BeltRecording(root, meta, calibration, lines, truth)


# ------------------------------------------------------------ describe
def _counts(values: list) -> str:
    c = Counter("(empty)" if v is None else v for v in values)
    return ", ".join(f"{k} {c[k]}" for k in sorted(c, key=str)) or "none"


def _describe_calibration(cal: CalibrationScans, indent: str = "") -> str:
    def mean(a: np.ndarray) -> str:
        m = a.reshape(-1, 2).mean(axis=0)
        return f"low {m[0]:.0f}, high {m[1]:.0f}"
    pom = [w.pom_mm for w in cal.wedges]
    fe = [w.fe_mm for w in cal.wedges]
    return (f"{indent}calibration: {cal.pixels} pixels; dark {cal.dark.shape[0]} lines (mean {mean(cal.dark)}), "
            f"air {cal.air.shape[0]} lines (mean {mean(cal.air)})\n"
            f"{indent}wedges: {len(cal.wedges)} scans, POM {min(pom):g}-{max(pom):g} mm, Fe {min(fe):g}-{max(fe):g} mm")


def _describe_rocks(ds: RockDataset) -> str:
    shapes = np.array([ds.crop(i).shape[:2] for i in range(len(ds.rows))]).reshape(-1, 2)
    grades = [r.sc2o3_ppm for r in ds.rows if r.sc2o3_ppm is not None]
    lines = [f"{ds.root}: {ROCKS_FORMAT} dataset, {len(ds.rows)} rocks",
             f"  pitch: {ds.pixel_pitch_mm:g} mm across, {ds.line_pitch_mm:g} mm along the belt",
             f"  labels: {_counts([r.label for r in ds.rows])}",
             f"  splits: {_counts([r.split for r in ds.rows])}"]
    if len(shapes):
        lines.append(f"  crops: {shapes[:, 0].min()}-{shapes[:, 0].max()} lines x "
                     f"{shapes[:, 1].min()}-{shapes[:, 1].max()} px, all read and valid")
    if grades:
        lines.append(f"  assayed: {len(grades)}, Sc2O3 {min(grades):g}-{max(grades):g} ppm")
    extra = list(ds.rows[0].extra) if ds.rows else []
    if extra:
        lines.append(f"  extra columns: {', '.join(extra)}")
    return "\n".join(lines + [_describe_calibration(ds.calibration, "  ")])


def _describe_belt(rec: BeltRecording) -> str:
    seconds = rec.n_lines / rec.line_rate_hz
    lines = [f"{rec.root}: {BELT_FORMAT} recording, {rec.n_lines} lines x {rec.pixels} px x 2 channels",
             f"  {seconds:.3f} s of belt at {rec.line_rate_hz:g} Hz, {rec.belt_speed_m_s:g} m/s "
             f"({rec.belt_speed_m_s * seconds:.2f} m); pitch {rec.pixel_pitch_mm:g} mm across, "
             f"{rec.line_pitch_mm:.4g} mm along",
             "  truth: none" if rec.truth is None else
             f"  truth: {len(rec.truth)} rocks, labels {_counts([t['label'] for t in rec.truth])}"]
    return "\n".join(lines + [_describe_calibration(rec.calibration, "  ")])


def describe(path: Path) -> str:
    """Validate a dataset, recording, calibration folder or single TIFF and summarize it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_file() and path.name in ("dataset.json", "recording.json"):
        path = path.parent
    if path.is_file():
        if path.suffix.lower() in (".tif", ".tiff"):
            a = _read_tiff(path)
            return f"{path}: TIFF {a.shape} uint16, channel means {a.reshape(-1, 2).mean(axis=0).round(1).tolist()}"
        raise InputError(path, "not a dataset, recording or calibration folder, nor a .tiff")
    if (path / "dataset.json").exists():
        return _describe_rocks(read_rocks_dataset(path))
    if (path / "recording.json").exists():
        return _describe_belt(read_belt_recording(path))
    if (path / "dark.tiff").exists() or (path / "wedges.csv").exists():
        return f"{path}: calibration folder\n" + _describe_calibration(read_calibration(path), "  ")
    raise InputError(path, "not a dataset (no dataset.json), recording (no recording.json) "
                           "or calibration folder (no dark.tiff)")
