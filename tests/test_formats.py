"""File formats (docs/formats.md): round trips, hand-written files, every rejection."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from sorting.errors import InputError
from sorting.io import (
    ROCK_COLUMNS,
    TRUTH_COLUMNS,
    BeltRecordingWriter,
    CalibrationScans,
    RockDatasetWriter,
    RockRow,
    WedgeScan,
    describe,
    read_belt_recording,
    read_calibration,
    read_rocks_dataset,
    write_calibration,
)

P = 40
ROOT = Path(__file__).resolve().parents[1]


def _counts(rng, n, w):
    return rng.integers(0, 65536, size=(n, w, 2), dtype=np.uint16)


@pytest.fixture
def cal():
    rng = np.random.default_rng(1)
    wedges = (WedgeScan("wedge_000.tiff", 0, 0.0, 0.0, _counts(rng, 16, 12)),
              WedgeScan("wedge_001.tiff", 28, 250.0, 12.0, _counts(rng, 20, 12)))
    return CalibrationScans(_counts(rng, 16, P), _counts(rng, 17, P), wedges)


def _tiff(path: Path, a: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, a, **({"photometric": "minisblack", "planarconfig": "contig"} | kw))


def write_csv(path: Path, header, rows) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


ROCKS = [  # rock_id, x0, label, sc2o3_ppm, mass_g, split, (h, w)
    ("00017", 0, "sc", 412.5, 88.0, "train", (12, 9)),
    ("b", 31, "waste", 3.0, None, "test", (7, 9)),
    ("c", 5, None, None, None, None, (10, 4)),
]


@pytest.fixture
def dataset(tmp_path, cal):
    rng = np.random.default_rng(2)
    crops = [_counts(rng, h, w) for *_, (h, w) in ROCKS]
    rows = [RockRow(rid, f"rocks/rock_{i:05d}.tiff", x0, lab, ppm, m, split,
                    {"lithotype": "granite" if i else ""})
            for i, (rid, x0, lab, ppm, m, split, _) in enumerate(ROCKS)]
    root = tmp_path / "ds"
    with RockDatasetWriter(root, {"pixel_pitch_mm": 1.6, "line_pitch_mm": 1.5, "ore": "test"},
                           cal, extra_columns=("lithotype",)) as w:
        for row, crop in zip(rows, crops):
            w.add(row, crop)
    return root, rows, crops


@pytest.fixture
def recording(tmp_path, cal):
    rng = np.random.default_rng(3)
    chunks = [_counts(rng, n, P) for n in (50, 1, 29)]
    truth = [dict(rock_id="7", first_line=3, last_line=20, x_min_px=4, x_max_px=15, centroid_line=11.5,
                  centroid_px=9.25, label="sc", sc2o3_ppm=300.0, mass_g=41.5, shape="round"),
             dict(rock_id="8", first_line=40, last_line=44, x_min_px=0, x_max_px=3, centroid_line=42.0,
                  centroid_px=1.0, label="waste", sc2o3_ppm=None, mass_g=None, shape="flat")]
    root = tmp_path / "belt"
    meta = {"pixel_pitch_mm": 1.6, "line_rate_hz": 2000.0, "belt_speed_m_s": 3.0, "detector_pixels": P}
    with BeltRecordingWriter(root, meta, cal, truth_columns=("shape",)) as w:
        for c in chunks:
            w.append(c)
        w.close(truth)
    return root, np.concatenate(chunks), truth


def _same_calibration(a: CalibrationScans, b: CalibrationScans) -> None:
    assert np.array_equal(a.dark, b.dark) and a.dark.dtype == b.dark.dtype == np.uint16
    assert np.array_equal(a.air, b.air)
    assert len(a.wedges) == len(b.wedges)
    for wa, wb in zip(a.wedges, b.wedges):
        assert (wa.file, wa.x0, wa.pom_mm, wa.fe_mm) == (wb.file, wb.x0, wb.pom_mm, wb.fe_mm)
        assert np.array_equal(wa.counts, wb.counts)


# ---------------------------------------------------------------- round trips
def test_calibration_round_trip(tmp_path, cal):
    write_calibration(tmp_path / "calibration", cal)
    back = read_calibration(tmp_path / "calibration")
    _same_calibration(cal, back)
    assert back.pixels == P
    assert back.source == str(tmp_path / "calibration")


def test_rocks_round_trip(dataset, cal):
    root, rows, crops = dataset
    ds = read_rocks_dataset(root)
    assert ds.rows == tuple(rows)
    assert ds.rows[0].rock_id == "00017"  # ids stay strings, leading zeros kept
    assert (ds.pixels, ds.pixel_pitch_mm, ds.line_pitch_mm) == (P, 1.6, 1.5)
    assert ds.meta["format"] == "xrt-rocks/1" and ds.meta["ore"] == "test"
    assert ds.meta["channels"] == ["low", "high"] and ds.meta["detector_pixels"] == P
    for i, crop in enumerate(crops):
        got = ds.crop(i)
        assert got.dtype == np.uint16 and np.array_equal(got, crop)
    _same_calibration(cal, ds.calibration)
    header = (root / "rocks.csv").read_text().splitlines()[0]
    assert header == ",".join(ROCK_COLUMNS) + ",lithotype"


def test_belt_round_trip(recording, cal):
    root, lines, truth = recording
    rec = read_belt_recording(root)
    assert isinstance(rec.lines, np.memmap) and not rec.lines.flags.writeable
    assert rec.lines.shape == (80, P, 2) and rec.n_lines == 80 and rec.pixels == P
    assert rec.lines.dtype == np.dtype("<u2")
    assert np.array_equal(rec.lines, lines)
    assert (root / "lines.u16").read_bytes() == lines.astype("<u2").tobytes()
    assert rec.meta["lines"] == 80 and rec.meta["format"] == "xrt-belt/1"
    assert rec.line_pitch_mm == pytest.approx(3.0 * 1000 / 2000.0)  # 1.5 mm per line
    assert (rec.line_rate_hz, rec.belt_speed_m_s, rec.pixel_pitch_mm) == (2000.0, 3.0, 1.6)
    assert rec.truth == truth
    assert isinstance(rec.truth[0]["first_line"], int) and rec.truth[0]["rock_id"] == "7"
    _same_calibration(cal, rec.calibration)
    header = (root / "truth.csv").read_text().splitlines()[0]
    assert header == ",".join(TRUTH_COLUMNS) + ",shape"


def test_belt_without_truth_and_empty(tmp_path, cal):
    meta = {"pixel_pitch_mm": 1.0, "line_rate_hz": 100.0, "belt_speed_m_s": 1.0}
    with BeltRecordingWriter(tmp_path / "r", meta, cal):
        pass
    rec = read_belt_recording(tmp_path / "r")
    assert rec.truth is None and rec.lines.shape == (0, P, 2)


def test_writer_that_fails_leaves_no_json(tmp_path, cal):
    meta = {"pixel_pitch_mm": 1.0, "line_rate_hz": 100.0, "belt_speed_m_s": 1.0}
    with pytest.raises(ValueError, match="pixels"):
        with BeltRecordingWriter(tmp_path / "r", meta, cal) as w:
            w.append(np.zeros((4, P + 1, 2), np.uint16))
    assert not (tmp_path / "r" / "recording.json").exists()


def test_rock_writer_rejects_bad_rows(tmp_path, cal):
    w = RockDatasetWriter(tmp_path / "d", {"pixel_pitch_mm": 1.0, "line_pitch_mm": 1.0}, cal)
    crop = np.zeros((5, 5, 2), np.uint16)
    with pytest.raises(ValueError, match="label"):
        w.add(RockRow("1", "rocks/1.tiff", 0, "ore", None, None, None), crop)
    with pytest.raises(ValueError, match="exceeds"):
        w.add(RockRow("1", "rocks/1.tiff", P - 4, None, None, None, None), crop)
    with pytest.raises(ValueError, match="uint16"):
        w.add(RockRow("1", "rocks/1.tiff", 0, None, None, None, None), crop.astype(np.float32))
    w.add(RockRow("1", "rocks/1.tiff", 0, None, None, None, None), crop)
    with pytest.raises(ValueError, match="twice"):
        w.add(RockRow("1", "rocks/2.tiff", 0, None, None, None, None), crop)


# ---------------------------------------------------------------- hand-written files
def _hand_calibration(folder: Path, rng) -> dict:
    folder.mkdir(parents=True)
    arrays = {"dark.tiff": _counts(rng, 16, P), "air.tiff": _counts(rng, 16, P),
              "wedge_a.tiff": _counts(rng, 16, 40), "wedge_b.tiff": _counts(rng, 18, 10)}
    for name, a in arrays.items():
        _tiff(folder / name, a)
    write_csv(folder / "wedges.csv", ["file", "x0", "pom_mm", "fe_mm"],
               [["wedge_a.tiff", 0, 0, 0], ["wedge_b.tiff", 30, "125.5", "6"]])
    return arrays


def test_hand_written_dataset(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "hand_ds"
    arrays = _hand_calibration(root / "calibration", rng)
    (root / "dataset.json").write_text(json.dumps(
        {"format": "xrt-rocks/1", "detector_pixels": P, "pixel_pitch_mm": 2.0, "line_pitch_mm": 2.5,
         "channels": ["low", "high"], "site": "somewhere"}))
    crop = _counts(rng, 9, 6)
    _tiff(root / "rocks" / "r1.tiff", crop)
    big_endian = _counts(rng, 5, 5)  # another tool's TIFF: big-endian, extra column before the contract ones
    _tiff(root / "rocks" / "r2.tif", big_endian, byteorder=">")
    write_csv(root / "rocks.csv", ["lithotype", *ROCK_COLUMNS],
               [["skarn", "r1", "rocks/r1.tiff", "34", "sc", "250", "12.5", "train"],
                ["", "2", "rocks/r2.tif", "0", "waste", "", "", ""]])
    ds = read_rocks_dataset(root)
    assert ds.rows == (RockRow("r1", "rocks/r1.tiff", 34, "sc", 250.0, 12.5, "train", {"lithotype": "skarn"}),
                       RockRow("2", "rocks/r2.tif", 0, "waste", None, None, None, {"lithotype": ""}))
    assert np.array_equal(ds.crop(0), crop) and np.array_equal(ds.crop(1), big_endian)
    assert ds.crop(1).dtype == np.uint16
    assert np.array_equal(ds.calibration.dark, arrays["dark.tiff"])
    assert [(w.file, w.x0, w.pom_mm, w.fe_mm) for w in ds.calibration.wedges] == \
        [("wedge_a.tiff", 0, 0.0, 0.0), ("wedge_b.tiff", 30, 125.5, 6.0)]
    assert "2 rocks" in describe(root)


def test_hand_written_recording(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "hand_belt"
    _hand_calibration(root / "calibration", rng)
    lines = _counts(rng, 33, P)
    lines.astype("<u2").tofile(root / "lines.u16")
    (root / "recording.json").write_text(json.dumps(
        {"format": "xrt-belt/1", "detector_pixels": P, "lines": 33, "pixel_pitch_mm": 1.0,
         "line_rate_hz": 4000, "belt_speed_m_s": 2.5}))
    write_csv(root / "truth.csv", TRUTH_COLUMNS,
               [["r9", 2, 9, 10, 20, "5.5", "15.0", "waste", "", "7.25"]])
    rec = read_belt_recording(root)
    assert np.array_equal(rec.lines, lines) and rec.lines.shape == (33, P, 2)
    assert rec.line_pitch_mm == pytest.approx(0.625)  # 2.5 m/s * 1000 / 4000 Hz
    assert rec.truth == [dict(rock_id="r9", first_line=2, last_line=9, x_min_px=10, x_max_px=20,
                              centroid_line=5.5, centroid_px=15.0, label="waste", sc2o3_ppm=None, mass_g=7.25)]
    text = describe(root)
    assert "33 lines" in text and "0.008 s" in text  # 33 / 4000 Hz = 8.25 ms


# ---------------------------------------------------------------- rejections
def _break(kind: str, ds: Path, belt: Path) -> tuple[Path, str]:
    """Damage a good dataset or recording; return (path to read, regex the message must match)."""
    rng = np.random.default_rng(6)
    if kind == "truncated_lines":
        data = (belt / "lines.u16").read_bytes()
        (belt / "lines.u16").write_bytes(data[:-3])
        n = len(data) - 3
        return belt, rf"lines\.u16: has {n} bytes, recording\.json says N=80 P=40 -> .*{len(data)} bytes"
    if kind == "float_tiff":
        _tiff(ds / "rocks" / "rock_00001.tiff", np.zeros((7, 9, 2), np.float32))
        return ds, r"rock_00001\.tiff: .*dtype float32"
    if kind == "uint8_tiff":
        _tiff(ds / "calibration" / "air.tiff", np.zeros((16, P, 2), np.uint8))
        return ds, r"air\.tiff: .*dtype uint8"
    if kind == "missing_dark":
        (belt / "calibration" / "dark.tiff").unlink()
        return belt, r"dark\.tiff: .*does not exist"
    if kind == "three_channels":
        _tiff(ds / "rocks" / "rock_00000.tiff", _counts(rng, 12, 9)[..., [0, 1, 1]])
        return ds, r"rock_00000\.tiff: .*3 channels"
    if kind == "two_pages":
        tifffile.imwrite(ds / "rocks" / "rock_00002.tiff", _counts(rng, 10, 4).transpose(2, 0, 1).copy(),
                         photometric="minisblack")
        return ds, r"rock_00002\.tiff: has 2 pages"
    if kind == "planar":
        _tiff(ds / "rocks" / "rock_00002.tiff", _counts(rng, 10, 4).transpose(2, 0, 1).copy(),
              planarconfig="separate")
        return ds, r"rock_00002\.tiff: channels are stored as separate planes"
    if kind == "not_tiff":
        (ds / "rocks" / "rock_00002.tiff").write_bytes(b"hello, not a tiff")
        return ds, r"rock_00002\.tiff: not a readable TIFF"
    if kind == "short_scan":
        _tiff(ds / "calibration" / "dark.tiff", _counts(rng, 15, P))
        return ds, r"dark\.tiff: has 15 lines; .*at least 16"
    if kind == "air_pixels":
        _tiff(ds / "calibration" / "air.tiff", _counts(rng, 16, P - 1))
        return ds, r"air\.tiff: has 39 pixels but dark\.tiff has 40"
    if kind == "wedge_overhang":
        _edit_csv(ds / "calibration" / "wedges.csv", 1, "x0", "29")
        return ds, r"wedge_001\.tiff: x0=29 \+ width 12 exceeds .* 40 pixels"
    if kind == "wedge_bad_number":
        _edit_csv(ds / "calibration" / "wedges.csv", 0, "fe_mm", "thick")
        return ds, r"wedges\.csv: line 2: fe_mm is 'thick'"
    if kind == "rocks_missing_columns":
        _drop_columns(ds / "rocks.csv", ("label", "split"))
        return ds, r"rocks\.csv: missing column\(s\) label, split"
    if kind == "truth_missing_columns":
        _drop_columns(belt / "truth.csv", ("centroid_px",))
        return belt, r"truth\.csv: missing column\(s\) centroid_px"
    if kind == "x0_negative":
        _edit_csv(ds / "rocks.csv", 1, "x0", "-1")
        return ds, r"rocks\.csv: line 3: x0 -1 is outside"
    if kind == "x0_out_of_range":
        _edit_csv(ds / "rocks.csv", 0, "x0", "40")
        return ds, r"rocks\.csv: line 2: x0 40 is outside the detector's columns 0\.\.39"
    if kind == "crop_overhang":
        _edit_csv(ds / "rocks.csv", 1, "x0", "32")  # 32 + 9 > 40
        return ds, r"rock_00001\.tiff: x0=32 \+ width 9 = 41 exceeds detector_pixels=40"
    if kind == "bad_label":
        _edit_csv(ds / "rocks.csv", 2, "label", "Sc-bearing")
        return ds, r"rocks\.csv: line 4: label is 'Sc-bearing'; expected sc, waste or empty"
    if kind == "bad_split":
        _edit_csv(ds / "rocks.csv", 2, "split", "val")
        return ds, r"rocks\.csv: line 4: split is 'val'; expected train, test or empty"
    if kind == "nan_grade":
        _edit_csv(ds / "rocks.csv", 0, "sc2o3_ppm", "nan")
        return ds, r"rocks\.csv: line 2: sc2o3_ppm is 'nan'"
    if kind == "negative_mass":
        _edit_csv(ds / "rocks.csv", 0, "mass_g", "-2")
        return ds, r"rocks\.csv: line 2: mass_g is '-2'"
    if kind == "duplicate_id":
        _edit_csv(ds / "rocks.csv", 2, "rock_id", "b")
        return ds, r"rocks\.csv: line 4: rock_id 'b' is not unique"
    if kind == "missing_crop":
        (ds / "rocks" / "rock_00001.tiff").unlink()
        return ds, r"rock_00001\.tiff: does not exist \(listed in rocks\.csv line 3\)"
    if kind == "missing_rocks_csv":
        (ds / "rocks.csv").unlink()
        return ds, r"rocks\.csv: file does not exist"
    if kind == "json_garbage":
        (ds / "dataset.json").write_text("{format: xrt-rocks/1")
        return ds, r"dataset\.json: not valid JSON"
    if kind == "json_format":
        _edit_json(belt / "recording.json", format="xrt-belt/2")
        return belt, r"recording\.json: \"format\" is 'xrt-belt/2'; expected \"xrt-belt/1\""
    if kind == "json_missing_key":
        _edit_json(ds / "dataset.json", line_pitch_mm=None)
        return ds, r"dataset\.json: missing key\(s\) line_pitch_mm"
    if kind == "line_rate_zero":
        _edit_json(belt / "recording.json", line_rate_hz=0)
        return belt, r"recording\.json: \"line_rate_hz\" is 0; expected a number > 0"
    if kind == "pixels_mismatch":
        _edit_json(ds / "dataset.json", detector_pixels=41)
        return ds, r"dataset\.json: detector_pixels=41 but calibration/dark\.tiff has 40"
    if kind == "truth_bad_int":
        _edit_csv(belt / "truth.csv", 0, "first_line", "3.5")
        return belt, r"truth\.csv: line 2: first_line is '3\.5'; expected an integer"
    raise AssertionError(kind)


def _edit_csv(path: Path, row: int, column: str, value: str) -> None:
    with path.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    table[row][column] = value
    write_csv(path, list(table[0]), [list(r.values()) for r in table])


def _drop_columns(path: Path, columns) -> None:
    with path.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    keep = [c for c in table[0] if c not in columns]
    write_csv(path, keep, [[r[c] for c in keep] for r in table])


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


BROKEN = ["truncated_lines", "float_tiff", "uint8_tiff", "missing_dark", "three_channels", "two_pages",
          "planar", "not_tiff", "short_scan", "air_pixels", "wedge_overhang", "wedge_bad_number",
          "rocks_missing_columns", "truth_missing_columns", "x0_negative", "x0_out_of_range",
          "crop_overhang", "bad_label", "bad_split", "nan_grade", "negative_mass", "duplicate_id",
          "missing_crop", "missing_rocks_csv", "json_garbage", "json_format", "json_missing_key",
          "line_rate_zero", "pixels_mismatch", "truth_bad_int"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_input_names_the_file(kind, dataset, recording):
    path, pattern = _break(kind, dataset[0], recording[0])
    with pytest.raises(InputError, match=pattern):
        describe(path)  # reads every crop too, so lazily read problems surface here


@pytest.mark.parametrize("kind", ["float_tiff", "three_channels", "crop_overhang", "not_tiff"])
def test_crop_problems_surface_at_crop(kind, dataset, recording):
    root = dataset[0]
    path, pattern = _break(kind, root, recording[0])
    ds = read_rocks_dataset(root)  # crops are lazy: the dataset opens
    with pytest.raises(InputError, match=pattern):
        for i in range(len(ds.rows)):
            ds.crop(i)


def test_missing_folders(tmp_path):
    for reader in (read_calibration, read_rocks_dataset, read_belt_recording, describe):
        with pytest.raises(InputError, match="nowhere.*does not exist"):
            reader(tmp_path / "nowhere")
    with pytest.raises(InputError, match="not a dataset"):
        describe(tmp_path)


# ---------------------------------------------------------------- CLI
def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sorting.cli", "inspect", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("kind", ["truncated_lines", "three_channels", "rocks_missing_columns", "json_garbage"])
def test_cli_inspect_broken(kind, dataset, recording):
    path, pattern = _break(kind, dataset[0], recording[0])
    res = _inspect(path)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("sorting inspect: error: ")


def test_cli_inspect_good(dataset):
    res = _inspect(dataset[0])
    assert res.returncode == 0, res.stderr
    assert "3 rocks" in res.stdout and "sc 1" in res.stdout
