"""Scaling of the sorting loop: belt width, belt speed, occupancy and chunk size.

    python benchmarks/bench_scaling.py --out out/scaling [--seconds 2] [--quick]

For each point a short belt is simulated with the reference machine changed in one
parameter, then sorted unpaced (throughput, real-time factor against that belt's own line
rate) and, for the chunk-size sweep, also paced (latency). Writes ``scaling.json`` and one
PNG per sweep into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sorting.cli.bench import machine_description  # noqa: E402
from sorting.cli.demo import SHIPPED_MODEL  # noqa: E402
from sorting.config import CONFIG_DIR, load_machine, load_ore, load_sorter  # noqa: E402
from sorting.io import read_belt_recording  # noqa: E402
from sorting.physics import load_materials  # noqa: E402
from sorting.realtime.events import missed_deadlines  # noqa: E402
from sorting.realtime.runner import build_pipeline, run_loop, timing_of  # noqa: E402
from sorting.realtime.sources import replay  # noqa: E402
from sorting.stages.inference import load_model
from sorting.twin import simulate_belt  # noqa: E402


def _point(tmp: Path, name: str, machine, occupancy: float, seconds: float, chunk: int, paced: bool) -> dict:
    rec_dir = tmp / name
    simulate_belt(rec_dir, seconds, 3, machine, load_ore(), load_materials(), occupancy=occupancy, progress=False)
    rec = read_belt_recording(rec_dir)
    timing = timing_of(rec.meta)
    sorter = load_sorter(CONFIG_DIR / "sorter_reference.yaml")
    # valves across the whole belt, at the reference pitch
    valves = int(-(-machine.belt_width_mm // sorter.ejector.valve_pitch_mm))
    sorter = dataclasses.replace(sorter, ejector=dataclasses.replace(sorter.ejector, valves=valves))
    model = load_model(SHIPPED_MODEL)
    pipe = build_pipeline(rec.calibration, model, sorter, timing, "sorter", chunk)
    fast = run_loop(replay(rec.lines, timing.line_rate_hz, chunk, False), pipe, keep_events=False).summary
    out = {
        "name": name, "pixels": timing.pixels, "belt_width_m": machine.belt_width_mm / 1000,
        "belt_speed_m_s": timing.belt_speed_m_s, "line_rate_hz": timing.line_rate_hz,
        "occupancy": rec.meta.get("occupancy"), "chunk_lines": chunk, "particles": fast["particles"],
        "particles_per_s": fast["particles"] / fast["stream_s"],
        "throughput_lines_s": fast["throughput_lines_s"], "realtime_factor": fast["realtime_factor"],
        "stage_ms_per_chunk": {k: v * 1000 / max(pipe.counters.chunks, 1) for k, v in pipe.stage_s.items()},
    }
    if paced:
        pipe = build_pipeline(rec.calibration, model, sorter, timing, "sorter", chunk)
        slow = run_loop(replay(rec.lines, timing.line_rate_hz, chunk, True), pipe, keep_events=False).summary
        # late as the bench counts it: every missed deadline (late ejects and undecided particles)
        out.update(latency_ms=slow["latency_ms"], late=missed_deadlines(slow["late_ejects"], slow["undecided"]),
                   cpu_fraction=slow["cpu_fraction"])
    print(json.dumps({k: out[k] for k in ("name", "realtime_factor", "particles_per_s")}), file=sys.stderr)
    return out


def _plot(points: list[dict], x: str, path: Path, xlabel: str, latency: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[x] for p in points]
    ax.plot(xs, [p["realtime_factor"] for p in points], "o-", label="real-time factor (unpaced)")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.axhline(10.0, color="r", lw=0.8, ls="--", label="10x target")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("throughput / line rate")
    if latency and all("latency_ms" in p for p in points):
        ax2 = ax.twinx()
        ax2.plot(xs, [p["latency_ms"]["p999"] for p in points], "s--", color="C1", label="p99.9 latency (paced)")
        ax2.set_ylabel("ms")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(path.stem.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/scaling"))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="fewer points")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ref = load_machine()
    widths = (0.5, 1.0, 2.4) if args.quick else (0.5, 1.0, 1.6, 2.4)
    speeds = (1.5, 3.0) if args.quick else (1.0, 2.0, 3.0, 4.0)
    occupancies = (0.05, 0.3, 0.5) if args.quick else (0.05, 0.15, 0.3, 0.5)
    chunks = (16, 32, 128) if args.quick else (16, 32, 64, 128)
    result = {"machine": machine_description(), "seconds": args.seconds, "sweeps": {}}
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        tmp = Path(tmp)
        sweeps = result["sweeps"]
        sweeps["belt_width"] = [
            _point(tmp, f"width_{w}", dataclasses.replace(ref, detector=dataclasses.replace(
                ref.detector, pixels=int(round(w * 1000 / ref.detector.pixel_pitch_mm)))), 0.3, args.seconds, 32, False)
            for w in widths]
        # faster belt, same 0.8 mm line pitch: the line rate follows the speed
        sweeps["belt_speed"] = [
            _point(tmp, f"speed_{v}", dataclasses.replace(ref, belt=dataclasses.replace(
                ref.belt, speed_m_s=v, line_rate_hz=v * 1000 / ref.line_pitch_mm)), 0.3, args.seconds, 32, False)
            for v in speeds]
        sweeps["occupancy"] = [_point(tmp, f"occupancy_{o}", ref, o, args.seconds, 32, False) for o in occupancies]
        sweeps["chunk_lines"] = [_point(tmp, f"chunk_{c}", ref, 0.3, args.seconds, c, True) for c in chunks]
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result["sweeps"]["belt_width"], "belt_width_m", args.out / "belt_width.png", "belt width (m)")
    _plot(result["sweeps"]["belt_speed"], "belt_speed_m_s", args.out / "belt_speed.png", "belt speed (m/s)")
    _plot(result["sweeps"]["occupancy"], "occupancy", args.out / "occupancy.png", "occupancy (area share)")
    _plot(result["sweeps"]["chunk_lines"], "chunk_lines", args.out / "chunk_lines.png", "chunk (lines)", True)
    print(f"wrote {args.out}/scaling.json and 4 plots")


if __name__ == "__main__":
    main()
