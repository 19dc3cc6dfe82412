"""``xrt-belt/1`` recordings (docs/formats.md): memory-mapped lines.u16, truth.csv, recording.json."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io.calibration import (
    CalibrationScans,
    meta_for_writer,
    read_calibration,
    write_calibration,
)
from sorting.io.common import oneline, require
from sorting.io.rocks import LABELS
from sorting.io.tables import (
    cell,
    json_number,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from sorting.io.tiff import check_array

BELT_FORMAT = "xrt-belt/1"
TRUTH_COLUMNS = ("rock_id", "first_line", "last_line", "x_min_px", "x_max_px",
                 "centroid_line", "centroid_px", "label", "sc2o3_ppm", "mass_g")


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
        self._meta = meta_for_writer(meta, calibration, BELT_FORMAT, _BELT_KEYS)
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
        check_array(lines, "lines", self._pixels)
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
            write_csv(self.root / "truth.csv", self._truth_columns, truth)
        write_json(self.root / "recording.json", {**self._meta, **(extra_meta or {}), "lines": self._n})


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
    header, table = read_csv(path, TRUTH_COLUMNS)
    out, seen = [], set()
    for line, r in table:
        rec = {h: _typed(r[h]) for h in header if h not in TRUTH_COLUMNS}
        for key, kind in _TRUTH_KINDS.items():
            optional = key in ("label", "sc2o3_ppm", "mass_g")
            rec[key] = cell(path, line, r, key, kind, optional=optional,
                             choices=LABELS if key == "label" else ())
        if rec["first_line"] > rec["last_line"] or rec["x_min_px"] > rec["x_max_px"]:
            raise InputError(path, f"line {line}: first_line > last_line or x_min_px > x_max_px")
        if rec["rock_id"] in seen:
            raise InputError(path, f"line {line}: rock_id {rec['rock_id']!r} is not unique")
        seen.add(rec["rock_id"])
        out.append({k: rec[k] for k in header})
    return out


def read_belt_recording(root: Path, *, with_truth: bool = True) -> BeltRecording:
    """Read and validate an ``xrt-belt/1`` recording (docs/formats.md); lines are memory-mapped.
    ``with_truth=False`` leaves ``truth.csv`` unread (``truth`` is None), for tools that must
    work from the lines alone."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "recording folder does not exist")
    jpath = root / "recording.json"
    meta = read_json(jpath, BELT_FORMAT, ("detector_pixels", "lines") + _BELT_KEYS)
    pixels = json_number(jpath, meta, "detector_pixels", integer=True)
    n = json_number(jpath, meta, "lines", integer=True, strict=False)
    for key in _BELT_KEYS:
        json_number(jpath, meta, key)
    calibration = read_calibration(root / "calibration")
    if calibration.pixels != pixels:
        raise InputError(jpath, f"detector_pixels={pixels} but calibration/dark.tiff has {calibration.pixels} pixels")
    lpath = root / "lines.u16"
    require(lpath)
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
            raise InputError(lpath, f"cannot memory-map ({oneline(exc)})") from None
    tpath = root / "truth.csv"
    truth = _read_truth(tpath) if with_truth and tpath.exists() else None
    return BeltRecording(root, meta, calibration, lines, truth)
