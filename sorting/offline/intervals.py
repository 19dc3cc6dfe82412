"""How sure the metallurgical numbers of a labeled sample are: bootstrap intervals over rocks.

A report on 42 rocks prints an AUC and a recovery as confidently as one on 4,000. These
functions put a 95 % interval beside them: the rocks are resampled with replacement
(``resamples`` times, with a fixed ``seed``, so the same data give the same interval), the
statistic is recomputed on each resample with the threshold held fixed, and the interval is
the central ``level`` share of the resampled values (percentile bootstrap). A resample
without a rock of one class has no AUC (no recovery without Sc) and is left out.

Pure functions on 1-D arrays, one entry per rock, as :mod:`sorting.offline.metallurgy`.
"""
from __future__ import annotations

import numpy as np

from sorting.offline.metallurgy import Feed

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
#: below this many rocks of either class, a printed metric is flagged as resting on a small sample
SMALL_CLASS_ROCKS = 30
#: resamples held in memory at once: (block, n) float64 weights
_BLOCK = 128


def resample_weights(n: int, resamples: int, seed: int):
    """Bootstrap weights in blocks: each row counts how often each of the ``n`` rocks was drawn
    (``n`` draws with replacement; a row sums to ``n``). Yields (b, n) float64 arrays, ``resamples``
    rows in all; the same ``seed`` gives the same rows."""
    rng = np.random.default_rng(seed)
    p = np.full(n, 1.0 / n)
    done = 0
    while done < resamples:
        b = min(_BLOCK, resamples - done)
        yield rng.multinomial(n, p, size=b).astype(np.float64)
        done += b


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_auc(scores: np.ndarray, is_sc: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count half) of rocks carrying ``weights``: the Mann-Whitney statistic with
    each rock counted ``weight`` times. ``weights`` is (b, n): one AUC per row, NaN where a row
    has no weight on one class. With all weights 1 it is the plain AUC."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_sc, dtype=bool)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted, w_sorted = s[order], y[order], w[:, order]
    n = len(s)
    # the rocks of each tie group [start, end) in ascending score order
    new = np.r_[True, s_sorted[1:] != s_sorted[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    neg = w_sorted * ~y_sorted
    cum_neg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg, axis=1)], axis=1)  # (b, n + 1)
    below = cum_neg[:, starts[group]]  # waste weight strictly below each rock's score
    tied = cum_neg[:, ends[group]] - below  # waste weight at its score
    pos = w_sorted * y_sorted
    wins = np.sum(pos * (below + 0.5 * tied), axis=1)
    return _ratio(wins, pos.sum(axis=1) * neg.sum(axis=1))


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float] | None:
    """The central ``level`` share of the finite ``values``; None when fewer than half are finite
    (the statistic is undefined on most resamples)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0 or 2 * len(v) < len(np.asarray(values)):
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(v, [tail, 100.0 - tail])
    return float(lo), float(hi)


def sort_intervals(scores: np.ndarray, is_sc: np.ndarray, threshold: float, feed: Feed, *,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   level: float = DEFAULT_LEVEL) -> dict:
    """Bootstrap intervals of AUC, Sc recovery and mass pull of the sort ``scores >= threshold``.

    Parameters
    ----------
    scores : (n,) array_like of float
    is_sc : (n,) array_like of bool
    threshold : float
        Held fixed: the interval is the uncertainty from which rocks were sampled, not from
        choosing the threshold.
    feed : Feed
        :func:`sorting.offline.metallurgy.make_feed` on the same rocks (masses and Sc units).
    resamples, seed, level
        Number of bootstrap resamples, their seed, and the interval's coverage.

    Returns
    -------
    dict
        ``auc``, ``sc_recovery``, ``mass_pull``: ``[low, high]`` or None (undefined), and
        ``resamples``, ``seed``, ``level``.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_sc, dtype=bool)
    n = len(s)
    out: dict = {"resamples": int(resamples), "seed": int(seed), "level": float(level)}
    if n == 0:
        return {**out, "auc": None, "sc_recovery": None, "mass_pull": None}
    sel = s >= threshold
    m, u = feed.mass, feed.units
    auc, rec, pull = [], [], []
    for w in resample_weights(n, resamples, seed):
        auc.append(weighted_auc(s, y, w))
        rec.append(_ratio(w @ (u * sel), w @ u))
        pull.append(_ratio(w @ (m * sel), w @ m))
    for name, vals in (("auc", auc), ("sc_recovery", rec), ("mass_pull", pull)):
        ci = percentile_interval(np.concatenate(vals), level)
        out[name] = None if ci is None else [ci[0], ci[1]]
    return out


def small_sample(n_sc: int, n_waste: int, min_per_class: int = SMALL_CLASS_ROCKS) -> str | None:
    """A warning when either class has fewer than ``min_per_class`` rocks, else None."""
    if min(n_sc, n_waste) >= min_per_class:
        return None
    return (f"only {n_sc} sc and {n_waste} waste rocks: with fewer than {min_per_class} of either class "
            "the metrics are rough; read the 95 % intervals, not the point values")


def format_interval(ci, pct: bool) -> str:
    """``"95 % CI 90.1-98.7 %"`` (``pct``) or ``"95 % CI 0.951-0.998"``; empty for no interval."""
    if not ci:
        return ""
    if pct:
        return f"95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %"
    return f"95 % CI {ci[0]:.3f}-{ci[1]:.3f}"
