"""What real belts carry besides ore: belt splices, tramp metal, slabs, and the cap on the air.

A short belt with splices, tramp steel and a slab (the session's ``objects_belt``) is
simulated with the same seed as the clean ``small_belt``: the twin lays the objects over the same rocks and gives
only the objects' pixels their own noise (checked here on the raw lines). Both belts go
through the loop; the rocks away from the objects must be decided exactly alike, no eject
may open more valves than ``ejector.max_valves``, tramp follows ``sorting.tramp`` and the
slab leaves no ejecting fragment. Expected values come from the twin's ``objects.csv`` and
``truth.csv``, from the valve geometry computed by hand, or from a run without the cap.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import BELT_SECONDS, OBJECTS
from loop_helpers import logged

from sorting.cli import main
from sorting.config import default_max_valves, load_sorter
from sorting.io import read_belt_recording
from sorting.realtime.runner import build_pipeline, timing_of
from sorting.stages.calibrate import calibrate
from sorting.stages.eject import Timing, plan
from sorting.stages.features import FEATURE_NAMES, features_from_ring
from sorting.stages.inference import load_model
from sorting.stages.segment import foreground
from sorting.stages.splice import SpliceFinder
from sorting.stages.tramp import TrampFinder

ROOT = Path(__file__).resolve().parents[1]
SORTER_YAML = ROOT / "configs" / "sorter_reference.yaml"
MODEL = ROOT / "models" / "crater_lake.onnx"
#: a particle counts as "away from the objects" when its box is this far from every object's box
MARGIN_PX = 16
SPLICE_EVERY_S = OBJECTS["splice_every_s"]
TRAMP = OBJECTS["tramp"]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dirty_belt(objects_belt):
    return objects_belt


@pytest.fixture(scope="module")
def objects(dirty_belt):
    with (dirty_belt / "objects.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("first_line", "last_line", "x_min_px", "x_max_px"):
            r[k] = int(r[k])
    return rows


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def sorter():
    return load_sorter(SORTER_YAML)


def _run(path, model, sorter, frozen_air=False):
    """Events and counters of the loop over a recording, 32 lines per chunk. ``frozen_air``:
    the air tracker keeps the calibration's air level (see the test that uses it)."""
    rec = read_belt_recording(path)
    pipe = build_pipeline(rec.calibration, model, sorter, timing_of(rec.meta), str(SORTER_YAML), 32)
    if frozen_air:
        pipe.air.end_epoch = lambda: None
    events = []
    for i in range(0, rec.lines.shape[0], 32):
        events += pipe.step(i, rec.lines[i:i + 32], 0.0)
    events += pipe.finish()
    return logged(events), pipe.counters.summary()


@pytest.fixture(scope="module")
def runs(small_belt, dirty_belt, model, sorter):
    return {
        "clean": _run(small_belt, model, sorter),
        "dirty": _run(dirty_belt, model, sorter),
        "clean_frozen": _run(small_belt, model, sorter, frozen_air=True),
        "dirty_frozen": _run(dirty_belt, model, sorter, frozen_air=True),
    }


def _box(e):
    return e["first_line"], e["last_line"], e["x_min_px"], e["x_max_px"]


def _overlaps(box, o, margin=0):
    l0, l1, c0, c1 = box
    return (l0 <= o["last_line"] + margin and l1 >= o["first_line"] - margin
            and c0 <= o["x_max_px"] + margin and c1 >= o["x_min_px"] - margin)


def _away(events, objects):
    return {_box(e): e for e in events if not any(_overlaps(_box(e), o, MARGIN_PX) for o in objects)}


# ------------------------------------------------------------------ the twin
def test_the_twin_lays_objects_over_the_same_rocks(small_belt, dirty_belt, objects):
    clean, dirty = read_belt_recording(small_belt), read_belt_recording(dirty_belt)
    assert clean.truth == dirty.truth  # the same rocks
    kinds = [o["kind"] for o in objects]
    period = SPLICE_EVERY_S * clean.line_rate_hz
    assert kinds.count("splice") >= int(BELT_SECONDS / SPLICE_EVERY_S) - 1
    assert kinds.count("tramp") == TRAMP and kinds.count("slab") == 1
    splices = sorted(o["first_line"] for o in objects if o["kind"] == "splice")
    assert np.allclose(np.diff(splices), period, atol=1)  # once per belt revolution
    for o in objects:
        if o["kind"] == "splice":  # the whole width, belt edges included
            assert (o["x_min_px"], o["x_max_px"]) == (0, clean.pixels - 1)
        if o["kind"] == "tramp":
            assert 10.0 <= float(o["steel_mm"]) <= 30.0
        if o["kind"] == "slab":
            assert float(o["length_mm"]) > 512 * clean.line_pitch_mm  # longer than the loop's particle limit
    # outside the objects' boxes every count is the clean belt's
    differs = np.any(np.asarray(clean.lines) != np.asarray(dirty.lines), axis=2)
    inside = np.zeros(differs.shape, bool)
    for o in objects:
        inside[o["first_line"]:o["last_line"] + 1, o["x_min_px"]:o["x_max_px"] + 1] = True
    assert differs.any() and not (differs & ~inside).any()


# ------------------------------------------------------------------ the loop
def test_rocks_away_from_the_objects_are_decided_as_on_the_clean_belt(runs, objects):
    """With the air tracker holding the calibration's level, nothing but the objects differs
    between the two runs: every particle away from them must come out identical."""
    clean, dirty = _away(runs["clean_frozen"][0], objects), _away(runs["dirty_frozen"][0], objects)
    assert len(clean) > 200
    assert clean.keys() == dirty.keys()
    keys = ("decision", "valves", "score", "area_mm2", "centroid_line", "centroid_px", "open_s", "close_s")
    for box, e in clean.items():
        assert {k: e[k] for k in keys} == {k: dirty[box][k] for k in keys}, box


def test_with_the_air_tracker_live_only_borderline_scores_can_differ(runs, objects, model):
    """The air tracker follows the level from the empty belt; objects change which pixels are
    empty, so its noise (and every attenuation after it, by ~1e-3) differs a little. The
    same rocks are still found; only a score right at the threshold may cross it."""
    clean, dirty = _away(runs["clean"][0], objects), _away(runs["dirty"][0], objects)
    common = clean.keys() & dirty.keys()
    assert len(common) >= 0.99 * len(clean)
    flipped = [b for b in common if clean[b]["decision"] != dirty[b]["decision"]]
    assert len(flipped) <= 0.01 * len(common)
    for b in flipped:
        assert abs(clean[b]["score"] - model.threshold) < 0.02 and abs(dirty[b]["score"] - model.threshold) < 0.02


def test_no_eject_opens_more_valves_than_the_cap(runs, sorter):
    cap = sorter.ejector.max_valves
    assert cap == 10  # (100 mm + 2 x 5 mm) / 12.5 mm = 8.8 -> 9, + 1 across a valve edge
    for name, (events, _) in runs.items():
        assert max(len(e["valves"]) for e in events) <= cap, name
        assert all(not e["over_cap"] or e["decision"] == "pass" for e in events)


def test_a_tighter_cap_passes_exactly_the_wider_ejects(dirty_belt, runs, model, sorter):
    tight = dataclasses.replace(sorter, ejector=dataclasses.replace(sorter.ejector, max_valves=4))
    events, counters = _run(dirty_belt, model, tight)
    ref = {_box(e): e for e in runs["dirty"][0]}
    assert max(len(e["valves"]) for e in events) <= 4
    wider = {b for b, e in ref.items() if len(e["valves"]) > 4}
    over = {_box(e) for e in events if e["over_cap"]}
    assert wider and over == wider and counters["over_cap"] == len(wider)
    assert all(e["decision"] == "pass" and e["valves"] == [] for e in events if e["over_cap"])


def _tramp_events(events, objects):
    out = {}
    for o in objects:
        if o["kind"] == "tramp":
            out[o["object_id"]] = [e for e in events if _overlaps(_box(e), o) and e["kind"] == "tramp"]
    return out


def test_tramp_is_found_and_never_left_to_the_model(runs, objects):
    events, counters = runs["dirty"]
    found = _tramp_events(events, objects)
    for oid, evs in found.items():
        o = next(x for x in objects if x["object_id"] == oid)
        assert len(evs) == 1, oid  # one particle, the piece of steel itself
        e = evs[0]
        assert abs(e["first_line"] - o["first_line"]) <= 2 and abs(e["last_line"] - o["last_line"]) <= 2
        assert e["score"] == 0.0 and e["class"] == "waste"
        assert e["decision"] == "pass"  # the reference sorter: tramp goes the waste's way, here passing
    assert counters["tramp"] == sum(e["kind"] == "tramp" for e in events) == TRAMP
    # no rock is taken for tramp, on either belt
    tramp_objects = [o for o in objects if o["kind"] == "tramp"]
    assert all(any(_overlaps(_box(e), o) for o in tramp_objects) for e in events if e["kind"] == "tramp")
    assert runs["clean"][1]["tramp"] == 0


def test_tramp_is_ejected_when_the_sorter_says_so(dirty_belt, objects, model, sorter):
    ejecting = dataclasses.replace(sorter, sorting=dataclasses.replace(sorter.sorting, tramp="eject"))
    events, _ = _run(dirty_belt, model, ejecting)
    found = _tramp_events(events, objects)
    assert all(len(evs) == 1 for evs in found.values())
    n_eject = 0
    for evs in found.values():
        e = evs[0]
        if e["over_cap"]:  # a plate wider than the cap allows: passes, never a wall of air
            assert e["decision"] == "pass"
        else:
            assert e["decision"] == "eject" and 1 <= len(e["valves"]) <= sorter.ejector.max_valves
            n_eject += 1
    assert n_eject >= 1


def test_the_slab_passes_and_leaves_no_ejecting_fragment(dirty_belt, runs, objects):
    events, counters = runs["dirty"]
    slab = next(o for o in objects if o["kind"] == "slab")
    truth = read_belt_recording(dirty_belt).truth
    on_slab = [e for e in events if _overlaps(_box(e), slab)]
    long_pieces = [e for e in on_slab if e["too_long"]]
    assert len(long_pieces) >= 2 and all(e["decision"] == "pass" for e in long_pieces)
    assert counters["too_long"] >= 2
    # what fires in the slab's box is a rock lying beside it (its own truth row), not a piece of the slab
    for e in on_slab:
        if e["decision"] == "eject":
            assert any(abs(e["centroid_line"] - t["centroid_line"]) <= 2
                       and abs(e["centroid_px"] - t["centroid_px"]) <= 2
                       for t in truth), _box(e)


def test_rocks_on_a_splice_are_found_and_sorted(dirty_belt, runs, objects):
    events, counters = runs["dirty"]
    rec = read_belt_recording(dirty_belt)
    splices = [o for o in objects if o["kind"] == "splice"]
    assert counters["splices"] == len(splices)
    assert counters["splice_lines"] >= sum(o["last_line"] - o["first_line"] + 1 for o in splices)
    on_splice = [t for t in rec.truth if any(t["first_line"] <= o["last_line"] and t["last_line"] >= o["first_line"]
                                            for o in splices)]
    assert len(on_splice) >= 20
    for t in on_splice:
        match = [e for e in events if abs(e["centroid_line"] - t["centroid_line"]) <= 3
                 and abs(e["centroid_px"] - t["centroid_px"]) <= 3]
        assert len(match) == 1, t["rock_id"]
        e = match[0]
        assert e["splice"] and abs(e["x_min_px"] - t["x_min_px"]) <= 2 and abs(e["x_max_px"] - t["x_max_px"]) <= 2
    # nothing as wide as the belt
    assert max(e["x_max_px"] - e["x_min_px"] + 1 for e in events) < 0.5 * rec.pixels


# ------------------------------------------------------------------ the stages
@pytest.fixture(scope="module")
def cal(small_belt):
    return calibrate(read_belt_recording(small_belt).calibration)


def test_a_splice_line_is_taken_out_and_the_rock_on_it_kept(cal):
    rng = np.random.default_rng(0)
    w = cal.pixels
    a = (rng.standard_normal((24, w, 2)) * cal.air_sigma_a).astype(np.float32)
    steel = np.array([1.13, 0.38], np.float32)  # ~1 mm of iron (the calibration's wedge reads 1.13, 0.38)
    rock = np.zeros((24, w), bool)
    rock[4:20, 300:360] = True
    a[rock] += np.array([1.0, 0.5], np.float32)
    band = slice(10, 14)
    a[band] += steel
    mask = foreground(a, cal)
    assert mask[band].all(axis=1).sum() >= 3  # the plain foreground: the whole width
    finder = SpliceFinder(cal, 0, w)
    assert finder.screen(mask)
    before = a.copy()
    done = finder.correct(a, mask, np.zeros(0, bool), np.zeros(w, bool))
    assert done[band].all() and done.sum() == 4  # the noise lines either side stay as they were
    assert (mask[band] == rock[band]).mean() > 0.995
    # the steel's own attenuation is what came off the splice lines (to within the noise)
    removed = (before - a)[band].mean(axis=1)
    assert np.allclose(removed, steel, atol=0.02)
    assert finder.episodes == 1


def test_a_crowded_line_is_not_a_splice(cal):
    """Rocks at both belt edges over two thirds of the width (the twin's most crowded belts
    cover at most 69 % of a line), with bare belt between them."""
    rng = np.random.default_rng(1)
    w = cal.pixels
    a = (rng.standard_normal((8, w, 2)) * cal.air_sigma_a).astype(np.float32)
    rock = np.zeros((8, w), bool)
    for c0, c1 in ((0, 200), (260, 500), (560, 770), (1070, w)):
        rock[:, c0:c1] = True
    assert 0.65 < rock[0].mean() < 0.7
    a[rock] += np.array([1.5, 0.8], np.float32)
    mask = foreground(a, cal)
    finder = SpliceFinder(cal, 0, w)
    assert finder.screen(mask)  # a candidate for the cheap screen ...
    before, m0 = a.copy(), mask.copy()
    done = finder.correct(a, mask, np.zeros(0, bool), np.zeros(w, bool))
    assert not done.any() and np.array_equal(a, before) and np.array_equal(mask, m0)  # ... but no splice


def test_tramp_is_told_from_rock_by_shape(cal):
    finder = TrampFinder(cal)
    fe = cal.lut.wedge_t_mm[:, 1]
    iron_12 = cal.lut.wedge_a[(cal.lut.wedge_t_mm[:, 0] == 0) & (fe == 12.0)][0]  # 12 mm of iron, measured
    ring = np.zeros((256, 200, 2), np.float32)
    yy, xx = np.mgrid[:80, :80]
    shapes = {}
    # a plate 60 x 60 px of 12 mm iron: flat
    ring[0:80, 0:80][(abs(yy - 40) < 30) & (abs(xx - 40) < 30)] = iron_12
    shapes["plate"] = (abs(yy - 40) < 30) & (abs(xx - 40) < 30)
    # a rock of the same peak attenuation: a dome (thickness as a half-ellipsoid) 70 px across
    rho2 = ((yy - 40) / 35.0) ** 2 + ((xx - 40) / 35.0) ** 2
    dome = np.sqrt(np.clip(1 - rho2, 0, None))[..., None] * iron_12
    ring[100:180, 0:80] = dome
    shapes["rock"] = rho2 < 1
    # a rod 12 mm across (15 px) lying along the belt: the chord of a 12 mm iron cylinder
    v = (xx[:, :20] - 10) / 7.5
    rod = np.sqrt(np.clip(1 - v ** 2, 0, None))
    ring[0:80, 100:120] = (rod[..., None] * iron_12)
    shapes["rod"] = (rod > 0) & (abs(yy[:, :20] - 40) < 35)
    boxes = np.array([[0, 0, 80, 80], [100, 0, 80, 80], [0, 100, 80, 20]], np.int64)
    masks = [shapes["plate"], shapes["rock"], shapes["rod"]]
    x = np.empty((3, len(FEATURE_NAMES)), np.float32)
    features_from_ring(ring, boxes, masks, cal, 0.8, 0.8, out=x)
    assert finder.find(ring, boxes, masks, x).tolist() == [True, False, True]
    # the iron scale reads the wedge's own steps back
    assert finder.iron_mm(np.array([iron_12[1]]))[0] == pytest.approx(12.0, abs=1e-6)


# ------------------------------------------------------------------ the sorter settings
def test_the_default_cap_is_the_widest_rock_plus_margins():
    # (100 + 2 x 5) / 12.5 = 8.8 pitches -> 9 valves, + 1 where the span starts inside a valve
    assert default_max_valves(12.5, 5.0, 80) == 10
    assert default_max_valves(15.0, 6.0, 72) == 9  # 112 / 15 = 7.47 -> 8, + 1
    assert default_max_valves(10.0, 0.0, 80) == 11  # exactly 10 pitches: 11 when not on a valve edge
    assert default_max_valves(12.5, 5.0, 6) == 6  # never more than the row
    # the most valves a 100 mm wide particle really gets, over every position of a pixel: the cap
    ej, t = load_sorter(SORTER_YAML).ejector, Timing(3750.0, 3.0, 0.8, 1250)
    width_px = int(round(100.0 / 0.8))
    x0 = np.arange(0, 200)
    e = plan(np.zeros(x0.size), np.zeros(x0.size), x0, x0 + width_px - 1, ej, t)
    assert int((e.valve_hi - e.valve_lo + 1).max()) == ej.max_valves == math.ceil(110 / 12.5) + 1


def test_sorter_keys_for_cap_and_tramp_may_be_left_out(tmp_path):
    import yaml

    data = yaml.safe_load(SORTER_YAML.read_text())
    del data["ejector"]["max_valves"]
    del data["sorting"]["tramp"]
    data["sorting"]["eject"] = "waste"
    p = tmp_path / "sorter.yaml"
    p.write_text(yaml.safe_dump(data))
    s = load_sorter(p)
    assert s.ejector.max_valves == 10
    assert s.sorting.tramp == "eject"  # the waste's way: with eject: waste, the jets take it


def test_cli_simulate_belt_writes_objects(tmp_path, capsys):
    out = tmp_path / "belt"
    assert main(["simulate", "belt", str(out), "--seconds", "0.3", "--seed", "3", "--tramp", "1",
                 "--splice-every-s", "0.1", "--quiet"]) == 0
    with (out / "objects.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["kind"] for r in rows} <= {"splice", "tramp"} and any(r["kind"] == "splice" for r in rows)
    assert list(rows[0]) == ["object_id", "kind", "shape", "first_line", "last_line", "x_min_px", "x_max_px",
                             "steel_mm", "thickness_mm", "length_mm", "width_mm"]
