"""The commissioning verbs: select (picks to assay), adapt (a model for a new machine from a
parent and a few assays), compare (champion vs challengers with paired-bootstrap intervals)."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sorting.cli import main


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def _ids(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["rock_id"] for r in csv.DictReader(f)]


def _rows(path: Path) -> list[dict]:
    with open(path / "rocks.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ select
def test_select_picks_n_distinct_rocks_of_the_pool_deterministically(tmp_path, small_rocks, small_model):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    base = ["select", str(small_rocks), "--model", str(small_model), "--n", "20", "--quiet", "--jobs", "1",
            "--uncertain-share", "0.25"]
    assert main(base + ["--out", str(a), "--seed", "3"]) == 0
    assert main(base + ["--out", str(b), "--seed", "3"]) == 0
    assert main(base + ["--out", str(c), "--seed", "4"]) == 0
    ids_a = _ids(a)
    pool_ids = {r["rock_id"] for r in _rows(small_rocks)}
    assert len(ids_a) == 20 and len(set(ids_a)) == 20 and set(ids_a) <= pool_ids
    assert a.read_text() == b.read_text()  # same seed, same picks, same file
    assert set(_ids(c)) != set(ids_a)  # another seed moves some picks
    with open(a, newline="") as f:
        reasons = [r["reason"] for r in csv.DictReader(f)]
    assert reasons.count("uncertainty") == 5 and reasons.count("coverage") == 15


def test_select_coverage_reaches_every_separated_group():
    # three well-separated groups of very different sizes: random picks of 6 would usually
    # miss the 5-rock group; coverage picks take each group (k-means on the embedding)
    from sorting.offline.select import select_rocks

    rng = np.random.default_rng(0)
    centres = np.zeros((3, 24))
    centres[1, :12] = 30.0
    centres[2, 12:] = -30.0
    sizes = (400, 100, 5)
    X = np.vstack([c + rng.normal(size=(n, 24)) for c, n in zip(centres, sizes)])
    group = np.repeat([0, 1, 2], sizes)
    picks = select_rocks(X, 6, seed=1)
    assert set(group[picks.index]) == {0, 1, 2}
    assert len(set(picks.index.tolist())) == 6 and picks.reason == ("coverage",) * 6


def test_select_uncertainty_picks_sit_at_the_operating_point():
    from sorting.offline.select import select_rocks

    rng = np.random.default_rng(1)
    X = rng.normal(size=(1000, 5))
    scores = np.linspace(0.0, 1.0, 1000)  # rank = score here
    picks = select_rocks(X, 40, scores=scores, threshold=0.7, uncertain_share=0.5, seed=0)
    unc = picks.index[np.array(picks.reason) == "uncertainty"]
    assert len(unc) == 20
    # the 4 x 20 = 80 rocks nearest the threshold in rank: scores within 0.7 +- 0.04
    assert np.all(np.abs(scores[unc] - 0.7) <= 0.045)


def test_select_bad_input_exit_2(tmp_path, capsys, small_rocks, small_model):
    out = str(tmp_path / "p.csv")
    err = _one_line_exit_2(capsys, ["select", str(small_rocks), "--model", str(small_model), "--n", "100000",
                                    "--out", out, "--quiet"])
    assert "--n" in err and "pool" in err
    err = _one_line_exit_2(capsys, ["select", str(small_rocks), "--model", str(small_model), "--n", "0",
                                    "--out", out, "--quiet"])
    assert "--n" in err
    empty = tmp_path / "empty"
    shutil.copytree(small_rocks, empty, ignore=shutil.ignore_patterns("rocks"))
    (empty / "rocks.csv").write_text((small_rocks / "rocks.csv").read_text().splitlines()[0] + "\n")
    err = _one_line_exit_2(capsys, ["select", str(empty), "--model", str(small_model), "--n", "1",
                                    "--out", out, "--quiet"])
    assert "no rocks" in err
    assert not Path(out).exists()


# ------------------------------------------------------------------------------ adapt
def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(path: Path) -> dict:
    from sorting.stages.inference import load_model

    return load_model(path).meta


def test_train_records_its_recipe(small_rocks, small_model):
    meta = _meta(small_model)
    recipe = meta["recipe"]
    assert recipe["command"] == "sorting train" and recipe["seed"] == 0
    assert recipe["dataset"]["rows"] == "split=train"
    assert recipe["dataset"]["n_rows"] == sum(r["split"] == "train" and r["label"] != "" for r in _rows(small_rocks))
    twin = recipe["twin"]
    ds_meta = json.loads((small_rocks / "dataset.json").read_text())
    assert twin == ds_meta["twin"] and twin["n"] == len(_rows(small_rocks))
    assert twin["machine"]["tube"]["kvp"] == 160.0 and twin["ore"]["name"] == "crater_lake"


def test_twin_recipe_writes_the_same_dataset_again(tmp_path, small_configs):
    from sorting.twin import simulate_rocks
    from sorting.twin.rocks import configs_from_recipe

    machine, ore, lib = small_configs
    a = simulate_rocks(tmp_path / "a", 4, 5, machine, ore, lib, progress=False)
    recipe = json.loads((a / "dataset.json").read_text())["twin"]
    m2, o2, l2 = configs_from_recipe(recipe)
    assert m2 == machine and o2 == ore
    b = simulate_rocks(tmp_path / "b", recipe["n"], recipe["seed"], m2, o2, l2, recipe["test_fraction"],
                       progress=False)
    assert (a / "rocks.csv").read_text() == (b / "rocks.csv").read_text()
    for f in sorted((a / "rocks").iterdir()):
        assert f.read_bytes() == (b / "rocks" / f.name).read_bytes()


def test_adapt_names_parent_and_dataset_and_writes_a_card(tmp_path, small_rocks, small_model):
    from sorting.stages.inference import load_model

    out = tmp_path / "new.onnx"
    assert main(["adapt", str(small_model), str(small_rocks), "--out", str(out), "--no-parent-data",
                 "--quiet", "--jobs", "1"]) == 0
    model = load_model(out)  # loadable like any model, same features
    meta = model.meta
    assert meta["parent"]["name"] == small_model.name
    assert meta["parent"]["fingerprint"] == _sha256(small_model)
    assert meta["parent"]["training_fingerprint"] == _meta(small_model)["training_fingerprint"]
    assert meta["dataset"]["fingerprint"].startswith("sha256:") and meta["dataset"]["name"] == small_rocks.name
    assert meta["recipe"]["command"] == "sorting adapt"
    assert meta["recipe"]["parent_recipe"] == _meta(small_model)["recipe"]
    m = meta["training_metrics"]
    assert m["strategy"] in ("parent", "scratch/random_forest", "scratch/extra_trees") and m["n_parent_rocks"] == 0
    # without the parent's rocks the default is the new rocks alone; the parent replaces it
    # only when the bootstrap says it is better
    assert m["choice"]["default"] == "scratch/random_forest"
    switched = [k for k, t in m["choice"]["tests"].items() if t["better"]]
    assert (m["strategy"] == "scratch/random_forest") == (not switched)
    # few rocks: the random forest and the extra trees only
    assert set(m["cv_auc_strategies"]) == {"parent", "scratch/random_forest", "scratch/extra_trees"}
    assert 0.0 <= model.threshold <= 1.0
    card = out.with_suffix(".md")
    text = card.read_text()
    assert small_model.name in text and meta["dataset"]["fingerprint"] in text
    # scores like any model
    assert main(["predict", str(small_rocks), "--model", str(out), "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0


def test_adapt_regenerates_the_parents_rocks_from_its_recipe(tmp_path, small_rocks, small_model):
    out = tmp_path / "new.onnx"
    cache = tmp_path / "cache"
    assert main(["adapt", str(small_model), str(small_rocks), "--out", str(out), "--cache", str(cache),
                 "--quiet", "--jobs", "1"]) == 0
    meta = _meta(out)
    pdata = meta["recipe"]["parent_data"]
    assert pdata["source"] == "twin recipe"
    # the dataset comes from the parent's own machine: the fit to its scans finds nothing better
    assert pdata["machine"]["source"].startswith("the parent's own")
    assert pdata["machine"]["parent_machine_wedge_rms_a"][0] < 0.01
    # the twin wrote the parent's training rocks again, rock for rock: same dataset fingerprint
    assert pdata["matches_parent_recipe"] is True
    assert pdata["fingerprint"] == _meta(small_model)["recipe"]["dataset"]["fingerprint"]
    assert meta["training_metrics"]["n_parent_rocks"] == pdata["n_rows"] > 0
    assert any(k.startswith("union_r") for k in meta["training_metrics"]["cv_auc_strategies"])
    assert meta["training_metrics"]["choice"]["default"] == "union_r1/extra_trees"


def test_adapt_without_a_fit_warns_and_uses_the_parents_machine(tmp_path, capsys, monkeypatch, small_rocks,
                                                                 small_model):
    import sorting.twin.fit

    def no_fit(*args, **kwargs):
        raise ValueError("only 3 wedge cells with a usable attenuation")

    monkeypatch.setattr(sorting.twin.fit, "fit_machine", no_fit)
    out = tmp_path / "new.onnx"
    assert main(["adapt", str(small_model), str(small_rocks), "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--quiet", "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "cannot fit the twin's machine" in err and "only 3 wedge cells" in err
    pdata = _meta(out)["recipe"]["parent_data"]
    assert pdata["machine"]["source"].startswith("the parent's own: no fit")
    assert pdata["matches_parent_recipe"] is True


def test_adapt_on_another_machine_writes_the_parents_ore_on_the_fitted_machine(tmp_path, small_model):
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials
    from sorting.twin import simulate_rocks

    lib = load_materials()
    other = load_machine("configs/machine_example_commissioning.yaml", lib)
    new = simulate_rocks(tmp_path / "new", 40, 11, other, load_ore(None, lib), lib, test_fraction=0.0, progress=False)
    out = tmp_path / "new.onnx"
    assert main(["adapt", str(small_model), str(new), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--twin-rocks", "100", "--quiet", "--jobs", "1"]) == 0
    meta = _meta(out)
    pdata = meta["recipe"]["parent_data"]
    fitted = pdata["machine"]
    assert fitted["source"] == "fitted to the dataset's calibration scans"
    # the commissioning machine's config, found again from its scans
    assert abs(fitted["config"]["tube"]["kvp"] - 130.0) <= 8.0
    assert fitted["config"]["detector"]["front"]["material"] == "gos"
    assert fitted["config"]["detector"]["pixel_pitch_mm"] == 1.0
    assert fitted["wedge_rms_a"][0] < fitted["parent_machine_wedge_rms_a"][0] / 10
    assert pdata["source"] == f"twin recipe on machine {fitted['name']}" and "matches_parent_recipe" not in pdata
    # 100 rocks of the parent's ore, every one for training (the twin's own labels)
    assert pdata["n_rows"] == meta["training_metrics"]["n_parent_rocks"] and 90 <= pdata["n_rows"] <= 100
    # the twin's grades are exact: narrower soft targets than the new rocks' assays get
    assert pdata["simulated"] is True
    assert meta["training_metrics"]["parent_soft_width"] == 0.1
    twin = json.loads(next((tmp_path / "cache").glob("parent_*/dataset.json")).read_text())["twin"]
    assert twin["n"] == 100 and twin["machine"]["name"] == fitted["name"] and twin["ore"]["name"] == "crater_lake"


def test_adapt_bad_input_exit_2(tmp_path, capsys, small_rocks, small_model):
    out = str(tmp_path / "x.onnx")
    err = _one_line_exit_2(capsys, ["adapt", str(tmp_path / "none.onnx"), str(small_rocks), "--out", out])
    assert "none.onnx" in err
    unlabeled = tmp_path / "unlabeled"
    shutil.copytree(small_rocks, unlabeled)
    rows = _rows(small_rocks)
    with open(unlabeled / "rocks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "label": ""} for r in rows])
    err = _one_line_exit_2(capsys, ["adapt", str(small_model), str(unlabeled), "--out", out, "--quiet"])
    assert "labeled" in err
    err = _one_line_exit_2(capsys, ["adapt", str(small_model), str(small_rocks), "--out", out,
                                    "--target-recovery", "1.5"])
    assert "--target-recovery" in err
    err = _one_line_exit_2(capsys, ["adapt", str(small_model), str(small_rocks), "--out", out,
                                    "--machine", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err
    err = _one_line_exit_2(capsys, ["adapt", str(small_model), str(small_rocks), "--out", out,
                                    "--machine", "configs/machine_reference.yaml", "--no-parent-data"])
    assert "--machine" in err
    err = _one_line_exit_2(capsys, ["adapt", str(small_model), str(small_rocks), "--out", out,
                                    "--twin-rocks", "5"])
    assert "--twin-rocks" in err


# ------------------------------------------------------------------------------ compare
def test_compare_verdict_identical_models_no_difference():
    from sorting.offline.compare import compare_scores

    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.clip(0.5 * y + rng.normal(0.25, 0.25, 300), 0, 1)
    r = compare_scores({"A": s, "B": s.copy()}, y, 0.5, n_boot=300)
    d = r["differences"]["B"]
    assert d["auc"] == 0.0 and d["auc_ci"] == [0.0, 0.0] and not d["real"]
    assert "no difference" in r["verdict"]


def test_compare_verdict_perfect_vs_random_real_difference():
    from sorting.offline.compare import compare_scores

    rng = np.random.default_rng(1)
    n = 200
    y = rng.random(n) < 0.5
    grade = np.where(y, rng.uniform(150, 600, n), rng.uniform(1, 149, n))
    mass = rng.uniform(10, 500, n)
    perfect = grade / grade.max()  # ranks by grade: AUC 1
    noise = rng.random(n)  # AUC about 0.5
    r = compare_scores({"random": noise, "perfect": perfect}, y, 0.5, mass_g=mass, sc2o3_ppm=grade, n_boot=500)
    assert r["models"]["perfect"]["auc"] == 1.0
    d = r["differences"]["perfect"]
    assert d["real"] and d["auc_ci"][0] > 0.3
    # the perfect ranking recovers more Sc at the champion's pull
    assert d["sc_recovery_at_pull"] > 0 and d["sc_recovery_at_pull_ci"][0] > 0
    assert "perfect is better than random: real difference" in r["verdict"]
    # and the other way round: worse
    r2 = compare_scores({"perfect": perfect, "random": noise}, y, 0.5, mass_g=mass, sc2o3_ppm=grade, n_boot=300)
    assert r2["differences"]["random"]["real"] and "worse than" in r2["verdict"]


def test_compare_bootstrap_interval_covers_the_known_auc_spread():
    # a hand-checkable case: the AUC's bootstrap 95 % interval of a model whose scores are
    # the label plus noise must contain the full-sample AUC and have a width near the
    # Hanley-McNeil standard error (x 3.92)
    from sorting.offline.compare import compare_scores

    rng = np.random.default_rng(2)
    n = 400
    y = rng.random(n) < 0.5
    s = y + rng.normal(0, 0.8, n)
    r = compare_scores({"a": s, "b": s + rng.normal(0, 0.01, n)}, y, 0.5, n_boot=1000)
    a = r["models"]["a"]
    auc = a["auc"]
    n1, n0 = int(y.sum()), int((~y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2)) / (n1 * n0))
    lo, hi = a["auc_ci"]
    assert lo < auc < hi
    assert 0.7 < (hi - lo) / (3.92 * se) < 1.3


def test_compare_cli_writes_report_and_verdict(tmp_path, small_rocks, small_model):
    rep = tmp_path / "rep"
    assert main(["compare", str(small_rocks), "--models", str(small_model), str(small_model), "--report", str(rep),
                 "--bootstrap", "200", "--quiet", "--jobs", "1"]) == 0
    res = json.loads((rep / "compare.json").read_text())
    assert res["champion"] == str(small_model) and len(res["challengers"]) == 1
    (d,) = res["differences"].values()
    assert d["auc"] == 0 and not d["real"]
    assert "no difference" in (rep / "verdict.txt").read_text()
    assert (rep / "grade_recovery.png").stat().st_size > 1000
    assert res["split"] == "test" and res["n"] == sum(r["split"] == "test" for r in _rows(small_rocks))


def test_compare_bad_input_exit_2(tmp_path, capsys, small_rocks, small_model):
    err = _one_line_exit_2(capsys, ["compare", str(small_rocks), "--models", str(small_model),
                                    "--report", str(tmp_path / "r")])
    assert "--models" in err
    err = _one_line_exit_2(capsys, ["compare", str(small_rocks), "--models", str(small_model),
                                    str(tmp_path / "missing.onnx"), "--report", str(tmp_path / "r")])
    assert "missing.onnx" in err


# ------------------------------------------------------------------------------ parallel features
def test_parallel_features_equal_serial_local_and_dask(small_rocks):
    from sorting.io import read_rocks_dataset
    from sorting.parallel import Workers
    from sorting.stages.calibrate import calibrate
    from sorting.stages.features import dataset_features

    ds = read_rocks_dataset(small_rocks)
    cal = calibrate(ds.calibration)
    idx = list(range(0, len(ds.rows), 2))
    X1, ok1, p1 = dataset_features(ds, cal, idx, progress=False)
    try:
        X2, ok2, p2 = dataset_features(ds, cal, idx, progress=False, workers=Workers(2), chunk_rocks=7)
    finally:  # no idle pool processes left behind for the tests that count child processes
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    assert np.array_equal(X1, X2, equal_nan=True) and np.array_equal(ok1, ok2) and p1 == p2
    distributed = pytest.importorskip("distributed")
    # a real TCP scheduler on loopback, its worker threads in this process
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        X3, ok3, p3 = dataset_features(ds, cal, idx, progress=False,
                                       workers=Workers(-1, cluster.scheduler_address), chunk_rocks=9)
    assert np.array_equal(X1, X3, equal_nan=True) and np.array_equal(ok1, ok3) and p1 == p3


def test_worker_options_bad_input_exit_2(tmp_path, capsys, small_rocks, small_model):
    out = str(tmp_path / "s.csv")
    err = _one_line_exit_2(capsys, ["predict", str(small_rocks), "--model", str(small_model), "--out", out,
                                    "--jobs", "0"])
    assert "--jobs" in err
    err = _one_line_exit_2(capsys, ["predict", str(small_rocks), "--model", str(small_model), "--out", out,
                                    "--scheduler", "localhost:8786"])
    assert "--scheduler" in err



def test_paired_auc_difference_resolves_only_real_differences():
    # the rule adapt uses to leave its default: a tiny AUC edge on 100 rocks is not resolvable,
    # a large one is
    from sorting.offline.compare import paired_auc_difference

    rng = np.random.default_rng(3)
    y = rng.random(100) < 0.4
    base = y + rng.normal(0, 0.9, 100)
    tiny = base.copy()
    tiny[np.flatnonzero(y)[:2]] += 0.05  # two sc rocks nudged up: AUC +0.00x
    d, ci = paired_auc_difference(base, tiny, y, n_boot=500)
    assert 0 <= d < 0.01 and ci[0] <= 0 <= ci[1]
    d, ci = paired_auc_difference(base, y + rng.normal(0, 0.1, 100), y, n_boot=500)
    assert d > 0.1 and ci[0] > 0


def test_dataset_features_leave_no_per_crop_tables_on_the_calibration(small_rocks):
    # bounded memory on huge datasets: the tables derived per crop window (one per position and
    # width) live and die with each chunk's own copy of the calibration
    from sorting.io import read_rocks_dataset
    from sorting.stages.calibrate import calibrate
    from sorting.stages.features import dataset_features

    ds = read_rocks_dataset(small_rocks)
    cal = calibrate(ds.calibration)
    X, ok, _ = dataset_features(ds, cal, progress=False, chunk_rocks=16)
    assert ok.all()
    assert not any(isinstance(k, tuple) and k[0] == "detector" for k in cal._derived)


def test_predict_on_a_dask_cluster_writes_the_same_scores(tmp_path, small_rocks, small_model):
    distributed = pytest.importorskip("distributed")
    local, remote = tmp_path / "local.csv", tmp_path / "dask.csv"
    assert main(["predict", str(small_rocks), "--model", str(small_model), "--out", str(local), "--quiet",
                 "--jobs", "1"]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        assert main(["predict", str(small_rocks), "--model", str(small_model), "--out", str(remote), "--quiet",
                     "--scheduler", cluster.scheduler_address]) == 0
    assert local.read_text() == remote.read_text()


def test_unreachable_scheduler_is_one_line_exit_2(tmp_path, capsys, monkeypatch, small_rocks, small_model):
    import socket

    import sorting.parallel

    monkeypatch.setattr(sorting.parallel, "CONNECT_TIMEOUT_S", 1.0)

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _one_line_exit_2(capsys, ["predict", str(small_rocks), "--model", str(small_model), "--out",
                                    str(tmp_path / "s.csv"), "--quiet", "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert "--scheduler" in err and "cannot reach" in err


def test_adapt_model_types_convert_to_onnx_exactly(tmp_path):
    # what the loop runs must be what adapt fitted: ONNX scores within 1e-5 of scikit-learn
    from sorting.offline.adapt import adapt_candidates
    from sorting.offline.training import TrainedModel, fit_soft
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION
    from sorting.stages.inference import load_model

    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, len(FEATURE_NAMES))).astype(np.float32)
    p = 1 / (1 + np.exp(-(X[:, 0] + 0.5 * X[:, 3])))
    for name, clf in adapt_candidates(0, 100).items():
        fit_soft(clf, X, p, np.r_[np.ones(200), np.full(100, 3.0)])
        path = TrainedModel(clf, FEATURE_NAMES, FEATURE_VERSION, 0.5, 0.95, "", {"estimator": name}).save(
            tmp_path / f"{name}.onnx")
        Xt = rng.normal(size=(500, len(FEATURE_NAMES))).astype(np.float32)
        onnx_scores = load_model(path).predict_proba(Xt)
        assert np.abs(onnx_scores - clf.predict_proba(Xt)[:, 1]).max() < 1e-5, name
