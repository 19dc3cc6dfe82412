"""Which rocks of a pool to send to the laboratory: the picks of ``sorting select``.

Assays cost money, so the few rocks assayed on a new machine should teach ``sorting adapt``
as much as possible. Two kinds of picks:

- **Coverage** (most of them): the pool's feature vectors are robustly standardized
  (median and interquartile range per feature, clipped at +-5), turned by PCA into
  uncorrelated directions (so the six size features or the five mafic-fraction quantiles do
  not count six or five times) and cut into as many k-means clusters (k-means++ seeding)
  as there are coverage picks; each cluster gives the rock nearest its centre. The picks
  spread over the pool's sizes and lithotype-like groups in proportion to how common they
  are, and an outlying group still gets its own.
- **Uncertainty** (``uncertain_share`` of them, with a parent model; none by default): rocks whose parent
  score lies nearest the parent's operating threshold, in rank terms (the pool's share of
  rocks the parent calls ``sc``), taken greedily farthest from everything already picked
  so that they do not repeat one another. Those are the rocks whose call decides the
  operating point.

Deterministic for a seed; the same pool and seed give the same picks.

Measured on the commissioning benchmark (benchmarks/bench_adapt.py's pool and hold-out, 100
picks, the random forest on the parent's rocks regenerated on the new machine with the picks,
6 seeds): hold-out AUC
0.947 +- 0.003 with coverage picks only, 0.946 +- 0.006 with a quarter of uncertainty picks,
0.943 +- 0.005 with a tenth, 0.937 +- 0.005 with half, 0.941 +- 0.003 with random rocks. Hence
no uncertainty picks by default: near the operating point the parent is often wrong on a new
machine, and those rocks are the least representative of the feed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: clusters are fitted on at most this many rocks (a seeded subsample), for bounded time on huge pools
KMEANS_FIT_MAX = 50_000
#: share of the PCA variance kept for the coverage space
PCA_VARIANCE = 0.95


@dataclass(frozen=True)
class Picks:
    """``index`` (k,) into the pool's rows, ``reason`` ``"coverage"`` or ``"uncertainty"``,
    ``cluster`` (-1 for uncertainty picks), ``distance`` of each pick to its cluster centre
    (coverage) or its rank distance to the operating point (uncertainty)."""

    index: np.ndarray
    reason: tuple[str, ...]
    cluster: np.ndarray
    distance: np.ndarray


def embed(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """Robust-standardized, PCA-decorrelated coordinates of feature rows ``X`` (n, F), NaN-free."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    med = np.nanmedian(X, axis=0)
    q75, q25 = np.nanpercentile(X, [75, 25], axis=0)
    scale = q75 - q25
    std = np.nanstd(X, axis=0)
    scale = np.where(scale > 1e-12, scale, np.where(std > 1e-12, std, 1.0))
    Z = np.clip((X - med) / scale, -5.0, 5.0)
    Z = np.where(np.isfinite(Z), Z, 0.0)
    if len(Z) < 3:
        return Z
    pca = PCA(n_components=PCA_VARIANCE, svd_solver="full", random_state=seed)
    return pca.fit_transform(Z)


def _coverage(Z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    fit_rows = np.arange(len(Z)) if len(Z) <= KMEANS_FIT_MAX else np.sort(rng.choice(len(Z), KMEANS_FIT_MAX,
                                                                                      replace=False))
    with threadpool_limits(1):  # one thread: the same clusters on every machine
        km = KMeans(n_clusters=k, init="k-means++", n_init=3, random_state=seed).fit(Z[fit_rows])
        labels = km.predict(Z)
    d = np.linalg.norm(Z - km.cluster_centers_[labels], axis=1)
    picks, clusters, dist = [], [], []
    taken = np.zeros(len(Z), bool)
    for c in range(k):
        members = np.flatnonzero((labels == c) & ~taken)
        if not len(members):  # a cluster of the subsample with no pool rock left: its nearest free rock
            members = np.flatnonzero(~taken)
            dc = np.linalg.norm(Z[members] - km.cluster_centers_[c], axis=1)
            j = members[int(np.argmin(dc))]
            picks.append(j)
            dist.append(float(dc.min()))
        else:
            j = members[int(np.argmin(d[members]))]
            picks.append(j)
            dist.append(float(d[j]))
        clusters.append(c)
        taken[j] = True
    return np.array(picks, np.int64), np.array(clusters, np.int64), np.array(dist)


def _uncertain(Z: np.ndarray, scores: np.ndarray, threshold: float, k: int, taken: np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """``k`` rocks nearest the operating point in rank, spread out (greedy farthest point)."""
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, np.float64)
    rank[order] = np.arange(n) / max(n - 1, 1)
    cut = float(np.mean(scores >= threshold))  # the parent's pull on this pool, in rank
    closeness = np.abs(rank - cut)
    band = np.argsort(closeness, kind="stable")
    band = band[~taken[band]][: max(4 * k, k)]  # the 4k rocks nearest the operating point
    chosen: list[int] = []
    ref = Z[taken]
    dmin = (np.min(np.linalg.norm(Z[band, None, :] - ref[None, :, :], axis=2), axis=1)
            if len(ref) else np.full(len(band), np.inf))
    for _ in range(min(k, len(band))):
        j = int(np.argmax(np.where(np.isin(band, chosen), -np.inf, dmin)))
        chosen.append(int(band[j]))
        dmin = np.minimum(dmin, np.linalg.norm(Z[band] - Z[band[j]], axis=1))
    idx = np.array(chosen, np.int64)
    return idx, closeness[idx]


def select_rocks(X: np.ndarray, n: int, *, scores: np.ndarray | None = None, threshold: float | None = None,
                 uncertain_share: float = 0.0, seed: int = 0) -> Picks:
    """Pick ``n`` distinct rows of the pool ``X`` (m, F) to assay.

    Parameters
    ----------
    X : (m, F) features of the pool's usable rocks (NaN allowed: read as the median)
    n : 1 <= n <= m
    scores, threshold : the parent model's P(sc) per rock and its operating threshold; without
        them every pick is a coverage pick
    uncertain_share : share of the picks taken near the operating point (0-1)
    seed : seeds the PCA and k-means

    Returns
    -------
    Picks, coverage picks first.
    """
    X = np.asarray(X, dtype=np.float64)
    m = len(X)
    if not 1 <= n <= m:
        raise ValueError(f"cannot pick {n} rocks from a pool of {m}")
    if not 0.0 <= uncertain_share <= 1.0:
        raise ValueError(f"uncertain_share {uncertain_share} is not in [0, 1]")
    Z = embed(X, seed)
    k_unc = int(round(n * uncertain_share)) if scores is not None and threshold is not None else 0
    k_cov = n - k_unc
    idx = np.zeros(0, np.int64)
    cl = np.zeros(0, np.int64)
    dist = np.zeros(0)
    if k_cov:
        idx, cl, dist = _coverage(Z, k_cov, seed)
    reasons = ["coverage"] * len(idx)
    if k_unc:
        taken = np.zeros(m, bool)
        taken[idx] = True
        u, ud = _uncertain(Z, np.asarray(scores, dtype=np.float64), float(threshold), k_unc, taken)
        idx = np.r_[idx, u]
        cl = np.r_[cl, np.full(len(u), -1)]
        dist = np.r_[dist, ud]
        reasons += ["uncertainty"] * len(u)
    assert len(np.unique(idx)) == len(idx) == n
    return Picks(idx, tuple(reasons), cl, dist)
