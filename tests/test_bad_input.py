"""The bad-input corpus, driven through the command-line verbs.

Every case hands a verb a damaged copy of a session fixture (or a broken config or
option) and expects what docs/cli.md promises: exit status 2 and exactly one
line on stderr that names the file or option and the problem, never a traceback.
Extra CSV columns and JSON keys are allowed by the contract: those cases must succeed.

Most cases run ``sorting.cli.main`` in-process (fast); a handful run the real
``python -m sorting.cli`` in a subprocess, without ``--quiet``, as a user would.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from sorting.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ---------------------------------------------------------------- copying and damaging
def _copy_rocks(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _copy_belt(src: Path, dst: Path) -> Path:
    """A copy whose 28 MB lines.u16 is a symlink (cases that damage it replace it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lines.u16"))
    os.symlink(src / "lines.u16", dst / "lines.u16")
    return dst


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _write_table(path: Path, header: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _edit_rows(path: Path, **set_all) -> None:
    header, rows = _read_table(path)
    for r in rows:
        r.update(set_all)
    _write_table(path, header, rows)


def _edit_row(path: Path, i: int, **values) -> None:
    header, rows = _read_table(path)
    rows[i].update(values)
    _write_table(path, header, rows)


def _first_crop(ds: Path) -> tuple[Path, dict]:
    _, rows = _read_table(ds / "rocks.csv")
    return ds / rows[0]["file"], rows[0]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.unlink()  # never write through a symlink into a fixture
    path.write_bytes(data[:int(len(data) * keep)])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\x00garbage garbage"[:16]
    path.write_bytes(bytes(data))


def _retype_tiff(path: Path, fn) -> None:
    a = tifffile.imread(path)
    tifffile.imwrite(path, fn(a), photometric="minisblack", planarconfig="contig")


def _model_meta(src: Path, dst: Path, **changes) -> Path:
    import onnx

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["sorting"])
    meta.update(changes)
    props["sorting"] = json.dumps(meta)
    onnx.helper.set_model_props(proto, props)
    dst.write_bytes(proto.SerializeToString())
    return dst


def _yaml_edit(src: Path, dst: Path, edit) -> Path:
    data = yaml.safe_load(src.read_text())
    edit(data)
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


# ---------------------------------------------------------------- running a verb
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    return rc, capsys.readouterr().err


def _assert_one_line(rc: int, err: str, *fragments: str) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}, stderr: {err!r}"
    lines = err.splitlines()  # also splits on the \r of a progress bar
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def fx(small_rocks, small_belt, small_model) -> dict:
    return {"rocks": small_rocks, "belt": small_belt, "model": small_model}


def _predict(ds: Path, model: Path, tmp: Path) -> list:
    return ["predict", ds, "--model", model, "--out", tmp / "scores.csv", "--quiet"]


def _train(ds: Path, tmp: Path) -> list:
    return ["train", ds, "--out", tmp / "m.onnx", "--quiet"]


def _run(rec: Path, model: Path, sorter: Path, tmp: Path) -> list:
    return ["run", rec, "--model", model, "--sorter", sorter, "--events", tmp / "ev.jsonl", "--quiet"]


SORTER = CONFIGS / "sorter_reference.yaml"
MACHINE = CONFIGS / "machine_reference.yaml"
ORE = CONFIGS / "ore_crater_lake.yaml"


# ---------------------------------------------------------------- the corpus
# Each builder damages copies in ``tmp`` and returns (argv, fragments the one line must hold).
def _crop_truncated(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _truncate(crop, 0.6)
    return _predict(ds, fx["model"], tmp), [crop.name]


def _crop_garbage(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _garble_header(crop)
    return _train(ds, tmp), [crop.name, "not a readable TIFF"]


def _crop_float(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _retype_tiff(crop, lambda a: a.astype(np.float32))
    return _predict(ds, fx["model"], tmp), [crop.name, "dtype float32"]


def _crop_uint8(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _retype_tiff(crop, lambda a: (a >> 8).astype(np.uint8))
    return _train(ds, tmp), [crop.name, "dtype uint8"]


def _crop_three_channels(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _retype_tiff(crop, lambda a: np.concatenate([a, a[..., :1]], axis=2))
    return _predict(ds, fx["model"], tmp), [crop.name, "3 channels"]


def _crop_one_channel(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _retype_tiff(crop, lambda a: np.ascontiguousarray(a[..., 0]))
    return _predict(ds, fx["model"], tmp), [crop.name, "expected (h, w, 2)"]


def _crop_overhang(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    w = tifffile.imread(crop).shape[1]
    _edit_row(ds / "rocks.csv", 0, x0=str(1250 - w + 1))
    return _train(ds, tmp), [crop.name, "exceeds"]


def _x0_negative(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_row(ds / "rocks.csv", 3, x0="-4")
    return _predict(ds, fx["model"], tmp), ["rocks.csv", "line 5", "x0"]


def _x0_out_of_range(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_row(ds / "rocks.csv", 0, x0="1250")
    return _train(ds, tmp), ["rocks.csv", "line 2", "x0"]


def _x0_not_a_number(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_row(ds / "rocks.csv", 0, x0="left")
    return _train(ds, tmp), ["rocks.csv", "line 2", "x0"]


def _rocks_missing_column(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    header, rows = _read_table(ds / "rocks.csv")
    _write_table(ds / "rocks.csv", [h for h in header if h != "label"], rows)
    return _train(ds, tmp), ["rocks.csv", "missing column(s) label"]


def _rocks_short_row(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    text = (ds / "rocks.csv").read_text().splitlines()
    text[2] = ",".join(text[2].split(",")[:4])
    (ds / "rocks.csv").write_text("\n".join(text) + "\n")
    return _predict(ds, fx["model"], tmp), ["rocks.csv", "line 3"]


def _wedges_missing_column(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    header, rows = _read_table(ds / "calibration" / "wedges.csv")
    _write_table(ds / "calibration" / "wedges.csv", [h for h in header if h != "fe_mm"], rows)
    return _train(ds, tmp), ["wedges.csv", "missing column(s) fe_mm"]


def _wedge_x0_negative(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_row(ds / "calibration" / "wedges.csv", 2, x0="-1")
    return _predict(ds, fx["model"], tmp), ["wedges.csv", "line 4", "x0"]


def _wedge_overhang(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_row(ds / "calibration" / "wedges.csv", 0, x0="1249")
    return _predict(ds, fx["model"], tmp), ["wedge_000.tiff", "exceeds"]


def _dark_truncated(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _truncate(ds / "calibration" / "dark.tiff", 0.5)
    return _train(ds, tmp), ["dark.tiff"]


def _air_garbage(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    _garble_header(rec / "calibration" / "air.tiff")
    return _run(rec, fx["model"], SORTER, tmp), ["air.tiff", "not a readable TIFF"]


def _dark_float(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    _retype_tiff(rec / "calibration" / "dark.tiff", lambda a: a.astype(np.float64))
    return _run(rec, fx["model"], SORTER, tmp), ["dark.tiff", "dtype float64"]


def _air_three_channels(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _retype_tiff(ds / "calibration" / "air.tiff", lambda a: np.concatenate([a, a[..., :1]], axis=2))
    return _predict(ds, fx["model"], tmp), ["air.tiff", "3 channels"]


def _air_fewer_pixels(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _retype_tiff(ds / "calibration" / "air.tiff", lambda a: np.ascontiguousarray(a[:, :1000]))
    return _train(ds, tmp), ["air.tiff", "1000 pixels"]


def _wedge_uint8(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _retype_tiff(ds / "calibration" / "wedge_005.tiff", lambda a: (a >> 8).astype(np.uint8))
    return _predict(ds, fx["model"], tmp), ["wedge_005.tiff", "dtype uint8"]


def _calibration_pixels_mismatch(fx, tmp):
    """dataset.json and the calibration disagree on P (crop vs calibration shapes)."""
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["detector_pixels"] = 1024
    (ds / "dataset.json").write_text(json.dumps(meta))
    return _predict(ds, fx["model"], tmp), ["dataset.json", "detector_pixels=1024"]


def _missing_dark(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    (ds / "calibration" / "dark.tiff").unlink()
    return _train(ds, tmp), ["dark.tiff", "does not exist"]


def _missing_wedge_file(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    (rec / "calibration" / "wedge_010.tiff").unlink()
    return _run(rec, fx["model"], SORTER, tmp), ["wedge_010.tiff", "does not exist"]


def _missing_calibration(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    shutil.rmtree(rec / "calibration")
    return _run(rec, fx["model"], SORTER, tmp), ["calibration", "does not exist"]


def _beam_off_air(fx, tmp):
    """air.tiff is a second dark scan: readable, but nothing to calibrate from."""
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    shutil.copy(ds / "calibration" / "dark.tiff", ds / "calibration" / "air.tiff")
    return _train(ds, tmp), ["calibration"]


def _lines_short(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    _truncate(rec / "lines.u16", 0.9)
    return _run(rec, fx["model"], SORTER, tmp), ["lines.u16", "bytes"]


def _lines_long(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    meta = json.loads((rec / "recording.json").read_text())
    meta["lines"] -= 1  # the file now holds one line more than the json says
    (rec / "recording.json").write_text(json.dumps(meta))
    return _run(rec, fx["model"], SORTER, tmp), ["lines.u16", "bytes"]


def _truth_missing_column(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    header, rows = _read_table(rec / "truth.csv")
    _write_table(rec / "truth.csv", [h for h in header if h != "last_line"], rows)
    return _run(rec, fx["model"], SORTER, tmp), ["truth.csv", "missing column(s) last_line"]


def _recording_json_nan(fx, tmp):
    rec = _copy_belt(fx["belt"], tmp / "rec")
    text = (rec / "recording.json").read_text().replace('"line_rate_hz": 3750.0', '"line_rate_hz": NaN')
    (rec / "recording.json").write_text(text)
    return _run(rec, fx["model"], SORTER, tmp), ["recording.json", "line_rate_hz"]


# ---- datasets that cannot be trained on
def _one_class(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_rows(ds / "rocks.csv", label="waste")
    return _train(ds, tmp), ["rocks.csv", "0 sc"]


def _no_labels(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_rows(ds / "rocks.csv", label="")
    return _train(ds, tmp), ["rocks.csv", "no labeled rows"]


def _only_test_split(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    _edit_rows(ds / "rocks.csv", split="test")
    return _train(ds, tmp), ["rocks.csv", "split=train"]


def _no_rows(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    header, _ = _read_table(ds / "rocks.csv")
    _write_table(ds / "rocks.csv", header, [])
    return _train(ds, tmp), ["rocks.csv", "no labeled rows"]


# ---- models
def _predict_not_onnx(fx, tmp):
    bad = tmp / "model.onnx"
    bad.write_text("this is not a model\n")
    return _predict(fx["rocks"], bad, tmp), ["model.onnx", "not an ONNX model"]


def _run_not_onnx(fx, tmp):
    bad = tmp / "model.onnx"
    shutil.copy(fx["rocks"] / "calibration" / "dark.tiff", bad)
    return _run(fx["belt"], bad, SORTER, tmp), ["model.onnx", "not an ONNX model"]


def _model_truncated(fx, tmp):
    bad = tmp / "model.onnx"
    bad.write_bytes(fx["model"].read_bytes()[:5000])
    return _predict(fx["rocks"], bad, tmp), ["model.onnx"]


def _model_empty(fx, tmp):
    bad = tmp / "model.onnx"
    bad.write_bytes(b"")
    return _run(fx["belt"], bad, SORTER, tmp), ["model.onnx"]


def _model_missing(fx, tmp):
    return _predict(fx["rocks"], tmp / "nope.onnx", tmp), ["nope.onnx", "no such model file"]


def _model_other_version(fx, tmp):
    m = _model_meta(fx["model"], tmp / "other.onnx", feature_version="0")
    return _predict(fx["rocks"], m, tmp), ["other.onnx", "other features"]


def _model_other_names(fx, tmp):
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(fx["model"])).metadata_props}["sorting"])
    names = list(meta["feature_names"])
    names[0], names[1] = names[1], names[0]
    m = _model_meta(fx["model"], tmp / "other.onnx", feature_names=names)
    return _run(fx["belt"], m, SORTER, tmp), ["other.onnx", "other features"]


def _model_fewer_features(fx, tmp):
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(fx["model"])).metadata_props}["sorting"])
    m = _model_meta(fx["model"], tmp / "other.onnx", feature_names=meta["feature_names"][:-1])
    return _predict(fx["rocks"], m, tmp), ["other.onnx", "other features"]


# ---- sorter YAML (run --sorter)
def _sorter(edit, tmp):
    return _yaml_edit(SORTER, tmp / "sorter.yaml", edit)


def _sorter_case(edit, *frags):
    def build(fx, tmp):
        return _run(fx["belt"], fx["model"], _sorter(edit, tmp), tmp), ["sorter.yaml", *frags]
    return build


def _set(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p] if not p.isdigit() else d[int(p)]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()


def _sorter_not_yaml(fx, tmp):
    p = tmp / "sorter.yaml"
    p.write_text("ejector: [distance_mm: 300\n  valves: {\n")
    return _run(fx["belt"], fx["model"], p, tmp), ["sorter.yaml", "not valid YAML"]


def _sorter_empty(fx, tmp):
    p = tmp / "sorter.yaml"
    p.write_text("")
    return _run(fx["belt"], fx["model"], p, tmp), ["sorter.yaml"]


def _sorter_missing(fx, tmp):
    return _run(fx["belt"], fx["model"], tmp / "nope.yaml", tmp), ["nope.yaml", "no such file"]


# ---- machine and ore YAML (simulate --machine / --ore)
def _simulate_rocks(tmp, machine=MACHINE, ore=ORE):
    return ["simulate", "rocks", tmp / "out", "--n", "2", "--machine", machine, "--ore", ore, "--quiet"]


def _simulate_belt(tmp, machine=MACHINE, ore=ORE):
    return ["simulate", "belt", tmp / "out", "--seconds", "0.05", "--machine", machine, "--ore", ore, "--quiet"]


def _machine_case(edit, *frags, verb=_simulate_rocks):
    def build(fx, tmp):
        return verb(tmp, machine=_yaml_edit(MACHINE, tmp / "machine.yaml", edit)), ["machine.yaml", *frags]
    return build


def _ore_case(edit, *frags, verb=_simulate_rocks):
    def build(fx, tmp):
        return verb(tmp, ore=_yaml_edit(ORE, tmp / "ore.yaml", edit)), ["ore.yaml", *frags]
    return build


def _machine_text_nan(fx, tmp):
    p = tmp / "machine.yaml"
    p.write_text(MACHINE.read_text().replace("kvp: 160.0", "kvp: .nan"))
    return _simulate_belt(tmp, machine=p), ["machine.yaml", "tube.kvp", "finite"]


# ---- output files whose folder does not exist (never created), non-empty simulate folders
def _events_missing_folder(fx, tmp):
    argv = _run(fx["belt"], fx["model"], SORTER, tmp)
    argv[argv.index("--events") + 1] = tmp / "missing" / "dir" / "ev.jsonl"
    return argv, ["--events", str(tmp / "missing" / "dir")]


def _summary_json_missing_folder(workers: int):
    def build(fx, tmp):
        return (_run(fx["belt"], fx["model"], SORTER, tmp)
                + ["--summary-json", tmp / "nowhere" / "s.json", "--workers", str(workers)],
                ["--summary-json", str(tmp / "nowhere")])
    return build


def _predict_out_missing_folder(fx, tmp):
    return (["predict", fx["rocks"], "--model", fx["model"], "--out", tmp / "no" / "scores.csv", "--quiet"],
            ["--out", str(tmp / "no")])


def _train_out_missing_folder(fx, tmp):
    return ["train", fx["rocks"], "--out", tmp / "no" / "m.onnx", "--quiet"], ["--out", str(tmp / "no")]


def _bench_json_missing_folder(fx, tmp):
    return (["bench", "--recording", fx["belt"], "--model", fx["model"], "--json", tmp / "no" / "b.json", "--quiet"],
            ["--json", str(tmp / "no")])


def _not_empty(what: str):
    def build(fx, tmp):
        out = tmp / "out"
        out.mkdir()
        (out / "old_crop.tiff").write_bytes(b"stale")
        argv = _simulate_rocks(tmp) if what == "rocks" else _simulate_belt(tmp)
        return argv, ["out", "not empty", "--force"]
    return build


def _model_is_folder(fx, tmp):
    d = tmp / "models"
    d.mkdir()
    return _predict(fx["rocks"], d, tmp), ["models", "is a folder, not a model file"]


def _run_model_is_folder(fx, tmp):
    return _run(fx["belt"], tmp, SORTER, tmp), [str(tmp), "is a folder, not a model file"]


# ---- sorting inspect on damaged files: TIFFs, models, YAML
def _inspect_truncated_crop(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _truncate(crop, 0.6)
    return ["inspect", crop], [crop.name, "is truncated"]


def _inspect_garbage_tiff(fx, tmp):
    ds = _copy_rocks(fx["rocks"], tmp / "ds")
    crop, _ = _first_crop(ds)
    _garble_header(crop)
    return ["inspect", crop], [crop.name, "not a readable TIFF"]


def _inspect_model_other_version(fx, tmp):
    return ["inspect", _model_meta(fx["model"], tmp / "other.onnx", feature_version="0")], ["other.onnx",
                                                                                           "other features"]


def _inspect_model_garbage(fx, tmp):
    bad = tmp / "model.onnx"
    bad.write_text("this is not a model\n")
    return ["inspect", bad], ["model.onnx", "not an ONNX model"]


def _inspect_yaml(src: Path, edit, *frags, name: str = "cfg.yaml"):
    def build(fx, tmp):
        return ["inspect", _yaml_edit(src, tmp / name, edit)], [name, *frags]
    return build


def _inspect_unknown_yaml(fx, tmp):
    p = tmp / "cfg.yaml"
    p.write_text("conveyor: {speed: 3}\nlights: on\n")
    return ["inspect", p], ["cfg.yaml", "top-level keys conveyor, lights", "not a sorter"]


def _inspect_not_yaml(fx, tmp):
    p = tmp / "cfg.yaml"
    p.write_text("ejector: [distance_mm: 300\n  valves: {\n")
    return ["inspect", p], ["cfg.yaml", "not valid YAML"]


def _inspect_bad_materials(fx, tmp):
    p = tmp / "materials.yaml"
    p.write_text("albite: {formula: NaAlSi3O8, density_g_cm3: -2.6}\n")
    return ["inspect", p], ["materials.yaml", "albite.density_g_cm3"]


CASES = {
    # TIFFs: crops and calibration scans
    "crop_truncated": _crop_truncated,
    "crop_garbage": _crop_garbage,
    "crop_float": _crop_float,
    "crop_uint8": _crop_uint8,
    "crop_three_channels": _crop_three_channels,
    "crop_one_channel": _crop_one_channel,
    "crop_overhang": _crop_overhang,
    "dark_truncated": _dark_truncated,
    "air_garbage": _air_garbage,
    "dark_float": _dark_float,
    "air_three_channels": _air_three_channels,
    "air_fewer_pixels": _air_fewer_pixels,
    "wedge_uint8": _wedge_uint8,
    "calibration_pixels_mismatch": _calibration_pixels_mismatch,
    "beam_off_air": _beam_off_air,
    # CSV and JSON
    "x0_negative": _x0_negative,
    "x0_out_of_range": _x0_out_of_range,
    "x0_not_a_number": _x0_not_a_number,
    "rocks_missing_column": _rocks_missing_column,
    "rocks_short_row": _rocks_short_row,
    "wedges_missing_column": _wedges_missing_column,
    "wedge_x0_negative": _wedge_x0_negative,
    "wedge_overhang": _wedge_overhang,
    "truth_missing_column": _truth_missing_column,
    "recording_json_nan": _recording_json_nan,
    # missing files
    "missing_dark": _missing_dark,
    "missing_wedge_file": _missing_wedge_file,
    "missing_calibration": _missing_calibration,
    # recordings
    "lines_short": _lines_short,
    "lines_long": _lines_long,
    # training sets
    "one_class": _one_class,
    "no_labels": _no_labels,
    "only_test_split": _only_test_split,
    "no_rows": _no_rows,
    # models
    "predict_not_onnx": _predict_not_onnx,
    "run_not_onnx": _run_not_onnx,
    "model_truncated": _model_truncated,
    "model_empty": _model_empty,
    "model_missing": _model_missing,
    "model_other_version": _model_other_version,
    "model_other_names": _model_other_names,
    "model_fewer_features": _model_fewer_features,
    # sorter YAML
    "sorter_negative_pitch": _sorter_case(_set("ejector.valve_pitch_mm", -12.5), "ejector.valve_pitch_mm"),
    "sorter_nan_distance": _sorter_case(_set("ejector.distance_mm", float("nan")), "ejector.distance_mm", "finite"),
    "sorter_null_response": _sorter_case(_set("ejector.response_ms", None), "ejector.response_ms", "missing"),
    "sorter_null_ejector": _sorter_case(_set("ejector", None), "ejector", "missing"),
    "sorter_no_distance": _sorter_case(_set("ejector.distance_mm", _DELETE), "ejector.distance_mm", "missing"),
    "sorter_no_eject": _sorter_case(_set("sorting.eject", _DELETE), "sorting.eject", "missing"),
    "sorter_no_sorting": _sorter_case(_set("sorting", _DELETE), "sorting", "missing"),
    "sorter_fractional_valves": _sorter_case(_set("ejector.valves", 80.5), "ejector.valves", "integer"),
    "sorter_zero_valves": _sorter_case(_set("ejector.valves", 0), "ejector.valves"),
    "sorter_threshold_out_of_range": _sorter_case(_set("sorting.threshold", 1.5), "sorting.threshold"),
    "sorter_threshold_nan": _sorter_case(_set("sorting.threshold", float("nan")), "sorting.threshold"),
    "sorter_bad_eject": _sorter_case(_set("sorting.eject", "gold"), "sorting.eject"),
    "sorter_unknown_key": _sorter_case(_set("ejector.nozzles", 3), "ejector.nozzles", "unknown key"),
    "sorter_string_number": _sorter_case(_set("ejector.margin_mm", "five"), "ejector.margin_mm"),
    "sorter_valves_miss_belt": _sorter_case(_set("ejector.offset_mm", 5000.0), "valves"),
    "sorter_zero_max_valves": _sorter_case(_set("ejector.max_valves", 0), "ejector", "max_valves"),
    "sorter_fractional_max_valves": _sorter_case(_set("ejector.max_valves", 2.5), "ejector.max_valves", "integer"),
    "sorter_bad_tramp": _sorter_case(_set("sorting.tramp", "keep"), "sorting.tramp"),
    "sorter_not_yaml": _sorter_not_yaml,
    "sorter_empty": _sorter_empty,
    "sorter_missing": _sorter_missing,
    # machine YAML
    "machine_nan_kvp": _machine_text_nan,
    "machine_negative_pixels": _machine_case(_set("detector.pixels", -1250), "detector.pixels"),
    "machine_missing_belt": _machine_case(_set("belt", _DELETE), "belt", verb=_simulate_belt),
    "machine_null_pitch": _machine_case(_set("detector.pixel_pitch_mm", None), "detector.pixel_pitch_mm"),
    "machine_nan_speed": _machine_case(_set("belt.speed_m_s", float("nan")), "belt.speed_m_s", verb=_simulate_belt),
    "machine_negative_flux": _machine_case(_set("flux_photons_per_px_line", -5.0), "flux_photons_per_px_line"),
    "machine_negative_air": _machine_case(_set("detector.air_level_adu", [-30000.0, 40000.0]),
                                          "detector.air_level_adu"),
    "machine_saturating_air": _machine_case(_set("detector.air_level_adu", [30000.0, 90000.0]),
                                            "detector.air_level_adu"),
    "machine_nan_filter": _machine_case(_set("tube.filters.0.thickness_mm", float("nan")), "tube.filters[0]"),
    "machine_unknown_material": _machine_case(_set("detector.front.material", "unobtainium"), "unobtainium"),
    "machine_high_kvp": _machine_case(_set("tube.kvp", 5000.0), "kvp"),
    # ore YAML
    "ore_negative_variability": _ore_case(_set("sc_variability", -0.2), "sc_variability"),
    "ore_nan_grade": _ore_case(_set("mineral_sc2o3_ppm.albite", float("nan")), "mineral_sc2o3_ppm.albite"),
    "ore_negative_grade": _ore_case(_set("mineral_sc2o3_ppm.albite", -2.0), "mineral_sc2o3_ppm.albite"),
    "ore_missing_proportion": _ore_case(_set("lithotypes.0.proportion", _DELETE), "proportion"),
    "ore_null_cutoff": _ore_case(_set("label_cutoff_ppm", None), "label_cutoff_ppm", verb=_simulate_belt),
    "ore_nan_pct": _ore_case(_set("lithotypes.0.minerals.albite.min_pct", float("nan")), "min_pct"),
    "ore_unknown_mineral": _ore_case(lambda d: d["lithotypes"][0]["minerals"].update(
        {"kryptonite": {"min_pct": 0.0, "max_pct": 1.0}}) or d["mineral_sc2o3_ppm"].update({"kryptonite": 5.0}),
        "kryptonite"),
    "ore_sizes_swapped": _ore_case(lambda d: d.update(size_min_mm=120.0), "size_min_mm"),
    # output files and folders
    "events_missing_folder": _events_missing_folder,
    "summary_json_missing_folder": _summary_json_missing_folder(1),
    "summary_json_missing_folder_workers": _summary_json_missing_folder(2),
    "predict_out_missing_folder": _predict_out_missing_folder,
    "train_out_missing_folder": _train_out_missing_folder,
    "bench_json_missing_folder": _bench_json_missing_folder,
    "simulate_rocks_not_empty": _not_empty("rocks"),
    "simulate_belt_not_empty": _not_empty("belt"),
    "model_is_folder": _model_is_folder,
    "run_model_is_folder": _run_model_is_folder,
    # sorting inspect
    "inspect_truncated_crop": _inspect_truncated_crop,
    "inspect_garbage_tiff": _inspect_garbage_tiff,
    "inspect_model_other_version": _inspect_model_other_version,
    "inspect_model_garbage": _inspect_model_garbage,
    "inspect_sorter_negative_pitch": _inspect_yaml(SORTER, _set("ejector.valve_pitch_mm", -12.5),
                                                   "ejector.valve_pitch_mm"),
    "inspect_sorter_missing_key": _inspect_yaml(SORTER, _set("ejector.response_ms", _DELETE), "ejector.response_ms",
                                                "missing"),
    "inspect_machine_nan_speed": _inspect_yaml(MACHINE, _set("belt.speed_m_s", float("nan")), "belt.speed_m_s"),
    "inspect_machine_unknown_material": _inspect_yaml(MACHINE, _set("detector.front.material", "unobtainium"),
                                                      "unobtainium"),
    "inspect_ore_negative_grade": _inspect_yaml(ORE, _set("mineral_sc2o3_ppm.albite", -2.0),
                                                "mineral_sc2o3_ppm.albite"),
    "inspect_bad_materials": _inspect_bad_materials,
    "inspect_unknown_yaml": _inspect_unknown_yaml,
    "inspect_not_yaml": _inspect_not_yaml,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, fx, tmp_path, capsys):
    argv, fragments = CASES[case](fx, tmp_path)
    rc, err = _cli(argv, capsys)
    _assert_one_line(rc, err, *fragments)


# ---------------------------------------------------------------- bad options
def _a_file(path: Path) -> Path:
    path.write_text("a file where a folder is needed\n")
    return path


OPTION_CASES = {
    "chunk_lines_zero": (lambda fx, tmp: _run(fx["belt"], fx["model"], SORTER, tmp) + ["--chunk-lines", "0"],
                         ["--chunk-lines"]),
    "n_zero": (lambda fx, tmp: ["simulate", "rocks", tmp / "o", "--n", "0", "--quiet"], ["--n"]),
    "seconds_negative": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--seconds", "-1", "--quiet"],
                         ["--seconds"]),
    "seconds_nan": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--seconds", "nan", "--quiet"], ["--seconds"]),
    "occupancy_too_high": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--occupancy", "0.95", "--quiet"],
                           ["--occupancy"]),
    "test_fraction": (lambda fx, tmp: ["simulate", "rocks", tmp / "o", "--test-fraction", "2", "--quiet"],
                      ["--test-fraction"]),
    "tramp_negative": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--tramp", "-1", "--quiet"], ["--tramp"]),
    "slabs_negative": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--slabs", "-2", "--quiet"], ["--slabs"]),
    "splice_period_negative": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--splice-every-s", "-8", "--quiet"],
                               ["--splice-every-s"]),
    "slab_too_short": (lambda fx, tmp: ["simulate", "belt", tmp / "o", "--slabs", "1", "--slab-mm", "5", "--quiet"],
                       ["--slab-mm"]),
    "target_recovery": (lambda fx, tmp: _train(fx["rocks"], tmp) + ["--target-recovery", "0"],
                        ["--target-recovery"]),
    "soft_width_negative": (lambda fx, tmp: _train(fx["rocks"], tmp) + ["--soft-width", "-0.1"], ["--soft-width"]),
    "twin_rocks_few": (lambda fx, tmp: ["adapt", fx["model"], fx["rocks"], "--out", tmp / "a.onnx",
                                        "--twin-rocks", "3"], ["--twin-rocks"]),
    "out_is_folder": (lambda fx, tmp: ["predict", fx["rocks"], "--model", fx["model"], "--out", tmp, "--quiet"],
                      ["is a folder"]),
    "udp_garbage": (lambda fx, tmp: _run(fx["belt"], fx["model"], SORTER, tmp) + ["--udp", "nowhere"], ["--udp"]),
    "no_such_dataset": (lambda fx, tmp: _predict(tmp / "nowhere", fx["model"], tmp), ["nowhere", "does not exist"]),
    "no_such_recording": (lambda fx, tmp: _run(tmp / "nowhere", fx["model"], SORTER, tmp),
                          ["nowhere", "does not exist"]),
    "chunk_lines_huge": (lambda fx, tmp: _run(fx["belt"], fx["model"], SORTER, tmp) + ["--chunk-lines", "10000000"],
                         ["--chunk-lines"]),
    "workers_zero": (lambda fx, tmp: _run(fx["belt"], fx["model"], SORTER, tmp) + ["--workers", "0"], ["--workers"]),
    "listen_unknown_host": (lambda fx, tmp: _run(fx["belt"], fx["model"], SORTER, tmp)
                            + ["--listen", "no.such.host.invalid:5000"], ["--listen"]),
    "events_unwritable": (lambda fx, tmp: ["run", fx["belt"], "--model", fx["model"], "--sorter", SORTER,
                                           "--events", _a_file(tmp / "blocker") / "ev.jsonl", "--quiet"],
                          ["ev.jsonl"]),
    "demo_not_onnx": (lambda fx, tmp: ["demo", "--model", SORTER, "--out", tmp / "demo"],
                      ["sorter_reference.yaml", "not an ONNX model"]),
    "bench_not_onnx": (lambda fx, tmp: ["bench", "--model", SORTER, "--quiet"],
                       ["sorter_reference.yaml", "not an ONNX model"]),
    "bench_chunk_lines": (lambda fx, tmp: ["bench", "--chunk-lines", "0", "--quiet"], ["--chunk-lines"]),
    "bench_repeats": (lambda fx, tmp: ["bench", "--repeats", "0", "--quiet"], ["--repeats"]),
    "unknown_verb": (lambda fx, tmp: ["sortify"], ["sortify"]),
    "missing_required": (lambda fx, tmp: ["run", fx["belt"], "--model", fx["model"]], ["--sorter"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_exits_2_with_one_line(case, fx, tmp_path, capsys):
    build, fragments = OPTION_CASES[case]
    rc, err = _cli(build(fx, tmp_path), capsys)
    _assert_one_line(rc, err, *fragments)


# ---------------------------------------------------------------- allowed extras
def test_extra_columns_and_keys_are_accepted(fx, tmp_path, capsys):
    """docs/formats.md: extra keys and columns are allowed; values with commas and quotes too."""
    ds = _copy_rocks(fx["rocks"], tmp_path / "ds")
    header, rows = _read_table(ds / "rocks.csv")
    for i, r in enumerate(rows):
        r["operator_note"] = f'bag {i}, "wet"'
    _write_table(ds / "rocks.csv", ["operator_note"] + header + ["z"], rows)
    wedges = ds / "calibration" / "wedges.csv"
    header, rows = _read_table(wedges)
    for r in rows:
        r["step_id"] = "A"
    _write_table(wedges, header + ["step_id"], rows)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["site"] = {"name": "Crater Lake", "bench": 3}
    (ds / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "scores.csv"
    rc, err = _cli(["predict", ds, "--model", fx["model"], "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    ids = [r["rock_id"] for r in _read_table(out)[1]]
    assert ids == [r["rock_id"] for r in _read_table(fx["rocks"] / "rocks.csv")[1]]


def test_empty_recording_runs(fx, tmp_path, capsys):
    """N = 0 is a valid recording: nothing to sort, no crash on undefined rates."""
    rec = _copy_belt(fx["belt"], tmp_path / "rec")
    (rec / "lines.u16").unlink()
    (rec / "lines.u16").write_bytes(b"")
    meta = json.loads((rec / "recording.json").read_text())
    meta["lines"] = 0
    (rec / "recording.json").write_text(json.dumps(meta))
    header, _ = _read_table(rec / "truth.csv")
    _write_table(rec / "truth.csv", header, [])
    rc, err = _cli(_run(rec, fx["model"], SORTER, tmp_path), capsys)
    assert rc == 0, err
    assert (tmp_path / "ev.jsonl").read_text() == ""


def test_extra_truth_columns_are_accepted(fx, tmp_path, capsys):
    rec = _copy_belt(fx["belt"], tmp_path / "rec")
    header, rows = _read_table(rec / "truth.csv")
    for r in rows:
        r["photo"] = "img,1.png"
    _write_table(rec / "truth.csv", ["photo"] + header, rows)
    meta = json.loads((rec / "recording.json").read_text())
    meta["operator"] = "night shift"
    (rec / "recording.json").write_text(json.dumps(meta))
    rc, err = _cli(["inspect", rec], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------- a real terminal
SUBPROCESS_CASES = ["crop_truncated", "crop_float", "lines_short", "one_class", "model_other_version",
                    "sorter_nan_distance", "machine_nan_kvp", "events_missing_folder",
                    "summary_json_missing_folder_workers", "simulate_belt_not_empty", "model_is_folder",
                    "inspect_truncated_crop", "inspect_model_other_version", "inspect_sorter_negative_pitch"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_no_traceback_reaches_a_real_process(case, fx, tmp_path):
    """As a user runs it: a separate interpreter, progress bars on (no --quiet)."""
    argv, fragments = CASES[case](fx, tmp_path)
    argv = [str(a) for a in argv if a != "--quiet"]
    res = subprocess.run([sys.executable, "-m", "sorting.cli", *argv], capture_output=True, text=True, check=False,
                         cwd=ROOT, timeout=300)
    _assert_one_line(res.returncode, res.stderr, *fragments)
    assert res.stderr.startswith(f"sorting {argv[0]}: error: ")
