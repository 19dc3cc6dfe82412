"""Metallurgical accounting of a rock-by-rock sort (definitions: docs/physics.md).

Pure functions on 1-D arrays, one entry per rock. What a metallurgist reads:
mass pull (mass to product), Sc recovery (Sc2O3 units to product), product and
reject grades, upgrade ratio, waste rejection, confusion counts, AUC, and the
grade-recovery curve swept over the decision threshold.

Weighting. Masses weight everything when every rock has one; otherwise each rock
counts as one unit of mass (``mass_basis = "count"``), since a partial mass column
would silently bias the pull. Sc units are mass x assay; where rocks are not
assayed, recovery falls back to the share of ``sc``-labeled rocks sent to product
(``recovery_basis = "count"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Basis = Literal["mass", "count"]
RecoveryBasis = Literal["assay", "count"]


@dataclass(frozen=True)
class Feed:
    """The accounting weights of a set of rocks.

    Attributes
    ----------
    mass : (n,) ndarray of float64
        Mass of each rock in g, or 1.0 per rock when ``mass_basis == "count"``.
    units : (n,) ndarray of float64
        What recovery counts: mass x Sc2O3 ppm (``recovery_basis == "assay"``) or
        mass x [rock is sc] (``"count"``).
    grade_ppm : (n,) ndarray of float64 or None
        Sc2O3 assays when every rock is assayed, else None (no grades reported).
    """

    mass: np.ndarray
    units: np.ndarray
    grade_ppm: np.ndarray | None
    mass_basis: Basis
    recovery_basis: RecoveryBasis


def _all_finite(a: np.ndarray | None, n: int) -> bool:
    return a is not None and len(a) == n and n > 0 and bool(np.all(np.isfinite(a)))


def make_feed(is_sc: np.ndarray, mass_g: np.ndarray | None = None,
              sc2o3_ppm: np.ndarray | None = None) -> Feed:
    """Accounting weights for ``n`` rocks; see the module docstring for the fallbacks.

    Parameters
    ----------
    is_sc : (n,) array_like of bool
        True where the rock's label is ``sc``.
    mass_g, sc2o3_ppm : (n,) array_like of float, optional
        NaN where unknown.
    """
    is_sc = np.asarray(is_sc, dtype=bool)
    n = len(is_sc)
    mass_g = None if mass_g is None else np.asarray(mass_g, dtype=np.float64)
    sc2o3_ppm = None if sc2o3_ppm is None else np.asarray(sc2o3_ppm, dtype=np.float64)
    if _all_finite(mass_g, n):
        mass, mass_basis = mass_g.copy(), "mass"
    else:
        mass, mass_basis = np.ones(n), "count"
    if _all_finite(sc2o3_ppm, n):
        grade = sc2o3_ppm.copy()
        return Feed(mass, mass * grade, grade, mass_basis, "assay")
    return Feed(mass, mass * is_sc, None, mass_basis, "count")


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def sort_balance(selected: np.ndarray, is_sc: np.ndarray, feed: Feed) -> dict:
    """Mass and metal balance of one sort.

    Parameters
    ----------
    selected : (n,) array_like of bool
        True where the rock goes to product (classified ``sc``).
    is_sc : (n,) array_like of bool
        True where the rock's label is ``sc``.
    feed : Feed
        From :func:`make_feed` on the same rocks.

    Returns
    -------
    dict
        ``mass_pull``, ``sc_recovery``, ``feed_grade_ppm``, ``product_grade_ppm``,
        ``reject_grade_ppm``, ``upgrade_ratio``, ``waste_rejection``, ``sc_rock_recall``,
        ``confusion`` {tp, fp, fn, tn} (positive = sc), the bases, and counts.
        A ratio whose denominator is empty is None.
    """
    sel = np.asarray(selected, dtype=bool)
    is_sc = np.asarray(is_sc, dtype=bool)
    m, u = feed.mass, feed.units
    tp = int(np.sum(sel & is_sc))
    fp = int(np.sum(sel & ~is_sc))
    fn = int(np.sum(~sel & is_sc))
    tn = int(np.sum(~sel & ~is_sc))
    out = {
        "n": int(len(sel)),
        "n_product": int(sel.sum()),
        "mass_basis": feed.mass_basis,
        "recovery_basis": feed.recovery_basis,
        "mass_pull": _ratio(m[sel].sum(), m.sum()),
        "sc_recovery": _ratio(u[sel].sum(), u.sum()),
        "waste_rejection": _ratio(m[~sel & ~is_sc].sum(), m[~is_sc].sum()),
        "sc_rock_recall": _ratio(tp, tp + fn),
        "feed_grade_ppm": None,
        "product_grade_ppm": None,
        "reject_grade_ppm": None,
        "upgrade_ratio": None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }
    if feed.grade_ppm is not None:
        feed_g = _ratio(u.sum(), m.sum())
        prod_g = _ratio(u[sel].sum(), m[sel].sum())
        out["feed_grade_ppm"] = feed_g
        out["product_grade_ppm"] = prod_g
        out["reject_grade_ppm"] = _ratio(u[~sel].sum(), m[~sel].sum())
        if feed_g and prod_g is not None:
            out["upgrade_ratio"] = prod_g / feed_g
    return out


def grade_recovery_curve(scores: np.ndarray, feed: Feed) -> dict[str, np.ndarray]:
    """Sweep the threshold from high to low: product = rocks with score >= threshold.

    Parameters
    ----------
    scores : (n,) array_like of float
        Higher = more likely sc. Ties move to product together.
    feed : Feed

    Returns
    -------
    dict of (k + 1,) ndarray of float64
        ``threshold`` (first entry +inf: nothing to product), ``mass_pull``,
        ``sc_recovery``, ``product_grade_ppm`` (NaN where the product is empty or
        grades are unknown), for the k distinct score values.
    """
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    cm = np.cumsum(feed.mass[order])
    cu = np.cumsum(feed.units[order])
    # the last rock of each tie group closes a threshold step
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True]) if len(s) else np.zeros(0, int)
    tm, tu = (cm[-1], cu[-1]) if len(s) else (0.0, 0.0)
    mass = np.r_[0.0, cm[last]]
    units = np.r_[0.0, cu[last]]
    with np.errstate(invalid="ignore", divide="ignore"):
        grade = units / mass if feed.grade_ppm is not None else np.full(len(mass), np.nan)
        return {
            "threshold": np.r_[np.inf, s_sorted[last]],
            "mass_pull": mass / tm if tm > 0 else np.zeros_like(mass),
            "sc_recovery": units / tu if tu > 0 else np.zeros_like(units),
            "product_grade_ppm": np.where(mass > 0, grade, np.nan),
        }


def threshold_for_recovery(scores: np.ndarray, units: np.ndarray, target: float) -> float:
    """The highest threshold whose product (score >= threshold) holds ``target`` of the units.

    Parameters
    ----------
    scores : (n,) array_like of float
    units : (n,) array_like of float
        Non-negative recovery units per rock (Sc2O3 mass, or 1 per sc rock).
    target : float
        In (0, 1].

    Raises
    ------
    ValueError
        When the units sum to zero (nothing to recover) or target is out of range.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target recovery {target} is not in (0, 1]")
    s = np.asarray(scores, dtype=np.float64)
    u = np.asarray(units, dtype=np.float64)
    total = u.sum()
    if not total > 0:
        raise ValueError("no recoverable units: every rock has zero Sc")
    order = np.argsort(-s, kind="stable")
    cum = np.cumsum(u[order])
    # tolerance: a target of exactly 1.0 must be reachable despite rounding in cumsum
    k = int(np.searchsorted(cum, target * total * (1.0 - 1e-12), side="left"))
    return float(s[order][min(k, len(s) - 1)])


def interp_curve(curve: dict[str, np.ndarray], x_key: str, y_key: str, x: float) -> float:
    """``y`` of a monotone curve at ``x``, linearly between rocks (for same-pull comparisons)."""
    xs, ys = curve[x_key], curve[y_key]
    ok = np.isfinite(xs) & np.isfinite(ys)
    return float(np.interp(x, xs[ok], ys[ok]))


def roc_auc(scores: np.ndarray, is_sc: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is absent.

    The Mann-Whitney form: the probability that a random sc rock outscores a random
    waste rock.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_sc, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    r = rankdata(s)  # average ranks handle ties as half-wins
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def label_cutoff_ppm(sc2o3_ppm: np.ndarray, is_sc: np.ndarray) -> float:
    """The grade cut that best reproduces the labels: fewest sc rocks below it plus waste
    rocks at or above it; the geometric midpoint of the two assays around the best cut.

    Parameters
    ----------
    sc2o3_ppm : (n,) array_like of float
        Finite assays, n >= 1.
    is_sc : (n,) array_like of bool
    """
    g = np.asarray(sc2o3_ppm, dtype=np.float64)
    y = np.asarray(is_sc, dtype=bool)
    order = np.argsort(g, kind="stable")
    gs, ys = g[order], y[order]
    # a cut before sorted position k: sc rocks at positions < k + waste rocks at >= k
    sc_below = np.r_[0, np.cumsum(ys)]
    waste_above = np.r_[np.cumsum((~ys)[::-1])[::-1], 0]
    ok = np.r_[True, gs[1:] > gs[:-1], True]  # never cut between equal assays
    err = np.where(ok, sc_below + waste_above, np.iinfo(np.int64).max)
    k = int(np.argmin(err))
    if k == 0:
        return float(gs[0])
    if k == len(gs):
        return float(np.nextafter(gs[-1], np.inf))
    lo, hi = gs[k - 1], gs[k]
    return float(np.sqrt(lo * hi)) if lo > 0 else float((lo + hi) / 2)


def soft_sc_targets(sc2o3_ppm: np.ndarray, is_sc: np.ndarray, cutoff_ppm: float, width: float) -> np.ndarray:
    """P(sc) targets from assays: logistic in ln(grade / cutoff) with scale ``width``,
    kept on the side of 0.5 that the rock's label says (the label stays the authority).

    A hard label treats a 140 ppm rock like a 5 ppm one, while recovery counts the Sc in
    both; soft targets make the classifier rank rocks by grade on both sides of the cut
    (and a single-rock assay is itself uncertain by tens of per cent).

    Returns
    -------
    (n,) ndarray of float64 in [0, 1]
    """
    g = np.maximum(np.asarray(sc2o3_ppm, dtype=np.float64), 1e-6)
    y = np.asarray(is_sc, dtype=bool)
    z = np.clip(np.log(g / cutoff_ppm) / width, -50.0, 50.0)
    p = 1.0 / (1.0 + np.exp(-z))
    return np.where(y, np.maximum(p, 0.5), np.minimum(p, 0.5))
