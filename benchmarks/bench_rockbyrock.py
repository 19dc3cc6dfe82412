"""Rock-by-rock commissioning: how many assayed rocks `sorting dataset` keeps, and that none is
tied to a wrong assay.

    python benchmarks/bench_rockbyrock.py [--n 300] [--seeds 0 1 2] [--out out/rockbyrock]
                                          [--json benchmarks/results/rockbyrock.json]
                                          [--lost F] [--debris F] [--touching F] [--missed F]

The slip rates default to ``sorting simulate rockbyrock``'s; ``--touching 0 --missed 0`` leaves
only lost samples and debris chips, the slips every assayed rock can survive
(benchmarks/results/rockbyrock_lost_debris.json).

Per seed the twin simulates a rock-by-rock test of ``--n`` numbered rocks (``sorting simulate
rockbyrock`` with its default rates: 2 % of the samples lost in the laboratory, a debris chip
after 5 % of the rocks, 2 % of the rocks touching the next one, 1 % missed by the scanner),
then ``sorting dataset`` ties the recording to the laboratory's ``assays.csv``. Its result is
scored against what the twin says really happened (``truth_rockbyrock.csv``, ``truth.csv``):

- ``kept``: rows of the dataset; ``kept_of_assayed``: kept / assay rows;
- ``kept_of_alone``: kept (``kept_alone``) / the assayed rocks that were scanned alone (not missed, not off the
  belt edge, not touching another rock): the ones a perfect tool could keep;
- ``wrong_ties``: kept rows whose crop does not hold exactly the rock of its feed number (by the
  twin's positions), or whose grade and mass are not that rock's laboratory results. Must be 0;
- ``wrong_labels``: kept rows whose label disagrees with their assay at the cut-off;
- ``excluded``: excluded.csv's rows by reason; ``truth``: the slips the twin made;
- ``dataset_s``: wall seconds of `sorting dataset` (recording scan, alignment, crops), and
  ``simulate_s`` of the simulation. On a busy machine these are indicative only.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from collections import Counter
from pathlib import Path

from sorting.cli import main


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def score(test: Path, ds: Path, cutoff_ppm: float = 150.0) -> dict:
    """The dataset ``ds`` against the twin's record of the test ``test``."""
    from sorting.io import read_rocks_dataset

    record = _rows(test / "truth_rockbyrock.csv")
    rocks = {r["seq"]: r for r in record if r["kind"] == "rock"}
    objects = _rows(test / "truth.csv")
    dataset = read_rocks_dataset(ds)
    wrong, wrong_labels = [], 0
    for i, row in enumerate(dataset.rows):
        t = rocks.get(row.rock_id)
        h, w = dataset.crop(i).shape[:2]
        line0 = int(row.extra["first_line"])
        inside = [o["rock_id"] for o in objects
                  if int(o["first_line"]) < line0 + h and int(o["last_line"]) >= line0
                  and int(o["x_min_px"]) < row.x0 + w and int(o["x_max_px"]) >= row.x0]
        ok = (t is not None and inside == [row.rock_id] and t["lab_mass_g"] != ""
              and float(t["lab_mass_g"]) == row.mass_g and float(t["lab_sc2o3_ppm"]) == row.sc2o3_ppm)
        if not ok:
            wrong.append(row.rock_id)
        wrong_labels += row.label != ("sc" if row.sc2o3_ppm >= cutoff_ppm else "waste")
    assayed = [s for s, r in rocks.items() if r["lost"] == "0"]
    alone = [s for s in assayed if rocks[s]["fate"] == "scanned" and not rocks[s]["touching_with"]]
    kept = {r.rock_id for r in dataset.rows}
    excluded = Counter(r["reason"] for r in _rows(ds / "excluded.csv"))
    return {
        "rocks_fed": len(rocks),
        "assayed": len(assayed),
        "alone": len(alone),
        "kept": len(kept),
        "kept_of_assayed": round(len(kept) / max(len(assayed), 1), 4),
        "kept_alone": len(kept & set(alone)),
        "kept_of_alone": round(len(kept & set(alone)) / max(len(alone), 1), 4),
        "wrong_ties": len(wrong),
        "wrong_tie_ids": wrong,
        "wrong_labels": wrong_labels,
        "excluded": dict(sorted(excluded.items())),
        "truth": {
            "lost": sum(r["lost"] == "1" for r in rocks.values()),
            "missed": sum(r["fate"] == "missed" for r in rocks.values()),
            "edge": sum(r["fate"] == "edge" for r in rocks.values()),
            "touching_rocks": sum(bool(r["touching_with"]) for r in rocks.values()),
            "debris_chips": sum(r["kind"] == "debris" for r in record),
        },
        "mass_model": dataset.meta.get("rockbyrock", {}),
    }


def main_bench() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("out/rockbyrock"))
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "rockbyrock.json")
    rates = ("lost", "debris", "touching", "missed")
    for rate in rates:
        ap.add_argument(f"--{rate}", type=float, default=None, help="slip rate (default: the simulator's)")
    args = ap.parse_args()
    slips = [x for r in rates if getattr(args, r) is not None for x in (f"--{r}", str(getattr(args, r)))]
    runs = []
    for seed in args.seeds:
        test, ds = args.out / f"test_n{args.n}_seed{seed}", args.out / f"dataset_n{args.n}_seed{seed}"
        t0 = time.perf_counter()
        argv = ["simulate", "rockbyrock", str(test), "--n", str(args.n), "--seed", str(seed), *slips, "--quiet"]
        if main(argv) != 0:
            return 1
        t1 = time.perf_counter()
        if main(["dataset", str(test), "--assays", str(test / "assays.csv"), "--out", str(ds)]) != 0:
            return 1
        t2 = time.perf_counter()
        run = {"seed": seed, **score(test, ds), "simulate_s": round(t1 - t0, 2), "dataset_s": round(t2 - t1, 2)}
        runs.append(run)
        print(json.dumps({k: run[k] for k in ("seed", "assayed", "alone", "kept", "kept_of_alone", "wrong_ties",
                                              "dataset_s")}))
    total = {
        "assayed": sum(r["assayed"] for r in runs),
        "alone": sum(r["alone"] for r in runs),
        "kept": sum(r["kept"] for r in runs),
        "kept_alone": sum(r["kept_alone"] for r in runs),
        "wrong_ties": sum(r["wrong_ties"] for r in runs),
        "wrong_labels": sum(r["wrong_labels"] for r in runs),
    }
    total["kept_of_assayed"] = round(total["kept"] / total["assayed"], 4)
    total["kept_of_alone"] = round(total["kept_alone"] / total["alone"], 4)
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    result = {"n": args.n, "seeds": args.seeds, "slips": {r: getattr(args, r) for r in rates}, "machine": machine,
              "total": total, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(total))
    return 0 if total["wrong_ties"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main_bench())
