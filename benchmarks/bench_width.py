"""Belt width against one worker and particle-parallel workers.

    python benchmarks/bench_width.py --out benchmarks/results [--seconds 8] [--repeats 3] [--workers 2]

For each belt width (1.0 / 1.6 / 2.4 m by default) the twin simulates a belt of the
reference machine widened at its own pixel pitch (0.8 mm: 1250 / 2000 / 3000 pixels) and
occupancy (30 %), with valves across the whole width at the reference pitch. Each belt is
then sorted unpaced with one worker and with ``--workers`` processes, ``--repeats`` times
each in alternating order (1-N, N-1, ...; a fresh pipeline each run, the lines read in full
before timing): real-time factor against the line rate, CPU seconds of all processes, the
speed-up of the workers over one worker (medians, every run listed), and whether the
workers' events equal one worker's (apart from the wall-clock keys). Then once each paced at
the line rate: latency p50 / p99 / p99.9 and late. Writes ``width.json`` and ``width.png``
into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sorting.cli.bench import machine_description, same_events  # noqa: E402
from sorting.config import load_machine, load_ore, load_sorter  # noqa: E402
from sorting.physics import load_materials  # noqa: E402
from sorting.realtime.events import missed_deadlines  # noqa: E402
from sorting.realtime.parallel import run_recording  # noqa: E402
from sorting.resources import SHIPPED_MODEL, shipped_config  # noqa: E402
from sorting.twin import simulate_belt  # noqa: E402


def _sorter_for(width_mm: float, folder: Path) -> Path:
    """The reference sorter YAML with valves across ``width_mm`` at its valve pitch."""
    ref = shipped_config("sorter_reference.yaml")
    doc = yaml.safe_load(Path(ref).read_text())
    pitch = load_sorter(ref).ejector.valve_pitch_mm
    doc["ejector"]["valves"] = int(-(-width_mm // pitch))
    path = folder / "sorter.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_sorter(path)  # a valid sorter
    return path


def _paced(summary: dict) -> dict:
    # late as the bench counts it: every missed deadline (late ejects and undecided particles)
    return {"latency_ms": summary["latency_ms"], "late": missed_deadlines(summary["late_ejects"], summary["undecided"]),
            "cpu_fraction": summary["cpu_fraction"]}


def _point(tmp: Path, width_m: float, args) -> dict:
    ref = load_machine()
    pixels = int(round(width_m * 1000 / ref.detector.pixel_pitch_mm))
    machine = dataclasses.replace(ref, detector=dataclasses.replace(ref.detector, pixels=pixels))
    folder = tmp / f"width_{width_m}"
    t0 = time.perf_counter()
    simulate_belt(folder / "belt", args.seconds, args.seed, machine, load_ore(), load_materials(),
                  occupancy=args.occupancy, progress=False)
    simulate_s = time.perf_counter() - t0
    belt, sorter = folder / "belt", _sorter_for(machine.belt_width_mm, folder)
    runs: dict[int, list[dict]] = {1: [], args.workers: []}
    events: dict[int, list] = {}
    for r in range(args.repeats):
        for n in ((1, args.workers) if r % 2 == 0 else (args.workers, 1)):
            res = run_recording(belt, SHIPPED_MODEL, sorter, n, 32, keep_events=n not in events)
            events.setdefault(n, res.events)
            runs[n].append(res.summary)
    one, many = runs[1], runs[args.workers]
    out = {
        "belt_width_m": width_m, "pixels": pixels, "line_rate_hz": one[0]["line_rate_hz"],
        "stream_s": one[0]["stream_s"], "particles": one[0]["particles"], "simulate_s": round(simulate_s, 1),
        "one_worker": {
            "realtime_factor": statistics.median(s["realtime_factor"] for s in one),
            "realtime_factor_runs": [round(s["realtime_factor"], 3) for s in one],
            "cpu_s": statistics.median(s["cpu_s"] for s in one),
            "cpu_s_runs": [round(s["cpu_s"], 3) for s in one],
        },
        "workers": {
            "count": args.workers,
            "realtime_factor": statistics.median(s["realtime_factor"] for s in many),
            "realtime_factor_runs": [round(s["realtime_factor"], 3) for s in many],
            "cpu_s": statistics.median(s["cpu_s"] for s in many),
            "cpu_s_runs": [round(s["cpu_s"], 3) for s in many],
            "loop_cpu_s_runs": [round(s["loop_cpu_s"], 3) for s in many],
            "local_chunks_runs": [s["local_chunks"] for s in many],
            # run by run in the alternating order: each workers run over the one-worker run beside it
            "speedup_runs": [round(b["throughput_lines_s"] / a["throughput_lines_s"], 3) for a, b in zip(one, many)],
            "events_equal_one_worker": same_events(events[args.workers], events[1]),
        },
    }
    out["workers"]["speedup_over_one_worker"] = out["workers"]["realtime_factor"] / out["one_worker"]["realtime_factor"]
    if not args.no_paced:
        out["one_worker"]["paced"] = _paced(run_recording(belt, SHIPPED_MODEL, sorter, 1, 32, realtime=True,
                                                          keep_events=False).summary)
        out["workers"]["paced"] = _paced(run_recording(belt, SHIPPED_MODEL, sorter, args.workers, 32, realtime=True,
                                                       keep_events=False).summary)
    print(json.dumps({"width_m": width_m, "one": out["one_worker"]["realtime_factor"],
                      "workers": out["workers"]["realtime_factor"],
                      "speedup": round(out["workers"]["speedup_over_one_worker"], 3)}), file=sys.stderr)
    return out


def _plot(points: list[dict], path: Path, workers: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["belt_width_m"] for p in points]
    ax.plot(xs, [p["one_worker"]["realtime_factor"] for p in points], "o-", label="one worker")
    ax.plot(xs, [p["workers"]["realtime_factor"] for p in points], "s-", label=f"{workers} processes")
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="keeping up")
    ax.set_xlabel("belt width (m), 0.8 mm pixels")
    ax.set_ylabel("real-time factor, unpaced (median)")
    for p in points:
        w = p["workers"]
        ax.annotate(f"{w['speedup_over_one_worker']:.2f}x", (p["belt_width_m"], w["realtime_factor"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("belt width: one worker and particle-parallel workers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 1.6, 2.4], help="belt widths, m")
    ap.add_argument("--seconds", type=float, default=8.0, help="belt seconds per width")
    ap.add_argument("--occupancy", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="unpaced runs of each mode per width")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-paced", action="store_true", help="skip the paced runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="width_") as tmp:
        points = [_point(Path(tmp), w, args) for w in args.widths]
    result = {"machine": machine_description(), "load_average_before": [round(x, 2) for x in load0],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "seconds": args.seconds,
              "occupancy_asked": args.occupancy, "seed": args.seed, "repeats": args.repeats,
              "wall_s": round(time.perf_counter() - t0, 1), "widths": points}
    (args.out / "width.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(points, args.out / "width.png", args.workers)
    print(f"wrote {args.out}/width.json and width.png")
    for p in points:
        o, w = p["one_worker"], p["workers"]
        paced = (f"; paced p99.9 {o['paced']['latency_ms']['p999']:.1f} / {w['paced']['latency_ms']['p999']:.1f} ms, "
                 f"late {o['paced']['late']} / {w['paced']['late']}" if "paced" in o else "")
        print(f"{p['belt_width_m']:.1f} m ({p['pixels']} px, {p['particles']} particles): one worker "
              f"{o['realtime_factor']:.2f}x, {w['count']} processes {w['realtime_factor']:.2f}x = "
              f"{w['speedup_over_one_worker']:.2f}x; CPU {o['cpu_s']:.2f} / {w['cpu_s']:.2f} s; events equal: "
              f"{w['events_equal_one_worker']}{paced}")


if __name__ == "__main__":
    main()
