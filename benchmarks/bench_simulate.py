"""Time the digital twin: a 600-rock dataset and a 20-second reference belt recording.

    python benchmarks/bench_simulate.py --json out/bench_simulate.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from sorting.config import load_machine, load_ore
from sorting.physics import load_materials
from sorting.twin import simulate_belt, simulate_rocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rocks", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    machine, ore, lib = load_machine(), load_ore(), load_materials()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    try:
        t0 = time.perf_counter()
        simulate_rocks(tmp / "rocks", args.rocks, 0, machine, ore, lib, progress=False)
        t_rocks = time.perf_counter() - t0
        t0 = time.perf_counter()
        simulate_belt(tmp / "belt", args.seconds, 0, machine, ore, lib, occupancy=0.3, progress=False)
        t_belt = time.perf_counter() - t0
        size = (tmp / "belt" / "lines.u16").stat().st_size
        meta = json.loads((tmp / "belt" / "recording.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}"),
        "rocks": args.rocks,
        "rocks_seconds": round(t_rocks, 2),
        "belt_seconds_simulated": args.seconds,
        "belt_rocks": meta.get("rocks"),
        "belt_occupancy": meta.get("occupancy"),
        "belt_seconds": round(t_belt, 2),
        "belt_bytes": size,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
