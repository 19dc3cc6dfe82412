"""Drift: classification with and without the air tracker on drifted belts.

    python benchmarks/bench_drift.py --seconds 8 --drifts 0 -0.05 0.05 --out out/drift --json out/drift/drift.json

The twin simulates the same belt (same seed: the same rocks at the same places) once per
drift value; a drift d moves the air level linearly from the calibration's to ``1 + d``
(low channel; ``1 + 0.7 d`` high) at the end of the run. A real drift of a few percent takes
hours; the twin squeezes it into seconds, so the belt should be long against the tracker's
time constant (~0.34 s): it lags the drift by about rate x time constant (0.05 / 8 s x 0.34 s
= 0.2 % of the air level on 8 s of belt).

Each belt is sorted unpaced by the shipped model (``--model``) with the reference sorter,
with the air tracker on (the pipeline's default) and off (the air level frozen at the
calibration's: a tracker that may not move, ``max_step=0``). Per run: particles found vs
truth (outcome.match_particles), what the jets hit (outcome.jets_outcome: Sc recovery,
mass pull, product grade), the share of truth rocks whose decision (eject / pass / not
found) is identical to the drift-free tracked run's, over the whole belt and over its last
third (where the drift is largest), and the mean relative change of the particles' areas
against that run over the last third (the segmentation's bias: empty belt read with a
stale air level adds or removes rock edge pixels).

Noise floor: the twin's noise stream depends on the drift (its Poisson draws for thick
rock consume a varying number of random numbers), so from the second block of lines on a
drifted belt carries another noise draw than the drift-free one, and some rocks near the
cut flip on noise alone. The control row "0 (noise)" is the drift-free belt again with
another noise seed (same rocks, same calibration): the identical-decision share no drift
can beat. Recordings are kept in ``--out`` and reused.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sorting.cli.demo import SHIPPED_MODEL
from sorting.config import CONFIG_DIR, load_machine, load_ore, load_sorter
from sorting.io import BeltRecordingWriter, read_belt_recording
from sorting.offline.outcome import jets_outcome, match_particles
from sorting.physics import load_materials
from sorting.realtime.runner import build_pipeline, run_loop, timing_of
from sorting.realtime.sources import replay
from sorting.stages.air import AirTracker
from sorting.stages.inference import load_model
from sorting.twin import BeltTwin, simulate_belt
from sorting.twin.belt import EXTRA_TRUTH

SORTER = CONFIG_DIR / "sorter_reference.yaml"
TOL_PX = 2.0  # as outcome.match_particles


NOISE_CONTROL = "noise"


def belt(out: Path, seconds: float, seed: int, drift: float | str, occupancy: float) -> Path:
    """The recording for one drift value (or the noise control), simulated unless already there."""
    control = drift == NOISE_CONTROL
    path = out / (f"belt_seed{seed}_{seconds:g}s_" + ("noise_control" if control else f"drift{drift:+.3f}"))
    meta = path / "recording.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if (m.get("drift", 0.0) == (0.0 if control else drift) and m.get("seed") == seed
                and m.get("occupancy_target") == occupancy and m.get("lines") == round(seconds * m["line_rate_hz"])):
            return path
    configs = load_machine(None), load_ore(None), load_materials(None)
    if not control:
        return simulate_belt(path, seconds, seed, *configs, occupancy=occupancy, progress=False, drift=drift)
    # as simulate_belt, with the noise stream alone reseeded: the same rocks at the same places
    twin = BeltTwin(seconds, seed, *configs, occupancy=occupancy)
    twin._noise_seq = np.random.SeedSequence([seed, 1])
    with BeltRecordingWriter(path, twin.meta, twin.calibration_scans(), truth_columns=EXTRA_TRUTH) as writer:
        for _, block in twin.chunks():
            writer.append(block)
        writer.close(twin.truth, extra_meta={k: twin.meta[k] for k in ("rocks", "occupancy")})
    return path


def matched(events: list[dict], truth: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per truth rock: the decision of the particle whose centroid lies within TOL_PX of its own
    (the nearest), or "missed"; and that particle's area (NaN when missed)."""
    el = np.array([e["centroid_line"] for e in events])
    ep = np.array([e["centroid_px"] for e in events])
    order = np.argsort(el)
    el_sorted = el[order]
    decision, area = [], []
    for t in truth:
        lo = np.searchsorted(el_sorted, t["centroid_line"] - TOL_PX)
        hi = np.searchsorted(el_sorted, t["centroid_line"] + TOL_PX, side="right")
        cand = order[lo:hi]
        d = np.hypot(el[cand] - t["centroid_line"], ep[cand] - t["centroid_px"])
        if cand.size and d.min() <= TOL_PX:
            e = events[cand[int(np.argmin(d))]]
            decision.append(e["decision"])
            area.append(e["area_mm2"])
        else:
            decision.append("missed")
            area.append(np.nan)
    return np.array(decision), np.array(area, float)


def sort_run(path: Path, label: str, model, sorter, tracked: bool) -> dict:
    rec = read_belt_recording(path)
    timing = timing_of(rec.meta)
    pipe = build_pipeline(rec.calibration, model, sorter, timing, str(SORTER))
    if not tracked:  # the air level stays the calibration's
        pipe.air = AirTracker(pipe.cal, max_step=0.0)
    t0 = time.perf_counter()
    result = run_loop(replay(rec.lines, rec.line_rate_hz, 32), pipe)
    wall = time.perf_counter() - t0
    events = [e.to_json() for e in result.events]  # as the event log holds them
    det = match_particles(events, rec.truth)
    out = jets_outcome(events, rec.truth, sorter, timing)
    gain = np.median(pipe.air.gain[~pipe.cal.bad], axis=0)
    decision, area = matched(events, rec.truth)
    return {
        "belt": label, "drift": float(rec.meta.get("drift", 0.0)), "tracked": tracked,
        "truth_rocks": det["truth_rocks"], "particles": result.summary["particles"],
        "found_once": det["found_once"], "missed": det["missed"], "duplicated": det["duplicated"],
        "unmatched_particles": det["unmatched_particles"], "cut": result.summary["cut"],
        "too_long": result.summary["too_long"],
        "sc_recovery": out["sc_recovery"], "mass_pull": out["mass_pull"],
        "product_grade_ppm": out["product_grade_ppm"], "feed_grade_ppm": out["feed_grade_ppm"],
        "misfires": out["misfires"],
        "tracked_gain_end": [float(g) for g in gain],  # tracked air over calibration air (low, high)
        "wall_s": wall, "stream_s": result.summary["stream_s"],
        "_decisions": decision, "_area": area,
        "_last_third": np.array([t["centroid_line"] >= 2 * rec.n_lines / 3 for t in rec.truth]),
    }


def pct(x: float | None, width: int = 5, places: int = 1) -> str:
    return "n/a".rjust(width) if x is None else f"{100 * x:{width}.{places}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="belt seconds per drift value (default 8)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--occupancy", type=float, default=0.3)
    ap.add_argument("--drifts", type=float, nargs="+", default=[0.0, -0.05, 0.05],
                    help="relative air-level drift over the run; 0 (the reference) is added if missing")
    ap.add_argument("--out", type=Path, default=Path("out/drift"), help="folder for the recordings")
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="default: models/crater_lake.onnx")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    belts = [0.0, NOISE_CONTROL] + [d for d in args.drifts if d != 0.0]
    args.out.mkdir(parents=True, exist_ok=True)
    model, sorter = load_model(args.model), load_sorter(SORTER)
    runs = []
    for d in belts:
        t0 = time.perf_counter()
        label = "0 (noise)" if d == NOISE_CONTROL else f"{d:+.3f}"
        path = belt(args.out, args.seconds, args.seed, d, args.occupancy)
        print(f"belt {label}: {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for tracked in (True, False):
            runs.append(sort_run(path, label, model, sorter, tracked))
    ref = runs[0]  # drift 0, tracked
    assert ref["drift"] == 0.0 and ref["tracked"]
    for r in runs:
        same = r["_decisions"] == ref["_decisions"]
        last = r["_last_third"]
        r["identical_vs_reference"] = float(same.mean())
        r["identical_vs_reference_last_third"] = float(same[last].mean())
        change = r["_area"][last] / ref["_area"][last] - 1.0
        # None when the run found none of the last third's rocks
        r["area_change_last_third"] = float(np.nanmean(change)) if np.isfinite(change).any() else None
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    print(f"\n{args.seconds:g} s of belt per run, seed {args.seed}, model {args.model.name}, reference sorter; "
          "reference = drift 0 with the tracker on; 0 (noise) = the same rocks with another noise draw")
    print(f"{'drift':>9} {'air':>7} {'found/truth':>12} {'missed':>6} {'ghost':>5} {'Sc rec%':>7} {'pull%':>6} "
          f"{'prod ppm':>8} {'same%':>6} {'same% last 1/3':>14} {'area% last 1/3':>14} {'gain end (lo, hi)':>18}")
    for r in rows:
        print(f"{r['belt']:>9} {'tracked' if r['tracked'] else 'fixed':>7} "
              f"{r['found_once']:>5}/{r['truth_rocks']:<6} {r['missed']:>6} {r['unmatched_particles']:>5} "
              f"{pct(r['sc_recovery']):>7} {pct(r['mass_pull']):>6} {r['product_grade_ppm']:>8.1f} "
              f"{pct(r['identical_vs_reference']):>6} {pct(r['identical_vs_reference_last_third']):>14} "
              f"{pct(r['area_change_last_third'], 7, 2):>14} "
              f"{r['tracked_gain_end'][0]:>8.4f} {r['tracked_gain_end'][1]:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds": args.seconds, "seed": args.seed, "occupancy": args.occupancy,
                                         "model": str(args.model), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
