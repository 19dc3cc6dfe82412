"""Labeled rock images (``xrt-rocks/1``) from the digital twin."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sorting.config import MachineConfig, OreConfig
from sorting.io import RockDatasetWriter, RockRow
from sorting.physics import MaterialLibrary
from sorting.twin.ore import (
    densities,
    grade_and_mass,
    label_for,
    mineral_list,
    sample_composition,
)
from sorting.twin.render import Renderer
from sorting.twin.shapes import RockImage, render_rock, sample_size_mm

CROP_MARGIN_PX = 8


@dataclass(frozen=True)
class SimulatedRock:
    image: RockImage
    lithotype: str
    sc2o3_ppm: float
    mass_g: float
    label: str


def make_rock(ore: OreConfig, machine: MachineConfig, rho: np.ndarray, rng: np.random.Generator) -> SimulatedRock:
    comp = sample_composition(ore, rng)
    img = render_rock(comp, sample_size_mm(ore, rng), ore, machine.line_pitch_mm,
                      machine.detector.pixel_pitch_mm, rng)
    volumes = img.paths_mm.sum(axis=(0, 1)) * machine.line_pitch_mm * machine.detector.pixel_pitch_mm
    grade, mass = grade_and_mass(volumes, comp.sc2o3_ppm, rho)
    return SimulatedRock(img, comp.lithotype, grade, mass, label_for(grade, ore))


def crop_signal(renderer: Renderer, rock: RockImage, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free mean and variance of a crop holding ``rock`` with ``margin`` px of belt around it."""
    h, w = rock.mask.shape
    mean, var = renderer.blank(h + 2 * margin, w + 2 * margin)
    m, v = renderer.signal(rock.paths_mm[rock.mask])
    rows, cols = np.nonzero(rock.mask)
    mean[rows + margin, cols + margin] = m
    var[rows + margin, cols + margin] = v
    return mean, var


def twin_recipe(machine: MachineConfig, ore: OreConfig, library: MaterialLibrary, **run) -> dict:
    """JSON-ready: the machine, ore and material configs (as their YAML would hold them) and
    the run's arguments (``n``, ``seed``, ``test_fraction``)."""
    used = {m for lith in ore.lithotypes for m in lith.minerals}
    used |= {f.material for f in machine.tube.filters} | {layer.material for layer in machine.detector.interlayer}
    used |= {machine.detector.front.material, machine.detector.back.material, machine.belt.material, "pom", "iron"}
    mats = {name: {"formula": library[name].formula, "density_g_cm3": library[name].density_g_cm3}
            for name in sorted(used)}
    return {"generator": "sorting simulate rocks", "machine": json.loads(json.dumps(asdict(machine))),
            "ore": json.loads(json.dumps(asdict(ore))), "materials": mats, **run}


def simulate_rocks(out: Path, n: int, seed: int, machine: MachineConfig, ore: OreConfig,
                   library: MaterialLibrary, test_fraction: float = 0.3, progress: bool = True) -> Path:
    minerals = mineral_list(ore)
    renderer = Renderer.create(machine, library, minerals)
    rho = densities(minerals, library)
    root = np.random.SeedSequence(seed)
    cal_seq, split_seq, rock_seq = root.spawn(3)
    scans = renderer.calibration_scans(np.random.default_rng(cal_seq))
    is_test = np.random.default_rng(split_seq).random(n) < test_fraction
    p = machine.detector.pixels
    meta = {
        "detector_pixels": p,
        "pixel_pitch_mm": machine.detector.pixel_pitch_mm,
        "line_pitch_mm": machine.line_pitch_mm,
        "channels": ["low", "high"],
        "simulated": True,
        "machine": machine.name,
        "ore": ore.name,
        "seed": seed,
        "label_cutoff_ppm": ore.label_cutoff_ppm,
        "tube_kvp": machine.tube.kvp,
        # the whole recipe: with these the twin writes this dataset again, rock for rock
        "twin": twin_recipe(machine, ore, library, n=n, seed=seed, test_fraction=test_fraction),
    }
    with RockDatasetWriter(out, meta, scans, extra_columns=("lithotype", "size_mm")) as writer, \
            threadpool_limits(limits=1, user_api="blas"):  # small products: threads only spin
        for i, seq in enumerate(tqdm(rock_seq.spawn(n), desc="rocks", unit="rock", disable=None if progress else True)):
            rng = np.random.default_rng(seq)
            rock = make_rock(ore, machine, rho, rng)
            mean, var = crop_signal(renderer, rock.image, CROP_MARGIN_PX)
            w = mean.shape[1]
            if w > p:
                raise ValueError(f"rock of {w} px does not fit a {p}-pixel detector")
            x0 = int(rng.integers(0, p - w + 1))
            crop = renderer.counts(mean, var, x0, rng)
            row = RockRow(
                rock_id=f"{i + 1:05d}", file=f"rocks/rock_{i + 1:05d}.tiff", x0=x0, label=rock.label,
                sc2o3_ppm=round(rock.sc2o3_ppm, 2), mass_g=round(rock.mass_g, 3),
                split="test" if is_test[i] else "train",
                extra={"lithotype": rock.lithotype, "size_mm": f"{rock.image.size_mm:.1f}"},
            )
            writer.add(row, crop)
    return out


def configs_from_recipe(recipe: dict, where: str = "recipe") -> tuple[MachineConfig, OreConfig, MaterialLibrary]:
    """The machine, ore and material library of a :func:`twin_recipe` (InputError naming
    ``where`` when it is incomplete or its values are out of range)."""
    from sorting.config import build
    from sorting.errors import InputError
    from sorting.physics.materials import Material

    try:
        mats = {str(k).lower(): Material(str(k).lower(), str(v["formula"]), float(v["density_g_cm3"]))
                for k, v in recipe["materials"].items()}
        library = MaterialLibrary(mats, where)
        machine = build(MachineConfig, recipe["machine"], where, "machine")
        ore = build(OreConfig, recipe["ore"], where, "ore")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InputError(where, f"not a complete twin recipe ({exc})") from None
    return machine, ore, library
