"""Regenerate ``sorting/physics/data/tungsten_spectra.csv`` with SpekPy.

The project never needs SpekPy at run time: this script precomputes unfiltered
tungsten-anode spectra on a 1 keV grid for a range of tube voltages, and the
machine's own filters are applied later from xraydb attenuation data.

    pip install -e .[spectra]
    python scripts/make_spectra.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "sorting" / "physics" / "data" / "tungsten_spectra.csv"


def main() -> None:
    import spekpy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anode-angle-deg", type=float, default=12.0)
    parser.add_argument("--kvp-min", type=int, default=60)
    parser.add_argument("--kvp-max", type=int, default=225)
    parser.add_argument("--kvp-step", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    kvps = list(range(args.kvp_min, args.kvp_max + 1, args.kvp_step))
    energies = np.arange(1.5, args.kvp_max, 1.0)
    table = np.zeros((energies.size, len(kvps)))
    for j, kvp in enumerate(kvps):
        spec = spekpy.Spek(kvp=kvp, th=args.anode_angle_deg, dk=1.0)
        k, phi = spec.get_spectrum()
        idx = np.searchsorted(energies, k)
        table[idx, j] = phi
        print(f"{kvp} kVp: {phi.sum():.4g} photons/cm2/mAs at 1 m")
    header = (
        f"# Unfiltered tungsten-anode spectra from SpekPy {spekpy.__version__ if hasattr(spekpy, '__version__') else ''}, "
        f"anode angle {args.anode_angle_deg} deg, 1 keV bins, fluence per bin in photons/cm2/mAs at 1 m\n"
        "# regenerate with scripts/make_spectra.py\n"
        "energy_kev," + ",".join(f"kvp_{k}" for k in kvps)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(args.out, np.column_stack([energies, table]), delimiter=",", header=header,
               comments="", fmt=["%.1f"] + ["%.6g"] * len(kvps))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
