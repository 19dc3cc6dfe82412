"""`sorting demo`: a belt of Crater Lake ore, simulated and sorted by the shipped model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sorting.config import CONFIG_DIR, load_machine, load_ore, load_sorter
from sorting.errors import InputError

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "crater_lake.onnx"


def _plot_stretch(path: Path, rec, cal, events: list[dict], lines: int = 1500) -> None:
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sorting.stages.normalize import attenuation
    from sorting.stages.segment import foreground

    # the stretch with the most particles
    starts = np.array([e["first_line"] for e in events]) if events else np.zeros(1)
    hist, edges = np.histogram(starts, bins=max(rec.n_lines // lines, 1), range=(0, rec.n_lines))
    l0 = int(edges[int(np.argmax(hist))])
    l1 = min(l0 + lines, rec.n_lines)
    a = attenuation(np.ascontiguousarray(rec.lines[l0:l1]), cal, 0)
    fg = foreground(a, cal, 0)
    fig, ax = plt.subplots(figsize=(12, 12 * (l1 - l0) / rec.pixels + 1))
    ax.imshow(a[..., 1], cmap="gray_r", vmin=0, vmax=4, aspect="auto",
              extent=(-0.5, rec.pixels - 0.5, l1 - 0.5, l0 - 0.5))
    colours = {"eject": "#d62728", "pass": "#2ca02c"}
    for e in events:
        if e["last_line"] < l0 or e["first_line"] >= l1:
            continue
        r0, r1 = max(e["first_line"], l0), min(e["last_line"], l1 - 1)
        box = fg[r0 - l0:r1 - l0 + 1, e["x_min_px"]:e["x_max_px"] + 1].astype(np.uint8)
        contours, _ = cv2.findContours(box, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        colour = colours[e["decision"]] if not e["late"] else "#ff7f0e"
        for c in contours:
            c = c[:, 0, :]
            ax.plot(np.r_[c[:, 0], c[0, 0]] + e["x_min_px"], np.r_[c[:, 1], c[0, 1]] + r0, color=colour, lw=1.2)
        ax.text(e["x_max_px"] + 2, e["first_line"], f"{e['score']:.2f}", color=colour, fontsize=6, va="top")
    ax.set_xlabel("detector column (pixel)")
    ax.set_ylabel("line (belt travel)")
    ax.set_title(f"A_high, lines {l0}-{l1}: red = eject (Sc-bearing), green = pass, orange = late")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cli_demo(args) -> int:
    from sorting.cli.run import format_summary
    from sorting.io import read_belt_recording
    from sorting.offline.outcome import jets_outcome, match_particles
    from sorting.physics import load_materials
    from sorting.realtime.runner import build_pipeline, run_loop, timing_of
    from sorting.realtime.sinks import EventLog
    from sorting.realtime.sources import prefault, replay
    from sorting.stages.inference import load_model
    from sorting.twin import simulate_belt

    model_path = args.model or SHIPPED_MODEL
    if args.model is None and not Path(model_path).is_file():
        raise InputError(model_path, "no model file; rebuild the shipped one with models/rebuild.sh")
    model = load_model(model_path)  # a wrong model fails before the simulation, not after
    out: Path = args.out
    rec_dir = out / "recording"
    if rec_dir.exists():
        shutil.rmtree(rec_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/3 simulating {args.seconds:g} s of Crater Lake ore on the reference belt (seed {args.seed})")
    simulate_belt(rec_dir, args.seconds, args.seed, load_machine(), load_ore(), load_materials(), occupancy=0.3,
                  touching=0.05)
    rec = read_belt_recording(rec_dir)
    sorter_path = CONFIG_DIR / "sorter_reference.yaml"
    sorter = load_sorter(sorter_path)
    timing = timing_of(rec.meta)

    print("2/3 sorting as fast as possible (throughput)")
    prefault(rec.lines)  # the recording was just written: read it once, so the run measures the loop
    fast = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False),
                    build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path)),
                    keep_events=False, total_lines=rec.n_lines, progress=True)
    print("3/3 sorting paced at the line rate (latency), as on the sorter")
    pipeline = build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path), shed_late=True)
    events_path = out / "events.jsonl"
    paced = run_loop(replay(rec.lines, timing.line_rate_hz, 32, True), pipeline, EventLog(events_path),
                     total_lines=rec.n_lines, progress=True)
    summary = paced.summary
    summary["throughput_lines_s"] = fast.summary["throughput_lines_s"]
    summary["realtime_factor"] = fast.summary["realtime_factor"]
    summary["wall_s"] = fast.summary["wall_s"]
    detection = match_particles(paced.events, rec.truth)
    outcome = jets_outcome(paced.events, rec.truth, sorter, timing)
    summary["detection"], summary["outcome"] = detection, outcome
    plot = out / "belt.png"
    _plot_stretch(plot, rec, pipeline.cal, paced.events)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print()
    print(f"Sorting report: {rec.meta.get('rocks')} rocks, {args.seconds:g} s of belt, model {Path(model_path).name} "
          f"(operating point P(sc) >= {pipeline.threshold:.3f})")
    print(format_summary(summary, outcome, detection))
    print(f"wrote {events_path}, {plot}, {out / 'summary.json'}")
    return 0
