"""What a model and a report record about where they came from: reproducible bytes (no wall
clock or run time unless asked), no paths of the machine that wrote them."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from sorting.errors import InputError
from sorting.offline.training import created_utc, train
from sorting.stages.inference import load_model

NAMES = tuple(f"f{i}" for i in range(5))


def _train(seed: int = 0):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, len(NAMES))).astype(np.float32)
    y = X[:, 0] + 0.5 * rng.normal(size=60) > 0
    return train(X, y, feature_names=NAMES, feature_version="t", fingerprint="sha256:t", seed=seed)


def test_created_utc_honours_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert created_utc() == "1970-01-01T00:00:00+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(86400 * 366 + 3600 + 61))  # 1970 has 365 days
    assert created_utc() == "1971-01-02T01:01:01+00:00"
    for bad in ("yesterday", "-5", "1.5"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
        with pytest.raises(InputError, match="SOURCE_DATE_EPOCH"):
            created_utc()


def test_two_trainings_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1796428800")
    a = _train().save(tmp_path / "a.onnx").read_bytes()
    b = _train().save(tmp_path / "b.onnx").read_bytes()
    assert a == b
    meta = load_model(tmp_path / "a.onnx", expected_names=NAMES, expected_version="t").meta
    assert meta["created_utc"] == "2026-12-05T00:00:00+00:00"
    assert meta["training_metrics"]["seed"] == 0
    assert "train_seconds" not in meta["training_metrics"]  # a property of the PC, not of the model
    assert _train(seed=1).save(tmp_path / "c.onnx").read_bytes() != a  # the seed is in the bytes


def test_save_writes_through_a_symbolic_link(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    target = tmp_path / "package" / "m.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "m.onnx"
    link.symlink_to("package/m.onnx")
    _train().save(link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_bytes()[:3] != b"old"
    assert load_model(link, expected_names=NAMES, expected_version="t").meta["created_utc"].startswith("1970")


def test_bad_source_date_epoch_stops_train_before_the_work(small_rocks, tmp_path, monkeypatch, capsys):
    from sorting.cli import main

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "tomorrow")
    rc = main(["train", str(small_rocks), "--out", str(tmp_path / "m.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["sorting train: error: SOURCE_DATE_EPOCH: must be whole seconds since "
                               "1970-01-01 UTC, got 'tomorrow'"]
    assert not (tmp_path / "m.onnx").exists()


def test_report_names_its_inputs_without_paths(small_rocks, small_model, tmp_path, capsys):
    from sorting.cli import main

    rep = tmp_path / "deep" / "rep"
    assert main(["evaluate", str(small_rocks), "--model", str(small_model), "--report", str(rep),
                 "--split", "train", "--quiet"]) == 0
    capsys.readouterr()
    text = (rep / "metrics.json").read_text()
    for p in (small_rocks, small_model, tmp_path):
        assert str(p.parent) not in text, f"{p.parent} in metrics.json"
    doc = json.loads(text)
    assert doc["dataset"] == small_rocks.name and doc["model"]["path"] == small_model.name
    assert doc["model"]["sha256"] == "sha256:" + hashlib.sha256(small_model.read_bytes()).hexdigest()
    # the train split is exactly what the model was trained on: the same fingerprint
    assert doc["dataset_fingerprint"] == doc["model"]["training_fingerprint"]
    main(["evaluate", str(small_rocks), "--model", str(small_model), "--report", str(rep), "--quiet"])
    capsys.readouterr()
    test_doc = json.loads((rep / "metrics.json").read_text())
    assert test_doc["split"] == "test" and test_doc["dataset_fingerprint"] != doc["dataset_fingerprint"]
