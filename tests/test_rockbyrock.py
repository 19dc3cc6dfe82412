"""Rock-by-rock test work: `sorting simulate rockbyrock` and `sorting dataset`.

The alignment function is checked on small hand-made cases (expected pairs worked out by
hand); the whole verb on a simulated test of 60 rocks with every kind of slip, against what
the twin says really happened (truth_rockbyrock.csv, truth.csv), never read by the verb.
"""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sorting.cli import main
from sorting.offline.rockbyrock import align

N_ROCKS = 60
SEED = 5  # with the rates below this plan holds lost samples, debris, touching pairs, missed and edge rocks
RATES = ["--lost", "0.05", "--debris", "0.1", "--touching", "0.05", "--missed", "0.05"]


# ---------------------------------------------------------------- the alignment, by hand
W = np.array([10.0, 50.0, 20.0, 200.0, 5.0, 80.0])  # the laboratory's masses of feed numbers 1..6


def test_align_clean_sequence_with_a_biased_scale():
    # another machine's estimate reads 3.7x heavy: every particle is still its own rock
    a = align(3.7 * W, W)
    assert a.pairs == [(k, k) for k in range(6)]
    assert a.coefficients[0] == pytest.approx(-math.log(3.7), abs=1e-6)


def test_align_debris_particle_is_skipped():
    # a 0.4 g chip lies between rock 2 and rock 3: particles 0, 1 | chip 2 | 3.. are rocks 3..6
    est = np.r_[W[:2], 0.4, W[2:]]
    a = align(est, W)
    assert a.pairs == [(0, 0), (1, 1), (3, 2), (4, 3), (5, 4), (6, 5)]
    assert a.particle_status[2] == "debris"


def test_align_lost_sample_keeps_the_rest_in_step():
    # feed number 3 has no assay row; its rock is on the belt (particle 2)
    w = W.copy()
    w[2] = np.nan
    a = align(W.copy(), w)
    assert a.pairs == [(0, 0), (1, 1), (3, 3), (4, 4), (5, 5)]
    assert a.slot_status[2] == "lost"


def test_align_missed_rock_keeps_the_rest_in_step():
    # feed number 3 was never scanned: particles 2.. are rocks 4..6
    est = np.delete(W, 2)
    a = align(est, W)
    assert a.pairs == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5)]
    assert a.slot_status[2] == "missed"


def test_align_touching_pair_excludes_both():
    # rocks 3 and 4 (20 g and 200 g) in contact: one particle of 220 g
    est = np.r_[W[:2], W[2] + W[3], W[4:]]
    a = align(est, W)
    assert a.pairs == [(0, 0), (1, 1), (3, 4), (4, 5)]
    assert list(a.slot_status[2:4]) == ["touching", "touching"]
    assert a.particle_status[2] == "touching"
    assert a.slot_touch_particle[2] == a.slot_touch_particle[3] == 2


def test_align_leaves_an_undecidable_slip_out():
    # two consecutive 30 g rocks, one of them missed: which one is unknowable, so neither is tied
    w = np.array([10.0, 30.0, 30.0, 60.0])
    a = align(np.array([10.0, 30.0, 60.0]), w)
    assert a.pairs == [(0, 0), (2, 3)]


def test_align_mass_disagreement_is_not_tied():
    # the third particle weighs 30 % more than rock 3: no tie, the others stay in step
    est = W.copy()
    est[2] *= 1.3
    a = align(est, W)
    assert a.pairs == [(0, 0), (1, 1), (3, 3), (4, 4), (5, 5)]


def test_align_refuses_bad_arrays():
    with pytest.raises(ValueError):
        align(np.array([1.0, -2.0]), W)
    with pytest.raises(ValueError):
        align(W, np.full(3, np.nan))


def test_mass_coefficients_weigh_other_minerals():
    """The mass model is fixed on syenite and hedenbergite; the iron minerals (xraydb
    attenuation, handbook densities) must come out within 4 % of their density."""
    from sorting.physics import load_materials
    from sorting.stages.crops import mass_coefficients
    from sorting.stages.normalize import basis_vector

    alpha, beta = mass_coefficients()
    lib = load_materials()
    for mineral in ("quartz", "hastingsite", "fayalite", "magnetite", "ilmenite"):
        p, f = basis_vector(mineral)
        assert alpha * p + beta * f == pytest.approx(lib[mineral].density_g_cm3, rel=0.04), mineral


# ---------------------------------------------------------------- the verb on a simulated test
@pytest.fixture(scope="module")
def rbr(tmp_path_factory):
    """A simulated rock-by-rock test and the dataset built from it."""
    root = tmp_path_factory.mktemp("rockbyrock")
    test = root / "test"
    assert main(["simulate", "rockbyrock", str(test), "--n", str(N_ROCKS), "--seed", str(SEED), *RATES,
                 "--quiet"]) == 0
    ds = root / "ds"
    assert main(["dataset", str(test), "--assays", str(test / "assays.csv"), "--out", str(ds)]) == 0
    return test, ds


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _truth(test: Path) -> tuple[dict, list[dict]]:
    record = _rows(test / "truth_rockbyrock.csv")
    return {r["seq"]: r for r in record if r["kind"] == "rock"}, _rows(test / "truth.csv")


def test_simulated_test_holds_every_kind_of_slip(rbr):
    test, _ = rbr
    rocks, objects = _truth(test)
    assays = _rows(test / "assays.csv")
    assert len(rocks) == N_ROCKS
    lost = {s for s, r in rocks.items() if r["lost"] == "1"}
    assert lost and lost.isdisjoint({a["seq"] for a in assays})
    assert len(assays) == N_ROCKS - len(lost)
    assert any(r["touching_with"] for r in rocks.values())
    assert any(r["fate"] == "missed" for r in rocks.values())
    assert any(r["fate"] == "edge" for r in rocks.values())
    assert any(o["kind"] == "debris" for o in objects)
    # missed rocks are not on the recording, but assayed unless lost
    missed = {s for s, r in rocks.items() if r["fate"] == "missed"}
    assert missed.isdisjoint({o["seq"] for o in objects})


def test_simulation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["simulate", "rockbyrock", str(out), "--n", "4", "--seed", "3", "--quiet"]) == 0
    for name in ("lines.u16", "assays.csv", "truth_rockbyrock.csv", "truth.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_dataset_ties_no_rock_to_a_wrong_assay(rbr):
    """Every kept crop holds the rock of its feed number (by the twin's truth), and nothing
    else; its grade and mass are that rock's laboratory results, its label follows the cut-off."""
    from sorting.io import read_rocks_dataset

    test, ds_path = rbr
    rocks, objects = _truth(test)
    ds = read_rocks_dataset(ds_path)
    assert ds.meta["label_cutoff_ppm"] == 150.0
    assert ds.rows
    for i, row in enumerate(ds.rows):
        t = rocks[row.rock_id]
        h, w = ds.crop(i).shape[:2]
        line0 = int(row.extra["first_line"])
        inside = [o["rock_id"] for o in objects
                  if int(o["first_line"]) < line0 + h and int(o["last_line"]) >= line0
                  and int(o["x_min_px"]) < row.x0 + w and int(o["x_max_px"]) >= row.x0]
        assert inside == [row.rock_id], (row.rock_id, inside)
        # the whole rock, at least 4 px from the crop's edges
        assert line0 + 4 <= int(t["first_line"]) and int(t["last_line"]) <= line0 + h - 5
        assert row.x0 + 4 <= int(t["x_min_px"]) and int(t["x_max_px"]) <= row.x0 + w - 5
        assert row.mass_g == float(t["lab_mass_g"]) and row.sc2o3_ppm == float(t["lab_sc2o3_ppm"])
        assert row.label == ("sc" if float(t["lab_sc2o3_ppm"]) >= 150.0 else "waste")
        assert row.split is None


def test_dataset_keeps_the_rocks_scanned_alone(rbr):
    test, ds_path = rbr
    rocks, _ = _truth(test)
    kept = {r["rock_id"] for r in _rows(ds_path / "rocks.csv")}
    alone = {s for s, r in rocks.items() if r["fate"] == "scanned" and r["lost"] == "0" and not r["touching_with"]}
    assert len(kept & alone) >= 0.97 * len(alone)
    # nothing else can be kept: lost samples have no assay, the others are not alone
    assert kept <= alone


def test_excluded_lists_every_slip_with_its_reason(rbr):
    test, ds_path = rbr
    rocks, objects = _truth(test)
    excluded = _rows(ds_path / "excluded.csv")
    assert list(excluded[0]) == ["seq", "particle_first_line", "reason", "detail"]
    reason = {r["seq"]: r["reason"] for r in excluded if r["seq"]}
    kept = {r["rock_id"] for r in _rows(ds_path / "rocks.csv")}
    # every feed number is kept or listed once
    assert sorted(kept | set(reason), key=int) == [str(k) for k in range(1, N_ROCKS + 1)]
    assert kept.isdisjoint(reason)
    for s, r in rocks.items():
        if r["lost"] == "1":
            assert reason[s] == "lost"
        elif r["fate"] == "missed":
            assert reason[s] == "missed"
        elif r["touching_with"]:
            assert reason[s] in ("touching", "crop", "ambiguous")
    # each debris chip the pipeline sees is listed as a particle without feed number
    debris_lines = {int(r["particle_first_line"]) for r in excluded if r["reason"] == "debris"}
    chips = [o for o in objects if o["kind"] == "debris"]
    assert chips
    for chip in chips:
        assert any(abs(line - int(chip["first_line"])) <= 2 for line in debris_lines), chip["rock_id"]


def test_dataset_is_valid_and_scores(rbr, tmp_path, capsys):
    _, ds = rbr
    assert main(["inspect", str(ds)]) == 0
    out = tmp_path / "scores.csv"
    assert main(["predict", str(ds), "--model", "models/crater_lake.onnx", "--out", str(out), "--quiet"]) == 0
    scores = _rows(out)
    assert len(scores) == len(_rows(ds / "rocks.csv"))
    assert all(s["problem"] == "" for s in scores)


def test_mass_estimate_matches_the_true_mass(rbr):
    """The pipeline's mass estimate before any calibration, against the twin's true masses."""
    from sorting.io import read_belt_recording
    from sorting.stages.calibrate import calibrate
    from sorting.stages.crops import find_particles, measure_particles

    test, _ = rbr
    rec = read_belt_recording(test)
    cal = calibrate(rec.calibration)
    parts = find_particles(rec.lines, cal, rec.pixel_pitch_mm, rec.line_pitch_mm)
    _, mass = measure_particles(rec.lines, cal, parts, rec.pixel_pitch_mm, rec.line_pitch_mm)
    ratios = []
    for c, m in zip(parts, mass):
        near = [t for t in rec.truth if t["kind"] == "rock" and not t["touching"]
                and abs(t["centroid_line"] - c.centroid_line) < 1 and abs(t["centroid_px"] - c.centroid_px) < 1]
        if near and not c.touches_border:
            ratios.append(math.log(m / near[0]["mass_g"]))
    assert len(ratios) >= 40
    assert abs(float(np.median(ratios))) < 0.02
    assert float(np.percentile(np.abs(ratios), 90)) < 0.06


# ---------------------------------------------------------------- bad input
def _assays(test: Path) -> list[dict]:
    return _rows(test / "assays.csv")


def _write(path: Path, header: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _case_missing_column(test, tmp):
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm"], _assays(test)), "missing column(s) mass_g"


def _case_duplicate_seq(test, tmp):
    rows = _assays(test)
    rows[5]["seq"] = rows[4]["seq"]
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], rows), "listed twice"


def _case_text_grade(test, tmp):
    rows = _assays(test)
    rows[3]["sc2o3_ppm"] = "<5"
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], rows), "sc2o3_ppm is '<5'"


def _case_seq_zero(test, tmp):
    rows = _assays(test)
    rows[0]["seq"] = "0"
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], rows), "feed numbers start at 1"


def _case_unknown_seq(test, tmp):
    rows = _assays(test)
    rows[-1]["seq"] = "500"
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], rows), "feed number 500 is unknown"


def _case_too_few_rows(test, tmp):
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], _assays(test)[:20]), "fewer than half"


def _case_zero_mass(test, tmp):
    rows = _assays(test)
    rows[2]["mass_g"] = "0"
    return _write(tmp / "a.csv", ["seq", "sc2o3_ppm", "mass_g"], rows), "mass > 0"


def _case_no_file(test, tmp):
    return tmp / "nope.csv", "does not exist"


@pytest.mark.parametrize("case", [_case_missing_column, _case_duplicate_seq, _case_text_grade, _case_seq_zero,
                                  _case_unknown_seq, _case_too_few_rows, _case_zero_mass, _case_no_file],
                         ids=lambda f: f.__name__[6:])
def test_bad_assay_file_exits_2_with_one_line(case, rbr, tmp_path, capsys):
    test, _ = rbr
    path, words = case(test, tmp_path)
    capsys.readouterr()
    rc = main(["dataset", str(test), "--assays", str(path), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and words in err
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_bad_cutoff_and_recording_exit_2(rbr, tmp_path, capsys):
    test, _ = rbr
    capsys.readouterr()
    rc = main(["dataset", str(test), "--assays", str(test / "assays.csv"), "--out", str(tmp_path / "d"),
               "--cutoff-ppm", "-3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--cutoff-ppm" in err
    broken = tmp_path / "rec"
    shutil.copytree(test, broken, ignore=shutil.ignore_patterns("lines.u16"))
    (broken / "lines.u16").write_bytes(b"\0" * 10)
    rc = main(["dataset", str(broken), "--assays", str(test / "assays.csv"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "lines.u16" in err


def test_dataset_never_reads_truth(rbr, tmp_path, capsys):
    """The same dataset from the recording without truth.csv (and truth_rockbyrock.csv)."""
    test, ds = rbr
    bare = tmp_path / "bare"
    shutil.copytree(test, bare, ignore=shutil.ignore_patterns("lines.u16", "truth*.csv"))
    (bare / "lines.u16").symlink_to(test / "lines.u16")
    out = tmp_path / "ds"
    assert main(["dataset", str(bare), "--assays", str(test / "assays.csv"), "--out", str(out)]) == 0
    assert (out / "rocks.csv").read_text() == (ds / "rocks.csv").read_text()
    assert (out / "excluded.csv").read_text() == (ds / "excluded.csv").read_text()
