"""Training, ONNX export and validated loading, on synthetic feature tables."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sorting.errors import InputError
from sorting.offline.training import train
from sorting.stages.inference import META_KEY, load_model

NAMES = tuple(f"f{i}" for i in range(8))
VERSION = "test-1"


def _table(n: int, seed: int):
    """Two informative features, one of them non-monotone (like the density traps)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    y = X[:, 0] - 0.8 * np.abs(X[:, 1]) + 0.5 * rng.normal(size=n) > -0.3
    mass = rng.uniform(20, 600, n)
    grade = np.where(y, rng.uniform(150, 650, n), rng.uniform(0, 40, n))
    return X, y, mass, grade


@pytest.fixture(scope="module")
def trained():
    X, y, mass, grade = _table(240, 0)
    X[3, 2] = np.nan  # boosting routes missing values; the graph must do the same
    return train(X, y, feature_names=NAMES, feature_version=VERSION, mass_g=mass, sc2o3_ppm=grade,
                 fingerprint="sha256:test", target_recovery=0.9, seed=0), (X, y, mass, grade)


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory):
    return trained[0].save(tmp_path_factory.mktemp("m") / "m.onnx")


def test_onnx_matches_sklearn(trained, model_file):
    tm, _ = trained
    X, *_ = _table(300, 1)
    X[::7, 1] = np.nan
    om = load_model(model_file, expected_names=NAMES, expected_version=VERSION)
    np.testing.assert_allclose(om.predict_proba(X), tm.predict_proba(X), atol=1e-5, rtol=0)
    buf = np.ascontiguousarray(X[:5], dtype=np.float32)
    np.testing.assert_allclose(om.scores_f32(buf), tm.predict_proba(buf), atol=1e-5, rtol=0)
    assert om.predict_proba(np.zeros((0, len(NAMES)))).shape == (0,)


def test_operating_point_reaches_target_recovery_out_of_fold(trained):
    tm, (X, y, mass, grade) = trained
    m = tm.metrics
    assert m["recovery_basis"] == "assay" and m["mass_basis"] == "mass"
    assert m["cv_sc_recovery"] >= 0.9
    assert 0.0 < tm.threshold < 1.0
    assert m["cv_auc"] > 0.8  # separable by construction: a useless model would sit near 0.5
    assert m["estimator"] in m["cv_auc_candidates"]


def test_metadata_is_self_describing(trained, model_file):
    om = load_model(model_file, expected_names=NAMES, expected_version=VERSION)
    assert om.threshold == pytest.approx(trained[0].threshold)
    assert om.meta["feature_names"] == list(NAMES) and om.meta["feature_version"] == VERSION
    assert om.meta["training_fingerprint"] == "sha256:test"
    assert om.meta["target_recovery"] == 0.9
    assert {"cv_auc", "cv_sc_recovery", "cv_mass_pull"} <= set(om.meta["training_metrics"])
    assert {"sklearn", "skl2onnx"} <= set(om.meta["versions"])
    assert om.decide(np.array([om.threshold, om.threshold - 1e-6])).tolist() == [True, False]


def test_no_pickle_in_the_model(model_file):
    data = model_file.read_bytes()
    assert b"pickle" not in data and b"\x80\x04\x95" not in data


@pytest.mark.parametrize("names, version", [(NAMES[:-1] + ("other",), VERSION), (NAMES, "test-2"),
                                            (NAMES[:-1], VERSION)])
def test_load_refuses_other_features(model_file, names, version):
    with pytest.raises(InputError, match="model was built on other features"):
        load_model(model_file, expected_names=names, expected_version=version)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a model\n", bytes(range(256)) * 4])
def test_load_refuses_non_onnx(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError, match="not an ONNX model"):
        load_model(p, expected_names=NAMES, expected_version=VERSION)


def test_load_refuses_missing_file_and_foreign_onnx(tmp_path, trained):
    with pytest.raises(InputError, match="no such model file"):
        load_model(tmp_path / "nope.onnx", expected_names=NAMES, expected_version=VERSION)
    proto = trained[0].to_onnx()
    del proto.metadata_props[:]
    p = tmp_path / "foreign.onnx"
    p.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="without sorting metadata"):
        load_model(p, expected_names=NAMES, expected_version=VERSION)


def test_metadata_threshold_out_of_range_is_refused(tmp_path, trained):
    import onnx

    proto = trained[0].to_onnx()
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == META_KEY))
    meta["threshold"] = 1.5
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    p = tmp_path / "thr.onnx"
    p.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="threshold"):
        load_model(p, expected_names=NAMES, expected_version=VERSION)


def test_train_refuses_one_class_and_bad_shapes():
    X, y, *_ = _table(40, 2)
    with pytest.raises(ValueError, match="both classes"):
        train(X, np.ones(40, bool), feature_names=NAMES, feature_version=VERSION)
    with pytest.raises(ValueError, match="does not match"):
        train(X[:, :3], y, feature_names=NAMES, feature_version=VERSION)
    with pytest.raises(ValueError, match="target recovery"):
        train(X, y, feature_names=NAMES, feature_version=VERSION, target_recovery=1.5)


def test_without_assays_the_threshold_recalls_sc_rocks():
    X, y, *_ = _table(120, 4)
    tm = train(X, y, feature_names=NAMES, feature_version=VERSION, target_recovery=0.95, seed=1)
    assert tm.metrics["recovery_basis"] == "count"
    assert tm.metrics["cv_sc_rock_recall"] >= 0.95


# --- both candidate estimators convert faithfully -------------------------------------

@pytest.mark.parametrize("name", ["hist_gradient_boosting", "random_forest"])
def test_every_candidate_converts_within_1e5(name, tmp_path):
    from sorting.offline.training import TrainedModel, _candidates, _fit

    X, y, _, grade = _table(200, 5)
    X[::11, 4] = np.nan
    from sorting.offline.metallurgy import soft_sc_targets

    clf = _fit(_candidates(0)[name], X, soft_sc_targets(grade, y, 150.0, 0.3))
    tm = TrainedModel(clf, NAMES, VERSION, 0.5, 0.95, "", {"estimator": name})
    om = load_model(tm.save(tmp_path / "m.onnx"), expected_names=NAMES, expected_version=VERSION)
    Xt, *_ = _table(400, 6)
    Xt[::5, 0] = np.nan
    np.testing.assert_allclose(om.predict_proba(Xt), tm.predict_proba(Xt), atol=1e-5, rtol=0)


def test_soft_targets_are_used_when_every_rock_is_assayed(trained):
    m = trained[0].metrics
    assert m["targets"] == "soft"
    # the table's labels switch between 40 and 150 ppm: the inferred cut lies there
    assert 40.0 <= m["label_cutoff_ppm"] <= 150.0


def test_expand_balances_classes_like_sklearn():
    from sklearn.utils.class_weight import compute_sample_weight

    from sorting.offline.training import _expand

    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.array([1, 0, 0, 0, 1])
    X2, y2, w2 = _expand(X, y.astype(float))  # hard targets: one copy per rock
    assert len(X2) == 5
    order = np.r_[np.flatnonzero(y == 1), np.flatnonzero(y == 0)]
    np.testing.assert_allclose(w2, compute_sample_weight("balanced", y)[order])
    X2, y2, w2 = _expand(X, np.array([0.5, 0.0, 0.25, 1.0, 1.0]))
    # sc copies of rocks 0, 2, 3, 4 with p = .5 .25 1 1; waste copies of 0, 1, 2 with .5 1 .75
    assert y2.tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert w2[:4].sum() == pytest.approx(2.5) and w2[4:].sum() == pytest.approx(2.5)
    np.testing.assert_allclose(w2[:4] / w2[0], [1, 0.5, 2, 2])


# --- the CLI on a small simulated dataset (session fixtures in conftest.py) -------------

def _run(argv, capsys):
    from sorting.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_predict_writes_the_contract_columns_for_every_row(small_rocks, small_model, tmp_path, capsys):
    import csv

    out = tmp_path / "scores.csv"
    rc, _ = _run(["predict", small_rocks, "--model", small_model, "--out", out, "--quiet"], capsys)
    assert rc == 0
    with open(out) as f:
        got = list(csv.DictReader(f))
    with open(small_rocks / "rocks.csv") as f:
        want = [r["rock_id"] for r in csv.DictReader(f)]
    assert [r["rock_id"] for r in got] == want
    assert {"rock_id", "score", "decision"} <= set(got[0])
    thr = load_model(small_model).threshold
    for r in got:
        s = float(r["score"])
        assert 0.0 <= s <= 1.0
        assert r["decision"] == ("sc" if s >= thr and not r["problem"] else "waste")
    assert {r["decision"] for r in got} == {"sc", "waste"}


def test_trained_model_carries_the_pipeline_features(small_model):
    from sorting.stages.features import FEATURE_NAMES, FEATURE_VERSION

    m = load_model(small_model)
    assert m.feature_names == tuple(FEATURE_NAMES) and m.feature_version == FEATURE_VERSION
    assert m.meta["training_fingerprint"].startswith("sha256:")
    assert m.meta["training_metrics"]["cv_sc_recovery"] >= 0.95


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_refuses_a_model_with_other_features(small_rocks, tmp_path, capsys):
    from sorting.offline.training import TrainedModel, _candidates, _fit

    X, y, *_ = _table(60, 7)
    clf = _fit(_candidates(0)["hist_gradient_boosting"], X, y.astype(float))
    other = TrainedModel(clf, NAMES, VERSION, 0.5, 0.95, "", {}).save(tmp_path / "other.onnx")
    rc, cap = _run(["predict", small_rocks, "--model", other, "--out", tmp_path / "s.csv"], capsys)
    assert rc == 2
    _one_line_error(cap.err, "other.onnx", "model was built on other features")
    assert not (tmp_path / "s.csv").exists()


def test_cli_refuses_a_non_onnx_model(small_rocks, tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_text("rock_id,score\n1,0.5\n")
    for verb, extra in (("predict", ["--out", tmp_path / "s.csv"]), ("evaluate", ["--report", tmp_path / "r"])):
        rc, cap = _run([verb, small_rocks, "--model", bad, *extra], capsys)
        assert rc == 2
        _one_line_error(cap.err, "model.onnx", "not an ONNX model")


def _relabel(src, dst, label):
    """A copy of dataset ``src`` whose every label is ``label`` ('' = unlabeled)."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "rocks.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["label"] = label
    with open(dst / "rocks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


@pytest.mark.parametrize("label, message", [("waste", "0 sc and"), ("", "no labeled rows")])
def test_train_refuses_one_class_or_no_labels(small_rocks, tmp_path, capsys, label, message):
    ds = _relabel(small_rocks, tmp_path / "ds", label)
    rc, cap = _run(["train", ds, "--out", tmp_path / "m.onnx", "--quiet"], capsys)
    assert rc == 2
    _one_line_error(cap.err, "rocks.csv", message)
    assert not (tmp_path / "m.onnx").exists()


def test_train_refuses_a_bad_target_recovery(small_rocks, tmp_path, capsys):
    rc, cap = _run(["train", small_rocks, "--out", tmp_path / "m.onnx", "--target-recovery", "95"], capsys)
    assert rc == 2
    _one_line_error(cap.err, "--target-recovery")


def test_train_soft_width_sets_the_targets(small_rocks, tmp_path, capsys):
    from sorting.offline.metallurgy import soft_sc_targets

    for width, targets in (("0.15", "soft"), ("0", "hard")):
        out = tmp_path / f"m{width}.onnx"
        rc, _ = _run(["train", small_rocks, "--out", out, "--soft-width", width, "--quiet", "--jobs", "1"], capsys)
        assert rc == 0
        m = load_model(out).meta["training_metrics"]
        assert m["targets"] == targets
        assert m["soft_width"] == (0.15 if targets == "soft" else None)
    # the width is the logistic scale in ln(grade / cut-off): one width above the cut is 1/(1+e^-1)
    p = soft_sc_targets(np.array([150.0 * np.e ** 0.15]), np.array([True]), 150.0, 0.15)
    assert p[0] == pytest.approx(1 / (1 + np.exp(-1.0)))
