"""Commissioning verbs: ``select`` (rocks to assay), ``adapt`` (a model for the new machine),
``compare`` (champion against challengers, with bootstrap intervals and a verdict)."""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from sorting.cli.batch import (
    add_worker_options,
    dataset_cutoff,
    dataset_fingerprint,
    evaluation_rows,
    features_of,
    open_dataset,
    sized,
    training_rows,
    warn,
)
from sorting.errors import InputError


def _column(rows, name: str) -> np.ndarray:
    return np.array([np.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows])


# ---------------------------------------------------------------------------------- select
def cli_select(args: argparse.Namespace) -> int:
    from sorting.io import read_rocks_dataset
    from sorting.offline.select import select_rocks
    from sorting.parallel import workers_from_args
    from sorting.stages.features import FEATURE_NAMES
    from sorting.stages.inference import load_model

    workers = workers_from_args(args)
    if args.n < 1:
        raise InputError("--n", f"must be at least 1, got {args.n}")
    if not 0.0 <= args.uncertain_share <= 1.0:
        raise InputError("--uncertain-share", f"must be in [0, 1], got {args.uncertain_share}")
    if args.out.is_dir():
        raise InputError(args.out, "is a folder; --out names the CSV file to write")
    model = load_model(args.model)
    pool = read_rocks_dataset(args.pool)  # the row count first: no features for a hopeless request
    where = Path(args.pool) / "rocks.csv"
    if not pool.rows:
        raise InputError(where, "the pool has no rocks")
    if args.n > len(pool.rows):
        raise InputError("--n", f"{args.n} is more than the {len(pool.rows)} rocks of the pool {args.pool}")
    ds, cal = open_dataset(args.pool)
    X, ok = features_of(ds, cal, list(range(len(ds.rows))), progress=not args.quiet, workers=workers)
    usable = np.flatnonzero(ok)
    if args.n > len(usable):
        raise InputError("--n", f"{args.n} is more than the {len(usable)} rocks of the pool with a usable crop")
    scores = model.predict_proba(X[usable])
    picks = select_rocks(X[usable], args.n, scores=scores, threshold=model.threshold,
                         uncertain_share=args.uncertain_share, seed=args.seed)
    size = X[usable, FEATURE_NAMES.index("equiv_diameter_mm")]
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rock_id", "reason", "cluster", "parent_score", "equiv_diameter_mm", "distance"])
            for j, reason, c, d in zip(picks.index, picks.reason, picks.cluster, picks.distance):
                w.writerow([ds.rows[usable[j]].rock_id, reason, int(c), f"{scores[j]:.6f}", f"{size[j]:.1f}",
                            f"{d:.4f}"])
    except OSError as exc:
        raise InputError(args.out, f"cannot write the picks ({exc.strerror})") from None
    n_unc = sum(r == "uncertainty" for r in picks.reason)
    print(f"picked {args.n} of {len(usable)} rocks ({args.n - n_unc} for coverage of the feature space, "
          f"{n_unc} near {args.model}'s operating point): wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------- adapt
def _rockset(ds, cal, idx: list[int], quiet: bool, workers):
    from sorting.offline.adapt import RockSet

    rows = [ds.rows[i] for i in idx]
    X, ok = features_of(ds, cal, idx, progress=not quiet, workers=workers)
    rows = [r for r, k in zip(rows, ok) if k]
    y = np.array([r.label == "sc" for r in rows], bool)
    return RockSet(X[ok], y, _column(rows, "sc2o3_ppm"), _column(rows, "mass_g")), rows


#: rocks the twin writes of the parent's ore on another machine than the parent's (bench_adapt, soft width 0.3:
#: hold-out AUC 0.9505 / 0.9514 / 0.9525 with 1,050 / 1,500 / 3,000 of them, 5 seeds)
TWIN_ROCKS = 3000
#: the parent's own machine explains the dataset's wedge scans when its rms is within this
#: factor (plus TWIN_SAME_RMS_A) of the fitted machine's, in both channels, at the same pitches
TWIN_SAME_FACTOR = 1.5
TWIN_SAME_RMS_A = 0.002


def _twin_machine(choice: str | None, recipe_machine, ds, cal, lib):
    """The machine the parent's ore is written on: (machine, same_as_parent, info)."""
    if choice == "parent":
        return recipe_machine, True, {"source": "the parent's own (--machine parent)", "name": recipe_machine.name}
    if choice not in (None, "fit"):
        from sorting.config import load_machine

        machine = load_machine(choice, lib)
        return machine, False, {"source": f"config {choice}", "path": str(choice), "name": machine.name}
    from dataclasses import asdict

    from sorting.twin.fit import fit_machine, wedge_rms

    where = Path(ds.root) / "calibration"
    try:
        fit = fit_machine(ds.calibration, cal, float(ds.pixel_pitch_mm), float(ds.line_pitch_mm), lib)
    except ValueError as exc:
        warn(f"{where}: cannot fit the twin's machine to these scans ({exc}); the parent's rocks are written on "
             "the parent's own machine (give --machine to name another)")
        return recipe_machine, True, {"source": f"the parent's own: no fit ({exc})", "name": recipe_machine.name}
    rms_fit = wedge_rms(fit.machine, ds.calibration, cal, lib)
    rms_own = wedge_rms(recipe_machine, ds.calibration, cal, lib)
    same_pitch = (abs(recipe_machine.detector.pixel_pitch_mm - fit.machine.detector.pixel_pitch_mm) < 1e-6
                  and abs(recipe_machine.line_pitch_mm - fit.machine.line_pitch_mm) < 1e-6)
    same = same_pitch and all(o <= TWIN_SAME_FACTOR * f + TWIN_SAME_RMS_A for o, f in zip(rms_own, rms_fit))
    info = {"source": "fitted to the dataset's calibration scans", "fitted": fit.describe(),
            "wedge_rms_a": list(rms_fit), "wedge_noise_a": list(fit.noise_a),
            "parent_machine_wedge_rms_a": list(rms_own), "config": asdict(fit.machine)}
    if same:
        info["source"] = "the parent's own: it explains the dataset's calibration scans as well as a fit"
        info["name"] = recipe_machine.name
        print(f"the parent's machine {recipe_machine.name} explains {where} (wedge rms A {rms_own[0]:.4f} / "
              f"{rms_own[1]:.4f}, fitted {rms_fit[0]:.4f} / {rms_fit[1]:.4f}): its rocks as they were")
        return recipe_machine, True, info
    info["name"] = fit.machine.name
    print(f"fitted the twin to {where}: {fit.describe()}")
    if any(r > 5.0 * n + 0.01 for r, n in zip(rms_fit, fit.noise_a)):
        warn(f"{where}: the twin's fit explains the wedge scans only to rms A "
             f"{rms_fit[0]:.4f} / {rms_fit[1]:.4f} (their noise {fit.noise_a[0]:.4f} / {fit.noise_a[1]:.4f}): "
             "this machine is unlike the twin's model of one; the parent's rocks written on it may mislead")
    return fit.machine, False, info


def _parent_rocks(meta: dict, args: argparse.Namespace, workers, tmp: Path, ds, cal):
    """The parent's training rocks: ``--parent-data``, or written by the twin from the parent's
    recorded recipe (its ore and seed) on the new machine (fitted to ``ds``'s calibration by
    default); (None, why) when neither is possible."""
    if args.no_parent_data:
        return None, {"source": "none (--no-parent-data)"}
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    info: dict = {}
    same = True
    if args.parent_data is not None:
        path = Path(args.parent_data)
        info["source"] = f"dataset {path}"
    else:
        twin = recipe.get("twin")
        if not isinstance(twin, dict):
            warn(f"{args.model}: the model records no twin recipe, so its training rocks cannot be made "
                  "again; adapting from the new rocks alone (give them with --parent-data)")
            return None, {"source": "none: the parent records no twin recipe"}
        import hashlib
        import json
        from dataclasses import asdict

        from sorting.physics import MaterialLibrary, load_materials
        from sorting.twin import simulate_rocks
        from sorting.twin.rocks import configs_from_recipe

        recipe_machine, ore, lib = configs_from_recipe(twin, f"{args.model} (recipe)")
        config_lib = load_materials(args.materials)
        lib = MaterialLibrary({**config_lib.materials, **lib.materials}, str(args.materials or "materials"))
        machine, same, info["machine"] = _twin_machine(args.machine, recipe_machine, ds, cal, lib)
        want = (recipe.get("dataset") or {}).get("fingerprint", "")
        key = (want.split(":")[-1] or "data")[:16]
        if same:  # the parent's own training data, rock for rock
            n, test_fraction = int(twin["n"]), float(twin.get("test_fraction", 0.3))
        else:  # the parent's ore on the new machine: more rocks than it had, every one for training
            n, test_fraction = int(args.twin_rocks), 0.0
            text = json.dumps(asdict(machine), sort_keys=True, default=str)
            key += f"_{hashlib.sha256(text.encode()).hexdigest()[:8]}_n{n}"
        cache = Path(args.cache) if args.cache is not None else tmp
        path = cache / f"parent_{key}"
        if not (path / "dataset.json").is_file():
            print(f"writing {n} rocks of the parent's ore with the twin ({machine.name}, {ore.name}, seed "
                  f"{twin['seed']}) in {path}")
            simulate_rocks(path, n, int(twin["seed"]), machine, ore, lib, test_fraction, progress=not args.quiet)
        info["source"] = "twin recipe" + ("" if same else f" on machine {machine.name}")
    pds, pcal = open_dataset(path)
    fp = dataset_fingerprint(pds, pcal)
    info["fingerprint"] = fp
    info["simulated"] = bool(pds.meta.get("simulated", False))  # grades from the twin: exact
    want = (recipe.get("dataset") or {}).get("fingerprint")
    if want and same and args.parent_data is None:
        info["matches_parent_recipe"] = fp == want
        if fp != want:
            warn(f"{path}: its fingerprint differs from the parent's training data ({want[:19]}...); "
                  "the twin or the data changed since the parent was trained")
    idx = training_rows(pds, path / "rocks.csv")
    rocks, _ = _rockset(pds, pcal, idx, args.quiet, workers)
    info["n_rows"] = int(len(rocks.is_sc))
    return rocks, info


def cli_adapt(args: argparse.Namespace) -> int:
    from sorting.offline.adapt import TWIN_SOFT_WIDTH, adapt, write_model_card, write_relabeled
    from sorting.offline.training import file_fingerprint, training_fingerprint
    from sorting.parallel import workers_from_args
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION
    from sorting.stages.inference import load_model

    workers = workers_from_args(args)
    if args.out.is_dir():
        raise InputError(args.out, "is a folder; --out names the model file to write")
    if args.machine is not None and (args.no_parent_data or args.parent_data is not None):
        raise InputError("--machine", "regenerates the parent's rocks: not with --parent-data or --no-parent-data")
    if args.twin_rocks < 100:
        raise InputError("--twin-rocks", f"must be at least 100, got {args.twin_rocks}")
    if args.machine not in (None, "fit", "parent"):  # a bad config fails now, not after the features
        from sorting.config import load_machine
        from sorting.physics import load_materials

        load_machine(args.machine, load_materials(args.materials))
    if args.target_recovery is not None and not 0.0 < args.target_recovery <= 1.0:
        raise InputError("--target-recovery", f"{args.target_recovery} is not in (0, 1]")
    t0 = time.perf_counter()
    parent = load_model(args.model)
    target = args.target_recovery if args.target_recovery is not None else float(
        parent.meta.get("target_recovery") or 0.95)
    ds, cal = open_dataset(args.dataset)
    where = Path(args.dataset) / "rocks.csv"
    idx = training_rows(ds, where)
    new, rows = _rockset(ds, cal, idx, args.quiet, workers)
    n_sc = int(new.is_sc.sum())
    if n_sc < 2 or len(new.is_sc) - n_sc < 2:
        raise InputError(where, f"the labeled rows hold {n_sc} sc and {len(new.is_sc) - n_sc} waste rocks with a "
                                "usable crop: adapting needs at least 2 of each class")
    with tempfile.TemporaryDirectory(prefix="sorting-adapt-") as tmp:
        parent_rocks, parent_info = _parent_rocks(parent.meta, args, workers, Path(tmp), ds, cal)
    ds_fp = dataset_fingerprint(ds, cal)
    parent_fp = file_fingerprint(args.model)
    rows_rule = "split=train" if any(ds.rows[i].split == "train" for i in idx) else "labeled rows, empty split"
    provenance = {
        "parent": {"path": str(args.model), "name": Path(args.model).name, "fingerprint": parent_fp,
                   "training_fingerprint": parent.meta.get("training_fingerprint"),
                   "threshold": parent.threshold, "estimator": parent.meta.get("estimator")},
        "dataset": {"path": str(args.dataset), "name": Path(args.dataset).name, "fingerprint": ds_fp,
                    "rows": rows_rule, "n_rows": len(idx)},
        "recipe": {"command": "sorting adapt", "seed": args.seed, "target_recovery": target,
                   "dataset": {"name": Path(args.dataset).name, "fingerprint": ds_fp, "rows": rows_rule,
                               "n_rows": len(idx)},
                   "parent_data": parent_info, "parent_recipe": parent.meta.get("recipe")},
    }
    if isinstance(ds.meta.get("twin"), dict):
        provenance["recipe"]["twin"] = ds.meta["twin"]
    n_work = len(new.is_sc) + (0 if parent_rocks is None else len(parent_rocks.is_sc))
    # the twin's grades are exact, a laboratory's are not: narrower soft targets for twin rocks
    parent_width = TWIN_SOFT_WIDTH if parent_info.get("simulated") else None
    res = adapt(new, parent.predict_proba(new.X), parent.threshold, feature_names=FEATURE_NAMES,
                feature_version=FEATURE_VERSION, parent_rocks=parent_rocks, parent_soft_width=parent_width,
                target_recovery=target,
                seed=args.seed, label_cutoff=dataset_cutoff(ds.meta), workers=sized(workers, n_work * 10),
                progress=not args.quiet, provenance=provenance)
    fp = training_fingerprint([(r.rock_id, r.file, r.x0, r.label, r.sc2o3_ppm, r.mass_g) for r in rows],
                              cal.fingerprint, new.X)
    try:
        if res.model is None:
            meta = write_relabeled(args.model, args.out, res, fp, provenance)
        else:
            from dataclasses import replace

            model = replace(res.model, fingerprint=fp)
            model.save(args.out)
            meta = model.meta()
        card = write_model_card(args.out, meta, res)
    except OSError as exc:
        raise InputError(args.out, f"cannot write the model ({exc.strerror})") from None
    load_model(args.out)  # what was written must load like any model
    m = res.metrics
    print(f"adapted {args.model} to {args.dataset}: {m['n_new']} new rocks ({m['n_new_sc']} sc)"
          + (f" + {m['n_parent_rocks']} parent rocks ({parent_info['source']})" if m["n_parent_rocks"] else ""))
    print("strategies (out-of-fold AUC on the new rocks): "
          + ", ".join(f"{k} {v:.3f}" for k, v in res.cv.items() if v is not None))
    print(f"chose {m['strategy']} (AUC {m['cv_auc']:.3f}); threshold {res.threshold:.4f} for "
          f"{100 * target:.0f} % Sc recovery: CV recovery {100 * (m['cv_sc_recovery'] or 0):.1f} %, "
          f"mass pull {100 * (m['cv_mass_pull'] or 0):.1f} %")
    print(f"wrote {args.out} and its model card {card.name} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------- compare
def cli_compare(args: argparse.Namespace) -> int:
    from sorting.offline.compare import compare_scores, write_compare
    from sorting.parallel import workers_from_args
    from sorting.stages.inference import load_model

    workers = workers_from_args(args)
    if len(args.models) < 2:
        raise InputError("--models", "needs a champion and at least one challenger (two or more model files)")
    if args.bootstrap < 100:
        raise InputError("--bootstrap", f"needs at least 100 replicates, got {args.bootstrap}")
    if args.report.exists() and not args.report.is_dir():
        raise InputError(args.report, "exists and is not a folder")
    models = [load_model(p) for p in args.models]
    names: list[str] = []
    for p in args.models:
        name = str(p)
        while name in names:
            name += "'"
        names.append(name)
    ds, cal = open_dataset(args.dataset)
    idx, split = evaluation_rows(ds, args.split, Path(args.dataset) / "rocks.csv")
    rows = [ds.rows[i] for i in idx]
    y = np.array([r.label == "sc" for r in rows])
    if y.all() or not y.any():
        raise InputError(Path(args.dataset) / "rocks.csv", f"the {len(y)} rows of split {split} are all one class: "
                                                           "comparing needs sc and waste rocks")
    X, ok = features_of(ds, cal, idx, progress=not args.quiet, workers=workers)
    scores = {}
    for name, model in zip(names, models):
        s = np.zeros(len(X), np.float32)
        if ok.any():
            s[ok] = model.predict_proba(X[ok])
        scores[name] = s
    mass, grade = _column(rows, "mass_g"), _column(rows, "sc2o3_ppm")
    result = compare_scores(scores, y, models[0].threshold, mass_g=mass, sc2o3_ppm=grade, n_boot=args.bootstrap,
                            progress=not args.quiet)
    result = {"dataset": str(args.dataset), "split": split, "n_failed_crops": int((~ok).sum()),
              "model_files": {n: {"path": str(p), "threshold": m.threshold,
                                  "training_fingerprint": m.meta.get("training_fingerprint"),
                                  "parent": (m.meta.get("parent") or {}).get("name")}
                              for n, p, m in zip(names, args.models, models)}, **result}
    try:
        paths = write_compare(args.report, result, scores, y, mass_g=mass, sc2o3_ppm=grade)
    except OSError as exc:
        raise InputError(args.report, f"cannot write the report ({exc.strerror})") from None
    champ = result["champion"]
    print(f"compared on {args.dataset} split {split}: {result['n']} rocks ({result['n_sc']} sc); "
          f"equal mass pull {100 * result['mass_pull']:.1f} % (the champion's operating point)")
    for n in names:
        st = result["models"][n]
        ci, rci = st["auc_ci"], st["sc_recovery_at_pull_ci"]
        print(f"  {n}{' (champion)' if n == champ else ''}: AUC {st['auc']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}], "
              f"Sc recovery {100 * st['sc_recovery_at_pull']:.1f} % [{100 * rci[0]:.1f}, {100 * rci[1]:.1f}]")
    print("verdict: " + result["verdict"])
    print(f"report: {', '.join(p.name for p in paths)} in {args.report}")
    return 0


def add_parsers(sub) -> None:
    """The commissioning verbs: ``select``, ``adapt``, ``compare``."""
    se = sub.add_parser("select", help="pick the rocks of a pool to assay, the ones that help `adapt` most")
    se.add_argument("pool", type=Path, help="xrt-rocks/1 dataset (labels may be empty)")
    se.add_argument("--model", type=Path, required=True, help="the model in use (the parent of `adapt`)")
    se.add_argument("--n", type=int, required=True, help="number of rocks to pick")
    se.add_argument("--out", type=Path, required=True, help="CSV to write: rock_id and why each was picked")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--uncertain-share", type=float, default=0.0,
                    help="share of the picks taken near the model's operating point (default 0: every pick "
                    "for coverage, which did best on the commissioning benchmark)")
    ad = sub.add_parser("adapt", help="a model for a new machine or ore from a parent model and assayed rocks")
    ad.add_argument("model", type=Path, help="the parent model (.onnx)")
    ad.add_argument("dataset", type=Path, help="xrt-rocks/1 dataset of the new machine; its labeled rows are used")
    ad.add_argument("--out", type=Path, required=True, help="the model file to write (.onnx); a model card "
                    "(.md) is written beside it")
    ad.add_argument("--target-recovery", type=float, default=None,
                    help="Sc recovery of the operating point (default: the parent's)")
    ad.add_argument("--seed", type=int, default=0)
    ad.add_argument("--parent-data", type=Path, default=None,
                    help="the parent's training dataset (default: regenerate it with the twin from the "
                    "parent's recorded recipe, when it has one)")
    ad.add_argument("--no-parent-data", action="store_true", help="do not use the parent's training rocks")
    ad.add_argument("--machine", default=None, metavar="fit|parent|MACHINE.yaml",
                    help="the machine the twin writes the parent's training rocks on (the parent's ore and "
                    "seed): `fit` (default) the twin fitted to DATASET's calibration scans, or the parent's "
                    "own machine when it explains them as well; `parent` the parent's own machine; or a "
                    "machine config (YAML)")
    ad.add_argument("--twin-rocks", type=int, default=TWIN_ROCKS,
                    help=f"rocks the twin writes on a machine other than the parent's (default {TWIN_ROCKS}; "
                    "on the parent's own machine: exactly the parent's training rocks)")
    ad.add_argument("--materials", type=Path, default=None,
                    help="material library for --machine (default: configs/materials.yaml)")
    ad.add_argument("--cache", type=Path, default=None,
                    help="keep the regenerated parent training data here and reuse it (default: a temporary folder)")
    co = sub.add_parser("compare", help="champion against challenger(s) on labeled rocks, with bootstrap "
                        "intervals and a verdict")
    co.add_argument("dataset", type=Path)
    co.add_argument("--models", type=Path, nargs="+", required=True,
                    help="champion first, then the challenger(s)")
    co.add_argument("--report", type=Path, required=True, help="folder for compare.json, grade_recovery.png, "
                    "verdict.txt")
    co.add_argument("--split", choices=("train", "test", "all"), default=None,
                    help="rows to compare on (default: test if any row is marked test, else all)")
    co.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap replicates (default 2000)")
    for p in (se, ad, co):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_worker_options(p)


VERBS = {"select": cli_select, "adapt": cli_adapt, "compare": cli_compare}
