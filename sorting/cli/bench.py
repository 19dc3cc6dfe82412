"""`sorting bench`: throughput and latency against the sorter's timing (docs/cli.md).

One run measures, on the same recording: the floor (normalizing the lines and nothing
else), the whole pipeline unpaced (throughput), and the pipeline paced at the line rate
(latency from a particle's last line to its decision, late count, CPU fraction).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorting.config import load_machine, load_ore, load_sorter
from sorting.errors import InputError
from sorting.io import check_output_file
from sorting.resources import SHIPPED_MODEL, shipped_config

if TYPE_CHECKING:
    from sorting.realtime.events import Event


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


#: what the loop is held to (docs/performance.md): throughput on one core, paced p99.9 latency,
#: and the particle-parallel speed-up of 2 processes over one
TARGET_REALTIME_FACTOR = 10.0
TARGET_P999_MS = 15.0
TARGET_WORKERS_SPEEDUP = 1.8
#: event keys that depend on the wall clock: left out where the events of two runs are compared
WALL_CLOCK_KEYS = ("latency_ms", "slack_ms", "late")
#: rock lengths (along the belt) the budget is reported for: a small and the largest Crater Lake rock
BUDGET_ROCKS_MM = (10.0, 100.0)


def budget_ms(sorter, belt_speed_m_s: float, length_mm: float) -> float:
    """Milliseconds from a rock's last scanned line to the moment its valve command must leave:
    ``(distance_mm - margin_mm - length_mm) / belt_speed_m_s - response_ms``."""
    e = sorter.ejector
    return (e.distance_mm - e.margin_mm - length_mm) / belt_speed_m_s - e.response_ms


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _latency_text(p: dict) -> str:
    lat = p["latency_ms"]
    return f"p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p999']:.2f} ms, late {p['late']}"


def same_events(a: list[Event], b: list[Event]) -> bool:
    """Whether two runs' events are equal apart from the wall-clock keys (``WALL_CLOCK_KEYS``)."""
    def logged(e: Event) -> dict:
        return {k: v for k, v in e.to_json().items() if k not in WALL_CLOCK_KEYS}

    return len(a) == len(b) and all(logged(x) == logged(y) for x, y in zip(a, b))


def format_bench(r: dict) -> list[str]:
    """A short human reading of a bench result against the sorter's timing."""
    f = r["line_rate_hz"]
    lines = [f"recording: {r['lines']} lines ({r['stream_s']:.2f} s of belt), {r['pixels']} px at {f:g} lines/s, "
             f"{r['particles']} particles, {r['chunk_lines']}-line chunks",
             f"throughput, unpaced, one core: {r['throughput_lines_s']:.0f} lines/s = {r['realtime_factor']:.2f}x the "
             f"line rate (1x = keeping up: {'yes' if r['realtime_factor'] >= 1 else 'NO'}; "
             f"target {TARGET_REALTIME_FACTOR:g}x: {_verdict(r['realtime_factor'] >= TARGET_REALTIME_FACTOR)}); "
             f"runs {' / '.join(f'{x:.2f}' for x in sorted(r['realtime_factor_runs']))}x",
             f"floor (normalizing only): {r['floor_realtime_factor']:.0f}x; the loop runs at "
             f"{r['pipeline_over_floor']:.3f} of it"]
    b = r.get("budget_ms") or {}
    if "latency_ms" in r:
        lat = r["latency_ms"]
        lines.append(f"latency, paced, last line -> decision: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
                     f"p99.9 {lat['p999']:.2f}  max {lat['max']:.2f} ms (target p99.9 <= {TARGET_P999_MS:g} ms: "
                     f"{_verdict(lat['p999'] <= TARGET_P999_MS)})")
        if b:
            rocks = [f"{v:.0f} ms for a {k.split('_')[1].replace('mm', ' mm')} rock" for k, v in b.items()]
            lines.append(f"deadline: {', '.join(rocks)}; max latency {lat['max']:.1f} ms uses "
                         f"{100 * lat['max'] / min(b.values()):.0f} % of the shortest")
        lines.append(f"late: {r['late']} ({r['late_ejects']} late ejects, {r['undecided']} left undecided); "
                     f"CPU {r['cpu_fraction']:.2f} of stream time")
    if "dense" in r:
        d = r["dense"]
        lines.append(f"twice the occupancy ({d['occupancy']:.2f} laid), paced: p99.9 {d['latency_ms']['p999']:.2f} ms, "
                     f"late {d['late']}, CPU {d['cpu_fraction']:.2f}")
    if "workers" in r:
        w = r["workers"]
        speedup = w["speedup_over_one_worker"]
        target = (f" (target {TARGET_WORKERS_SPEEDUP:g}x for 2: {_verdict(speedup >= TARGET_WORKERS_SPEEDUP)})"
                  if w["count"] == 2 else "")
        lines.append(f"workers: {w['count']} processes (particle-parallel), unpaced {w['realtime_factor']:.2f}x the "
                     f"line rate = {speedup:.2f}x one worker{target}; CPU {w['cpu_s']:.2f} s (one worker "
                     f"{w['one_worker_cpu_s']:.2f} s); events equal one worker's: "
                     f"{'yes' if w['events_equal_one_worker'] else 'NO'}")
        if "paced" in w:
            p, one = w["paced"], w["one_worker_paced"]
            lines.append(f"workers, paced: {_latency_text(p)} (one worker: {_latency_text(one)})")
    if "save_crops" in r:
        c = r["save_crops"]
        lines.append(f"paced, every particle's crop saved: p99.9 {c['latency_ms']['p999']:.2f} ms, late {c['late']}, "
                     f"CPU {c['cpu_fraction']:.2f}; crops written {c['written']}, dropped {c['dropped']}, "
                     f"skipped {c['crops_skipped']}")
    lines.append(f"peak memory {r['peak_rss_mb']:.0f} MiB; machine: {r['machine']}")
    return lines


def floor_throughput(lines: np.ndarray, cal, chunk_lines: int) -> float:
    """Lines per second for normalizing both channels and nothing else (preallocated buffers)."""
    from sorting.stages.normalize import attenuation

    out = np.empty((chunk_lines, lines.shape[1], 2), np.float32)
    n = lines.shape[0]
    t0 = time.perf_counter()
    for first in range(0, n, chunk_lines):
        chunk = lines[first:first + chunk_lines]
        attenuation(chunk, cal, 0, out=out[:chunk.shape[0]])
    return n / (time.perf_counter() - t0)


def run_bench(recording: Path, model_path: Path, sorter_path: Path, chunk_lines: int = 32,
              paced: bool = True, progress: bool = True, workers: int = 2, repeats: int = 3) -> dict:
    """Floor and unpaced pipeline ``repeats`` times each (a shared machine's speed wanders:
    the median run is reported, every run listed), then one paced run and the --workers runs."""
    from sorting.cli.run import stop_if_interrupted
    from sorting.io import read_belt_recording
    from sorting.realtime.runner import build_pipeline, run_loop, timing_of
    from sorting.realtime.sources import prefault, replay
    from sorting.stages.inference import load_model

    rec = read_belt_recording(recording)
    model = load_model(model_path)
    sorter = load_sorter(sorter_path)
    timing = timing_of(rec.meta)
    prefault(rec.lines)  # no run measures the disk or first-touch faults
    runs = []
    one_events: list[Event] = []  # the first run's, to compare with the --workers runs'
    for i in range(max(repeats, 1)):
        pipe = build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path), chunk_lines)
        floor = floor_throughput(rec.lines, pipe.cal, chunk_lines)
        fast = run_loop(replay(rec.lines, timing.line_rate_hz, chunk_lines, False), pipe,
                        keep_events=i == 0 and workers > 1, total_lines=rec.n_lines, progress=progress)
        if i == 0:
            one_events = fast.events
        stop_if_interrupted(fast.summary)
        stages = {k: round(v * 1000.0 / max(pipe.counters.chunks, 1), 4) for k, v in pipe.stage_s.items()}
        per_particle_us = {k: round(pipe.stage_s[k] * 1e6 / max(pipe.counters.particles, 1), 1)
                           for k in ("features", "classify", "decide")}
        runs.append((fast.summary["throughput_lines_s"], floor, fast.summary, stages, per_particle_us))
        del pipe  # one ring buffer at a time
    order = sorted(range(len(runs)), key=lambda i: runs[i][0])
    # the median run (the lower middle of an even count), with its own stage times
    throughput, floor, s, stages, per_particle_us = runs[order[len(order) // 2]]
    floors = sorted(r[1] for r in runs)
    floor = floors[len(floors) // 2]
    result = {
        "machine": machine_description(),
        "line_rate_hz": timing.line_rate_hz,
        "pixels": timing.pixels,
        "lines": rec.n_lines,
        "stream_s": rec.n_lines / timing.line_rate_hz,
        "particles": s["particles"],
        "rocks_truth": len(rec.truth) if rec.truth else None,
        "occupancy": rec.meta.get("occupancy"),
        "chunk_lines": chunk_lines,
        "throughput_lines_s": throughput,
        "realtime_factor": throughput / timing.line_rate_hz,
        "realtime_factor_runs": [round(r[0] / timing.line_rate_hz, 3) for r in runs],
        "floor_throughput_lines_s": floor,
        "floor_realtime_factor": floor / timing.line_rate_hz,
        "floor_realtime_factor_runs": [round(r[1] / timing.line_rate_hz, 2) for r in runs],
        "pipeline_over_floor": throughput / floor,
        "stage_ms_per_chunk": stages,
        "stage_us_per_particle": per_particle_us,
        # the time the loop has from a rock's last line to its valve command (docs/performance.md)
        "budget_ms": {f"rock_{int(mm)}mm": round(budget_ms(sorter, timing.belt_speed_m_s, mm), 2)
                      for mm in BUDGET_ROCKS_MM},
    }
    if paced:
        result.update(paced_run(recording, model, sorter, sorter_path, chunk_lines, progress))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if workers > 1:
        w = workers_run(recording, model_path, sorter_path, workers, chunk_lines, repeats, throughput, one_events)
        w["one_worker_cpu_s"] = round(s["cpu_s"], 4)  # the median one-worker run's
        if paced:
            w["paced"] = paced_workers_run(recording, model_path, sorter_path, workers, chunk_lines)
            w["one_worker_paced"] = {k: result[k] for k in ("latency_ms", "late", "late_ejects", "undecided",
                                                            "cpu_fraction")}
        result["workers"] = w
    return result


def workers_run(recording: Path, model_path: Path, sorter_path: Path, workers: int, chunk_lines: int,
                repeats: int, one_worker_lines_s: float, one_worker_events: list[Event]) -> dict:
    """``workers`` processes (the loop and feature workers) unpaced, ``repeats`` times; the
    median run against one worker's median throughput, and the first run's events against
    ``one_worker_events`` (one worker's, on the same recording)."""
    from sorting.cli.run import stop_if_interrupted
    from sorting.realtime.parallel import run_recording

    runs = []
    equal = True
    for i in range(max(repeats, 1)):
        res = run_recording(recording, model_path, sorter_path, workers, chunk_lines, keep_events=i == 0)
        runs.append(stop_if_interrupted(res.summary))
        if i == 0:
            equal = same_events(res.events, one_worker_events)
    runs.sort(key=lambda r: r["throughput_lines_s"])
    m = runs[len(runs) // 2]
    return {
        "mode": "particle-parallel",
        "count": workers,
        "throughput_lines_s": m["throughput_lines_s"],
        "realtime_factor": m["realtime_factor"],
        "realtime_factor_runs": [round(r["realtime_factor"], 3) for r in runs],
        "speedup_over_one_worker": m["throughput_lines_s"] / one_worker_lines_s,
        "events_equal_one_worker": equal,
        "particles": m["particles"],
        # where the time goes (median run): the loop's and each feature worker's CPU seconds
        # from the start of the stream, and the chunks each classified
        "cpu_s": round(m["cpu_s"], 4),
        "loop_cpu_s": round(m["loop_cpu_s"], 4),
        "worker_cpu_s": [round(x, 4) for x in m["worker_cpu_s"]],
        "worker_chunks": m["worker_chunks"],
        "local_chunks": m["local_chunks"],
    }


def paced_workers_run(recording: Path, model_path: Path, sorter_path: Path, workers: int, chunk_lines: int) -> dict:
    """``workers`` processes paced at the line rate (overload protection on, as live): the
    paced keys of :func:`paced_run`, CPU of all processes."""
    from sorting.cli.run import stop_if_interrupted
    from sorting.realtime.events import missed_deadlines
    from sorting.realtime.parallel import run_recording

    p = stop_if_interrupted(run_recording(recording, model_path, sorter_path, workers, chunk_lines, realtime=True,
                                          keep_events=False).summary)
    return {"paced_particles": p["particles"], "latency_ms": p["latency_ms"],
            "late": missed_deadlines(p["late_ejects"], p["undecided"]),
            "late_ejects": p["late_ejects"], "undecided": p["undecided"], "cpu_fraction": p["cpu_fraction"],
            "intake_lag_ms": p["intake_lag_ms"], "step_ms": p["step_ms"]}


def paced_run(recording: Path, model, sorter, sorter_path: Path, chunk_lines: int, progress: bool = True,
              save_crops: Path | None = None) -> dict:
    """The pipeline fed at the line rate (wall clock), with overload protection on: latency
    percentiles from a particle's last line to its decision, late count, CPU fraction.
    ``save_crops``: with every decided particle's crop saved there (``sorting run --save-crops``,
    never waiting for the writer); the saver's counts come back under ``save_crops``."""
    from sorting.cli.run import stop_if_interrupted
    from sorting.io import read_belt_recording
    from sorting.realtime.events import missed_deadlines
    from sorting.realtime.runner import build_pipeline, run_loop, timing_of
    from sorting.realtime.sources import prefault, replay

    rec = read_belt_recording(recording)
    timing = timing_of(rec.meta)
    prefault(rec.lines)
    pipe = build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path), chunk_lines, shed_late=True)
    saver = None
    if save_crops is not None:
        from sorting.realtime.crops import start_saving

        saver = start_saving(pipe, save_crops, rec.calibration, 1)
    try:
        slow = run_loop(replay(rec.lines, timing.line_rate_hz, chunk_lines, True), pipe, keep_events=False,
                        total_lines=rec.n_lines, progress=progress)
    finally:
        crops = saver.close() if saver is not None else None
    p = stop_if_interrupted(slow.summary)
    extra = {} if crops is None else {"save_crops": crops}
    return {**extra,
        "paced_particles": p["particles"],
        "latency_ms": p["latency_ms"],
        # every particle whose deadline was missed: late ejects and particles left undecided
        "late": missed_deadlines(p["late_ejects"], p["undecided"]),
        "late_ejects": p["late_ejects"],
        "undecided": p["undecided"],
        "cpu_fraction": p["cpu_fraction"],
        # latency = intake lag + the wait for the chunk to fill + the step: a slow wake-up of
        # the process (scheduling, a shared machine) shows in the first, the pipeline in the last
        "intake_lag_ms": p["intake_lag_ms"],
        "step_ms": p["step_ms"],
    }


def cli_bench(args) -> int:
    from sorting.physics import load_materials
    from sorting.twin import simulate_belt

    model = args.model or SHIPPED_MODEL
    if args.model is None and not Path(model).is_file():
        raise InputError(model, "the shipped model is missing (a source checkout rebuilds it: models/rebuild.sh)")
    sorter = args.sorter or shipped_config("sorter_reference.yaml")
    # bad inputs fail before seconds of simulation, not after
    from sorting.cli.options import option, parameters
    from sorting.realtime.runner import check_chunk_lines
    from sorting.stages.inference import load_model

    load_model(model)
    load_sorter(sorter)
    with option("--chunk-lines"):
        check_chunk_lines(args.chunk_lines)
    if args.workers > 1:
        from sorting.realtime.parallel import check_workers

        with option("--workers"):
            check_workers(args.workers)
    if args.repeats < 1:
        raise InputError("--repeats", f"must be at least 1, got {args.repeats}")
    if args.json:
        check_output_file(args.json, "--json")
    with tempfile.TemporaryDirectory(prefix="sorting_bench_") as tmp:
        recording = args.recording
        if recording is None:
            recording = Path(tmp) / "belt"
            print(f"simulating {args.seconds:g} s of reference belt at {args.occupancy:.0%} occupancy "
                  f"(seed {args.seed})")
            with parameters():
                simulate_belt(recording, args.seconds, args.seed, load_machine(args.machine), load_ore(),
                              load_materials(), occupancy=args.occupancy, progress=not args.quiet)
        result = run_bench(recording, Path(model), Path(sorter), args.chunk_lines, paced=not args.no_paced,
                           progress=not args.quiet, workers=args.workers, repeats=args.repeats)
        if args.save_crops:
            # the paced run again, every decided particle's crop saved (sorting run --save-crops)
            print("paced run with every particle's crop saved")
            sc = paced_run(recording, load_model(model), load_sorter(sorter), Path(sorter), args.chunk_lines,
                           not args.quiet, save_crops=Path(tmp) / "crops")
            crops = sc.pop("save_crops")
            result["save_crops"] = {"late": sc["late"], "latency_ms": sc["latency_ms"],
                                    "cpu_fraction": sc["cpu_fraction"],
                                    "written": crops["written"], "dropped": crops["dropped"],
                                    "crops_skipped": crops["crops_skipped"], "skipped": crops["skipped"],
                                    "paced_particles": sc["paced_particles"]}
        if args.recording is None and args.dense_seconds > 0 and not args.no_paced:
            # the same loop paced on the same kind of feed at twice the nominal occupancy (the
            # twin lays at most ~0.47 of the belt: the realised share is reported, not the asked one)
            target = min(2.0 * args.occupancy, 0.79)
            dense = Path(tmp) / "dense"
            print(f"simulating {args.dense_seconds:g} s of belt at {target:.0%} occupancy asked (seed {args.seed + 1})")
            with option("--dense-seconds"):
                simulate_belt(dense, args.dense_seconds, args.seed + 1, load_machine(args.machine), load_ore(),
                              load_materials(), occupancy=target, progress=not args.quiet)
            from sorting.io import read_belt_recording

            meta = read_belt_recording(dense).meta
            result["dense"] = {"occupancy_asked": target, "occupancy": meta.get("occupancy"),
                               "stream_s": args.dense_seconds, "rocks_truth": meta.get("rocks"),
                               **paced_run(dense, load_model(model), load_sorter(sorter), Path(sorter),
                                           args.chunk_lines, not args.quiet)}
    print("\n".join(format_bench(result)))
    if args.json:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise InputError("--json", f"{args.json}: cannot write ({exc.strerror})") from None
        print(f"every number: {args.json}")
    return 0
