"""`sorting simulate rocks|belt`: data from the digital twin."""
from __future__ import annotations

import argparse

from sorting.twin import simulate_belt, simulate_rocks


def _configs(args: argparse.Namespace):
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials

    lib = load_materials(args.materials)
    return load_machine(args.machine, lib), load_ore(args.ore, lib), lib


def cli_rocks(args: argparse.Namespace) -> int:
    from sorting.errors import InputError

    if args.n < 1:
        raise InputError("--n", f"must be at least 1, got {args.n}")
    if not 0.0 <= args.test_fraction <= 1.0:
        raise InputError("--test-fraction", f"must be in [0, 1], got {args.test_fraction}")
    machine, ore, lib = _configs(args)
    out = simulate_rocks(args.out, args.n, args.seed, machine, ore, lib, args.test_fraction,
                         progress=not args.quiet)
    print(f"wrote {args.n} rocks to {out}")
    return 0


def cli_belt(args: argparse.Namespace) -> int:
    machine, ore, lib = _configs(args)
    out = simulate_belt(args.out, args.seconds, args.seed, machine, ore, lib, args.occupancy, args.touching,
                        progress=not args.quiet, drift=args.drift, splice_every_s=args.splice_every_s,
                        tramp=args.tramp, slabs=args.slabs, slab_mm=args.slab_mm)
    print(f"wrote {args.seconds:g} s of belt to {out}")
    return 0
