"""Metallurgical metrics on tables small enough to check by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sorting.metallurgy import (grade_recovery_curve, interp_curve, make_feed, roc_auc, sort_balance,
                                threshold_for_recovery)
from sorting.report import evaluate, summary_lines, write_report

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
    assert {p.name for p in paths} >= {"metrics.json", "grade_recovery.png", "scores.png", "confusion.png",
                                        "lithotypes.png"}
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["curves"]["model"]["threshold"][0] is None  # +inf is not JSON
    assert (tmp_path / "grade_recovery.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_does_not_modify_inputs():
    args = [a.copy() for a in (SCORES, IS_SC, MASS, GRADE)]
    evaluate(args[0], args[1], 0.5, mass_g=args[2], sc2o3_ppm=args[3], baseline=args[2])
    for a, b in zip(args, (SCORES, IS_SC, MASS, GRADE)):
        np.testing.assert_array_equal(a, b)
