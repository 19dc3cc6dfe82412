"""`sorting simulate rocks|belt`: data from the digital twin."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sorting.cli.options import parameters
from sorting.errors import InputError
from sorting.twin import simulate_belt, simulate_rocks


def _configs(args: argparse.Namespace):
    from sorting.config import load_machine, load_ore
    from sorting.physics import load_materials

    lib = load_materials(args.materials)
    return load_machine(args.machine, lib), load_ore(args.ore, lib), lib


def prepare_out(out: Path, force: bool) -> Path:
    """Where to write ``OUT``. It must be new or an empty folder: writing over an older dataset
    or recording would leave its stale crops, scans or lines behind. With ``force`` a non-empty
    ``OUT`` is replaced: the twin writes a fresh folder beside it, which :func:`finish_out` puts
    in its place once complete (a failed simulation leaves the old data as it was)."""
    out = Path(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if not any(out.iterdir()):
        return out
    if not force:
        raise InputError(out, "is not empty; give a new folder, or --force to replace its contents")
    here, home, target = Path.cwd().resolve(), Path.home().resolve(), out.resolve()
    if target in (here, home) or target in here.parents:
        raise InputError(out, "is the current or home folder (or holds it): --force will not replace it")
    fresh = target.with_name(f".{target.name}.new")
    if fresh.exists():
        shutil.rmtree(fresh)  # left by an earlier simulation that did not finish
    return fresh


def finish_out(written: Path, out: Path) -> Path:
    """Put a fresh folder from :func:`prepare_out` in the place of ``out``."""
    out = Path(out)
    if written == out:
        return out
    shutil.rmtree(out)
    written.rename(out)
    return out


def cli_rocks(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError("--n", f"must be at least 1, got {args.n}")
    if not 0.0 <= args.test_fraction <= 1.0:
        raise InputError("--test-fraction", f"must be in [0, 1], got {args.test_fraction}")
    machine, ore, lib = _configs(args)
    dest = prepare_out(args.out, args.force)
    out = finish_out(simulate_rocks(dest, args.n, args.seed, machine, ore, lib, args.test_fraction,
                                    progress=not args.quiet), args.out)
    print(f"wrote {args.n} rocks to {out}")
    return 0


def cli_belt(args: argparse.Namespace) -> int:
    machine, ore, lib = _configs(args)
    dest = prepare_out(args.out, args.force)
    with parameters():
        out = finish_out(simulate_belt(dest, args.seconds, args.seed, machine, ore, lib, args.occupancy,
                                       args.touching, progress=not args.quiet, drift=args.drift,
                                       splice_every_s=args.splice_every_s, tramp=args.tramp, slabs=args.slabs,
                                       slab_mm=args.slab_mm), args.out)
    print(f"wrote {args.seconds:g} s of belt to {out}")
    return 0
