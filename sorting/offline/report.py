"""The metallurgical report of a model on labeled rocks: metrics JSON and PNG plots.

Beside the model it always shows two references at the same mass pull: the naive
baseline (rocks ranked by mean attenuation, the "dense = ore" rule that the Crater
Lake traps defeat, docs/physics.md) and the oracle (rocks ranked by true assay,
the best any sorter could do).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sorting.offline.intervals import format_interval, small_sample, sort_intervals
from sorting.offline.metallurgy import (
    Feed,
    grade_recovery_curve,
    interp_curve,
    make_feed,
    roc_auc,
    sort_balance,
)

TRAP_LITHOTYPES = ("fayalite_cumulate", "oxide_rich")


def _select_at_pull(scores: np.ndarray, feed: Feed, mass_pull: float) -> np.ndarray:
    """Product of a ranking cut where its mass pull comes closest to ``mass_pull``."""
    curve = grade_recovery_curve(scores, feed)
    k = int(np.argmin(np.abs(curve["mass_pull"] - mass_pull)))
    return np.asarray(scores, dtype=np.float64) >= curve["threshold"][k]


def lithotype_shares(selected: np.ndarray, lithotype: np.ndarray, feed: Feed) -> dict[str, dict]:
    """Per lithotype: rocks, share of rocks and of mass classified ``sc``."""
    out = {}
    for name in sorted(set(lithotype.tolist())):
        m = lithotype == name
        out[name] = {
            "n": int(m.sum()),
            "share_sc": float(selected[m].mean()),
            "mass_share_sc": float(feed.mass[m & selected].sum() / feed.mass[m].sum()),
        }
    return out


def evaluate(scores: np.ndarray, is_sc: np.ndarray, threshold: float, *,
             mass_g: np.ndarray | None = None, sc2o3_ppm: np.ndarray | None = None,
             baseline: np.ndarray | None = None, lithotype: np.ndarray | None = None) -> tuple[dict, dict]:
    """Metrics of a model at its operating point, with baseline and oracle beside it.

    Parameters
    ----------
    scores : (n,) array_like of float
        Model P(sc); product is ``scores >= threshold``.
    is_sc : (n,) array_like of bool
    threshold : float
    mass_g, sc2o3_ppm : (n,) array_like of float, optional
    baseline : (n,) array_like of float, optional
        The naive ranking (mean attenuation); NaN ranks last.
    lithotype : (n,) array_like of str, optional

    Returns
    -------
    metrics : dict
        JSON-ready: ``auc``, ``operating`` (:func:`sort_balance`), ``baseline`` and
        ``oracle`` at the model's mass pull, ``lithotypes``.
    curves : dict
        Grade-recovery curves (:func:`grade_recovery_curve`) of ``model``,
        ``baseline`` and ``oracle``, for the plots.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_sc, dtype=bool)
    feed = make_feed(y, mass_g, sc2o3_ppm)
    sel = s >= threshold
    op = sort_balance(sel, y, feed)
    metrics = {"n": int(len(s)), "n_sc": int(y.sum()), "threshold": float(threshold),
               "auc": roc_auc(s, y), "operating": op,
               # how sure: bootstrap over the rocks (fixed seed), threshold held
               "ci95": sort_intervals(s, y, threshold, feed),
               "small_sample": small_sample(int(y.sum()), int((~y).sum()))}
    curves = {"model": grade_recovery_curve(s, feed)}
    # oracle: the assay itself (or the label where rocks are not assayed)
    oracle = feed.grade_ppm if feed.grade_ppm is not None else y.astype(np.float64)
    refs = {"oracle": oracle}
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        refs["baseline"] = np.where(np.isfinite(b), b, -np.inf)
    pull = op["mass_pull"] or 0.0
    for name, r in refs.items():
        curves[name] = grade_recovery_curve(r, feed)
        rsel = _select_at_pull(r, feed, pull)
        entry = {"auc": roc_auc(r, y),
                 "sc_recovery_at_model_pull": interp_curve(curves[name], "mass_pull", "sc_recovery", pull),
                 "at_nearest_cut": sort_balance(rsel, y, feed)}
        if op["sc_recovery"] is not None:
            entry["mass_pull_at_model_recovery"] = interp_curve(curves[name], "sc_recovery", "mass_pull",
                                                                op["sc_recovery"])
        if lithotype is not None:
            entry["lithotypes"] = lithotype_shares(rsel, np.asarray(lithotype), feed)
        metrics[name] = entry
    if lithotype is not None:
        metrics["lithotypes"] = lithotype_shares(sel, np.asarray(lithotype), feed)
    return metrics, curves


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def _with_ci(x: float | None, ci, pct: bool = True) -> str:
    text = format_interval(ci, pct)
    return _fmt(x, pct) + (f" ({text})" if text and x is not None else "")


def summary_lines(metrics: dict) -> list[str]:
    """A short human summary of :func:`evaluate` metrics."""
    op = metrics["operating"]
    ci = metrics.get("ci95") or {}
    lines = [f"rocks: {metrics['n']} ({metrics['n_sc']} sc), threshold {metrics['threshold']:.4f}, "
             f"mass basis {op['mass_basis']}, recovery basis {op['recovery_basis']}"]
    lines += [f"AUC: model {_with_ci(metrics['auc'], ci.get('auc'), False)}"
              + (f", baseline (mean attenuation) {_fmt(metrics['baseline']['auc'], False)}"
                 if "baseline" in metrics else ""),
              f"operating point: Sc recovery {_with_ci(op['sc_recovery'], ci.get('sc_recovery'))}, "
              f"mass pull {_with_ci(op['mass_pull'], ci.get('mass_pull'))}, "
              f"waste rejection {_fmt(op['waste_rejection'])}"]
    if ci:
        lines.append(f"  (95 % intervals: bootstrap over the {metrics['n']} rocks, {ci['resamples']} resamples, "
                     f"seed {ci['seed']}, threshold held)")
    if op["product_grade_ppm"] is not None:
        rej = op["reject_grade_ppm"]
        lines.append(f"grades: feed {op['feed_grade_ppm']:.0f} ppm Sc2O3, product {op['product_grade_ppm']:.0f} "
                     f"ppm Sc2O3, reject {'n/a' if rej is None else f'{rej:.0f}'} ppm Sc2O3, "
                     f"upgrade ratio {_fmt(op['upgrade_ratio'], False)}")
    c = op["confusion"]
    lines.append(f"confusion (positive = sc): tp {c['tp']}  fp {c['fp']}  fn {c['fn']}  tn {c['tn']}")
    for name in ("baseline", "oracle"):
        if name in metrics:
            at_pull = _fmt(metrics[name]["sc_recovery_at_model_pull"])
            lines.append(f"Sc recovery at the same mass pull: {name} {at_pull}")
    if "lithotypes" in metrics:
        parts = []
        for lith, d in metrics["lithotypes"].items():
            b = metrics.get("baseline", {}).get("lithotypes", {}).get(lith)
            trap = " (trap)" if lith in TRAP_LITHOTYPES else ""
            parts.append(f"  {lith}{trap}: {_fmt(d['share_sc'])} of {d['n']} rocks"
                         + (f" (baseline {_fmt(b['share_sc'])})" if b else ""))
        lines.append("share classified sc by lithotype:")
        lines.extend(parts)
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grade_recovery(curves: dict, metrics: dict, path: Path) -> Path:
    plt = _plt()
    has_grade = np.isfinite(curves["model"]["product_grade_ppm"]).any()
    fig, axes = plt.subplots(1, 2 if has_grade else 1, figsize=(11 if has_grade else 5.5, 4.5), squeeze=False)
    styles = {"model": ("C0", "-"), "baseline": ("C3", "--"), "oracle": ("k", ":")}
    labels = {"model": "model", "baseline": "baseline (mean attenuation)", "oracle": "oracle (true assay)"}
    op = metrics["operating"]
    ax = axes[0, 0]
    for name, c in curves.items():
        col, ls = styles[name]
        ax.plot(100 * c["mass_pull"], 100 * c["sc_recovery"], color=col, ls=ls, label=labels[name])
    ax.plot([0, 100], [0, 100], color="0.7", lw=0.8, label="no sorting")
    if op["mass_pull"] is not None and op["sc_recovery"] is not None:
        ci = metrics.get("ci95") or {}
        if ci.get("mass_pull") and ci.get("sc_recovery"):
            # the 95 % bootstrap intervals of the operating point, as error bars
            x, y = 100 * op["mass_pull"], 100 * op["sc_recovery"]
            xe = [[x - 100 * ci["mass_pull"][0]], [100 * ci["mass_pull"][1] - x]]
            ye = [[y - 100 * ci["sc_recovery"][0]], [100 * ci["sc_recovery"][1] - y]]
            ax.errorbar(x, y, xerr=np.maximum(xe, 0), yerr=np.maximum(ye, 0), fmt="o", color="C0", capsize=3,
                        label="operating point (95 % CI)")
        else:
            ax.plot(100 * op["mass_pull"], 100 * op["sc_recovery"], "o", color="C0", label="operating point")
    ax.set(xlabel=f"mass pull ({op['mass_basis']}) %", ylabel="Sc recovery %", xlim=(0, 100), ylim=(0, 101))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    if has_grade:
        ax = axes[0, 1]
        for name, c in curves.items():
            col, ls = styles[name]
            ax.plot(100 * c["sc_recovery"][1:], c["product_grade_ppm"][1:], color=col, ls=ls, label=labels[name])
        if op["product_grade_ppm"] is not None:
            ax.plot(100 * op["sc_recovery"], op["product_grade_ppm"], "o", color="C0")
            ax.axhline(op["feed_grade_ppm"], color="0.7", lw=0.8,
                       label=f"feed grade ({op['feed_grade_ppm']:.0f} ppm Sc2O3)")
        ax.set(xlabel="Sc recovery %", ylabel="product grade, ppm Sc2O3", xlim=(0, 101))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Grade-recovery over the decision threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(scores: np.ndarray, is_sc: np.ndarray, threshold: float, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[~is_sc], bins=bins, alpha=0.6, color="C7", label=f"waste ({int((~is_sc).sum())})")
    ax.hist(scores[is_sc], bins=bins, alpha=0.6, color="C2", label=f"sc ({int(is_sc.sum())})")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="score P(sc)", ylabel="rocks", yscale="log", title="Score distribution by label")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict, path: Path) -> Path:
    plt = _plt()
    c = metrics["operating"]["confusion"]
    m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="k" if v < m.max() / 2 else "w", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["sc (product)", "waste (reject)"],
           yticklabels=["sc", "waste"], xlabel="classified", ylabel="true label", title="Confusion (rocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lithotypes(metrics: dict, path: Path) -> Path:
    plt = _plt()
    names = list(metrics["lithotypes"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [100 * metrics["lithotypes"][n]["share_sc"] for n in names], 0.4, label="model", color="C0")
    if "lithotypes" in metrics.get("baseline", {}):
        b = metrics["baseline"]["lithotypes"]
        ax.bar(x + 0.2, [100 * b[n]["share_sc"] for n in names], 0.4, label="baseline, same mass pull", color="C3")
    ax.set_xticks(x, [n + (" (trap)" if n in TRAP_LITHOTYPES else "") for n in names], rotation=20, ha="right")
    ax.set(ylabel="share of rocks classified sc %", ylim=(0, 118), title="Product share by lithotype")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(out_dir: Path, metrics: dict, curves: dict, scores: np.ndarray, is_sc: np.ndarray) -> list[Path]:
    """metrics.json, curves.json (grade-recovery curves, +inf as null) and the PNGs into
    ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = out_dir / "metrics.json"
    mpath.write_text(json.dumps(_jsonable(metrics), indent=1) + "\n")
    cpath = out_dir / "curves.json"
    short = {k: {c: np.round(v, 6) for c, v in cur.items()} for k, cur in curves.items()}
    cpath.write_text(json.dumps(_jsonable(short), separators=(",", ":")) + "\n")
    paths = [mpath, cpath,
             plot_grade_recovery(curves, metrics, out_dir / "grade_recovery.png"),
             plot_scores(np.asarray(scores), np.asarray(is_sc, bool), metrics["threshold"], out_dir / "scores.png"),
             plot_confusion(metrics, out_dir / "confusion.png")]
    if "lithotypes" in metrics:
        paths.append(plot_lithotypes(metrics, out_dir / "lithotypes.png"))
    return paths
