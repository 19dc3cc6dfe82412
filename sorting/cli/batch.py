"""The metallurgist's verbs on ``xrt-rocks/1`` datasets: ``train``, ``predict``, ``evaluate``.

Each dataset calibrates itself from its own ``calibration/`` (docs/formats.md),
so a model trained on one machine scores rocks scanned on another in the same
physical feature units.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from sorting.errors import InputError

# The naive "dense = ore" ranking of the report (docs/physics.md).
BASELINE_FEATURE = "a_high_mean"


def _warn(msg: str) -> None:
    sys.stderr.write(f"warning: {msg}\n")


def _open(path: Path):
    """Read a dataset and calibrate from its own scans."""
    from sorting.io import check_crops, read_rocks_dataset
    from sorting.stages.calibrate import calibrate

    ds = read_rocks_dataset(path)
    check_crops(ds)  # crops are read lazily; a bad one must fail now, not after minutes of features
    return ds, calibrate(ds.calibration)


#: below this many rocks the features are computed in this process: starting a pool costs more
PARALLEL_MIN_ROCKS = 1000


def sized(workers, n: int):
    """``workers`` for ``n`` rocks of work: this process alone when a local pool would cost more."""
    from sorting.parallel import Workers

    if workers is not None and workers.scheduler is None and n < PARALLEL_MIN_ROCKS:
        return Workers(1)
    return workers


def _features(ds, cal, indices: list[int], progress: bool, reasons: list[str] | None = None, workers=None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Features of the rows ``indices``; ``ok`` is False where the crop gave no usable rock. With
    ``reasons`` (a list), it receives one entry per row: "" or why that crop could not be scored."""
    from sorting.stages.features import dataset_features

    X, ok, problems = dataset_features(ds, cal, indices, progress=progress, workers=sized(workers, len(indices)))
    for p in problems:
        _warn(f"{ds.root}: rock {p}; it is scored 0.0 (waste)")
    if reasons is not None:
        # one problem per failed row, in row order, each "rock_id: why"
        why = iter(problems)
        reasons.extend("" if k else next(why)[len(ds.rows[i].rock_id) + 2:] for i, k in zip(indices, ok))
    return X, ok


def _column(rows, name: str) -> np.ndarray:
    return np.array([np.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows])


def _lithotypes(rows) -> np.ndarray | None:
    vals = [(r.extra or {}).get("lithotype") for r in rows]
    return np.array(vals) if vals and all(vals) else None


def _data_fingerprint(rows, cal, X: np.ndarray) -> str:
    """The training fingerprint's recipe (rows, calibration, feature matrix) on rows with a usable crop:
    ``sorting train`` stores it in the model, ``sorting evaluate`` in its report."""
    from sorting.offline.training import training_fingerprint

    return training_fingerprint([(r.rock_id, r.file, r.x0, r.label, r.sc2o3_ppm, r.mass_g) for r in rows],
                                cal.fingerprint, X)


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def training_rows(ds, where: Path) -> list[int]:
    """Labeled rows with split=train; all labeled rows when no row carries a split;
    labeled rows without a split when only test rows are marked."""
    labeled = [i for i, r in enumerate(ds.rows) if r.label is not None]
    if not labeled:
        raise InputError(where, "no labeled rows (label sc or waste): nothing to train on")
    if any(ds.rows[i].split == "train" for i in labeled):
        return [i for i in labeled if ds.rows[i].split == "train"]
    idx = [i for i in labeled if ds.rows[i].split is None]
    if not idx:
        raise InputError(where, "no labeled rows with split=train or an empty split: nothing to train on")
    return idx


def _check_classes(y: np.ndarray, where: Path, what: str) -> None:
    n_sc = int(y.sum())
    if n_sc < 2 or len(y) - n_sc < 2:
        raise InputError(where, f"{what} hold {n_sc} sc and {len(y) - n_sc} waste rocks: "
                                "training needs at least 2 of each class")


def _cutoff(meta: dict) -> float | None:
    """The dataset's own label cut-off grade when it states one (else inferred from labels)."""
    v = meta.get("label_cutoff_ppm")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def dataset_fingerprint(ds, cal) -> str:
    """sha256 of every row of the dataset's rocks.csv and its calibration (no crops read)."""
    from sorting.offline.training import dataset_fingerprint as fingerprint

    return fingerprint([(r.rock_id, r.file, r.x0, r.label, r.sc2o3_ppm, r.mass_g, r.split) for r in ds.rows],
                       cal.fingerprint)


def training_recipe(ds, cal, dataset: Path, idx: list[int], seed: int, target_recovery: float) -> dict:
    """How a model is made from ``dataset``: which rows, the seed, and, for a dataset written by
    the twin, the twin's recipe (machine, ore, materials, n, seed) that writes it again."""
    rows_rule = "split=train" if any(ds.rows[i].split == "train" for i in idx) else "labeled rows, empty split"
    recipe = {"command": "sorting train", "seed": seed, "target_recovery": target_recovery,
              "dataset": {"name": Path(dataset).name, "fingerprint": dataset_fingerprint(ds, cal),
                          "rows": rows_rule, "n_rows": len(idx)}}
    if isinstance(ds.meta.get("twin"), dict):
        recipe["twin"] = ds.meta["twin"]
    return recipe


def cli_train(args: argparse.Namespace) -> int:
    from sorting.io import check_output_file
    from sorting.offline.intervals import small_sample
    from sorting.offline.training import created_utc, train
    from sorting.parallel import workers_from_args
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION

    if not 0.0 < args.target_recovery <= 1.0:
        raise InputError("--target-recovery", f"{args.target_recovery} is not in (0, 1]")
    if not (args.soft_width >= 0.0 and np.isfinite(args.soft_width)):
        raise InputError("--soft-width", f"{args.soft_width} is not a width >= 0")
    check_output_file(args.out, "--out")
    created_utc()  # a bad SOURCE_DATE_EPOCH fails now, not after the training
    workers = workers_from_args(args)
    t0 = time.perf_counter()
    ds, cal = _open(args.dataset)
    where = Path(args.dataset) / "rocks.csv"
    idx = training_rows(ds, where)
    rows = [ds.rows[i] for i in idx]
    y = np.array([r.label == "sc" for r in rows])
    _check_classes(y, where, f"the {len(y)} training rows")
    X, ok = _features(ds, cal, idx, progress=not args.quiet, workers=workers)
    _check_classes(y[ok], where, f"the {int(ok.sum())} training rows with a usable crop")
    rows = [r for r, k in zip(rows, ok) if k]
    X, y = X[ok], y[ok]
    fp = _data_fingerprint(rows, cal, X)
    model = train(X, y, feature_names=FEATURE_NAMES, feature_version=FEATURE_VERSION,
                  mass_g=_column(rows, "mass_g"), sc2o3_ppm=_column(rows, "sc2o3_ppm"), fingerprint=fp,
                  target_recovery=args.target_recovery, seed=args.seed, label_cutoff=_cutoff(ds.meta),
                  soft_width=args.soft_width, progress=not args.quiet, workers=sized(workers, len(y)),
                  provenance={"recipe": training_recipe(ds, cal, args.dataset, idx, args.seed,
                                                        args.target_recovery)})
    try:
        model.save(args.out)
    except OSError as exc:
        raise InputError(args.out, f"cannot write the model ({exc.strerror})") from None
    m = model.metrics
    print(f"trained {m['estimator']} on {m['n_train']} rocks ({m['n_sc']} sc), features v{FEATURE_VERSION}")
    print("\n".join(cv_lines(m, model.threshold)))
    small = small_sample(m["n_sc"], m["n_train"] - m["n_sc"])
    if small:
        _warn(f"{where}: {small}")
    print("candidates (CV AUC): " + ", ".join(f"{k} {v:.3f}" for k, v in m["cv_auc_candidates"].items()))
    if m["targets"] == "soft":
        print(f"soft targets around the {m['label_cutoff_ppm']:.0f} ppm Sc2O3 label cut-off "
              f"(ln-width {m['soft_width']})")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - t0:.1f} s")
    return 0


def cv_lines(m: dict, threshold: float) -> list[str]:
    """The cross-validated training metrics of a model (its ``training_metrics``), with their
    95 % intervals where the model has them."""
    from sorting.offline.intervals import format_interval

    ci = m.get("cv_ci95") or {}

    def pct(key: str, ci_key: str, basis: str | None = None) -> str:
        x = m.get(key)
        if x is None:
            return "n/a"
        extra = ", ".join(p for p in (format_interval(ci.get(ci_key), True), basis and f"{basis} basis") if p)
        return f"{100 * x:.1f} %" + (f" ({extra})" if extra else "")

    auc_ci = format_interval(ci.get("auc"), False)
    up = m.get("cv_upgrade_ratio")
    return [f"{m['cv_folds']}-fold CV: AUC {m['cv_auc']:.3f}" + (f" ({auc_ci})" if auc_ci else ""),
            f"at threshold {threshold:.4f}: "
            f"Sc recovery {pct('cv_sc_recovery', 'sc_recovery', m.get('recovery_basis'))}, "
            f"mass pull {pct('cv_mass_pull', 'mass_pull', m.get('mass_basis'))}, "
            f"waste rejection {pct('cv_waste_rejection', '')}" + (f", upgrade {up:.2f}" if up is not None else "")]


def _scores(model, X: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """P(sc) per row; a row whose crop gave no rock scores 0.0 (it goes to waste)."""
    s = np.zeros(len(X), np.float32)
    if ok.any():
        s[ok] = model.predict_proba(X[ok])
    return s


def cli_predict(args: argparse.Namespace) -> int:
    from sorting.io import check_output_file
    from sorting.parallel import workers_from_args
    from sorting.stages.inference import load_model

    workers = workers_from_args(args)
    model = load_model(args.model)  # a wrong model fails before minutes of features
    check_output_file(args.out, "--out")
    ds, cal = _open(args.dataset)
    idx = list(range(len(ds.rows)))
    reasons: list[str] = []
    X, ok = _features(ds, cal, idx, progress=not args.quiet, reasons=reasons, workers=workers)
    s = _scores(model, X, ok)
    sc = model.decide(s) & ok
    try:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            # the three required columns first; `problem` (extra) says why a crop could not be scored
            w.writerow(["rock_id", "score", "decision", "problem"])
            for r, si, d, why in zip(ds.rows, s, sc, reasons):
                w.writerow([r.rock_id, f"{si:.6f}", "sc" if d else "waste", why])
    except OSError as exc:
        raise InputError(args.out, f"cannot write the scores ({exc.strerror})") from None
    print(f"scored {len(idx)} rocks ({int(sc.sum())} sc, {int((~ok).sum())} failed crops) "
          f"at threshold {model.threshold:.4f}: wrote {args.out}")
    return 0


def evaluation_rows(ds, split: str | None, where: Path) -> tuple[list[int], str]:
    """Labeled rows of ``split``; ``None`` = the test split if any row is marked test, else all."""
    labeled = [i for i, r in enumerate(ds.rows) if r.label is not None]
    if split is None:
        split = "test" if any(ds.rows[i].split == "test" for i in labeled) else "all"
    idx = labeled if split == "all" else [i for i in labeled if ds.rows[i].split == split]
    if not idx:
        raise InputError(where, f"no labeled rows in split {split!r} to evaluate (try --split all)")
    return idx, split


def cli_evaluate(args: argparse.Namespace) -> int:
    from sorting.offline.report import evaluate, summary_lines, write_report
    from sorting.parallel import workers_from_args
    from sorting.stages.features import FEATURE_NAMES
    from sorting.stages.inference import load_model

    workers = workers_from_args(args)
    model = load_model(args.model)
    if args.report.exists() and not args.report.is_dir():
        raise InputError(args.report, "exists and is not a folder")
    ds, cal = _open(args.dataset)
    idx, split = evaluation_rows(ds, args.split, Path(args.dataset) / "rocks.csv")
    rows = [ds.rows[i] for i in idx]
    X, ok = _features(ds, cal, idx, progress=not args.quiet, workers=workers)
    s = _scores(model, X, ok)
    y = np.array([r.label == "sc" for r in rows])
    base = X[:, FEATURE_NAMES.index(BASELINE_FEATURE)] if BASELINE_FEATURE in FEATURE_NAMES else None
    metrics, curves = evaluate(s, y, model.threshold, mass_g=_column(rows, "mass_g"),
                               sc2o3_ppm=_column(rows, "sc2o3_ppm"), baseline=base,
                               lithotype=_lithotypes(rows))
    # names and content fingerprints, no paths: the report carries nothing of the machine that wrote it
    metrics = {"dataset": Path(os.path.abspath(args.dataset)).name,
               "dataset_fingerprint": _data_fingerprint([r for r, k in zip(rows, ok) if k], cal, X[ok]),
               "split": split, "n_failed_crops": int((~ok).sum()),
               "model": {"path": Path(args.model).name, "sha256": _sha256(args.model), "threshold": model.threshold,
                         "feature_version": model.feature_version,
                         "target_recovery": model.meta.get("target_recovery"),
                         "training_fingerprint": model.meta.get("training_fingerprint"),
                         "training_metrics": model.meta.get("training_metrics")},
               "baseline_feature": BASELINE_FEATURE if base is not None else None, **metrics}
    try:
        paths = write_report(args.report, metrics, curves, s, y)
    except OSError as exc:
        raise InputError(args.report, f"cannot write the report ({exc.strerror})") from None
    if metrics["small_sample"]:
        _warn(f"{args.dataset}: {metrics['small_sample']}")
    print(f"evaluated {args.model} on {args.dataset} split {split}"
          + (f" ({metrics['n_failed_crops']} failed crops scored as waste)" if metrics["n_failed_crops"] else ""))
    print("\n".join(summary_lines(metrics)))
    print(f"report: {', '.join(p.name for p in paths)} in {args.report}")
    return 0


# public names for the other verb modules (cli/commission.py)
warn, open_dataset, features_of, dataset_cutoff = _warn, _open, _features, _cutoff


def add_parsers(sub) -> None:
    """The ``train``, ``predict`` and ``evaluate`` subparsers (docs/cli.md)."""
    tr = sub.add_parser("train", help="train a classifier on a labeled xrt-rocks/1 dataset -> one ONNX file")
    tr.add_argument("dataset", type=Path)
    tr.add_argument("--out", type=Path, required=True, help="model file to write (.onnx)")
    tr.add_argument("--target-recovery", type=float, default=0.95,
                    help="Sc recovery the operating threshold must reach in cross-validation (default 0.95)")
    tr.add_argument("--seed", type=int, default=0)
    from sorting.offline.training import SOFT_WIDTH

    tr.add_argument("--soft-width", type=float, default=SOFT_WIDTH,
                    help=f"ln-grade width of the soft targets around the label cut-off, about the assays' "
                    f"uncertainty (default {SOFT_WIDTH}; 0: hard labels)")
    pr = sub.add_parser("predict", help="score every rock of an xrt-rocks/1 dataset -> CSV")
    pr.add_argument("dataset", type=Path)
    pr.add_argument("--model", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True, help="CSV to write: rock_id,score,decision,problem")
    ev = sub.add_parser("evaluate", help="metallurgical report of a model on labeled rocks -> metrics.json + PNGs")
    ev.add_argument("dataset", type=Path)
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--report", type=Path, required=True, help="folder for metrics.json and the plots")
    ev.add_argument("--split", choices=("train", "test", "all"), default=None,
                    help="rows to evaluate (default: test if any row is marked test, else all)")
    for p in (tr, pr, ev):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_worker_options(p)


def add_worker_options(p) -> None:
    """``--jobs`` and ``--scheduler``: where a batch verb's parallel work runs (sorting/parallel.py)."""
    p.add_argument("--jobs", type=int, default=-1,
                   help="local worker processes for features and cross-validation (default -1: every core)")
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="run the parallel work on this Dask cluster instead (needs sorting[cluster]; "
                   "the workers must see the dataset at the same path)")


VERBS = {"train": cli_train, "predict": cli_predict, "evaluate": cli_evaluate}
