"""Champion against challenger(s) on the same labeled rocks (``sorting compare``).

Two figures per model: AUC, and Sc recovery at the champion's mass pull (the pull of the
champion's operating point on these rocks; every model is cut at that same pull, so the
comparison is at equal mass to product). Each comes with a 95 % interval from a **paired
bootstrap over rocks**: every replicate draws the rocks with replacement once and scores
all models on that same draw, so the interval of a difference reflects the models'
disagreement, not the luck of which rocks were drawn. The seed is fixed: the same rocks
and models give the same intervals.

Verdict: a challenger differs from the champion when the 95 % interval of its AUC
difference excludes 0 (the recovery difference is reported beside it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sorting.offline.metallurgy import grade_recovery_curve, interp_curve, make_feed, roc_auc, sort_balance

N_BOOT = 2000
BOOT_SEED = 20240607
LEVEL = 0.95


def _recovery_at(scores: np.ndarray, feed, pull: float) -> float:
    return interp_curve(grade_recovery_curve(scores, feed), "mass_pull", "sc_recovery", pull)


def _figures(scores: dict[str, np.ndarray], y: np.ndarray, feed, champion: str, threshold: float) -> dict:
    """AUC of each model and Sc recovery at the champion's operating pull, on one set of rocks."""
    pull = sort_balance(scores[champion] >= threshold, y, feed)["mass_pull"] or 0.0
    out = {"pull": pull}
    for name, s in scores.items():
        out[name] = (roc_auc(s, y), _recovery_at(s, feed, pull))
    return out


def paired_auc_difference(a: np.ndarray, b: np.ndarray, is_sc: np.ndarray, *, n_boot: int = N_BOOT,
                          seed: int = BOOT_SEED) -> tuple[float, list[float] | None]:
    """AUC(b) - AUC(a) on the same rocks and its 95 % paired-bootstrap interval (rocks drawn
    with replacement, both scored on the same draw)."""
    y = np.asarray(is_sc, dtype=bool)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    point = (roc_auc(b, y) or 0.0) - (roc_auc(a, y) or 0.0)
    rng = np.random.default_rng(seed)
    d = np.full(n_boot, np.nan)
    for k in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        yb = y[i]
        if yb.all() or not yb.any():
            continue
        d[k] = roc_auc(b[i], yb) - roc_auc(a[i], yb)
    return float(point), _interval(d)


def _interval(x: np.ndarray) -> list[float] | None:
    x = x[np.isfinite(x)]
    if not len(x):
        return None
    a = (1.0 - LEVEL) / 2
    return [float(np.quantile(x, a)), float(np.quantile(x, 1 - a))]


def compare_scores(scores: dict[str, np.ndarray], is_sc: np.ndarray, champion_threshold: float, *,
                   mass_g: np.ndarray | None = None, sc2o3_ppm: np.ndarray | None = None,
                   n_boot: int = N_BOOT, seed: int = BOOT_SEED, progress: bool = False) -> dict:
    """The comparison of models on the same rocks.

    Parameters
    ----------
    scores : {name: (n,) P(sc)}, the champion first (dict order)
    is_sc : (n,) bool
    champion_threshold : the champion's operating threshold (it sets the common mass pull)
    mass_g, sc2o3_ppm : (n,) optional, as for :func:`sorting.offline.metallurgy.make_feed`
    n_boot, seed : bootstrap replicates and their seed
    progress : a progress bar over the replicates

    Returns
    -------
    dict (JSON-ready): ``champion``, ``n``, ``n_sc``, ``mass_pull`` (the champion's), ``bases``,
    ``bootstrap`` {replicates, seed, level}, ``models`` {name: {auc, auc_ci, sc_recovery_at_pull,
    sc_recovery_at_pull_ci}}, ``differences`` {challenger: {auc, auc_ci, sc_recovery_at_pull,
    sc_recovery_at_pull_ci, real}} (challenger minus champion) and the one-line ``verdict``.
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError("compare needs a champion and at least one challenger")
    y = np.asarray(is_sc, dtype=bool)
    n = len(y)
    S = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    if any(len(v) != n for v in S.values()):
        raise ValueError("every model needs one score per rock")
    if y.all() or not y.any():
        raise ValueError("comparing needs rocks of both classes (sc and waste)")
    champion = names[0]
    m = None if mass_g is None else np.asarray(mass_g, dtype=np.float64)
    g = None if sc2o3_ppm is None else np.asarray(sc2o3_ppm, dtype=np.float64)
    feed = make_feed(y, m, g)
    point = _figures(S, y, feed, champion, champion_threshold)
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    boot = {k: np.full((n_boot, 2), np.nan) for k in names}
    for b in tqdm(range(n_boot), desc="bootstrap", unit="replicate", disable=None if progress else True):
        i = rng.integers(0, n, n)
        yb = y[i]
        if yb.all() or not yb.any():
            continue
        fb = make_feed(yb, None if m is None else m[i], None if g is None else g[i])
        f = _figures({k: v[i] for k, v in S.items()}, yb, fb, champion, champion_threshold)
        for k in names:
            boot[k][b] = [np.nan if f[k][0] is None else f[k][0], f[k][1]]
    models = {k: {"auc": point[k][0], "auc_ci": _interval(boot[k][:, 0]),
                  "sc_recovery_at_pull": point[k][1], "sc_recovery_at_pull_ci": _interval(boot[k][:, 1])}
              for k in names}
    diffs = {}
    for k in names[1:]:
        d = boot[k] - boot[champion]
        ci = _interval(d[:, 0])
        diffs[k] = {"auc": point[k][0] - point[champion][0], "auc_ci": ci,
                    "sc_recovery_at_pull": point[k][1] - point[champion][1],
                    "sc_recovery_at_pull_ci": _interval(d[:, 1]),
                    "real": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}
    out = {"champion": champion, "challengers": names[1:], "n": n, "n_sc": int(y.sum()),
           "champion_threshold": float(champion_threshold), "mass_pull": point["pull"],
           "mass_basis": feed.mass_basis, "recovery_basis": feed.recovery_basis,
           "bootstrap": {"replicates": n_boot, "seed": seed, "level": LEVEL, "paired": True, "over": "rocks"},
           "models": models, "differences": diffs}
    out["verdict"] = verdict(out)
    return out


def verdict(result: dict) -> str:
    """One line: for each challenger, whether its AUC differs from the champion's at this sample size."""
    parts = []
    for k, d in result["differences"].items():
        ci = d["auc_ci"]
        span = f"AUC {d['auc']:+.4f}, 95 % CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"AUC {d['auc']:+.4f}"
        rec = d["sc_recovery_at_pull"]
        span += f"; Sc recovery at equal pull {100 * rec:+.1f} points"
        if d["real"]:
            word = "better than" if d["auc"] > 0 else "worse than"
            parts.append(f"{k} is {word} {result['champion']}: real difference ({span})")
        else:
            parts.append(f"{k} vs {result['champion']}: no difference at this sample size ({span})")
    return f"{result['n']} rocks: " + "; ".join(parts)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def plot_compare(scores: dict[str, np.ndarray], is_sc: np.ndarray, result: dict, path: Path, *,
                 mass_g: np.ndarray | None = None, sc2o3_ppm: np.ndarray | None = None) -> Path:
    """Every model's grade-recovery curve (Sc recovery against mass pull) on one plot, the
    oracle and the champion's operating pull beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(is_sc, dtype=bool)
    feed = make_feed(y, mass_g, sc2o3_ppm)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, (name, s) in enumerate(scores.items()):
        c = grade_recovery_curve(np.asarray(s, np.float64), feed)
        st = result["models"][name]
        role = "champion" if name == result["champion"] else "challenger"
        ax.plot(100 * c["mass_pull"], 100 * c["sc_recovery"], color=f"C{i}", lw=1.6,
                label=f"{name} ({role}): AUC {st['auc']:.3f}")
    oracle = feed.grade_ppm if feed.grade_ppm is not None else y.astype(np.float64)
    c = grade_recovery_curve(oracle, feed)
    ax.plot(100 * c["mass_pull"], 100 * c["sc_recovery"], color="k", ls=":", lw=1, label="oracle (true assay)")
    ax.plot([0, 100], [0, 100], color="0.7", lw=0.8, label="no sorting")
    pull = result["mass_pull"]
    if pull is not None:
        ax.axvline(100 * pull, color="0.4", ls="--", lw=0.8, label=f"champion's pull {100 * pull:.1f} %")
    ax.set(xlabel=f"mass pull ({feed.mass_basis}) %", ylabel=f"Sc recovery ({feed.recovery_basis}) %",
           xlim=(0, 100), ylim=(0, 101), title=f"Champion vs challenger(s), {result['n']} rocks")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_compare(out_dir: Path, result: dict, scores: dict[str, np.ndarray], is_sc: np.ndarray, *,
                  mass_g: np.ndarray | None = None, sc2o3_ppm: np.ndarray | None = None) -> list[Path]:
    """``compare.json``, ``grade_recovery.png`` and ``verdict.txt`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / "compare.json"
    j.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    v = out_dir / "verdict.txt"
    v.write_text(result["verdict"] + "\n")
    png = plot_compare(scores, is_sc, result, out_dir / "grade_recovery.png", mass_g=mass_g, sc2o3_ppm=sc2o3_ppm)
    return [j, png, v]
