"""Metallurgical metrics on tables small enough to check by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sorting.offline.metallurgy import (
    grade_recovery_curve,
    interp_curve,
    label_cutoff_ppm,
    make_feed,
    roc_auc,
    soft_sc_targets,
    sort_balance,
    threshold_for_recovery,
)
from sorting.offline.report import evaluate, summary_lines, write_report

# Four rocks. Sc2O3 units = mass x grade = 50000, 60000, 3000, 0 (sum 113000 g.ppm);
# total mass 1000 g; waste mass 700 g.
MASS = np.array([100.0, 200.0, 300.0, 400.0])
GRADE = np.array([500.0, 300.0, 10.0, 0.0])
IS_SC = np.array([True, True, False, False])
SEL = np.array([True, False, True, False])
SCORES = np.array([0.9, 0.5, 0.5, 0.1])


def test_balance_mass_and_assay():
    b = sort_balance(SEL, IS_SC, make_feed(IS_SC, MASS, GRADE))
    assert b["mass_basis"] == "mass" and b["recovery_basis"] == "assay"
    assert b["mass_pull"] == pytest.approx(400 / 1000)
    assert b["sc_recovery"] == pytest.approx(53000 / 113000)
    assert b["feed_grade_ppm"] == pytest.approx(113.0)
    assert b["product_grade_ppm"] == pytest.approx(53000 / 400)
    assert b["reject_grade_ppm"] == pytest.approx(60000 / 600)
    assert b["upgrade_ratio"] == pytest.approx((53000 / 400) / 113.0)
    assert b["waste_rejection"] == pytest.approx(400 / 700)
    assert b["sc_rock_recall"] == pytest.approx(0.5)
    assert b["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}


def test_balance_falls_back_to_counts_when_a_mass_is_missing():
    mass = MASS.copy()
    mass[1] = np.nan
    b = sort_balance(SEL, IS_SC, make_feed(IS_SC, mass, GRADE))
    assert b["mass_basis"] == "count"
    assert b["mass_pull"] == pytest.approx(0.5)
    assert b["sc_recovery"] == pytest.approx(510 / 810)
    assert b["feed_grade_ppm"] == pytest.approx(810 / 4)


def test_balance_without_assays_counts_sc_rocks_by_mass():
    b = sort_balance(SEL, IS_SC, make_feed(IS_SC, MASS, None))
    assert b["recovery_basis"] == "count"
    assert b["sc_recovery"] == pytest.approx(100 / 300)
    assert b["product_grade_ppm"] is None and b["upgrade_ratio"] is None


def test_balance_empty_product_has_no_product_grade():
    b = sort_balance(np.zeros(4, bool), IS_SC, make_feed(IS_SC, MASS, GRADE))
    assert b["mass_pull"] == 0.0 and b["sc_recovery"] == 0.0
    assert b["product_grade_ppm"] is None
    assert b["reject_grade_ppm"] == pytest.approx(113.0)


def test_grade_recovery_curve_moves_ties_together():
    c = grade_recovery_curve(SCORES, make_feed(IS_SC, MASS, GRADE))
    np.testing.assert_array_equal(c["threshold"], [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(c["mass_pull"], [0, 0.1, 0.6, 1.0])
    np.testing.assert_allclose(c["sc_recovery"], [0, 50 / 113, 1.0, 1.0])
    np.testing.assert_allclose(c["product_grade_ppm"][1:], [500, 113000 / 600, 113])
    assert np.isnan(c["product_grade_ppm"][0])


def test_grade_recovery_curve_of_nothing():
    c = grade_recovery_curve(np.zeros(0), make_feed(np.zeros(0, bool)))
    assert len(c["threshold"]) == 1 and c["mass_pull"][0] == 0


@pytest.mark.parametrize("target, expected", [(0.4, 0.9), (0.45, 0.5), (0.95, 0.5), (1.0, 0.5)])
def test_threshold_for_recovery(target, expected):
    assert threshold_for_recovery(SCORES, MASS * GRADE, target) == expected


def test_threshold_for_recovery_refuses_nothing_to_recover():
    with pytest.raises(ValueError, match="no recoverable"):
        threshold_for_recovery(SCORES, np.zeros(4), 0.95)
    with pytest.raises(ValueError, match="not in"):
        threshold_for_recovery(SCORES, MASS, 0.0)


def test_auc_by_hand_and_against_sklearn():
    # pairs (sc, waste): 0.9>0.5, 0.9>0.1, 0.5=0.5 (half), 0.5>0.1 -> 3.5 / 4
    assert roc_auc(SCORES, IS_SC) == pytest.approx(0.875)
    assert roc_auc(SCORES, np.ones(4, bool)) is None
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.4
    s = np.round(rng.random(200) + 0.3 * y, 2)  # rounded to make ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_interp_curve_between_rocks():
    c = grade_recovery_curve(GRADE, make_feed(IS_SC, MASS, GRADE))  # the oracle ranking
    # pulls 0.1, 0.3, 0.6 hold 50, 110, 113 of 113 units; 0.4 is a third of the way to 0.6
    assert interp_curve(c, "mass_pull", "sc_recovery", 0.4) == pytest.approx(111 / 113)


def test_evaluate_with_baseline_oracle_and_lithotypes(tmp_path):
    lith = np.array(["a", "a", "b", "b"])
    baseline = np.array([1.0, 2.0, 3.0, 4.0])  # densest first: picks the barren rock 3
    m, curves = evaluate(SCORES, IS_SC, 0.6, mass_g=MASS, sc2o3_ppm=GRADE, baseline=baseline, lithotype=lith)
    assert m["operating"]["mass_pull"] == pytest.approx(0.1)
    assert m["operating"]["sc_recovery"] == pytest.approx(50 / 113)
    assert m["oracle"]["sc_recovery_at_model_pull"] == pytest.approx(50 / 113)
    assert m["baseline"]["sc_recovery_at_model_pull"] == pytest.approx(0.0)
    assert m["baseline"]["auc"] == pytest.approx(0.0)
    # model product = rock 0 only; baseline cut nearest 10 % pull = rock 3 (40 %) or nothing (0 %)
    assert m["lithotypes"]["a"] == {"n": 2, "share_sc": 0.5, "mass_share_sc": pytest.approx(100 / 300)}
    assert m["lithotypes"]["b"]["share_sc"] == 0.0
    assert m["baseline"]["at_nearest_cut"]["n_product"] == 0
    lines = summary_lines(m)
    assert any("oracle" in ln for ln in lines) and any("b: 0.0 %" in ln for ln in lines)
    paths = write_report(tmp_path, m, curves, SCORES, IS_SC)
    assert {p.name for p in paths} >= {"metrics.json", "curves.json", "grade_recovery.png", "scores.png",
                                        "confusion.png", "lithotypes.png"}
    doc = json.loads((tmp_path / "curves.json").read_text())
    assert doc["model"]["threshold"][0] is None  # +inf is not JSON
    assert doc["oracle"]["sc_recovery"] == [0, pytest.approx(50 / 113), pytest.approx(110 / 113), 1, 1]
    assert (tmp_path / "grade_recovery.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_does_not_modify_inputs():
    args = [a.copy() for a in (SCORES, IS_SC, MASS, GRADE)]
    evaluate(args[0], args[1], 0.5, mass_g=args[2], sc2o3_ppm=args[3], baseline=args[2])
    for a, b in zip(args, (SCORES, IS_SC, MASS, GRADE)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("grades, labels, expected", [
    ([10, 100, 200, 300], [0, 0, 1, 1], np.sqrt(100 * 200)),  # clean cut between 100 and 200
    ([300, 10, 200, 100], [1, 0, 1, 0], np.sqrt(100 * 200)),  # order does not matter
    ([0, 50, 60], [0, 1, 1], 25.0),  # a zero assay: arithmetic midpoint
    ([10, 20], [1, 1], 10.0),  # everything sc: cut at the lowest assay
])
def test_label_cutoff_by_hand(grades, labels, expected):
    assert label_cutoff_ppm(np.array(grades, float), np.array(labels, bool)) == pytest.approx(expected)


def test_label_cutoff_never_splits_equal_assays():
    # 100 ppm twice with both labels: a cut between the twins is impossible
    c = label_cutoff_ppm(np.array([50.0, 100.0, 100.0, 200.0]), np.array([0, 0, 1, 1], bool))
    assert c < 100.0 or c > 100.0


def test_soft_targets_by_hand():
    # logistic(ln(g / 150) / 0.3): at the cut 0.5; at 150 e^0.3 -> 1/(1+e^-1); label side kept
    p = soft_sc_targets(np.array([150.0, 150 * np.e ** 0.3, 150 / np.e ** 0.3, 10.0, 400.0]),
                        np.array([1, 1, 0, 1, 0], bool), 150.0, 0.3)
    s1 = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(p, [0.5, s1, 1 - s1, 0.5, 0.5])


def test_evaluate_cli_writes_the_report(small_rocks, small_model, tmp_path, capsys):
    from sorting.cli import main

    rep = tmp_path / "rep"
    assert main(["evaluate", str(small_rocks), "--model", str(small_model), "--report", str(rep), "--quiet"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    for needle in ("AUC: model", "baseline (mean attenuation)", "Sc recovery", "mass pull", "oracle",
                   "fayalite_cumulate (trap)", "ppm Sc2O3"):
        assert needle in out
    doc = json.loads((rep / "metrics.json").read_text())
    # 95 % intervals beside the point values, in the JSON and the printout
    ci = doc["ci95"]
    assert ci["resamples"] == 1000 and ci["level"] == 0.95
    for key, point in (("auc", doc["auc"]), ("sc_recovery", doc["operating"]["sc_recovery"]),
                       ("mass_pull", doc["operating"]["mass_pull"])):
        lo, hi = ci[key]
        assert 0.0 <= lo <= hi <= 1.0 and hi - lo > 0.0
        assert (f"95 % CI {lo:.3f}-{hi:.3f}" if key == "auc" else f"95 % CI {100 * lo:.1f}-{100 * hi:.1f} %") in out
    # the test split is small (~42 rocks): the warning names the class counts
    n_sc, n_waste = doc["n_sc"], doc["n"] - doc["n_sc"]
    assert min(n_sc, n_waste) < 30
    assert f"only {n_sc} sc and {n_waste} waste rocks" in cap.err and doc["small_sample"]
    assert doc["split"] == "test" and doc["baseline_feature"] == "a_high_mean"
    with open(small_rocks / "rocks.csv") as f:
        n_test = sum(1 for ln in f if ln.split(",")[6] == "test")
    assert doc["n"] == n_test
    for f in ("grade_recovery.png", "scores.png", "confusion.png", "lithotypes.png"):
        assert (rep / f).stat().st_size > 1000


def test_evaluate_cli_train_split_and_bad_report_folder(small_rocks, small_model, tmp_path, capsys):
    from sorting.cli import main

    rc = main(["evaluate", str(small_rocks), "--model", str(small_model), "--report", str(tmp_path / "r"),
               "--split", "train", "--quiet"])
    assert rc == 0  # the train split exists
    capsys.readouterr()
    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["evaluate", str(small_rocks), "--model", str(small_model), "--report", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a folder" in err[0]


def _ds(*rows):
    from types import SimpleNamespace

    return SimpleNamespace(rows=[SimpleNamespace(label=lab, split=spl) for lab, spl in rows])


def test_row_selection_rules():
    from sorting.cli.batch import evaluation_rows, training_rows
    from sorting.errors import InputError

    ds = _ds(("sc", "train"), ("waste", "test"), (None, "train"), ("waste", None), ("sc", "test"))
    assert training_rows(ds, "x") == [0]
    assert evaluation_rows(ds, None, "x") == ([1, 4], "test")
    assert evaluation_rows(ds, "all", "x") == ([0, 1, 3, 4], "all")
    unsplit = _ds(("sc", None), ("waste", None), (None, None))
    assert training_rows(unsplit, "x") == [0, 1]
    assert evaluation_rows(unsplit, None, "x") == ([0, 1], "all")
    with pytest.raises(InputError, match="no labeled rows in split 'test'"):
        evaluation_rows(unsplit, "test", "x")
    only_test = _ds(("sc", "test"), ("waste", None), ("sc", None))
    assert training_rows(only_test, "x") == [1, 2]
    with pytest.raises(InputError, match="nothing to train on"):
        training_rows(_ds(("sc", "test")), "x")
