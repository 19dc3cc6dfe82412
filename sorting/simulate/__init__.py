"""The digital twin: Crater Lake ore, rock shapes, belt scenes and the sorter's detector."""
from __future__ import annotations

import argparse

from .belt import BeltTwin, simulate_belt
from .ore import mineral_list, sample_composition
from .render import Renderer
from .rocks import make_rock, simulate_rocks

__all__ = ["BeltTwin", "Renderer", "make_rock", "mineral_list", "sample_composition", "simulate_belt", "simulate_rocks",
           "cli_rocks", "cli_belt"]


def _configs(args: argparse.Namespace):
    from ..config import load_machine, load_ore
    from ..physics import load_materials

    lib = load_materials(args.materials)
    return load_machine(args.machine, lib), load_ore(args.ore, lib), lib


def cli_rocks(args: argparse.Namespace) -> int:
    from ..errors import InputError

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
                        progress=not args.quiet, drift=args.drift)
    print(f"wrote {args.seconds:g} s of belt to {out}")
    return 0
