"""`sorting demo`: a belt of Crater Lake ore, simulated and sorted by the shipped model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sorting.cli.options import parameters
from sorting.config import load_machine, load_ore, load_sorter
from sorting.errors import InputError
from sorting.resources import SHIPPED_MODEL, shipped_config

#: compiled kernels that every run of the loop uses (module, name): if any has no cached machine
#: code, the first run compiles them all
LOOP_KERNELS = (("sorting.stages.normalize", "_above_dark"), ("sorting.stages.stitch_kernels", "track_chunk"),
                ("sorting.stages.features_kernel", "particles"), ("sorting.stages.linepass", "line_pass"),
                ("sorting.realtime.health", "_screen_samples"))


def kernels_cached() -> bool | None:
    """True when the loop's compiled kernels are in numba's on-disk cache (a fast start), False
    when some are not (the first run compiles them, ~20 s), None when it cannot tell. Reads the
    cache index files only: nothing is compiled."""
    import importlib

    seen = 0
    try:
        for module, name in LOOP_KERNELS:
            kernel = getattr(importlib.import_module(module), name, None)
            index = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
            if index is None:
                continue
            seen += 1
            if not index._load_index():  # {} when missing or stale (another source or numba version)
                return False
    except Exception:  # noqa: BLE001 - numba's cache internals may change: then we just cannot tell
        return None
    return True if seen else None


def compile_notice() -> str | None:
    """The line to print before the loop's first run, or None when the kernels are cached."""
    cached = kernels_cached()
    if cached:
        return None
    if cached is None:
        return "the first run after installing compiles the loop's kernels (~20 s); later runs start at once"
    return "compiling the loop's kernels once (~20 s; they are cached on disk for the next runs)"


def label_position(e: dict, l0: int, l1: int, pixels: int, room_px: int = 40, room_lines: int = 20):
    """Where a rock's score label goes, inside the stretch [l0, l1) x [0, pixels): right of the
    rock at its first line, or left of it near the right edge (on it, for a rock as wide as the
    belt), and pulled down into the stretch for a rock cut by its top, with the text above the
    anchor near the bottom. ``room_px`` / ``room_lines``: the room a label takes. Returns
    (x, y, ha, va) for matplotlib's ``text``."""
    if e["x_max_px"] + 2 + room_px <= pixels:
        x, ha = e["x_max_px"] + 2, "left"
    elif e["x_min_px"] - 2 - room_px >= 0:
        x, ha = e["x_min_px"] - 2, "right"
    else:  # as wide as the belt: on the rock itself
        x, ha = e["x_min_px"], "left"
    y = min(max(e["first_line"], l0), l1 - 1)
    va = "top" if y + room_lines <= l1 else "bottom"
    return x, y, ha, va


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
    fig, ax = plt.subplots(figsize=(12.8, 12 * (l1 - l0) / rec.pixels + 1))
    im = ax.imshow(a[..., 1], cmap="gray_r", vmin=0, vmax=4, aspect="auto",
                   extent=(-0.5, rec.pixels - 0.5, l1 - 0.5, l0 - 0.5))
    bar = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, extend="max")
    bar.set_label("high-energy attenuation A_high = ln(I_air / I) (dimensionless; 0 = empty belt)")
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
        x, y, ha, va = label_position(e, l0, l1, rec.pixels)
        ax.text(x, y, f"{e['score']:.2f}", color=colour, fontsize=6, ha=ha, va=va, clip_on=True)
    ax.set_xlim(-0.5, rec.pixels - 0.5)
    ax.set_ylim(l1 - 0.5, l0 - 0.5)
    pitch = rec.pixel_pitch_mm
    ax.set_xlabel(f"detector column (pixel, {pitch:g} mm)")
    ax.set_ylabel(f"line (belt travel, {rec.line_pitch_mm:.3g} mm per line)")
    ax.set_title(f"Lines {l0}-{l1}: red = eject (Sc-bearing), green = pass, orange = late; "
                 "numbers = score P(sc)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cli_demo(args) -> int:
    from sorting.cli.run import format_summary, stop_if_interrupted
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
        raise InputError(model_path, "the shipped model is missing (a source checkout rebuilds it: models/rebuild.sh)")
    model = load_model(model_path)  # a wrong model fails before the simulation, not after
    out: Path = args.out
    rec_dir = out / "recording"
    if rec_dir.exists():
        shutil.rmtree(rec_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/3 simulating {args.seconds:g} s of Crater Lake ore on the reference belt (seed {args.seed})")
    with parameters():
        simulate_belt(rec_dir, args.seconds, args.seed, load_machine(), load_ore(), load_materials(), occupancy=0.3,
                      touching=0.05)
    rec = read_belt_recording(rec_dir)
    sorter_path = shipped_config("sorter_reference.yaml")
    sorter = load_sorter(sorter_path)
    timing = timing_of(rec.meta)

    notice = compile_notice()
    if notice:
        print(notice, flush=True)
    print("2/3 sorting as fast as possible (throughput)")
    prefault(rec.lines)  # the recording was just written: read it once, so the run measures the loop
    fast = run_loop(replay(rec.lines, timing.line_rate_hz, 32, False),
                    build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path)),
                    keep_events=False, total_lines=rec.n_lines, progress=True)
    stop_if_interrupted(fast.summary)
    print("3/3 sorting paced at the line rate (latency), as on the sorter")
    pipeline = build_pipeline(rec.calibration, model, sorter, timing, str(sorter_path), shed_late=True)
    events_path = out / "events.jsonl"
    paced = run_loop(replay(rec.lines, timing.line_rate_hz, 32, True), pipeline, EventLog(events_path),
                     total_lines=rec.n_lines, progress=True)
    summary = stop_if_interrupted(paced.summary)
    summary["throughput_lines_s"] = fast.summary["throughput_lines_s"]
    summary["realtime_factor"] = fast.summary["realtime_factor"]
    summary["wall_s"] = fast.summary["wall_s"]
    logged = [e.to_json() for e in paced.events]  # the events as the log holds them
    detection = match_particles(logged, rec.truth)
    outcome = jets_outcome(logged, rec.truth, sorter, timing)
    summary["detection"], summary["outcome"] = detection, outcome
    plot = out / "belt.png"
    _plot_stretch(plot, rec, pipeline.cal, logged)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print()
    print(f"Sorting report: {rec.meta.get('rocks')} rocks, {args.seconds:g} s of belt, model {Path(model_path).name} "
          f"(operating point P(sc) >= {pipeline.threshold:.3f})")
    print(format_summary(summary, outcome, detection))
    print(f"wrote {events_path}, {plot}, {out / 'summary.json'}")
    return 0
