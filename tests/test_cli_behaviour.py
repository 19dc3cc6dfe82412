"""What a user sees from the verbs beyond bad input: the exit status of an interrupted verb,
output folders that are not made from typos, `simulate --force`, `inspect` on models and
YAML, the `problem` column of `predict`, and the demo's printout and picture."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from sorting.cli import main

ROOT = Path(__file__).resolve().parents[1]
SORTER = ROOT / "configs" / "sorter_reference.yaml"


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------- signals outside the loop
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_set_up_exits_128_plus_signum(small_belt, small_model, tmp_path, capsys, monkeypatch,
                                                       signum):
    """The signal arrives while the loop is being built (kernels compiled, calibration made):
    nothing was decided, the run is not finished, so 130 / 143 with one line, as mid-run."""
    import sorting.cli.run as run_mod

    real = run_mod.build_pipeline

    def interrupted_build(*a, **kw):
        os.kill(os.getpid(), signum)
        return real(*a, **kw)

    monkeypatch.setattr(run_mod, "build_pipeline", interrupted_build)
    rc, _, err = _cli(["run", small_belt, "--model", small_model, "--sorter", SORTER,
                       "--events", tmp_path / "ev.jsonl", "--quiet"], capsys)
    assert rc == 128 + signum
    assert err.splitlines() == [f"sorting run: interrupted ({signal.Signals(signum).name})"]
    assert signal.getsignal(signal.SIGTERM) is not None  # main() put its handler back


def test_a_signal_while_workers_set_up_exits_143(small_belt, small_model, tmp_path, capsys, monkeypatch):
    """With --workers 2 a signal while the feature workers set up ends the run before the belt
    starts: the same 143 (not the 130 of a Ctrl-C), and no worker is left behind."""
    import multiprocessing as mp

    from sorting.realtime import parallel

    real = parallel.FeaturePool._wait_ready

    def wait_ready(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args)

    monkeypatch.setattr(parallel.FeaturePool, "_wait_ready", wait_ready)
    rc, _, err = _cli(["run", small_belt, "--model", small_model, "--sorter", SORTER, "--events",
                       tmp_path / "ev.jsonl", "--workers", "2", "--quiet"], capsys)
    assert rc == 143, err
    assert err.splitlines() == ["sorting run: interrupted (SIGTERM)"]
    assert mp.active_children() == []


# ---------------------------------------------------------------- output files and folders
def test_a_missing_output_folder_is_refused_and_not_made(small_belt, small_model, tmp_path, capsys):
    missing = tmp_path / "missing" / "dir"
    rc, out, err = _cli(["run", small_belt, "--model", small_model, "--sorter", SORTER,
                         "--events", missing / "ev.jsonl", "--quiet"], capsys)
    assert rc == 2 and out == ""
    assert err == f"sorting run: error: --events: {missing / 'ev.jsonl'}: the folder {missing} does not exist " \
                  "(create it first)\n"
    assert not (tmp_path / "missing").exists()


def test_an_output_folder_option_creates_its_folder(small_rocks, small_model, tmp_path, capsys):
    report = tmp_path / "new" / "report"
    rc, _, err = _cli(["evaluate", small_rocks, "--model", small_model, "--report", report, "--quiet"], capsys)
    assert rc == 0, err
    assert (report / "metrics.json").is_file()


# ---------------------------------------------------------------- simulate --force
def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_simulate_refuses_a_non_empty_folder_and_force_leaves_no_stale_file(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _cli(["simulate", "rocks", out, "--n", "4", "--seed", "3", "--quiet"], capsys)[0] == 0
    before = {p: (out / p).read_bytes() for p in _files(out)}
    rc, _, err = _cli(["simulate", "rocks", out, "--n", "2", "--seed", "5", "--quiet"], capsys)
    assert rc == 2 and "not empty" in err and "--force" in err
    assert {p: (out / p).read_bytes() for p in _files(out)} == before  # untouched
    (out / "rocks" / "stale_note.txt").write_text("left by hand")
    rc, _, err = _cli(["simulate", "rocks", out, "--n", "2", "--seed", "5", "--force", "--quiet"], capsys)
    assert rc == 0, err
    # the same as a simulation into a new folder: two crops, nothing of the four-rock dataset
    fresh = tmp_path / "fresh"
    assert _cli(["simulate", "rocks", fresh, "--n", "2", "--seed", "5", "--quiet"], capsys)[0] == 0
    assert _files(out) == _files(fresh)
    assert (out / "rocks.csv").read_text() == (fresh / "rocks.csv").read_text()
    assert not any(p.name.endswith(".new") for p in tmp_path.iterdir())
    # an empty folder needs no --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["simulate", "belt", empty, "--seconds", "0.05", "--quiet"], capsys)[0] == 0


def test_force_will_not_replace_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(["simulate", "rocks", ".", "--n", "1", "--force", "--quiet"], capsys)
    assert rc == 2 and "current or home folder" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- inspect
def test_inspect_summarizes_a_model(small_model, capsys):
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION
    from sorting.stages.inference import load_model

    m = load_model(small_model)
    rc, out, err = _cli(["inspect", small_model], capsys)
    assert rc == 0, err
    assert f"features: version {FEATURE_VERSION}, {len(FEATURE_NAMES)} names" in out
    assert f"threshold {m.threshold:.4f}" in out
    tm = m.meta["training_metrics"]
    assert f"trained on {tm['n_train']} rocks ({tm['n_sc']} sc)" in out
    assert f"AUC {tm['cv_auc']:.3f} (95 % CI " in out
    assert "parent model: none" in out


def test_inspect_recognizes_each_yaml_and_reads_it(capsys):
    sorter = yaml.safe_load(SORTER.read_text())
    rc, out, _ = _cli(["inspect", SORTER], capsys)
    e = sorter["ejector"]
    assert rc == 0 and "sorter YAML" in out
    assert f"{e['valves']} valves at {e['valve_pitch_mm']:g} mm" in out
    assert f"blow out {sorter['sorting']['eject']}" in out
    machine = yaml.safe_load((ROOT / "configs" / "machine_reference.yaml").read_text())
    rc, out, _ = _cli(["inspect", ROOT / "configs" / "machine_reference.yaml"], capsys)
    assert rc == 0 and f"machine YAML {machine['name']!r}" in out
    assert f"{machine['detector']['pixels']} pixels of {machine['detector']['pixel_pitch_mm']:g} mm" in out
    ore = yaml.safe_load((ROOT / "configs" / "ore_crater_lake.yaml").read_text())
    rc, out, _ = _cli(["inspect", ROOT / "configs" / "ore_crater_lake.yaml"], capsys)
    assert rc == 0 and f"ore YAML {ore['name']!r}" in out
    assert all(lith["name"] in out for lith in ore["lithotypes"])
    assert f"label cut-off {ore['label_cutoff_ppm']:g} ppm Sc2O3" in out
    materials = yaml.safe_load((ROOT / "configs" / "materials.yaml").read_text())
    rc, out, _ = _cli(["inspect", ROOT / "configs" / "materials.yaml"], capsys)
    assert rc == 0 and f"valid: {len(materials)} materials" in out


def test_a_truncated_tiff_gets_one_message_from_every_verb(small_rocks, small_model, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(small_rocks, ds)
    with open(ds / "rocks.csv") as f:
        crop = ds / next(csv.DictReader(f))["file"]
    data = crop.read_bytes()
    crop.write_bytes(data[:len(data) // 2])
    messages = []
    for argv in (["inspect", crop], ["inspect", ds], ["predict", ds, "--model", small_model, "--out",
                                                      tmp_path / "s.csv", "--quiet"]):
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and len(err.splitlines()) == 1, err
        messages.append(err.split(": error: ", 1)[1].split(": ", 1)[1])  # after the file's path
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith("is truncated: its pixel data ends at byte ")
    assert messages[0].endswith(f"the file has {len(data) // 2} bytes\n")
    assert "ValueError" not in messages[0]


# ---------------------------------------------------------------- predict's problem column
def test_predict_says_why_a_crop_could_not_be_scored(small_rocks, small_model, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(small_rocks, ds)
    with open(ds / "rocks.csv") as f:
        rows = list(csv.DictReader(f))
    crop = ds / rows[0]["file"]
    h, w = tifffile.imread(crop).shape[:2]
    x0 = int(rows[0]["x0"])
    air = tifffile.imread(ds / "calibration" / "air.tiff")  # empty belt at the crop's columns: no rock
    empty = np.ascontiguousarray(np.resize(air[:, x0:x0 + w], (h, w, 2)))
    crop.unlink()
    tifffile.imwrite(crop, empty, photometric="minisblack", planarconfig="contig")
    out = tmp_path / "scores.csv"
    rc, _, err = _cli(["predict", ds, "--model", small_model, "--out", out, "--quiet"], capsys)
    assert rc == 0
    assert f"rock {rows[0]['rock_id']}: no rock in the crop" in err
    with open(out) as f:
        reader = csv.reader(f)
        header = next(reader)
        got = list(reader)
    assert header == ["rock_id", "score", "decision", "problem"]  # the required three first
    assert got[0] == [rows[0]["rock_id"], "0.000000", "waste", "no rock in the crop"]
    assert all(r[3] == "" for r in got[1:])


# ---------------------------------------------------------------- demo
def test_label_positions_stay_inside_the_frame():
    from sorting.cli.demo import label_position

    # a rock cut by the top of the stretch, at the right edge of the belt
    x, y, ha, va = label_position({"x_min_px": 1230, "x_max_px": 1249, "first_line": 90}, 100, 1600, 1250)
    assert (x, y, ha) == (1228, 100, "right") and va == "top"
    # a rock starting on the stretch's last line, at the left edge
    x, y, ha, va = label_position({"x_min_px": 0, "x_max_px": 10, "first_line": 1599}, 100, 1600, 1250)
    assert (x, y, ha, va) == (12, 1599, "left", "bottom")
    # as wide as the belt: no room on either side, the label goes on the rock, left-aligned
    x, _, ha, _ = label_position({"x_min_px": 5, "x_max_px": 1240, "first_line": 500}, 100, 1600, 1250)
    assert (x, ha) == (5, "left")
    # every placement leaves the label's room inside the frame
    rng = np.random.default_rng(0)
    for _ in range(500):
        x0 = int(rng.integers(0, 1250))
        e = {"x_min_px": x0, "x_max_px": int(rng.integers(x0, 1250)), "first_line": int(rng.integers(0, 1700))}
        x, y, ha, va = label_position(e, 100, 1600, 1250)
        assert (0 <= x - 40 if ha == "right" else x + 40 <= 1250 or x == e["x_min_px"]) and 100 <= y <= 1599
        assert va == "top" or y + 20 > 1600


def test_kernels_cached_reads_a_cold_cache_as_cold(tmp_path):
    """In a process whose numba cache folder is empty, the demo knows it will compile."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", "from sorting.cli.demo import kernels_cached, compile_notice; "
                          "print(kernels_cached()); print(compile_notice())"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert res.stdout.splitlines() == ["False",
                                       "compiling the loop's kernels once (~20 s; they are cached on disk for "
                                       "the next runs)"]


def test_the_demo_explains_its_numbers(tmp_path, capsys):
    rc, out, err = _cli(["demo", "--seconds", "0.4", "--out", tmp_path / "demo"], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    o = s["outcome"]
    assert "ppm Sc2O3 -> product" in out
    jets = [line for line in out.splitlines() if line.startswith("jets: ")]
    assert len(jets) == 1
    assert f"eject {s['ejected']} counts the particles the jets were fired at" in jets[0]
    assert f"they blew out {o['blown_out']} rocks" in jets[0]
    assert f"the product holds {o['n_product']} rocks" in jets[0]
    # the sorter ejects sc: the product is what the jets blew out
    assert o["n_product"] == o["blown_out"]
    assert (tmp_path / "demo" / "belt.png").stat().st_size > 10_000
    from sorting.cli.demo import kernels_cached

    assert kernels_cached() is True  # the demo compiled the loop here, and numba cached it


def test_a_signal_in_the_demo_loop_ends_the_demo_with_130(tmp_path, capsys, monkeypatch):
    """The demo runs the loop as one step of its work: a Ctrl-C there does not go on to a report
    of half a belt, it ends the verb as unfinished."""
    from sorting.realtime.stream import Pipeline

    real = Pipeline.step

    def step(self, first_line, raw, t_in):
        if first_line == 64:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, first_line, raw, t_in)

    monkeypatch.setattr(Pipeline, "step", step)
    rc, out, err = _cli(["demo", "--seconds", "0.2", "--out", tmp_path / "demo"], capsys)
    assert rc == 130
    assert err.splitlines()[-1] == "sorting demo: interrupted (SIGINT)"
    assert "3/3" not in out and not (tmp_path / "demo" / "summary.json").exists()
