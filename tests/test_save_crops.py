"""`sorting run --save-crops`: the decided particles' crops as an xrt-rocks/1 dataset, handed off
by the loop to a writer process (sorting/realtime/crops.py), each with the air level the loop
normalized it with, so that `sorting predict` gives the loop's scores."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sorting.cli import main
from sorting.resources import shipped_config

SORTER = shipped_config("sorter_reference.yaml")


def _pipeline(belt, model_path):
    from sorting.config import load_sorter
    from sorting.io import read_belt_recording
    from sorting.realtime.runner import build_pipeline, timing_of
    from sorting.stages.inference import load_model

    rec = read_belt_recording(belt)
    timing = timing_of(rec.meta)
    return rec, timing, build_pipeline(rec.calibration, load_model(model_path), load_sorter(SORTER), timing,
                                       str(SORTER))


def _run_api(belt, model_path, out, every: int = 1, queue_crops: int = 256, wait: bool = True, before=None):
    """The loop over the recording with a CropSaver attached; ``before(saver)`` runs before the
    belt starts. Returns (recording, events, saver summary)."""
    from loop_helpers import run_loop

    from sorting.realtime.crops import start_saving
    from sorting.realtime.sources import replay

    rec, timing, pl = _pipeline(belt, model_path)
    saver = start_saving(pl, out, rec.calibration, every, queue_crops=queue_crops, wait=wait)
    try:
        if before is not None:
            before(saver)
        result = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False), pl)
    finally:
        summary = saver.close()
    return rec, result.events, summary


def _predict(ds_dir, model_path, tmp_path, name="pred.csv") -> dict[str, tuple[float, str]]:
    out = tmp_path / name
    assert main(["predict", str(ds_dir), "--model", str(model_path), "--out", str(out), "--quiet"]) == 0
    return {r["rock_id"]: (float(r["score"]), r["problem"]) for r in csv.DictReader(open(out))}


def test_saved_crops_are_the_recordings_counts_around_each_particle(small_belt, small_model, tmp_path):
    from sorting.io import read_air, read_rocks_dataset

    rec, events, summary = _run_api(small_belt, small_model, tmp_path / "crops")
    ds = read_rocks_dataset(tmp_path / "crops")
    by_id = {str(e["particle"]): e for e in events}
    assert summary["written"] == len(ds.rows) > 0.3 * len(events)
    assert summary["dropped"] == 0 and "writer_error" not in summary  # an unpaced replay waits for the writer
    assert summary["written"] + summary["crops_skipped"] == len(events)
    # every crop handed off is listed, and nothing else was written
    assert len(list((tmp_path / "crops" / "rocks").glob("*.tiff"))) == len(ds.rows)
    assert not list((tmp_path / "crops").glob("*.tmp"))
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
        # the air level: one per pixel; it changes only where an air-tracker epoch (256 lines) begins
        air = read_air(ds.root, row, crop.shape)
        assert air.dtype == np.float32 and air.shape == crop.shape
        epoch = (fl + np.arange(h)) // 256
        same = epoch[1:] == epoch[:-1]
        np.testing.assert_array_equal(air[1:][same], air[:-1][same])


def test_predict_gives_the_loops_scores(small_belt, small_model, tmp_path):
    """`sorting run --save-crops`, then `sorting predict DIR`: the batch path normalizes each crop
    with the air level it carries, re-segments it and scores it as the loop did (the event log's
    scores). Without the air level (the calibration's flat field) most scores differ: the tracked
    level has moved away from the calibration's on this belt."""
    ev_path, crops = tmp_path / "events.jsonl", tmp_path / "crops"
    assert main(["run", str(small_belt), "--model", str(small_model), "--sorter", str(SORTER), "--events",
                 str(ev_path), "--save-crops", str(crops), "--quiet"]) == 0
    loop = {str(e["particle"]): e["score"] for e in map(json.loads, open(ev_path))}
    pred = _predict(crops, small_model, tmp_path)
    assert len(pred) > 0.3 * len(loop)
    close = [abs(s - loop[k]) < 1e-3 and not why for k, (s, why) in pred.items()]
    assert np.mean(close) >= 0.99
    # the same crops read with the calibration's level only (the column dropped)
    table = list(csv.DictReader(open(crops / "rocks.csv")))
    with open(crops / "rocks.csv", "w", newline="") as fh:
        out = csv.DictWriter(fh, [c for c in table[0] if c != "air_file"], extrasaction="ignore")
        out.writeheader()
        out.writerows(table)
    static = _predict(crops, small_model, tmp_path, "static.csv")
    assert np.mean([abs(s - loop[k]) < 1e-3 and not why for k, (s, why) in static.items()]) < 0.99


def test_attenuation_with_a_per_pixel_level_is_the_flat_field_one(small_belt):
    """``attenuation(..., log_flat=L)`` with L the calibration's own level on every line gives the
    calibration's attenuation bit for bit; a level higher by d gives A higher by d (A = ln(air -
    dark) - ln(counts - dark))."""
    from sorting.io import read_belt_recording
    from sorting.stages.calibrate import calibrate
    from sorting.stages.normalize import attenuation

    rec = read_belt_recording(small_belt)
    cal = calibrate(rec.calibration)
    raw = np.ascontiguousarray(rec.lines[100:140, 300:420])
    level = np.broadcast_to(cal.log_flat[300:420], raw.shape).astype(np.float32)
    a = attenuation(raw, cal, 300)
    np.testing.assert_array_equal(attenuation(raw, cal, 300, log_flat=level), a)
    good = ~cal.bad[300:420]
    higher = attenuation(raw, cal, 300, log_flat=level + np.float32(0.01))
    np.testing.assert_allclose(higher[:, good], a[:, good] + 0.01, atol=1e-5)
    with pytest.raises(ValueError):
        attenuation(raw, cal, 300, log_flat=level[:-1])


def test_every_nth_and_a_writer_that_falls_behind(small_belt, small_model, tmp_path):
    """--save-every 3 keeps particles 0, 3, 6...; a stopped writer with a paced-style (no wait)
    hand-off drops crops and counts them, and the loop still finishes every particle; once it
    runs again, it writes what it was handed, every crop of it (close waits for them all)."""
    def run():
        from loop_helpers import run_loop

        from sorting.realtime.crops import start_saving
        from sorting.realtime.sources import replay

        rec, timing, pl = _pipeline(small_belt, small_model)
        saver = start_saving(pl, tmp_path / "crops", rec.calibration, 3, queue_crops=2, wait=False)
        os.kill(saver._proc.pid, signal.SIGSTOP)
        try:
            result = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False), pl)
        finally:
            os.kill(saver._proc.pid, signal.SIGCONT)
        loop_skipped = sum(saver.skipped.values())
        return result.events, saver.handed, loop_skipped, saver.close()

    events, handed, loop_skipped, summary = run()
    chosen = len([e for e in events if e["particle"] % 3 == 0])
    assert summary["dropped"] > 0 and handed == summary["handed"] == 2
    assert summary["written"] + summary["dropped"] + summary["crops_skipped"] == chosen
    # every crop handed is written or skipped by the writer for a reason of its own
    assert summary["written"] + summary["crops_skipped"] - loop_skipped == handed
    ids = [r["rock_id"] for r in csv.DictReader(open(tmp_path / "crops" / "rocks.csv"))]
    assert len(ids) == summary["written"] and all(int(k) % 3 == 0 for k in ids)


def test_close_waits_for_every_crop_handed(small_belt, small_model, tmp_path):
    """A writer stopped while the whole belt is handed off (room for every crop, no wait): the
    crops wait in the shared arena (their headers in the pipe, grown to hold them); close() then
    waits until the writer has written them all."""
    from loop_helpers import run_loop

    from sorting.realtime.crops import start_saving
    from sorting.realtime.sources import replay

    rec, timing, pl = _pipeline(small_belt, small_model)
    saver = start_saving(pl, tmp_path / "crops", rec.calibration, 4, queue_crops=400, wait=False)
    os.kill(saver._proc.pid, signal.SIGSTOP)
    try:
        result = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False), pl)
        assert len(saver._ring) == saver.handed > 0  # none taken out yet
    finally:
        os.kill(saver._proc.pid, signal.SIGCONT)
    summary = saver.close()
    assert summary["dropped"] == 0 and "writer_error" not in summary
    assert summary["written"] + summary["crops_skipped"] == len([e for e in result.events if e["particle"] % 4 == 0])
    assert summary["written"] == len(list(csv.DictReader(open(tmp_path / "crops" / "rocks.csv")))) > 0


def test_the_arena_ring_keeps_crops_apart():
    """The arena's room, taken out oldest first: a crop never overlaps one still in it, never
    runs past the end, the ring holds at most ``cap`` crops, an empty ring takes any crop that
    fits the arena, and room given back is given out again."""
    from sorting.realtime.crops import _ArenaRing

    rng = np.random.default_rng(0)
    ring = _ArenaRing(10_000, 50)
    live: list[tuple[int, int]] = []
    refused = 0
    for _ in range(20_000):
        if live and rng.random() < 0.45:
            n = int(rng.integers(1, len(live) + 1))
            ring.taken(n)
            del live[:n]
            continue
        nbytes = int(rng.choice([64, 640, 3008, 6400]))
        off = ring.fit(nbytes)
        if off is None:
            refused += 1
            assert live  # an empty ring takes it
            continue
        assert 0 <= off and off + nbytes <= ring.size
        assert all(off + nbytes <= a or b <= off for a, b in live)
        if rng.random() < 0.1:  # not handed after all
            ring.put(off, nbytes)
            assert ring.give_back(1) == 1
            assert ring.fit(nbytes) == off
            continue
        ring.put(off, nbytes)
        live.append((off, off + nbytes))
        assert len(ring) == len(live) <= 50
    assert refused > 0
    ring.taken(len(live))
    assert len(ring) == 0 and ring.fit(10_000) == 0 and ring.fit(10_001) is None


def test_a_dead_writer_is_reported_and_not_waited_for(small_belt, small_model, tmp_path, capsys):
    """The writer killed before the belt starts: an unpaced replay (which would wait for a live
    writer) still decides every particle, and the death is reported, not hung on."""
    def kill_writer(saver):
        os.kill(saver._proc.pid, signal.SIGKILL)
        saver._proc.join(10)

    _, events, summary = _run_api(small_belt, small_model, tmp_path / "crops", wait=True, before=kill_writer)
    assert len(events) > 0
    assert "exit code -9" in summary["writer_error"]
    assert summary["written"] == 0
    assert summary["skipped"]["the writer process died"] > 0
    assert "crop writer process died" in capsys.readouterr().err


def test_a_writer_that_dies_on_the_belt_is_reported_once(small_belt, small_model, tmp_path, capsys):
    """The writer killed in the middle of a paced-style (no wait) run: the loop notices at its
    next hand-off, reports it once, counts what it could not hand and decides every particle."""
    from loop_helpers import run_loop

    from sorting.realtime.crops import start_saving
    from sorting.realtime.sources import replay

    rec, timing, pl = _pipeline(small_belt, small_model)
    saver = start_saving(pl, tmp_path / "crops", rec.calibration, 1, wait=False)

    def chunks():
        for k, chunk in enumerate(replay(rec.lines, timing.line_rate_hz, 32, False)):
            if k == 60:
                os.kill(saver._proc.pid, signal.SIGKILL)
                saver._proc.join(10)
            yield chunk

    try:
        result = run_loop(chunks(), pl)
        handed = saver.handed
    finally:
        summary = saver.close()
    assert result.summary["particles"] == len(result.events) > 0
    assert handed > 0 and "exit code -9" in summary["writer_error"]
    assert summary["skipped"]["the writer process died"] > 0
    assert summary["handed"] + summary["dropped"] + summary["crops_skipped"] == len(result.events)
    assert capsys.readouterr().err.count("crop writer process died") == 1


def test_the_writer_ends_with_the_loops_process_and_lists_what_it_wrote(small_belt, small_model, tmp_path):
    """The loop's process killed outright (SIGKILL, no clean-up) in the middle of the belt: the
    writer notices, writes rocks.csv and dataset.json of the crops it wrote, and exits."""
    out = tmp_path / "crops"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_save_crops import _pipeline
        from sorting.realtime.crops import start_saving
        from loop_helpers import run_loop
        from sorting.realtime.sources import replay
        rec, timing, pl = _pipeline({str(small_belt)!r}, {str(small_model)!r})
        saver = start_saving(pl, {str(out)!r}, rec.calibration, 1, wait=True)
        run_loop(replay(rec.lines[:3000], timing.line_rate_hz, 32, False), pl)
        print(saver._proc.pid, saver.handed, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == -signal.SIGKILL, p.stderr
    writer_pid, handed = (int(x) for x in p.stdout.split())
    assert handed > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{writer_pid}").exists() and \
            "Z" not in Path(f"/proc/{writer_pid}/stat").read_text().split()[2]:
        time.sleep(0.1)
    assert not Path(f"/proc/{writer_pid}").exists() or "Z" in Path(f"/proc/{writer_pid}/stat").read_text().split()[2]
    from sorting.io import read_rocks_dataset

    ds = read_rocks_dataset(out)  # a valid dataset: every listed file exists
    tiffs = sorted(p.name for p in (out / "rocks").glob("*.tiff"))
    assert sorted(Path(r.file).name for r in ds.rows) == tiffs and len(tiffs) > 0


def test_a_bad_air_file_is_refused(small_belt, small_model, tmp_path, capsys):
    _run_api(small_belt, small_model, tmp_path / "crops", every=7)
    row = next(csv.DictReader(open(tmp_path / "crops" / "rocks.csv")))
    import tifffile

    air = tmp_path / "crops" / row["air_file"]
    tifffile.imwrite(air, np.zeros((3, 3, 2), np.float32), photometric="minisblack", planarconfig="contig")
    assert main(["predict", str(tmp_path / "crops"), "--model", str(small_model), "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and row["air_file"] in err[0] and "shape" in err[0]
    tifffile.imwrite(air, np.zeros((3, 3, 2), np.uint16), photometric="minisblack", planarconfig="contig")
    assert main(["predict", str(tmp_path / "crops"), "--model", str(small_model), "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0]


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
