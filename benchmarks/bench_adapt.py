"""Commissioning a new machine: how close do 100 assayed rocks get to 2,000?

The machine (configs/machine_example_commissioning.yaml: 130 kVp, GOS | Cu | CsI, 1.0 mm
pixels, 70 % flux) and ore (configs/ore_example_commissioning.yaml: another lithotype mix and
Sc distribution) differ from the reference in every part the twin models. On them the twin
writes a pool of rocks (every rock assayed, so any subset can play "sent to the lab") and a
separate test set. Arms, each scored on the test set by ``sorting compare`` (paired bootstrap
against the 2,000-rock model as champion):

- ``parent``: the shipped model as it is;
- ``scratch_random``: ``sorting train`` on 100 random rocks of the pool;
- ``adapt_select``: ``sorting select`` picks 100 rocks, ``sorting adapt`` (parent + them; the
  parent's ore written by the twin on the machine fitted to the pool's calibration scans);
- ``adapt_random``: ``sorting adapt`` with 100 random rocks;
- ``adapt_select_parent_machine``: as ``adapt_select``, with ``--machine parent`` (the parent's
  training rocks as they were, on the parent's machine);
- ``adapt_select_machine``: as ``adapt_select``, with ``--machine`` the new machine's true twin
  config (what a perfect fit of the machine would give);
- ``full``: ``sorting train`` on the whole assayed pool (the reference of the target);
- ``full_narrow``: the same with ``--soft-width 0.1`` (the twin's grades are exact, so narrow
  soft targets suit them; the default 0.3 is for laboratory assays);
- ``full_adapt``: ``sorting adapt`` with the whole assayed pool (what the same tooling makes of
  all the assays).

Only the CLI verbs are used. Several seeds (the random draw, the picks, the fits).
Writes benchmarks/results/adapt/adapt.json and adapt.png.

    python benchmarks/bench_adapt.py [--work DIR] [--seeds 0 1 2] [--pool 2100] [--test 1000]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sorting.cli import main as sorting

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MACHINE = ROOT / "configs" / "machine_example_commissioning.yaml"
ORE = ROOT / "configs" / "ore_example_commissioning.yaml"
PARENT = ROOT / "models" / "crater_lake.onnx"
OUT = HERE / "results" / "adapt"
N_LAB = 100


def run(*argv) -> None:
    argv = [str(a) for a in argv]
    print("$ sorting " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    status = sorting(argv)
    if status != 0:
        raise SystemExit(f"sorting {argv[0]} failed with status {status}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def lab(pool: Path, ids: set[str], out: Path) -> Path:
    """The pool as the laboratory returns it: only the rocks in ``ids`` keep label, assay and
    mass (the others are unlabeled); crops and calibration are linked, not copied."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("rocks", "calibration"):
        os.symlink((pool / name).resolve(), out / name)
    shutil.copy(pool / "dataset.json", out / "dataset.json")
    with open(pool / "rocks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "rocks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            keep = r["rock_id"] in ids
            w.writerow({**r, "split": "", **({} if keep else {"label": "", "sc2o3_ppm": "", "mass_g": ""})})
    missing = ids - {r["rock_id"] for r in rows}
    assert not missing, missing
    return out


def picks(path: Path) -> set[str]:
    with open(path, newline="") as f:
        return {r["rock_id"] for r in csv.DictReader(f)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ["parent", "scratch_random", "adapt_random", "adapt_select", "adapt_select_parent_machine",
            "adapt_select_machine", "full", "full_narrow", "full_adapt"]
    labels = ["shipped model\nas is", "100 random\nfrom scratch", "100 random\n+ adapt", "100 selected\n+ adapt",
              "100 selected\n+ adapt\n--machine parent", "100 selected\n+ adapt\n--machine (true)",
              f"{result['n_pool']} assayed\nsorting train", f"{result['n_pool']} assayed\ntrain, soft width 0.1",
              f"{result['n_pool']} assayed\n+ adapt"]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    for i, arm in enumerate(arms):
        vals = [s["arms"][arm]["auc"] for s in result["seeds"]]
        cis = [s["arms"][arm]["auc_ci"] for s in result["seeds"]]
        x = i + np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.array([i])
        for xi, v, ci in zip(x, vals, cis):
            ax.errorbar(xi, v, yerr=[[v - ci[0]], [ci[1] - v]], fmt="o", color=f"C{i}", capsize=3, ms=5)
        ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color=f"C{i}", lw=2)
    full = np.mean([s["arms"]["full"]["auc"] for s in result["seeds"]])
    ax.axhspan(full - 0.003, full, color="0.85", zorder=0, label="within 0.003 of the full model")
    ax.set_xticks(range(len(arms)), labels, fontsize=8)
    ax.set(ylabel="AUC on the held-out test rocks (95 % bootstrap CI)",
           title=f"Commissioning {result['machine']} / {result['ore']}: {result['n_test']} test rocks, "
                 f"seeds {', '.join(str(s['seed']) for s in result['seeds'])}")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_adapt"), help="datasets and models (reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--pool", type=int, default=2100)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool, test = w / "pool", w / "test"
    for path, n, seed in ((pool, args.pool, 101), (test, args.test, 102)):
        if not (path / "dataset.json").is_file():
            run("simulate", "rocks", path, "--n", n, "--seed", seed, "--test-fraction", 0, "--machine", MACHINE,
                "--ore", ORE, "--quiet")
    full = w / "full.onnx"
    if not full.is_file():
        run("train", pool, "--out", full, "--quiet")
    full_narrow = w / "full_narrow.onnx"
    if not full_narrow.is_file():
        run("train", pool, "--out", full_narrow, "--soft-width", 0.1, "--quiet")
    full_adapt = w / "full_adapt.onnx"
    if not full_adapt.is_file():
        run("adapt", PARENT, pool, "--out", full_adapt, "--cache", w / "cache", "--quiet")
    with open(pool / "rocks.csv", newline="") as f:
        ids = [r["rock_id"] for r in csv.DictReader(f)]
    seeds = []
    for seed in args.seeds:
        d = w / f"seed{seed}"
        d.mkdir(exist_ok=True)
        rnd = set(np.random.default_rng(seed).choice(ids, N_LAB, replace=False).tolist())
        run("select", pool, "--model", PARENT, "--n", N_LAB, "--out", d / "picks.csv", "--seed", seed, "--quiet")
        sel = picks(d / "picks.csv")
        lab_rnd, lab_sel = lab(pool, rnd, d / "lab_random"), lab(pool, sel, d / "lab_select")
        run("train", lab_rnd, "--out", d / "scratch_random.onnx", "--seed", seed, "--quiet")
        run("adapt", PARENT, lab_rnd, "--out", d / "adapt_random.onnx", "--seed", seed, "--cache", w / "cache",
            "--quiet")
        run("adapt", PARENT, lab_sel, "--out", d / "adapt_select.onnx", "--seed", seed, "--cache", w / "cache",
            "--quiet")
        run("adapt", PARENT, lab_sel, "--out", d / "adapt_select_parent_machine.onnx", "--seed", seed, "--cache",
            w / "cache", "--machine", "parent", "--quiet")
        run("adapt", PARENT, lab_sel, "--out", d / "adapt_select_machine.onnx", "--seed", seed, "--cache",
            w / "cache", "--machine", MACHINE, "--quiet")
        models = {"full": full, "parent": PARENT, "scratch_random": d / "scratch_random.onnx",
                  "adapt_random": d / "adapt_random.onnx", "adapt_select": d / "adapt_select.onnx",
                  "adapt_select_parent_machine": d / "adapt_select_parent_machine.onnx",
                  "adapt_select_machine": d / "adapt_select_machine.onnx", "full_adapt": full_adapt,
                  "full_narrow": full_narrow}
        run("compare", test, "--models", *models.values(), "--report", d / "compare", "--quiet")
        cmp = json.loads((d / "compare" / "compare.json").read_text())
        names = {arm: str(p) for arm, p in models.items()}
        arms = {}
        for arm, name in names.items():
            st = cmp["models"][name]
            arms[arm] = {"auc": st["auc"], "auc_ci": st["auc_ci"],
                         "sc_recovery_at_full_pull": st["sc_recovery_at_pull"],
                         "sc_recovery_ci": st["sc_recovery_at_pull_ci"]}
            if arm != "full":
                diff = cmp["differences"][name]
                arms[arm]["auc_minus_full"] = diff["auc"]
                arms[arm]["auc_minus_full_ci"] = diff["auc_ci"]
                arms[arm]["differs_from_full"] = diff["real"]
        for arm in ("adapt_random", "adapt_select", "adapt_select_parent_machine", "adapt_select_machine",
                    "full_adapt"):
            meta_cv = _meta(models[arm])
            arms[arm]["strategy"] = meta_cv["training_metrics"]["strategy"]
            arms[arm]["cv_auc_strategies"] = meta_cv["training_metrics"]["cv_auc_strategies"]
        seeds.append({"seed": seed, "arms": arms, "verdict": cmp["verdict"], "full_mass_pull": cmp["mass_pull"]})
        print(json.dumps({a: round(v["auc"], 4) for a, v in arms.items()}), flush=True)
    summary = {}
    for arm in seeds[0]["arms"]:
        v = np.array([s["arms"][arm]["auc"] for s in seeds])
        summary[arm] = {"auc_mean": float(v.mean()), "auc_sd": float(v.std(ddof=1)) if len(v) > 1 else None,
                        "auc_min": float(v.min()), "auc_max": float(v.max())}
        if arm != "full":
            gap = np.array([s["arms"]["full"]["auc"] - s["arms"][arm]["auc"] for s in seeds])
            summary[arm]["gap_to_full_mean"] = float(gap.mean())
            summary[arm]["within_0.003_of_full"] = [bool(g <= 0.003) for g in gap]
    result = {"machine": MACHINE.stem, "ore": ORE.stem, "parent": str(PARENT.relative_to(ROOT)),
              "n_pool": args.pool, "n_test": args.test, "n_lab": N_LAB, "seeds": seeds, "summary": summary,
              "target": "adapt_select within 0.003 AUC of full", "seconds": round(time.perf_counter() - t0)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapt.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "adapt.png")
    for arm, s in summary.items():
        print(f"{arm:15s} AUC {s['auc_mean']:.4f} (sd {s['auc_sd'] or 0:.4f}, {s['auc_min']:.4f}-{s['auc_max']:.4f})"
              + (f", gap to full {s['gap_to_full_mean']:+.4f}" if "gap_to_full_mean" in s else ""))


def _meta(path: Path) -> dict:
    from sorting.stages.inference import load_model

    return load_model(path).meta


if __name__ == "__main__":
    main()
