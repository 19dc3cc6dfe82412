"""Session-wide test data, built once per test session (small: a few seconds each).

``small_belt``: 1.5 s of simulated belt (xrt-belt/1 with truth.csv) on the reference machine;
``objects_belt``: the same belt with splices, tramp steel and a slab on it.
``small_rocks``: ~120 labeled rocks (xrt-rocks/1). ``small_model``: a model trained on them.
Treat them as read-only; copy before damaging one.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

# A test run started in the background by a shell without job control (`pytest &`) inherits
# SIGINT ignored, and so would every process it starts; the tests that deliver SIGINT check
# what a user's Ctrl-C does, so they get Python's usual handler, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BELT_SECONDS = 1.5
BELT_SEED = 11
ROCKS_N = 120
ROCKS_SEED = 12


@pytest.fixture(scope="session")
def small_configs():
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials

    return load_machine(None), load_ore(None), load_materials(None)


@pytest.fixture(scope="session")
def small_belt(tmp_path_factory, small_configs) -> Path:
    """Path of a 1.5 s xrt-belt/1 recording with truth.csv (reference machine, Crater Lake ore)."""
    from sorting.twin import simulate_belt

    machine, ore, lib = small_configs
    out = tmp_path_factory.mktemp("small_belt") / "belt"
    return simulate_belt(out, BELT_SECONDS, BELT_SEED, machine, ore, lib, progress=False)


#: belt objects on the belt of ``objects_belt``
OBJECTS = {"splice_every_s": 0.4, "tramp": 5, "slabs": 1}


@pytest.fixture(scope="session")
def objects_belt(tmp_path_factory, small_configs) -> Path:
    """``small_belt`` (the same seed: the same rocks) with belt splices every 0.4 s, 5 pieces of
    tramp steel and a 700 mm slab, listed in its objects.csv."""
    from sorting.twin import simulate_belt

    machine, ore, lib = small_configs
    out = tmp_path_factory.mktemp("objects_belt") / "belt"
    return simulate_belt(out, BELT_SECONDS, BELT_SEED, machine, ore, lib, progress=False, **OBJECTS)


@pytest.fixture(scope="session")
def small_rocks(tmp_path_factory, small_configs) -> Path:
    """Path of a ~120-rock xrt-rocks/1 dataset with a train/test split."""
    from sorting.twin import simulate_rocks

    machine, ore, lib = small_configs
    out = tmp_path_factory.mktemp("small_rocks") / "rocks"
    return simulate_rocks(out, ROCKS_N, ROCKS_SEED, machine, ore, lib, progress=False)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, small_rocks) -> Path:
    """Path of an ONNX model trained by ``sorting train`` on ``small_rocks``."""
    from sorting.cli import main

    out = tmp_path_factory.mktemp("small_model") / "model.onnx"
    assert main(["train", str(small_rocks), "--out", str(out), "--quiet"]) == 0
    return out


# ---------------------------------------------------------------- the loop on the small belt
#: the reference sorter, as shipped
SORTER_YAML = Path(__file__).resolve().parents[1] / "configs" / "sorter_reference.yaml"
#: a fixed cut instead of the small model's own operating point, so that both decisions occur
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def rec(small_belt):
    """The small belt, read (its lines memory-mapped)."""
    from sorting.io import read_belt_recording

    return read_belt_recording(small_belt)


@pytest.fixture(scope="module")
def model(small_model):
    """The small model, loaded."""
    from sorting.stages.inference import load_model

    return load_model(small_model)


@pytest.fixture(scope="module")
def sorter():
    """The reference sorter with the threshold at :data:`THRESHOLD`."""
    import dataclasses

    from sorting.config import load_sorter

    ref = load_sorter(SORTER_YAML)
    return dataclasses.replace(ref, sorting=dataclasses.replace(ref.sorting, threshold=THRESHOLD))


@pytest.fixture(scope="module")
def sorter_yaml(tmp_path_factory):
    """The same sorter as a YAML file (for the CLI)."""
    text = SORTER_YAML.read_text().replace("threshold: null", f"threshold: {THRESHOLD}")
    assert f"threshold: {THRESHOLD}" in text
    path = tmp_path_factory.mktemp("sorter") / "sorter.yaml"
    path.write_text(text)
    return path
