"""Bootstrap intervals of the metallurgical numbers (sorting/offline/intervals.py), checked
against independent computations: scipy's Mann-Whitney AUC, the Wilson score interval of a
proportion, a hand count, and the coverage of the true value on synthetic data whose truth
is known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, norm

from sorting.offline.intervals import (
    percentile_interval,
    resample_weights,
    small_sample,
    sort_intervals,
    weighted_auc,
)
from sorting.offline.metallurgy import make_feed


def test_weighted_auc_is_mann_whitney_and_counts_weights_as_copies():
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=80), 1)  # rounded: many ties
    y = rng.random(80) < 0.4
    u = mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum())
    assert weighted_auc(s, y, np.ones((1, 80)))[0] == pytest.approx(u, abs=1e-12)
    # integer weights = the rocks repeated
    w = rng.integers(0, 4, size=80)
    rep = np.repeat(np.arange(80), w)
    u_rep = mannwhitneyu(s[rep][y[rep]], s[rep][~y[rep]]).statistic / (y[rep].sum() * (~y[rep]).sum())
    assert weighted_auc(s, y, w[None, :].astype(float))[0] == pytest.approx(u_rep, abs=1e-12)
    # by hand: sc 0.9, 0.5; waste 0.5, 0.1 -> pairs (0.9>0.5) 1, (0.9>0.1) 1, (0.5=0.5) 1/2, (0.5>0.1) 1 = 3.5/4
    assert weighted_auc([0.9, 0.5, 0.5, 0.1], [True, True, False, False], np.ones((1, 4)))[0] == 0.875
    assert np.isnan(weighted_auc([0.9, 0.5], [True, True], np.ones((1, 2)))[0])  # one class only


def test_resample_weights_are_seeded_draws_of_n():
    a = np.concatenate(list(resample_weights(50, 300, seed=4)))
    b = np.concatenate(list(resample_weights(50, 300, seed=4)))
    assert a.shape == (300, 50) and np.array_equal(a, b)
    assert np.all(a.sum(axis=1) == 50)
    # each rock is drawn Binomial(50, 1/50) times: mean 1, variance 49/50
    assert a.mean() == pytest.approx(1.0, abs=0.02)
    assert a.var() == pytest.approx(49 / 50, rel=0.05)
    assert not np.array_equal(a, np.concatenate(list(resample_weights(50, 300, seed=5))))


def test_mass_pull_interval_matches_wilson_on_a_large_sample():
    """With one unit of mass per rock the mass pull is a proportion: on 3000 rocks its bootstrap
    interval must agree with the Wilson score interval (a closed form)."""
    rng = np.random.default_rng(8)
    n = 3000
    s = rng.random(n)
    y = rng.random(n) < 0.5
    feed = make_feed(y)  # no masses, no assays: count basis
    ci = sort_intervals(s, y, 0.7, feed, resamples=2000, seed=1)
    k = int((s >= 0.7).sum())
    p, z = k / n, norm.ppf(0.975)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = ci["mass_pull"]
    assert lo == pytest.approx(centre - half, abs=0.2 * half)
    assert hi == pytest.approx(centre + half, abs=0.2 * half)
    # recovery on the count basis is the share of sc rocks selected: a proportion of the sc rocks
    ks, ns = int((s[y] >= 0.7).sum()), int(y.sum())
    ps = ks / ns
    half_s = z * np.sqrt(ps * (1 - ps) / ns)
    lo, hi = ci["sc_recovery"]
    assert (lo + hi) / 2 == pytest.approx(ps, abs=0.2 * half_s)
    assert (hi - lo) / 2 == pytest.approx(half_s, rel=0.2)


def test_intervals_cover_the_true_values_about_95_percent_of_the_time():
    """Binormal scores (waste N(0, 1), sc N(1, 1), each rock sc with probability 1/2): the true
    AUC is Phi(1 / sqrt 2), the true recovery (count basis) at threshold t is P(N(1, 1) >= t) and
    the true mass pull the mean of both classes' shares. 300 samples of 120 rocks each."""
    t, d = 0.5, 1.0
    truth = {"auc": norm.cdf(d / np.sqrt(2)), "sc_recovery": norm.sf(t - d),
             "mass_pull": 0.5 * norm.sf(t - d) + 0.5 * norm.sf(t)}
    rng = np.random.default_rng(21)
    hits = {k: 0 for k in truth}
    reps = 300
    for r in range(reps):
        y = rng.random(120) < 0.5
        s = rng.normal(size=120) + d * y
        ci = sort_intervals(s, y, t, make_feed(y), resamples=400, seed=r)
        for k, v in truth.items():
            hits[k] += ci[k][0] <= v <= ci[k][1]
    for k in truth:
        # a 95 % interval; the percentile bootstrap runs a little short on small samples
        assert 0.89 <= hits[k] / reps <= 0.985, (k, hits[k] / reps)


def test_sort_intervals_edge_cases_and_seed():
    y = np.array([True, False, True, False, True])
    s = np.array([0.9, 0.2, 0.8, 0.4, 0.3])
    feed = make_feed(y, mass_g=np.array([10.0, 20, 30, 40, 50]), sc2o3_ppm=np.array([400.0, 10, 300, 20, 200]))
    a = sort_intervals(s, y, 0.5, feed, resamples=200, seed=7)
    assert a == sort_intervals(s, y, 0.5, feed, resamples=200, seed=7)
    for k in ("auc", "sc_recovery", "mass_pull"):
        assert 0.0 <= a[k][0] <= a[k][1] <= 1.0
    empty = sort_intervals(np.zeros(0), np.zeros(0, bool), 0.5, make_feed(np.zeros(0, bool)))
    assert empty["auc"] is None and empty["mass_pull"] is None
    one_class = sort_intervals(s, np.ones(5, bool), 0.5, make_feed(np.ones(5, bool)), resamples=50)
    assert one_class["auc"] is None and one_class["sc_recovery"] is not None
    assert percentile_interval(np.array([np.nan, np.nan, 1.0])) is None
    with pytest.raises(ValueError):
        sort_intervals(s, y, 0.5, feed, resamples=0)


def test_small_sample_warning():
    assert small_sample(40, 35) is None
    msg = small_sample(21, 21)
    assert msg is not None and "21 sc and 21 waste" in msg
    assert small_sample(100, 29) is not None
