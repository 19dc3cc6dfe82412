"""Validate any project file or folder and summarize it in a few lines (``sorting inspect``)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io.belt import BELT_FORMAT, BeltRecording, read_belt_recording
from sorting.io.calibration import CalibrationScans, read_calibration
from sorting.io.rocks import ROCKS_FORMAT, RockDataset, read_rocks_dataset
from sorting.io.tiff import read_tiff


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
            a = read_tiff(path)
            return f"{path}: TIFF {a.shape} uint16, channel means {a.reshape(-1, 2).mean(axis=0).round(1).tolist()}"
        raise InputError(path, "not a dataset, recording or calibration folder, nor a .tiff, .onnx or .yaml file")
    if (path / "dataset.json").exists():
        return _describe_rocks(read_rocks_dataset(path))
    if (path / "recording.json").exists():
        return _describe_belt(read_belt_recording(path))
    if (path / "dark.tiff").exists() or (path / "wedges.csv").exists():
        return f"{path}: calibration folder\n" + _describe_calibration(read_calibration(path), "  ")
    raise InputError(path, "not a dataset (no dataset.json), recording (no recording.json) "
                           "or calibration folder (no dark.tiff)")
