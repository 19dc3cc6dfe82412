"""The loop compiles nothing on the belt: every compiled kernel it calls is loaded (or
compiled) while the pipeline is built, before the first line arrives, so no rock's deadline
pays seconds of JIT compilation, nor a lazy import (scikit-image's watershed: ~25 ms).
Checked on the kernels' own records of compiled signatures and on the modules loaded."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from pathlib import Path

from numba.core.registry import CPUDispatcher

import sorting
from sorting.config import load_sorter
from sorting.formats import read_belt_recording
from sorting.model import load_model
from sorting.runner import build_pipeline, run_loop, timing_of
from sorting.sources import replay

SORTER_YAML = Path(__file__).resolve().parents[1] / "configs" / "sorter_reference.yaml"


def _kernels() -> dict[str, CPUDispatcher]:
    found = {}
    for info in pkgutil.walk_packages(sorting.__path__, "sorting."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_no_compilation_on_the_belt(small_belt, small_model):
    rec = read_belt_recording(small_belt)
    ref = load_sorter(SORTER_YAML)
    sorter = dataclasses.replace(ref, sorting=dataclasses.replace(ref.sorting, threshold=0.5))
    kernels = _kernels()
    assert kernels, "the loop's compiled kernels were not found"
    pipe = build_pipeline(rec.calibration, load_model(small_model), sorter, timing_of(rec.meta),
                          str(SORTER_YAML), 32)
    before = {name: len(k.signatures) for name, k in kernels.items()}
    modules = set(sys.modules)
    # odd chunks, so a chunk also ends off the air tracker's epochs and mid-particle
    out = run_loop(replay(rec.lines, timing_of(rec.meta).line_rate_hz, 37, False), pipe, keep_events=False)
    assert out.summary["particles"] > 50
    after = {name: len(k.signatures) for name, k in kernels.items()}
    assert after == before, {n: (before[n], after[n]) for n in after if after[n] != before[n]}
    assert set(sys.modules) == modules, sorted(set(sys.modules) - modules)[:10]
