"""Training (scikit-learn) -> one self-describing ONNX file (read back by
:mod:`sorting.stages.inference`).

Operating point: product (``sc``) is ``score >= threshold``, with the threshold chosen on
out-of-fold scores of stratified cross-validation so that the Sc recovery on the
training split reaches the target (95 % by default). Where every training rock is
assayed, the classifier learns soft targets from the assays
(:func:`sorting.offline.metallurgy.soft_sc_targets`), so it also ranks rocks below the label
cut-off by grade: the recovery target reaches there, and so do the dense Sc-poor traps.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sorting.errors import InputError
from sorting.offline.intervals import sort_intervals
from sorting.offline.metallurgy import (
    label_cutoff_ppm,
    make_feed,
    roc_auc,
    soft_sc_targets,
    sort_balance,
    threshold_for_recovery,
)
from sorting.stages.inference import INPUT_NAME, META_KEY, MODEL_FORMAT

CV_FOLDS = 5
SOFT_WIDTH = 0.3  # ln-grade scale of the soft targets: about +-35 % around the cut


def candidates(seed: int) -> dict[str, Any]:
    """Classifiers tried by cross-validated AUC; all convert with skl2onnx and stay small.

    Each sits behind a median imputer: the converted trees send NaN down another branch
    than scikit-learn does for features that had no NaN in training, so the graph
    must never see one.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    def imputed(clf):
        return Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)), ("clf", clf)])

    return {
        "hist_gradient_boosting": imputed(HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=250, max_leaf_nodes=15, min_samples_leaf=10,
            l2_regularization=1.0, early_stopping=False, random_state=seed)),
        # leaves of 8 rocks: same CV AUC as deeper trees on 1000 simulated rocks, 1/3 of the file;
        # 50 trees: held-out AUC 0.983 vs 0.984 with 100 (93.5 % vs 93.3 % Sc recovery at
        # 71.6 % vs 71.3 % pull, features v4), at half the ONNX time in the loop (~50 -> ~27 us a chunk)
        "random_forest": imputed(RandomForestClassifier(
            n_estimators=50, min_samples_leaf=8, max_features="sqrt", n_jobs=1, random_state=seed)),
    }


@dataclass(frozen=True)
class TrainedModel:
    """A fitted classifier with its operating point and provenance.

    ``classifier.predict_proba`` column ``1`` is P(sc).
    """

    classifier: Any
    feature_names: tuple[str, ...]
    feature_version: str
    threshold: float
    target_recovery: float
    fingerprint: str
    metrics: dict = field(default_factory=dict)
    #: further metadata keys: how the model was made (``recipe``), its ``parent`` when adapted
    provenance: dict = field(default_factory=dict)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(sc) from scikit-learn, (n,) float32 (the reference the ONNX graph must match)."""
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            return np.zeros(0, np.float32)
        return self.classifier.predict_proba(X)[:, 1].astype(np.float32)

    def meta(self) -> dict:
        import onnx
        import skl2onnx
        import sklearn

        from sorting.version import VERSION

        return {
            "format": MODEL_FORMAT,
            "feature_names": list(self.feature_names),
            "feature_version": self.feature_version,
            "threshold": self.threshold,
            "decision": "sc where score >= threshold, score = P(sc)",
            "target_recovery": self.target_recovery,
            "estimator": self.metrics.get("estimator", type(self.classifier).__name__),
            "training_fingerprint": self.fingerprint,
            "training_metrics": self.metrics,
            "versions": {"sorting": VERSION, "sklearn": sklearn.__version__,
                         "skl2onnx": skl2onnx.__version__, "onnx": onnx.__version__},
            "created_utc": created_utc(),
            **self.provenance,
        }

    def to_onnx(self):
        """The ONNX ModelProto: input ``features`` float32 [None, F], outputs label and probabilities."""
        import onnx
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        clf = self.classifier
        final = clf.steps[-1][1] if hasattr(clf, "steps") else clf
        with warnings.catch_warnings():
            # skl2onnx writes bools into int attributes; protobuf < 7 accepts them (pinned)
            warnings.filterwarnings("ignore", message=".*Expected an int, got a boolean.*")
            onx = to_onnx(clf, initial_types=[(INPUT_NAME, FloatTensorType([None, len(self.feature_names)]))],
                          options={id(final): {"zipmap": False}},
                          target_opset={"": 17, "ai.onnx.ml": 3})
        onx.producer_name = "sorting"
        onx.doc_string = "DE-XRT rock classifier: P(sc) from the sorting feature vector"
        onnx.helper.set_model_props(onx, {META_KEY: json.dumps(self.meta())})
        return onx

    def save(self, path: str | Path) -> Path:
        """Write the ONNX file atomically; a symbolic link is written through (its target is replaced)."""
        path = Path(path)
        if path.is_symlink():
            path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_onnx().SerializeToString()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path


def created_utc() -> str:
    """The model's date: now, or ``SOURCE_DATE_EPOCH`` where set (the reproducible-builds
    convention: a build at a given source date gives the same bytes), ISO 8601 to the second."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        if not epoch.isdigit():
            raise ValueError(epoch)
        when = datetime.fromtimestamp(int(epoch), timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise InputError("SOURCE_DATE_EPOCH", f"must be whole seconds since 1970-01-01 UTC, got {epoch!r}") from None
    return when.isoformat(timespec="seconds")


def _check_xy(X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != len(feature_names):
        raise ValueError(f"`X` (shape {X.shape}) does not match {len(feature_names)} feature names")
    if y.shape != (len(X),):
        raise ValueError(f"`y` (shape {y.shape}) does not match `X` (shape {X.shape})")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("training needs rocks of both classes (sc and waste)")
    return X, y


def _expand(X: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft targets as weighted copies: each rock enters as sc with weight p and as waste
    with weight 1 - p (zero-weight copies dropped); the two classes are then balanced to
    equal total weight, which for hard targets is sklearn's ``class_weight="balanced"``."""
    pos, neg = p > 0, p < 1
    X2 = np.concatenate([X[pos], X[neg]])
    y2 = np.r_[np.ones(pos.sum(), int), np.zeros(neg.sum(), int)]
    w_pos, w_neg = p[pos], 1.0 - p[neg]
    n = len(p)
    w2 = np.r_[w_pos * (n / (2 * w_pos.sum())), w_neg * (n / (2 * w_neg.sum()))]
    return X2, y2, w2


def fit_soft(clf, X: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None):
    """Fit ``clf`` (a candidate pipeline) on soft targets ``p`` in [0, 1]; ``weight`` (n,)
    multiplies each rock's share after the classes are balanced. Returns ``clf``."""
    X2, y2, w2 = _expand(X, p)
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float64)
        w2 = w2 * np.r_[weight[p > 0], weight[p < 1]]
    return clf.fit(X2, y2, clf__sample_weight=w2)


_fit = fit_soft
_candidates = candidates


def fold_scores(clf, X: np.ndarray, p: np.ndarray, tr: np.ndarray, va: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
    """One fold (a task of the cross-validation, run anywhere): fit a clone of ``clf`` on
    rows ``tr`` and score rows ``va``."""
    from sklearn.base import clone
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fit_soft(clone(clf), X[tr], p[tr], None if weight is None else weight[tr]).predict_proba(X[va])[:, 1]


def oof_scores(cands: dict[str, Any], X: np.ndarray, p: np.ndarray, folds, workers=None,
               weight: np.ndarray | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Out-of-fold scores of every candidate; the folds x candidates run on ``workers``
    (:mod:`sorting.parallel`; default this process) and give the same numbers anywhere."""
    from tqdm import tqdm

    from sorting.parallel import Workers, imap

    tasks = [(name, k) for name in cands for k in range(len(folds))]
    oof = {name: np.full(len(p), np.nan) for name in cands}
    results = imap(fold_scores, ((cands[name], X, p, folds[k][0], folds[k][1], weight) for name, k in tasks),
                   workers or Workers(1))
    for (name, k), s in tqdm(zip(tasks, results), total=len(tasks), desc="cross-validation", unit="fold",
                             disable=None if progress else True):
        oof[name][folds[k][1]] = s
    return oof


def train(X: np.ndarray, y: np.ndarray, *, feature_names: tuple[str, ...], feature_version: str,
          mass_g: np.ndarray | None = None, sc2o3_ppm: np.ndarray | None = None,
          fingerprint: str = "", target_recovery: float = 0.95, seed: int = 0,
          label_cutoff: float | None = None, soft_width: float = SOFT_WIDTH,
          progress: bool = False, workers=None, provenance: dict | None = None) -> TrainedModel:
    """Fit a classifier and pick its operating threshold by stratified cross-validation.

    Parameters
    ----------
    X : (n, F) array_like of float32
        One feature row per rock, columns in ``feature_names`` order. A NaN feature is
        replaced by its training median; drop failed crops (all-NaN rows) before calling.
    y : (n,) array_like of bool
        True where the rock is ``sc``.
    feature_names, feature_version
        Stored in the model; checked against the pipeline when the model is loaded.
    mass_g, sc2o3_ppm : (n,) array_like of float, optional
        Where every rock has both, recovery is Sc2O3-unit weighted; otherwise it is
        the recall of ``sc`` rocks (mass-weighted if masses exist).
    fingerprint : str
        Identifies the training data (see :func:`training_fingerprint`).
    target_recovery : float
        Out-of-fold Sc recovery the threshold must reach, in (0, 1].
    seed : int
        Seeds the folds and the estimators.
    label_cutoff : float, optional
        Sc2O3 ppm at which a rock becomes ``sc`` (inferred from labels and assays when
        None). With ``soft_width > 0`` and every rock assayed, the classifier learns
        soft targets (:func:`sorting.offline.metallurgy.soft_sc_targets`) so that it ranks
        rocks by grade also below the cut, where the recovery target reaches.
    soft_width : float
        0 trains on the hard labels.
    workers : sorting.parallel.Workers, optional
        Where the cross-validation's folds run (default: this process); same result anywhere.
    provenance : dict, optional
        Further metadata keys (e.g. ``recipe``: how the training data was made).

    Returns
    -------
    TrainedModel
    """
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    X, y = _check_xy(X, y, tuple(feature_names))
    if not 0.0 < target_recovery <= 1.0:
        raise ValueError(f"target recovery {target_recovery} is not in (0, 1]")
    n_folds = int(min(CV_FOLDS, y.sum(), (~y).sum()))
    if n_folds < 2:
        raise ValueError("training needs at least 2 rocks of each class for cross-validation")
    folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(X, y))
    g = None if sc2o3_ppm is None else np.asarray(sc2o3_ppm, dtype=np.float64)
    soft = soft_width > 0 and g is not None and len(g) == len(y) and bool(np.isfinite(g).all())
    if soft:
        cut = float(label_cutoff) if label_cutoff is not None else label_cutoff_ppm(g, y)
        p = soft_sc_targets(g, y, cut, soft_width)
    else:
        cut, p = None, y.astype(np.float64)
    cands = candidates(seed)
    # One OpenMP thread per fit: on a busy 2-core box the spin-waiting team of the boosting
    # fit made it 30x slower; one thread is also deterministic. The folds run in parallel.
    oof = oof_scores(cands, X, p, folds, workers, progress=progress)
    cv_auc = {name: roc_auc(s, y) for name, s in oof.items()}
    best = max(cv_auc, key=lambda k: cv_auc[k])
    with threadpool_limits(1):
        clf = _fit(cands[best], X, p)
    feed = make_feed(y, mass_g, sc2o3_ppm)
    threshold = threshold_for_recovery(oof[best], feed.units, target_recovery)
    bal = sort_balance(oof[best] >= threshold, y, feed)
    # how sure those out-of-fold numbers are: bootstrap over the training rocks, threshold held
    ci = sort_intervals(oof[best], y, threshold, feed, seed=seed)
    metrics = {
        "n_train": int(len(y)), "n_sc": int(y.sum()), "cv_folds": n_folds,
        "estimator": best, "cv_auc": cv_auc[best], "cv_auc_candidates": cv_auc,
        "cv_sc_recovery": bal["sc_recovery"], "cv_mass_pull": bal["mass_pull"],
        "cv_sc_rock_recall": bal["sc_rock_recall"], "cv_waste_rejection": bal["waste_rejection"],
        "cv_upgrade_ratio": bal["upgrade_ratio"],
        "recovery_basis": feed.recovery_basis, "mass_basis": feed.mass_basis,
        "targets": "soft" if soft else "hard", "label_cutoff_ppm": cut,
        "soft_width": soft_width if soft else None, "seed": seed,
        "cv_ci95": ci,
    }
    return TrainedModel(clf, tuple(feature_names), feature_version, float(threshold),
                        float(target_recovery), fingerprint, metrics, dict(provenance or {}))


def training_fingerprint(rows: list[tuple], calibration_fingerprint: str, X: np.ndarray) -> str:
    """sha256 over the training rows, the machine calibration and the feature matrix."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(str, r)) for r in rows]).encode())
    h.update(calibration_fingerprint.encode())
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    return "sha256:" + h.hexdigest()


def dataset_fingerprint(rows: list[tuple], calibration_fingerprint: str) -> str:
    """sha256 over a dataset's rows (as given) and its calibration: cheap (no features)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(str, r)) for r in rows]).encode())
    h.update(calibration_fingerprint.encode())
    return "sha256:" + h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (a model file: what a child model records of its parent)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()
