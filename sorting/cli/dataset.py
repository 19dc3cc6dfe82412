"""Commissioning on the machine itself: ``sorting dataset`` (a rock-by-rock recording plus the
laboratory's assays -> labeled rocks) and ``sorting simulate rockbyrock`` (such a test on the twin)."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def add_parsers(sub, simsub, add_configs: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``dataset`` verb on ``sub`` and ``rockbyrock`` on the ``simulate`` parsers ``simsub``."""
    ds = sub.add_parser("dataset", help="labeled rocks from a rock-by-rock recording and the laboratory's assays")
    ds.add_argument("recording", type=Path, help="xrt-belt/1 folder: numbered rocks fed one at a time, in order")
    ds.add_argument("--assays", type=Path, required=True, help="the laboratory's CSV: seq,sc2o3_ppm,mass_g")
    ds.add_argument("--out", type=Path, required=True, help="the xrt-rocks/1 dataset folder to write")
    ds.add_argument("--cutoff-ppm", type=float, default=None,
                    help="label cut-off grade, ppm Sc2O3: sc at or above (default: the ore's label_cutoff_ppm)")
    ds.add_argument("--ore", type=Path, default=None,
                    help="ore YAML whose label_cutoff_ppm is the default cut-off "
                    "(default: configs/ore_crater_lake.yaml)")

    rbr = simsub.add_parser("rockbyrock", help="a rock-by-rock test: recording of numbered rocks and assays.csv")
    rbr.add_argument("out", type=Path)
    rbr.add_argument("--n", type=int, default=300, help="rocks fed (default 300)")
    rbr.add_argument("--seed", type=int, default=0)
    rbr.add_argument("--lost", type=float, default=0.02, help="share of samples lost in the laboratory")
    rbr.add_argument("--debris", type=float, default=0.05, help="share of rocks followed by a debris chip")
    rbr.add_argument("--touching", type=float, default=0.02, help="share of rocks in contact with the next one")
    rbr.add_argument("--missed", type=float, default=0.01,
                     help="share of rocks missed by the scanner (half never scanned, half off the belt edge)")
    add_configs(rbr)
    rbr.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_dataset(args: argparse.Namespace) -> int:
    from sorting.cli.options import option
    from sorting.offline.commissioning import build_dataset, check_cutoff_ppm

    t0 = time.perf_counter()
    if args.cutoff_ppm is not None:
        cutoff = args.cutoff_ppm
    else:
        from sorting.config import load_ore

        cutoff = load_ore(args.ore).label_cutoff_ppm
    if args.cutoff_ppm is not None:
        with option("--cutoff-ppm"):
            check_cutoff_ppm(cutoff)
    summary = build_dataset(args.recording, args.assays, args.out, cutoff)
    print(f"{summary.line()} ({time.perf_counter() - t0:.1f} s)")
    print(f"wrote {args.out} (label cut-off {cutoff:g} ppm Sc2O3) and {args.out / 'excluded.csv'}")
    return 0


def cli_rockbyrock(args: argparse.Namespace) -> int:
    from sorting.cli.options import parameters
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials
    from sorting.twin.rockbyrock import RockByRockRates, simulate_rockbyrock

    with parameters():
        rates = RockByRockRates(args.lost, args.debris, args.touching, args.missed)
    lib = load_materials(args.materials)
    machine, ore = load_machine(args.machine, lib), load_ore(args.ore, lib)
    with parameters():
        out = simulate_rockbyrock(args.out, args.n, args.seed, machine, ore, lib, rates, progress=not args.quiet)
    print(f"wrote a rock-by-rock test of {args.n} rocks to {out} (recording, assays.csv, truth_rockbyrock.csv)")
    return 0
