"""The shipped files are package data, found through sorting.resources; the checkout's
top-level configs/ and models/ link to them (one copy). The full check of a built wheel in a
fresh venv is scripts/check_wheel.sh (run by .ci/run)."""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest

import sorting
from sorting import resources

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(sorting.__file__).resolve().parent


def _shipped() -> list[Path]:
    return [resources.MATERIALS, resources.SHIPPED_MODEL, resources.SPECTRA_TABLE,
            *(resources.shipped_config(n) for n in ("machine_reference.yaml", "ore_crater_lake.yaml",
                                                     "sorter_reference.yaml"))]


def test_shipped_files_are_real_files_inside_the_package():
    for p in _shipped():
        assert p.is_file() and not p.is_symlink(), p
        assert PACKAGE in p.resolve().parents, f"{p} is outside the package {PACKAGE}"


def test_defaults_load_from_the_package():
    from sorting.config import load_machine, load_ore, load_sorter
    from sorting.physics import load_materials, tube_spectrum
    from sorting.stages.inference import load_model

    lib = load_materials()
    assert Path(lib.source).resolve() == resources.MATERIALS.resolve()
    machine = load_machine(None, lib)
    load_ore(None, lib)
    load_sorter(resources.shipped_config("sorter_reference.yaml"))
    e, f = tube_spectrum(machine.tube.kvp, machine.tube.anode_angle_deg)
    kvp = machine.tube.kvp  # the table's physics: no photon above the tube voltage
    assert f[e > kvp].sum() == 0 and f[e < kvp].sum() > 0
    assert load_model(resources.SHIPPED_MODEL).threshold > 0


def test_checkout_configs_and_model_are_relative_links_to_the_package_files():
    pairs = [(ROOT / "configs" / p.name, p) for p in sorted(resources.CONFIG_DIR.glob("*.yaml"))]
    pairs.append((ROOT / "models" / resources.SHIPPED_MODEL.name, resources.SHIPPED_MODEL))
    assert len(pairs) >= 5
    for link, target in pairs:
        assert link.is_symlink(), f"{link} must be a symbolic link to {target}, not a second copy"
        assert not os.path.isabs(os.readlink(link)), f"{link} links by an absolute path"
        assert link.resolve() == target.resolve(), link
    # and nothing else at the top level of configs/ that the package would not ship
    names = {p.name for p in resources.CONFIG_DIR.glob("*.yaml")}
    strays = [p.name for p in (ROOT / "configs").iterdir() if p.name not in names]
    assert not strays, f"configs/ holds files that are not shipped: {strays}"


def test_every_file_under_sorting_data_is_declared_package_data():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "data").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in cfg.get("sorting", []))]
    assert not missing, f"not in [tool.setuptools.package-data] (a wheel would lack them): {missing}"
    table = resources.SPECTRA_TABLE.relative_to(PACKAGE / "physics").as_posix()
    assert any(fnmatch.fnmatch(table, g) for g in cfg["sorting.physics"])


def test_only_resources_knows_where_files_live():
    # no module finds files beside its own source: a wheel has nothing beside the package
    offenders = []
    for py in PACKAGE.rglob("*.py"):
        text = py.read_text()
        if re.search(r"__file__|\.parents\[", text):
            offenders.append(py.relative_to(PACKAGE).as_posix())
    assert not offenders, offenders
