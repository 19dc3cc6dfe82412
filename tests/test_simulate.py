"""The digital twin: determinism, ore bookkeeping and the truth it writes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sorting.config import load_machine, load_ore
from sorting.io import read_belt_recording, read_rocks_dataset
from sorting.physics import load_materials
from sorting.twin import simulate_belt, simulate_rocks
from sorting.twin.ore import densities, grade_and_mass, mineral_list, sample_composition
from sorting.twin.rocks import make_rock


@pytest.fixture(scope="module")
def cfg():
    return load_machine(), load_ore(), load_materials()


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_different_rocks(tmp_path, cfg):
    m, o, lib = cfg
    a = simulate_rocks(tmp_path / "a", 6, 11, m, o, lib, progress=False)
    b = simulate_rocks(tmp_path / "b", 6, 11, m, o, lib, progress=False)
    c = simulate_rocks(tmp_path / "c", 6, 12, m, o, lib, progress=False)
    assert _digest(a) == _digest(b)
    da, dc = read_rocks_dataset(a), read_rocks_dataset(c)
    assert [r.sc2o3_ppm for r in da.rows] != [r.sc2o3_ppm for r in dc.rows]
    assert not np.array_equal(da.crop(0), dc.crop(0)) or da.crop(0).shape != dc.crop(0).shape


def test_belt_same_seed_same_bytes(tmp_path, cfg):
    m, o, lib = cfg
    a = simulate_belt(tmp_path / "a", 0.3, 5, m, o, lib, progress=False)
    b = simulate_belt(tmp_path / "b", 0.3, 5, m, o, lib, progress=False)
    c = simulate_belt(tmp_path / "c", 0.3, 6, m, o, lib, progress=False)
    assert _digest(a) == _digest(b)
    assert (a / "lines.u16").read_bytes() != (c / "lines.u16").read_bytes()


def test_composition_within_modal_ranges(cfg):
    _, ore, _ = cfg
    rng = np.random.default_rng(3)
    liths = {lith.name: lith for lith in ore.lithotypes}
    for _ in range(200):
        comp = sample_composition(ore, rng)
        assert comp.volume_fraction.sum() == pytest.approx(1.0)
        for name, frac in zip(comp.minerals, comp.volume_fraction):
            rng_ = liths[comp.lithotype].minerals.get(name)
            if rng_ is None:
                assert frac == 0
            else:
                assert rng_.min_pct / 100 - 1e-9 <= frac <= rng_.max_pct / 100 + 1e-9


def test_grade_and_mass_by_hand():
    # 10 cm3 of hedenbergite (3.56 g/cm3, 650 ppm) and 30 cm3 of albite (2.62, 2 ppm)
    grade, mass = grade_and_mass(np.array([10_000.0, 30_000.0]), np.array([650.0, 2.0]), np.array([3.56, 2.62]))
    assert mass == pytest.approx(35.6 + 78.6)
    assert grade == pytest.approx((35.6 * 650 + 78.6 * 2) / (35.6 + 78.6))


def test_rock_mass_and_grade_follow_rendered_volumes(cfg):
    m, ore, lib = cfg
    minerals = mineral_list(ore)
    rho = densities(minerals, lib)
    px_area = m.line_pitch_mm * m.detector.pixel_pitch_mm
    for seed in range(20):
        rock = make_rock(ore, m, rho, np.random.default_rng(seed))
        paths = rock.image.paths_mm
        # every pixel's mineral paths add up to the body's thickness, which never exceeds the rock size
        assert np.all(paths >= 0)
        assert paths.sum(axis=2).max() <= rock.image.size_mm
        mass = float((paths.sum(axis=(0, 1)) * px_area * rho).sum()) * 1e-3
        assert rock.mass_g == pytest.approx(mass, rel=1e-4)
        assert (rock.label == "sc") == (rock.sc2o3_ppm >= ore.label_cutoff_ppm)
        # the projection is about as wide as the rock is big (within the random aspect ratios)
        extent_mm = max(rock.image.mask.shape) * m.detector.pixel_pitch_mm
        assert 0.5 * rock.image.size_mm <= extent_mm <= rock.image.size_mm * 1.1 + 2


def test_belt_truth_matches_the_lines(tmp_path, cfg):
    m, o, lib = cfg
    rec = read_belt_recording(simulate_belt(tmp_path / "belt", 1.0, 3, m, o, lib, occupancy=0.3, progress=False))
    assert rec.truth and len(rec.truth) > 10
    air = rec.calibration.air.astype(np.float32).mean(axis=0)
    dark = rec.calibration.dark.astype(np.float32).mean(axis=0)
    span = air[:, 1] - dark[:, 1]
    good = np.abs(span - np.median(span)) < 0.3 * np.median(span)  # skip dead and stuck columns
    covered = np.zeros(rec.lines.shape[:2], bool)
    for t in rec.truth:
        # every rock lies inside the recording and its centroid pixel is attenuated
        assert 0 <= t["first_line"] <= t["centroid_line"] <= t["last_line"] < rec.n_lines
        assert 0 <= t["x_min_px"] <= t["centroid_px"] <= t["x_max_px"] < rec.pixels
        line, col = int(round(t["centroid_line"])), int(round(t["centroid_px"]))
        cols = [c for c in range(col - 2, col + 3) if 0 <= c < rec.pixels and good[c]]
        patch = rec.lines[line - 1:line + 2, cols, 1].astype(np.float32)
        trans = (patch - dark[cols, 1]) / span[cols]
        assert np.median(trans) < 0.97, t
        covered[t["first_line"]:t["last_line"] + 1, t["x_min_px"]:t["x_max_px"] + 1] = True
    # outside every truth box the belt is empty: transmission ~1 within noise
    hi = rec.lines[..., 1].astype(np.float32)
    trans = (hi - dark[:, 1]) / np.maximum(span, 1)
    outside = trans[~covered & good[None, :]]
    assert abs(float(outside.mean()) - 1.0) < 0.01
    occ = float(rec.meta["occupancy"])
    assert 0.15 < occ < 0.45


def test_belt_worker_processes_make_the_same_rocks(cfg):
    from sorting.twin import BeltTwin

    m, o, lib = cfg

    def lines(workers):
        twin = BeltTwin(0.4, 9, m, o, lib, occupancy=0.3, workers=workers)
        return b"".join(block.tobytes() for _, block in twin.chunks()), twin.truth

    one, truth_one = lines(1)
    two, truth_two = lines(2)
    assert truth_one == truth_two and len(truth_one) > 5
    assert one == two
