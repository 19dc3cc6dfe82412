"""The files shipped inside the package: default configs, the material library, the shipped
model and the tube spectra table. The one place that knows where they live.

They are package data (in a wheel as in a source checkout), found through
:mod:`importlib.resources`, never beside the source folder: an installed ``sorting`` has no
repository around it. In a checkout, the top-level ``configs/*.yaml`` and
``models/crater_lake.onnx`` are symbolic links to these files, so there is one copy.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _package_root() -> Path:
    root = files("sorting")
    if not isinstance(root, Path):  # e.g. imported from a zip archive: files are not on disk
        raise RuntimeError(f"the sorting package is not installed as files on disk ({root!r}); "
                           "install it with pip")
    return root


_ROOT = _package_root()

#: the shipped configs: machine_reference.yaml, ore_crater_lake.yaml, materials.yaml, sorter_reference.yaml, ...
CONFIG_DIR = _ROOT / "data" / "configs"
#: the material library, default of ``--materials``
MATERIALS = CONFIG_DIR / "materials.yaml"
#: the shipped Crater Lake classifier, default of ``--model`` in ``demo`` and ``bench``
SHIPPED_MODEL = _ROOT / "data" / "models" / "crater_lake.onnx"
#: tungsten tube spectra (SpekPy), written by scripts/make_spectra.py
SPECTRA_TABLE = _ROOT / "physics" / "data" / "tungsten_spectra.csv"


#: the operator page's files (HTML, JS, CSS), served by ``sorting serve``
SERVICE_STATIC = _ROOT / "realtime" / "service" / "static"
#: the folder the running package is imported from: a child process started with this on its
#: path imports this same ``sorting`` (a checkout, a worktree or site-packages alike)
IMPORT_ROOT = _ROOT.parent


def shipped_config(name: str) -> Path:
    """The shipped config file ``name`` (e.g. ``"sorter_reference.yaml"``)."""
    return CONFIG_DIR / name
