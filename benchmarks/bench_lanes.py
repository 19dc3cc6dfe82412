"""Lane-parallel speed-up against belt width: one worker against two lanes, same belt.

    python benchmarks/bench_lanes.py --out out/lanes [--seconds 4] [--repeats 3] [--workers 2]

For each width a belt is simulated on the reference machine with that many detector
pixels (30 % occupancy, valves across the whole belt), then sorted unpaced by the single
loop and by ``--workers`` lanes, alternately, ``--repeats`` times each; the median of each
is reported, and the two event logs are compared (wall-clock fields aside). As the
machine's own yardstick, ``--workers`` complete single loops are also run at once, each on
the whole belt (``two_loops``): how much of its solo speed each keeps when the cores are
shared. Writes ``lanes.json`` and ``lanes.png`` into ``--out``.

Every lane pays some costs in full whatever its width (per chunk: the ONNX call, the
stages' Python set-up, reading the chunk's lines from memory; per column: the overlap it
sees twice), so the speed-up grows with the belt's width.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sorting.cli.bench import machine_description  # noqa: E402
from sorting.cli.demo import SHIPPED_MODEL  # noqa: E402
from sorting.config import CONFIG_DIR, load_machine, load_ore, load_sorter, read_yaml  # noqa: E402
from sorting.io import read_belt_recording  # noqa: E402
from sorting.physics import load_materials  # noqa: E402
from sorting.realtime.lanes import run_lanes  # noqa: E402
from sorting.realtime.runner import build_pipeline, run_loop, timing_of  # noqa: E402
from sorting.realtime.sources import prefault, replay  # noqa: E402
from sorting.stages.inference import load_model
from sorting.twin import simulate_belt  # noqa: E402

WALL_CLOCK = ("latency_ms", "slack_ms", "late")


def _loop_job(rec_dir: Path, sorter_path: Path, results, go) -> None:
    rec = read_belt_recording(rec_dir)
    timing = timing_of(rec.meta)
    pipe = build_pipeline(rec.calibration, load_model(SHIPPED_MODEL), load_sorter(sorter_path), timing,
                          str(sorter_path))
    prefault(rec.lines)
    results.put("ready")
    go.wait()
    results.put(run_loop(replay(rec.lines, timing.line_rate_hz, 32), pipe, keep_events=False).summary["wall_s"])


def _loops_at_once(rec_dir: Path, sorter_path: Path, n: int) -> list[float]:
    """Wall seconds of ``n`` complete single loops started together, one process each."""
    ctx = mp.get_context("fork")
    results, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_loop_job, args=(rec_dir, sorter_path, results, go)) for _ in range(n)]
    for p in procs:
        p.start()
    for _ in range(n):
        assert results.get(timeout=600) == "ready"
    go.set()
    walls = [results.get(timeout=600) for _ in range(n)]
    for p in procs:
        p.join()
    return walls


def _point(tmp: Path, width_m: float, seconds: float, repeats: int, workers: int) -> dict:
    ref = load_machine()
    machine = dataclasses.replace(ref, detector=dataclasses.replace(
        ref.detector, pixels=int(round(width_m * 1000 / ref.detector.pixel_pitch_mm))))
    rec_dir = tmp / f"width_{width_m}"
    simulate_belt(rec_dir, seconds, 3, machine, load_ore(), load_materials(), occupancy=0.3, progress=False)
    # the reference ejector, with valves across the whole belt
    sorter_data = read_yaml(CONFIG_DIR / "sorter_reference.yaml")
    sorter_data["ejector"]["valves"] = int(-(-machine.belt_width_mm // sorter_data["ejector"]["valve_pitch_mm"]))
    sorter_path = tmp / f"sorter_{width_m}.yaml"
    sorter_path.write_text(yaml.safe_dump(sorter_data))
    rec = read_belt_recording(rec_dir)
    timing = timing_of(rec.meta)
    model, sorter = load_model(SHIPPED_MODEL), load_sorter(sorter_path)
    prefault(rec.lines)
    one, many, solo, together = [], [], [], []
    for k in range(repeats):
        solo += _loops_at_once(rec_dir, sorter_path, 1)
        together.append(_loops_at_once(rec_dir, sorter_path, workers))
        pipe = build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path))
        single = run_loop(replay(rec.lines, timing.line_rate_hz, 32), pipe, keep_events=k == 0)
        lanes = run_lanes(rec_dir, SHIPPED_MODEL, sorter_path, workers)
        if k == 0:
            strip = lambda evs: [{f: v for f, v in e.items() if f not in WALL_CLOCK} for e in evs]  # noqa: E731
            same = strip(single.events) == strip(lanes.events)
        one.append(single.summary["realtime_factor"])
        many.append(lanes.summary)
    rt_one = statistics.median(one)
    mid = sorted(many, key=lambda s: s["realtime_factor"])[len(many) // 2]
    out = {
        "belt_width_m": width_m, "pixels": timing.pixels, "seconds": seconds, "particles": mid["particles"],
        "workers": workers, "lanes": mid["lanes"], "same_events": same,
        "single_realtime_factor": rt_one, "single_runs": [round(x, 3) for x in one],
        "lanes_realtime_factor": mid["realtime_factor"],
        "lanes_runs": [round(s["realtime_factor"], 3) for s in many],
        "speedup": mid["realtime_factor"] / rt_one,
        "lane_cpu_s": mid["lane_cpu_s"], "lane_wall_s": mid["lane_wall_s"], "merge_cpu_s": mid["merge_cpu_s"],
        "lane_stage_s": mid["lane_stage_s"],
        # each of `workers` whole single loops at once keeps this share of its solo speed
        "two_loops": {"solo_wall_s": solo, "together_wall_s": together,
                      "speed_kept": statistics.median(solo) / statistics.median(sum(together, []))},
    }
    print(json.dumps({k: out[k] for k in ("belt_width_m", "single_realtime_factor", "lanes_realtime_factor",
                                          "speedup", "same_events")} | {"speed_kept": out["two_loops"]["speed_kept"]}),
          file=sys.stderr)
    return out


def _plot(points: list[dict], path: Path, workers: int) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    w = [p["belt_width_m"] for p in points]
    ax.plot(w, [p["speedup"] for p in points], "o-", label=f"{workers} lanes / 1 worker (median)")
    for p in points:
        runs = [r / p["single_realtime_factor"] for r in p["lanes_runs"]]
        ax.plot([p["belt_width_m"]] * len(runs), runs, ".", color="0.6")
    ax.axhline(1.7, color="C3", ls="--", lw=1, label="target 1.7x")
    ax.axhline(workers, color="0.7", ls=":", lw=1, label=f"ideal {workers}x")
    ax.set_xlabel("belt width (m)")
    ax.set_ylabel("throughput speed-up")
    ax.set_ylim(1.0, workers + 0.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Lane-parallel speed-up, unpaced, 32-line chunks", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/lanes"))
    ap.add_argument("--seconds", type=float, default=4.0, help="belt seconds per width")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each mode per width")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 1.6, 2.4], help="belt widths (m)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_description(), "seconds": args.seconds, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="lanes_") as tmp:
        result["points"] = [_point(Path(tmp), w, args.seconds, args.repeats, args.workers) for w in args.widths]
    (args.out / "lanes.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result["points"], args.out / "lanes.png", args.workers)
    print(f"wrote {args.out / 'lanes.json'} and {args.out / 'lanes.png'}")


if __name__ == "__main__":
    main()
