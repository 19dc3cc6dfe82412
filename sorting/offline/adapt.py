"""A model for a new machine or ore from a parent model and a few assayed rocks (``sorting adapt``).

What the parent knows is kept where it helps, and the new rocks decide how much:

- ``parent``: the parent's own scores, with only the operating threshold moved to the new
  rocks (the parent's graph is kept as it is);
- ``scratch``: the model types fitted on the new rocks alone;
- ``union_r{R}``: the candidates fitted on the parent's training rocks (written by the twin
  from the parent's recorded recipe, on the new machine: see ``sorting adapt --machine``; or
  given) together with the new rocks, the new rocks weighted up so that their total weight
  is ``R`` times the parent rocks'.

Each strategy (and model type: the random forest, extremely randomized trees, and the
boosting candidate from 300 new rocks on) is scored by repeated stratified cross-validation
**on the new rocks only** (parent rocks are always in the training folds, never in the
validation folds). The default is to keep the parent's knowledge: ``union_r1/extra_trees``
when the parent's rocks could be had, else ``scratch/random_forest``. Another strategy
replaces the default only when the new rocks show it is better: its out-of-fold AUC is higher
and the 95 % paired bootstrap interval (over the new rocks) of the difference excludes 0.

Why, measured on the commissioning benchmark's pool and hold-out (benchmarks/bench_adapt.py,
100 rocks picked by ``sorting select``, 5 seeds): with the parent's ore written by the twin on
the new machine (fitted to its calibration scans), hold-out AUC 0.951 +- 0.003 with extra
trees, 0.954 +- 0.002 with the twin rocks' narrow soft targets (:data:`TWIN_SOFT_WIDTH`); with
the parent's rocks on the parent's machine 0.948 +- 0.002; earlier, with the
machine's true config, extra trees 0.952 +- 0.002 against 0.947 +- 0.003 for the random forest,
and from the new rocks alone both 0.940-0.941. With a quarter of uncertainty picks and the
parent's rocks from the reference machine, the forest reached 0.942 +- 0.005 with the parent's
rocks and 0.930 +- 0.011 without, while plain "best out-of-fold AUC" picked ``scratch`` in most
seeds on differences of a few thousandths that 100 rocks cannot resolve.

The operating threshold is then chosen on the chosen strategy's out-of-fold scores of the new
rocks, for the target Sc recovery, and the model is refitted on all of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sorting.offline.metallurgy import (
    label_cutoff_ppm,
    make_feed,
    roc_auc,
    soft_sc_targets,
    sort_balance,
    threshold_for_recovery,
)
from sorting.offline.training import SOFT_WIDTH, TrainedModel, candidates, fit_soft, fold_scores

#: total weight of the new rocks relative to the parent's rocks, for the union strategies
UNION_RATIOS = (1.0, 3.0)
#: below this many new rocks only the random forest is tried: with 100 rocks the boosting
#: candidate won the cross-validation by chance and lost on held-out rocks (0.904 vs 0.943
#: AUC on the commissioning benchmark), the forest never fell that far
FOREST_ONLY_BELOW = 300
#: trees of the extremely randomized trees candidate (100: the hold-out AUC of 50 was 0.001 lower)
EXTRA_TREES = 100
CV_FOLDS = 5
CV_REPEATS = 2
#: soft-target width (ln grade) for parent rocks written by the twin: their grades are exact,
#: not assays (bench_adapt, 100 selected rocks, 2 twin draws x 5 seeds: hold-out AUC 0.9500 /
#: 0.9526 / 0.9532 / 0.9529 with 0.3 / hard labels / 0.1 / 0.05)
TWIN_SOFT_WIDTH = 0.1


@dataclass(frozen=True)
class RockSet:
    """Labeled rocks: features ``X`` (n, F), ``is_sc`` (n,), assays and masses (NaN where unknown)."""

    X: np.ndarray
    is_sc: np.ndarray
    sc2o3_ppm: np.ndarray
    mass_g: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.is_sc)
        if self.X.ndim != 2 or len(self.X) != n or len(self.sc2o3_ppm) != n or len(self.mass_g) != n:
            raise ValueError("RockSet: X, is_sc, sc2o3_ppm and mass_g must have one entry per rock")


@dataclass(frozen=True)
class Adapted:
    """The outcome: either a fitted ``model`` (TrainedModel) or ``model is None`` and the
    parent kept with ``threshold``; ``cv`` holds every strategy's out-of-fold AUC."""

    strategy: str
    model: TrainedModel | None
    threshold: float
    cv: dict
    metrics: dict


def adapt_candidates(seed: int, n_new: int) -> dict:
    """The model types ``adapt`` tries: the training candidates (below ``FOREST_ONLY_BELOW`` new
    rocks only the random forest) and extremely randomized trees, whose smoother boundaries
    suit a training set of two machines or ores (the default of the union strategies)."""
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    cands = candidates(seed)
    if n_new < FOREST_ONLY_BELOW:
        cands = {"random_forest": cands["random_forest"]}
    cands["extra_trees"] = Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("clf", ExtraTreesClassifier(n_estimators=EXTRA_TREES, min_samples_leaf=8, max_features="sqrt", n_jobs=1,
                                     random_state=seed))])
    return cands


def _targets(rocks: RockSet, cut: float | None, soft_width: float) -> np.ndarray:
    g = rocks.sc2o3_ppm
    if soft_width > 0 and cut is not None and bool(np.isfinite(g).all()):
        return soft_sc_targets(g, rocks.is_sc, cut, soft_width)
    return rocks.is_sc.astype(np.float64)


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import RepeatedStratifiedKFold

    k = int(min(CV_FOLDS, y.sum(), (~y).sum()))
    if k < 2:
        raise ValueError("adapting needs at least 2 new rocks of each class")
    return list(RepeatedStratifiedKFold(n_splits=k, n_repeats=CV_REPEATS, random_state=seed).split(
        np.zeros(len(y)), y))


def adapt(new: RockSet, parent_scores: np.ndarray, parent_threshold: float, *, feature_names: tuple[str, ...],
          feature_version: str, parent_rocks: RockSet | None = None, target_recovery: float = 0.95,
          seed: int = 0, label_cutoff: float | None = None, soft_width: float = SOFT_WIDTH,
          parent_soft_width: float | None = None, workers=None, progress: bool = False,
          provenance: dict | None = None) -> Adapted:
    """Choose and fit the adapted model (see the module docstring).

    Parameters
    ----------
    new : the new machine's labeled rocks (at least 2 of each class)
    parent_scores : (n_new,) the parent's P(sc) of the new rocks
    parent_threshold : the parent's operating threshold (reported only)
    parent_rocks : the parent's training rocks, if they could be had
    label_cutoff : the label cut-off grade (ppm); inferred from the new rocks when None
    soft_width : soft-target width (ln grade) of the new rocks' assays
    parent_soft_width : the same for the parent's rocks (default ``soft_width``;
        :data:`TWIN_SOFT_WIDTH` for rocks the twin wrote, whose grades are exact)
    workers : where the cross-validation folds run (:mod:`sorting.parallel`)
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from sorting.parallel import Workers, imap

    y = np.asarray(new.is_sc, dtype=bool)
    folds = _folds(y, seed)
    g = new.sc2o3_ppm
    cut = label_cutoff
    if cut is None and bool(np.isfinite(g).all()):
        cut = label_cutoff_ppm(g, y)
    p_new = _targets(new, cut, soft_width)
    n_new = len(y)
    cands = adapt_candidates(seed, n_new)
    # the training sets: X, targets and weights of each strategy; validation rows are new rocks
    sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]] = {}
    sets["scratch"] = (np.asarray(new.X, np.float32), p_new, None, 0)
    if parent_rocks is not None and len(parent_rocks.is_sc):
        p_par = _targets(parent_rocks, cut, soft_width if parent_soft_width is None else parent_soft_width)
        X_all = np.vstack([np.asarray(parent_rocks.X, np.float32), np.asarray(new.X, np.float32)])
        n_par = len(p_par)
        for r in UNION_RATIOS:
            w = np.r_[np.ones(n_par), np.full(n_new, r * n_par / n_new)]
            sets[f"union_r{r:g}"] = (X_all, np.r_[p_par, p_new], w, n_par)
    tasks = [(s, c, k) for s in sets for c in cands for k in range(len(folds))]

    def task_args(s, c, k):
        X, p, w, off = sets[s]
        tr, va = folds[k]
        tr_rows = np.r_[np.arange(off), off + tr] if off else tr
        return cands[c], X, p, tr_rows, off + va, w

    oof = {(s, c): np.zeros((CV_REPEATS, n_new)) for s in sets for c in cands}
    per_rep = len(folds) // CV_REPEATS
    results = imap(fold_scores, (task_args(*t) for t in tasks), workers or Workers(1))
    for (s, c, k), sc in tqdm(zip(tasks, results), total=len(tasks), desc="adapt cross-validation", unit="fold",
                              disable=None if progress else True):
        oof[(s, c)][k // per_rep, folds[k][1]] = sc
    # AUC per repeat, averaged (each repeat's out-of-fold scores cover every new rock once)
    cv = {"parent": roc_auc(parent_scores, y)}
    for (s, c), o in oof.items():
        cv[f"{s}/{c}"] = float(np.mean([roc_auc(o[r], y) for r in range(CV_REPEATS)]))
    best, switch = _choose(cv, oof, parent_scores, y, seed)
    feed = make_feed(y, new.mass_g, new.sc2o3_ppm)
    base = {"n_new": int(n_new), "n_new_sc": int(y.sum()), "n_parent_rocks": 0 if parent_rocks is None
            else int(len(parent_rocks.is_sc)), "cv_folds": per_rep, "cv_repeats": CV_REPEATS,
            "cv_auc_strategies": cv, "strategy": best, "cv_auc": cv[best], "choice": switch,
            "label_cutoff_ppm": cut, "targets": "soft" if soft_width > 0 and cut is not None
            and bool(np.isfinite(g).all()) else "hard", "recovery_basis": feed.recovery_basis,
            "mass_basis": feed.mass_basis, "parent_soft_width": None if parent_rocks is None else
            (soft_width if parent_soft_width is None else parent_soft_width)}
    if best == "parent":
        scores = np.asarray(parent_scores, np.float64)
        thr = threshold_for_recovery(scores, feed.units, target_recovery)
        bal = sort_balance(scores >= thr, y, feed)
        return Adapted("parent", None, float(thr), cv, {**base, **_cv_balance(bal)})
    s, c = best.split("/")
    scores = oof[(s, c)].mean(axis=0)  # the repeats' mean: one out-of-fold score per new rock
    thr = threshold_for_recovery(scores, feed.units, target_recovery)
    bal = sort_balance(scores >= thr, y, feed)
    X, p, w, off = sets[s]
    from sklearn.base import clone

    with threadpool_limits(1):
        clf = fit_soft(clone(cands[c]), X, p, w)
    metrics = {"n_train": int(len(p)), "n_sc": int(y.sum()), "estimator": c, **base, **_cv_balance(bal),
               "soft_width": soft_width if base["targets"] == "soft" else None}
    model = TrainedModel(clf, tuple(feature_names), feature_version, float(thr), float(target_recovery),
                         "", metrics, dict(provenance or {}))
    return Adapted(s, model, float(thr), cv, metrics)


def _choose(cv: dict, oof: dict, parent_scores: np.ndarray, y: np.ndarray, seed: int) -> tuple[str, dict]:
    """The default strategy, or the best alternative whose out-of-fold AUC is higher by a
    margin the new rocks can resolve (paired bootstrap interval of the difference above 0)."""
    from sorting.offline.compare import paired_auc_difference

    keys = [k for k in cv if k != "parent"]
    default = next((k for k in keys if k == "union_r1/extra_trees"), None) or next(
        (k for k in keys if k == "scratch/random_forest"), keys[0])

    def scores(k: str) -> np.ndarray:
        return np.asarray(parent_scores, np.float64) if k == "parent" else oof[tuple(k.split("/"))].mean(axis=0)

    tests = {}
    for k in cv:
        if k == default or cv[k] is None or cv[default] is None or cv[k] <= cv[default]:
            continue
        d, ci = paired_auc_difference(scores(default), scores(k), y, n_boot=1000, seed=seed)
        tests[k] = {"auc_minus_default": d, "ci": ci, "better": bool(ci is not None and ci[0] > 0)}
    better = [k for k, t in tests.items() if t["better"]]
    best = max(better, key=lambda k: cv[k]) if better else default
    return best, {"default": default, "rule": "default unless another is better by a paired-bootstrap "
                  "interval (95 %) of the out-of-fold AUC difference above 0", "tests": tests}


def _cv_balance(bal: dict) -> dict:
    return {"cv_sc_recovery": bal["sc_recovery"], "cv_mass_pull": bal["mass_pull"],
            "cv_sc_rock_recall": bal["sc_rock_recall"], "cv_waste_rejection": bal["waste_rejection"],
            "cv_upgrade_ratio": bal["upgrade_ratio"]}


def write_relabeled(parent_path: Path, out: Path, res: Adapted, fingerprint: str, provenance: dict) -> dict:
    """When the parent itself wins: its graph unchanged, its metadata renewed (the new
    threshold, the new rocks' figures, the parent and dataset named). Returns the metadata."""
    import onnx

    from sorting.stages.inference import META_KEY

    proto = onnx.load_model(str(parent_path))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[META_KEY])
    meta.update({"threshold": res.threshold, "training_fingerprint": fingerprint,
                 "training_metrics": {**res.metrics, "estimator": f"parent ({meta.get('estimator')})"},
                 "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance})
    props[META_KEY] = json.dumps(meta)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out)
    return meta


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_model_card(model_path: Path, meta: dict, res: Adapted) -> Path:
    """A markdown model card beside the model (same name, ``.md``): parent, data, strategy, figures."""
    m = res.metrics
    par, ds, rec = meta.get("parent", {}), meta.get("dataset", {}), meta.get("recipe", {})
    pdata = rec.get("parent_data", {})
    lines = [
        f"# Model card: `{Path(model_path).name}`",
        "",
        "Adapted by `sorting adapt` from a parent model to a new machine or ore, with the new",
        "machine's assayed rocks. Everything below is also in the model's metadata (ONNX",
        "`metadata_props[\"sorting\"]`).",
        "",
        "## Lineage",
        f"- parent: `{par.get('path')}` ({par.get('fingerprint')}), trained on "
        f"{par.get('training_fingerprint')}, threshold {par.get('threshold')}",
        f"- new rocks: `{ds.get('path')}` ({ds.get('fingerprint')}), {ds.get('rows')}: "
        f"{m['n_new']} rocks with a usable crop, {m['n_new_sc']} sc",
        f"- the parent's training rocks: {pdata.get('source')}"
        + (f", {pdata.get('n_rows')} rocks" if pdata.get("n_rows") else "")
        + (f", fingerprint {'matches' if pdata.get('matches_parent_recipe') else 'DIFFERS from'} the parent's recipe"
           if "matches_parent_recipe" in pdata else ""),
        "",
        "## How it was chosen",
        f"Repeated stratified cross-validation on the new rocks only ({m['cv_folds']} folds x "
        f"{m['cv_repeats']} repeats; parent rocks are always in the training folds). The default, "
        f"`{m['choice']['default']}`, is kept unless another strategy is better by a 95 % paired-bootstrap "
        "interval of the out-of-fold AUC difference above 0. Out-of-fold AUC:",
        "",
        "| strategy / model type | AUC on the new rocks |",
        "|---|---|",
    ]
    for k, v in res.cv.items():
        mark = " **(chosen)**" if k == m["strategy"] else ""
        lines.append(f"| `{k}`{mark} | {'n/a' if v is None else f'{v:.4f}'} |")
    lines += [
        "",
        "`parent`: the parent's scores with a new threshold; `scratch`: fitted on the new rocks alone;",
        "`union_rR`: fitted on the parent's rocks and the new rocks, the new rocks weighted to R",
        "times the parent rocks' total weight.",
    ]
    if m.get("parent_soft_width") is not None:
        new_targets = ("hard labels" if m.get("targets") == "hard"
                       else f"ln-grade width {m.get('soft_width') or SOFT_WIDTH}")
        lines.append(f"Targets: {new_targets} for the new rocks' assays, ln-grade width {m['parent_soft_width']} "
                     "for the parent's rocks"
                     + (" (the twin's grades are exact)." if m["parent_soft_width"] == TWIN_SOFT_WIDTH else "."))
    lines += [
        "",
        "## Operating point",
        f"Threshold **{res.threshold:.4f}**: the highest score cut whose out-of-fold Sc recovery on the new "
        f"rocks reaches {_pct(meta.get('target_recovery'))} (CV: recovery {_pct(m.get('cv_sc_recovery'))}, "
        f"mass pull {_pct(m.get('cv_mass_pull'))}, waste rejection {_pct(m.get('cv_waste_rejection'))}; "
        f"recovery basis {m.get('recovery_basis')}, mass basis {m.get('mass_basis')}).",
        "",
        "## Limits",
        f"- Chosen and calibrated on {m['n_new']} rocks: expect the threshold's recovery to move by a few",
        "  points on the plant feed. Check it with `sorting compare` on assayed rocks that were not",
        "  used here (champion first), and collect more assays where the verdict says \"no difference\".",
        f"- Features version {meta.get('feature_version')}; the loader refuses any other.",
        "",
    ]
    path = Path(model_path).with_suffix(".md")
    path.write_text("\n".join(lines))
    return path
