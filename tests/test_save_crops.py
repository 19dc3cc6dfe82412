"""`sorting run --save-crops`: the decided particles' crops as an xrt-rocks/1 dataset, handed off
by the loop to a writer thread (sorting/realtime/crops.py)."""
from __future__ import annotations

import csv
import json
import threading

import numpy as np
import pytest

from sorting.cli import main
from sorting.resources import shipped_config

SORTER = shipped_config("sorter_reference.yaml")


def _run_api(belt, model_path, out, hold_air: bool, every: int = 1, queue_crops: int = 256, wait: bool = True,
             block_writer: threading.Event | None = None):
    """The loop over the recording with a CropSaver attached; returns (events, saver summary)."""
    from loop_helpers import run_loop

    from sorting.config import load_sorter
    from sorting.io import read_belt_recording
    from sorting.realtime.crops import start_saving
    from sorting.realtime.runner import build_pipeline, timing_of
    from sorting.realtime.sources import replay
    from sorting.stages.inference import load_model

    rec = read_belt_recording(belt)
    timing = timing_of(rec.meta)
    pl = build_pipeline(rec.calibration, load_model(model_path), load_sorter(SORTER), timing, str(SORTER))
    if hold_air:  # the air level held at the calibration's, as the batch path reads it
        pl.air.end_epoch = lambda: None
    saver = start_saving(pl, out, rec.calibration, every, queue_crops=queue_crops, wait=wait)
    if block_writer is not None:
        inner = saver._write_one

        def slow(*a):
            block_writer.wait()
            inner(*a)
        saver._write_one = slow
    result = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False), pl)
    if block_writer is not None:
        block_writer.set()
    return rec, result.events, saver.close()


def _predict(ds_dir, model_path, tmp_path) -> dict[str, tuple[float, str]]:
    out = tmp_path / "pred.csv"
    assert main(["predict", str(ds_dir), "--model", str(model_path), "--out", str(out), "--quiet"]) == 0
    return {r["rock_id"]: (float(r["score"]), r["problem"]) for r in csv.DictReader(open(out))}


def test_saved_crops_are_the_recordings_counts_around_each_particle(small_belt, small_model, tmp_path):
    from sorting.io import read_rocks_dataset

    rec, events, summary = _run_api(small_belt, small_model, tmp_path / "crops", hold_air=False)
    ds = read_rocks_dataset(tmp_path / "crops")
    by_id = {str(e["particle"]): e for e in events}
    assert summary["written"] == len(ds.rows) > 0.3 * len(events)
    assert summary["dropped"] == 0  # an unpaced replay waits for the writer
    assert summary["written"] + summary["crops_skipped"] == len(events)
    for i, row in enumerate(ds.rows):
        e = by_id[row.rock_id]
        assert row.label is row.split is row.sc2o3_ppm is row.mass_g is None
        crop = ds.crop(i)
        fl = int(row.extra["first_line"])
        h, w = crop.shape[:2]
        # at least 4 px of belt on every side of the particle's box
        assert fl <= e["first_line"] - 4 and fl + h - 1 >= e["last_line"] + 4
        assert row.x0 <= e["x_min_px"] - 4 and row.x0 + w - 1 >= e["x_max_px"] + 4
        # the raw counts exactly as recorded (the raw ring held them)
        np.testing.assert_array_equal(crop, rec.lines[fl:fl + h, row.x0:row.x0 + w])


def test_predict_gives_the_loops_scores(small_belt, small_model, tmp_path):
    """With the air level held at the calibration's (as the batch path normalizes), the batch
    path re-segments each crop and scores it exactly as the loop did."""
    _, events, summary = _run_api(small_belt, small_model, tmp_path / "crops", hold_air=True)
    pred = _predict(tmp_path / "crops", small_model, tmp_path)
    loop = {str(e["particle"]): e["score"] for e in events}
    assert len(pred) == summary["written"] > 0
    close = [abs(s - loop[k]) < 1e-3 and not why for k, (s, why) in pred.items()]
    assert np.mean(close) >= 0.99


def test_every_nth_and_a_writer_that_falls_behind(small_belt, small_model, tmp_path):
    """--save-every 3 keeps particles 0, 3, 6...; a stuck writer with a paced-style (no wait)
    hand-off drops crops and counts them, and the loop still finishes every particle."""
    gate = threading.Event()
    _, events, summary = _run_api(small_belt, small_model, tmp_path / "crops", hold_air=False, every=3,
                                  queue_crops=2, wait=False, block_writer=gate)
    chosen = len([e for e in events if e["particle"] % 3 == 0])
    assert summary["dropped"] > 0
    assert summary["written"] + summary["dropped"] + summary["crops_skipped"] == chosen
    ids = [r["rock_id"] for r in csv.DictReader(open(tmp_path / "crops" / "rocks.csv"))]
    assert ids and all(int(k) % 3 == 0 for k in ids)


@pytest.mark.parametrize("extra, needle", [
    (["--workers", "2"], "--save-crops"),
    (["--save-every", "0"], "--save-every"),
])
def test_bad_options_exit_2(small_belt, small_model, tmp_path, capsys, extra, needle):
    argv = ["run", str(small_belt), "--model", str(small_model), "--sorter", str(SORTER), "--events",
            str(tmp_path / "ev.jsonl"), "--save-crops", str(tmp_path / "crops"), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cli_refuses_a_non_empty_folder_and_writes_the_summary(small_belt, small_model, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    base = ["run", str(small_belt), "--model", str(small_model), "--sorter", str(SORTER), "--quiet"]
    assert main(base + ["--events", str(tmp_path / "a.jsonl"), "--save-crops", str(full)]) == 2
    assert "not empty" in capsys.readouterr().err
    out = tmp_path / "crops"
    assert main(base + ["--events", str(tmp_path / "b.jsonl"), "--save-crops", str(out), "--save-every", "5",
                        "--summary-json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())["save_crops"]
    assert s["every"] == 5 and s["written"] == len(list((out / "rocks").glob("*.tiff"))) > 0
