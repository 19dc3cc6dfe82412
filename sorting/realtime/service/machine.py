"""The MACHINE folder of `sorting serve`: the machine keys of an ``xrt-belt/1`` recording and
its ``calibration/``; ``lines`` may be 0 and ``lines.u16`` absent."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sorting.errors import InputError
from sorting.io.belt import BELT_FORMAT
from sorting.io.calibration import CalibrationScans, read_calibration
from sorting.io.tables import json_number, read_json

MACHINE_KEYS = ("detector_pixels", "pixel_pitch_mm", "line_rate_hz", "belt_speed_m_s")


@dataclass(frozen=True)
class Machine:
    root: Path
    meta: dict
    calibration: CalibrationScans


def read_machine(root: Path) -> Machine:
    """Read and check a machine folder (or any ``xrt-belt/1`` recording); its lines are not read."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "machine folder does not exist")
    jpath = root / "recording.json"
    meta = read_json(jpath, BELT_FORMAT, MACHINE_KEYS)
    pixels = json_number(jpath, meta, "detector_pixels", integer=True)
    for key in MACHINE_KEYS[1:]:
        json_number(jpath, meta, key)  # a finite number > 0
    calibration = read_calibration(root / "calibration")
    if calibration.pixels != pixels:
        raise InputError(jpath, f"detector_pixels={pixels} but calibration/dark.tiff has {calibration.pixels} pixels")
    return Machine(root, meta, calibration)
