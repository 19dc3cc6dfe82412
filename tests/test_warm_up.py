"""The loop compiles nothing on the belt: every compiled kernel it calls is loaded (or
compiled) while the pipeline is built, before the first line arrives, so no rock's deadline
pays seconds of JIT compilation, nor a lazy import (scikit-image's watershed: ~25 ms).

Checked on the kernels' own records of compiled signatures and on the modules loaded, in a
fresh interpreter (dispatchers are per process: in this one, other tests have compiled
their own signatures already), over three kinds of input: a replayed recording (read-only
lines), a stream of copied lines (writable, as a TCP source gives them) and a stream with
faults (the faulty path's flags); and all three again on a belt with splices, tramp steel
and a slab."""
from __future__ import annotations

import subprocess
import sys
import textwrap

#: every compiled kernel of the package, by dotted name (both scripts below start with it)
FIND_KERNELS = textwrap.dedent('''
    import importlib, pkgutil
    from numba.core.registry import CPUDispatcher
    import sorting

    def all_kernels():
        kernels = {}
        for info in pkgutil.walk_packages(sorting.__path__, "sorting."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if isinstance(obj, CPUDispatcher) and obj.__module__ == info.name:
                    kernels[info.name + "." + name] = obj
        return kernels
''')

SCRIPT = FIND_KERNELS + textwrap.dedent('''
    import dataclasses, importlib, pkgutil, sys
    from pathlib import Path
    from numba.core.registry import CPUDispatcher
    import sorting
    from sorting.config import CONFIG_DIR, load_sorter
    from sorting.twin.faults import FaultSpec, inject
    from sorting.io import read_belt_recording
    from sorting.stages.inference import load_model
    from sorting.realtime.runner import build_pipeline, run_loop, timing_of
    from sorting.realtime.sources import replay

    kernels = all_kernels()
    assert kernels, "the loop's compiled kernels were not found"
    rec = read_belt_recording(Path(sys.argv[1]))
    timing = timing_of(rec.meta)
    ref = load_sorter(CONFIG_DIR / "sorter_reference.yaml")
    sorter = dataclasses.replace(ref, sorting=dataclasses.replace(ref.sorting, threshold=0.5))

    def pipe():
        return build_pipeline(rec.calibration, load_model(sys.argv[2]), sorter, timing, "sorter", 32)

    faults = [FaultSpec("stuck_module", 900, 200, col0=600, n_cols=64), FaultSpec("saturated", 2000, 40),
              FaultSpec("dark", 3000, 60)]
    streams = {
        # odd chunks: chunks also end off the air tracker's epochs and mid-particle
        "replayed": lambda p: replay(rec.lines, timing.line_rate_hz, 37, False),
        "copied": lambda p: ((f, raw.copy(), t) for f, raw, t in replay(rec.lines, timing.line_rate_hz, 32, False)),
        "faulty": lambda p: inject(replay(rec.lines, timing.line_rate_hz, 32, False), faults, p.cal),
    }
    # run_loop's start-up makes a (disabled) progress bar, whose first use imports a lock
    # module: before the first line, not on the belt
    from tqdm import tqdm
    tqdm(disable=True).close()
    for name, stream in streams.items():
        p = pipe()
        before = {k: len(d.signatures) for k, d in kernels.items()}
        modules = set(sys.modules)
        out = run_loop(stream(p), p, keep_events=False)
        assert out.summary["particles"] > 50, (name, out.summary["particles"])
        grew = {k: (before[k], len(d.signatures)) for k, d in kernels.items() if len(d.signatures) != before[k]}
        assert not grew, (name, "compiled on the belt", grew)
        new = sorted(set(sys.modules) - modules)
        assert not new, (name, "imported on the belt", new[:10])
        if name.endswith("faulty"):
            assert out.summary["alarms"]["stuck_module"] >= 1 and out.summary["alarms"]["dark"] >= 1, out.summary
        if len(sys.argv) > 3 and name == "replayed":  # a belt with splices, tramp steel and a slab
            assert out.summary["splices"] >= 1 and out.summary["tramp"] >= 1, out.summary
    print("ok", len(kernels), "kernels")
''')


def test_no_compilation_or_import_on_the_belt(small_belt, small_model):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(small_belt), str(small_model)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_no_compilation_on_a_belt_with_splices_tramp_and_slabs(objects_belt, small_model):
    """The splice and tramp paths run only where such objects pass: their kernels too are
    ready before the first line."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(objects_belt), str(small_model), "objects"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


WORKER_SCRIPT = FIND_KERNELS + textwrap.dedent('''
    import dataclasses, importlib, os, pkgutil, sys
    from pathlib import Path
    from numba.core.registry import CPUDispatcher
    import sorting
    from sorting.config import CONFIG_DIR, load_sorter
    from sorting.io import read_belt_recording
    from sorting.stages.inference import load_model
    from sorting.realtime.parallel import queue_chunks, run_parallel
    from sorting.realtime.runner import build_pipeline, timing_of
    from sorting.realtime.sources import replay
    from sorting.realtime.stream import Pipeline
    from sorting.twin.faults import FaultSpec, inject

    kernels = all_kernels()
    parent = os.getpid()
    real_serve, real_classify = Pipeline.serve_features, Pipeline.classify
    state = {"warm": False, "calls": 0}

    def serve(self, model):
        real_serve(self, model)
        state["warm"] = True  # from here on, nothing may compile or import

    def classify(self, request):
        if os.getpid() == parent or not state["warm"]:
            return real_classify(self, request)
        before = {k: len(d.signatures) for k, d in kernels.items()}
        modules = set(sys.modules)
        out = real_classify(self, request)
        grew = {k: (before[k], len(d.signatures)) for k, d in kernels.items() if len(d.signatures) != before[k]}
        new = sorted(set(sys.modules) - modules)
        if grew or new:
            raise AssertionError(f"a feature worker compiled {grew} / imported {new[:10]} on the belt")
        return out

    Pipeline.serve_features, Pipeline.classify = serve, classify
    rec = read_belt_recording(Path(sys.argv[1]))
    timing = timing_of(rec.meta)
    ref = load_sorter(CONFIG_DIR / "sorter_reference.yaml")
    sorter = dataclasses.replace(ref, sorting=dataclasses.replace(ref.sorting, threshold=0.5))
    pipe = build_pipeline(rec.calibration, load_model(sys.argv[2]), sorter, timing, "sorter", 32,
                          queue_chunks=queue_chunks(2))
    faults = [FaultSpec("stuck_module", 900, 200, col0=600, n_cols=64), FaultSpec("saturated", 2000, 40)]
    out = run_parallel(inject(replay(rec.lines, timing.line_rate_hz, 32, False), faults, pipe.cal), pipe,
                       sys.argv[2], 2, keep_events=False)
    s = out.summary
    assert s["worker_chunks"][0] > 20, s
    if len(sys.argv) > 3:
        assert s["tramp"] >= 1, s
    print("ok", s["worker_chunks"][0], "chunks in the worker")
''')


def test_a_feature_worker_compiles_nothing_on_the_belt(small_belt, small_model):
    """A feature worker is warmed up with the types it meets on the belt (its read-only view
    of the ring, boxes and masks out of a pipe): none of its chunks compiles or imports."""
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(small_belt), str(small_model)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_a_feature_worker_compiles_nothing_on_a_belt_with_tramp(objects_belt, small_model):
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(objects_belt), str(small_model), "objects"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout
