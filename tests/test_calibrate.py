"""Calibration: bad pixels, the POM x Fe basis inverse and the mafic fraction.

Raw scans are made here directly from the detector physics (build_response,
pixel_pattern, sample_counts); expected thicknesses are the ones the scans were made
with, expected mafic fractions the volume fractions of the simulated rocks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sorting.config import Layer, MachineConfig, load_machine
from sorting.errors import InputError
from sorting.io import CalibrationScans, WedgeScan
from sorting.physics import load_materials
from sorting.stages.calibrate import Calibration, calibrate, find_bad_pixels
from sorting.stages.maps import material_maps
from sorting.stages.normalize import attenuation, basis_vector
from sorting.twin.detector import build_response, pixel_pattern, sample_counts

#: the crossed wedge grid of docs/formats.md (POM 0-250 mm, Fe 0-12 mm)
WEDGE_POM_MM = (0.0, 10.0, 20.0, 35.0, 50.0, 70.0, 90.0, 120.0, 150.0, 200.0, 250.0)
WEDGE_FE_MM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0)
SOURCE = "test-calibration-folder"


# ---------------------------------------------------------------- scan making (shared with the other test files)
def raw_counts(mean: np.ndarray, var: np.ndarray, machine: MachineConfig, x0: int,
               rng: np.random.Generator | None) -> np.ndarray:
    """Raw uint16 counts of detector columns x0.. for signal ``mean`` (L, W, 2) above dark.

    ``rng=None``: noise-free, ``rint(dark + gain * mean)`` with dead pixels at dark and
    stuck ones saturated; otherwise ``sample_counts`` (compound Poisson, read noise).
    """
    pat = pixel_pattern(machine)
    cols = slice(x0, x0 + mean.shape[1])
    if rng is not None:
        return sample_counts(mean, var, pat, rng, cols)
    sig = pat.dark[cols] + pat.gain[cols] * mean
    sig[:, pat.dead[cols]] = pat.dark[cols][pat.dead[cols]]
    sig[:, pat.stuck[cols]] = 65535.0
    return np.clip(np.rint(sig), 0, 65535).astype(np.uint16)


def plate_signal(machine: MachineConfig, line_integral: np.ndarray, lines: int, width: int):
    """Mean and variance (lines, width, 2) float32 of a uniform plate, sum(mu*t) (E,)."""
    resp = build_response(machine, load_materials())
    mean, var = resp.mean_var(np.exp(-np.asarray(line_integral, dtype=float)))
    shape = (lines, width, 2)
    return (np.broadcast_to(mean, shape).astype(np.float32), np.broadcast_to(var, shape).astype(np.float32))


def make_scans(machine: MachineConfig, seed: int | None = None, lines: int = 64, wedge_lines: int = 16,
               wedge_width: int = 48, pom_mm=WEDGE_POM_MM, fe_mm=WEDGE_FE_MM) -> CalibrationScans:
    """Dark, air and crossed POM x Fe wedge scans of ``machine`` (noise-free when seed is None)."""
    lib = load_materials()
    resp = build_response(machine, lib)
    rng = None if seed is None else np.random.default_rng(seed)
    p = machine.detector.pixels
    zero = np.zeros((lines, p, 2), np.float32)
    dark = raw_counts(zero, zero, machine, 0, rng)
    air = raw_counts(*plate_signal(machine, np.zeros(resp.energies_kev.size), lines, p), machine, 0, rng)
    mu_pom, mu_fe = lib.mu_per_mm(["pom", "iron"], resp.energies_kev)
    wedges = []
    for i, (pom, fe) in enumerate((pom, fe) for pom in pom_mm for fe in fe_mm):
        x0 = (i * 97) % (p - wedge_width + 1)
        sig = plate_signal(machine, mu_pom * pom + mu_fe * fe, wedge_lines, wedge_width)
        wedges.append(WedgeScan(f"wedge_{i:03d}.tiff", x0, pom, fe, raw_counts(*sig, machine, x0, rng)))
    return CalibrationScans(dark, air, tuple(wedges), SOURCE)


def other_machine() -> MachineConfig:
    """Another sorter: 120 kVp, 1000 pixels of 1.0 mm, GOS front layer, 0.3 mm Cu between layers."""
    ref = load_machine()
    det = dataclasses.replace(ref.detector, pixels=1000, pixel_pitch_mm=1.0, front=Layer("gos", 0.2),
                              interlayer=(Layer("silicon", 0.3), Layer("copper", 0.3)))
    return dataclasses.replace(ref, name="other-120kv", tube=dataclasses.replace(ref.tube, kvp=120.0),
                               detector=det)


def mu_of(name: str, energies: np.ndarray) -> np.ndarray:
    """Linear attenuation (E,) of a library material or of syenite (albite/orthoclase 50/50 by volume)."""
    lib = load_materials()
    if name == "syenite":
        return lib.mu_per_mm(["albite", "orthoclase"], energies).mean(axis=0)
    return lib.mu_per_mm([name], energies)[0]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref():
    return load_machine()


@pytest.fixture(scope="module")
def resp(ref):
    return build_response(ref, load_materials())


@pytest.fixture(scope="module")
def cal_clean(ref) -> Calibration:
    return calibrate(make_scans(ref))


@pytest.fixture(scope="module")
def scans_noisy(ref) -> CalibrationScans:
    return make_scans(ref, seed=7)


@pytest.fixture(scope="module")
def cal_noisy(scans_noisy) -> Calibration:
    return calibrate(scans_noisy)


def _scan_a(scan, cal: Calibration) -> np.ndarray:
    """Mean A (2,) of a uniform scan over its lines and good columns, through normalize.attenuation."""
    a = attenuation(scan.counts, cal, scan.x0)
    good = ~cal.bad[scan.x0:scan.x0 + scan.counts.shape[1]]
    return a[:, good].reshape(-1, 2).mean(axis=0)


# ---------------------------------------------------------------- basis inverse
@pytest.mark.parametrize("pom, fe", [(20.0, 1.0), (50.0, 2.0), (35.0, 4.0), (90.0, 3.0), (120.0, 1.5),
                                     (70.0, 6.0), (150.0, 0.5)])
def test_noise_free_wedge_cell_inverts_to_its_thicknesses(cal_clean, ref, pom, fe):
    scans = make_scans(ref, pom_mm=(pom,), fe_mm=(fe,), lines=2)
    a = _scan_a(scans.wedges[0], cal_clean)
    t_pom, t_fe = cal_clean.lut.invert(a[:1], a[1:])
    assert t_pom[0] == pytest.approx(pom, rel=0.02)
    assert t_fe[0] == pytest.approx(fe, rel=0.02)


@pytest.mark.parametrize("pom, fe", [(27.0, 0.8), (63.0, 2.6), (105.0, 3.7), (42.0, 7.3), (170.0, 1.2), (8.0, 2.2)])
def test_off_grid_combination_inverts(cal_clean, resp, pom, fe):
    mu_pom, mu_fe = mu_of("pom", resp.energies_kev), mu_of("iron", resp.energies_kev)
    a = resp.attenuation(mu_pom * pom + mu_fe * fe).astype(np.float32)
    t_pom, t_fe = cal_clean.lut.invert(a[:1], a[1:])
    assert t_pom[0] == pytest.approx(pom, rel=0.02)
    assert t_fe[0] == pytest.approx(fe, rel=0.02)


def test_pure_layers_invert_to_one_basis(cal_clean, resp):
    mu_pom, mu_fe = mu_of("pom", resp.energies_kev), mu_of("iron", resp.energies_kev)
    a = resp.attenuation(np.stack([mu_pom * 80.0, mu_fe * 3.0])).astype(np.float32)
    t_pom, t_fe = cal_clean.lut.invert(a[:, 0], a[:, 1])
    assert t_pom[0] == pytest.approx(80.0, rel=0.02) and abs(t_fe[0]) < 0.03
    assert t_fe[1] == pytest.approx(3.0, rel=0.02) and abs(t_pom[1]) < 0.5


def test_invert_edges_clamped_and_finite(cal_clean):
    a_low = np.array([0.0, -0.1, 50.0, 0.0, 3.0, np.float32(1e30)], np.float32)
    a_high = np.array([0.0, -0.1, 40.0, 5.0, 0.0, 1.0], np.float32)
    t_pom, t_fe = cal_clean.lut.invert(a_low, a_high)
    assert np.isfinite(t_pom).all() and np.isfinite(t_fe).all()
    assert abs(t_pom[0]) < 0.5 and abs(t_fe[0]) < 0.05  # empty belt reads nothing
    assert t_pom.max() <= 250.0 * 1.01 and t_fe.max() <= 12.0 * 1.01


def test_invert_shapes_and_out(cal_clean):
    rng = np.random.default_rng(0)
    a_high = rng.uniform(0.2, 3.0, (3, 40, 50)).astype(np.float32)
    a_low = (a_high * rng.uniform(1.4, 2.0, a_high.shape)).astype(np.float32)
    t_pom, t_fe = cal_clean.lut.invert(a_low, a_high)
    assert t_pom.shape == a_low.shape and t_pom.dtype == np.float32 and t_fe.dtype == np.float32
    out = (np.empty_like(a_low), np.empty_like(a_low))
    got = cal_clean.lut.invert(a_low, a_high, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[0], t_pom)
    # a long flat input crosses remap's 32767-pixel block limit
    flat = cal_clean.lut.invert(np.tile(a_low.ravel(), 6), np.tile(a_high.ravel(), 6))
    np.testing.assert_array_equal(flat[1][:a_low.size], t_fe.ravel())
    with pytest.raises(ValueError, match=r"\(3, 40, 50\).*\(40, 50\)"):
        cal_clean.lut.invert(a_low, a_high[0])


# ---------------------------------------------------------------- noisy scans and bad pixels
def test_bad_pixels_found_from_noisy_scans(cal_noisy, scans_noisy, ref):
    pat = pixel_pattern(ref)
    np.testing.assert_array_equal(cal_noisy.bad, pat.dead | pat.stuck | pat.noisy)
    found = find_bad_pixels(scans_noisy.dark.astype(np.float32), scans_noisy.air.astype(np.float32))
    np.testing.assert_array_equal(found.dead, pat.dead)
    np.testing.assert_array_equal(found.stuck, pat.stuck)
    np.testing.assert_array_equal(found.noisy, pat.noisy)


def test_more_defects_of_every_kind_are_found():
    machine = dataclasses.replace(load_machine(), name="many-defects")
    machine = dataclasses.replace(machine, detector=dataclasses.replace(machine.detector, pixels=400,
                                                                        dead_pixels=12))
    pat = pixel_pattern(machine)
    assert pat.dead.sum() == pat.stuck.sum() == pat.noisy.sum() == 4
    scans = make_scans(machine, seed=3, pom_mm=(0.0,), fe_mm=(0.0,))
    found = find_bad_pixels(scans.dark.astype(np.float32), scans.air.astype(np.float32))
    np.testing.assert_array_equal(found.dead, pat.dead)
    np.testing.assert_array_equal(found.stuck, pat.stuck)
    np.testing.assert_array_equal(found.noisy, pat.noisy)


def test_noisy_calibration_is_sound(cal_noisy, ref, resp):
    assert cal_noisy.pixels == ref.detector.pixels
    assert cal_noisy.dark.dtype == cal_noisy.air.dtype == cal_noisy.air_sigma_a.dtype == np.float32
    # air noise of A is about 1/sqrt(equivalent quanta) of the air signal
    n_eq = resp.air_adu**2 / resp.weights_sq.sum(axis=0)
    good = ~cal_noisy.bad
    np.testing.assert_allclose(np.median(cal_noisy.air_sigma_a[good], axis=0), 1.0 / np.sqrt(n_eq), rtol=0.1)
    # the noisy fit still inverts mid-range thicknesses (16-line wedge cells limit it to a few %)
    mu_pom, mu_fe = mu_of("pom", resp.energies_kev), mu_of("iron", resp.energies_kev)
    for pom, fe in [(30.0, 1.0), (63.0, 2.6), (100.0, 3.0)]:
        a = resp.attenuation(mu_pom * pom + mu_fe * fe).astype(np.float32)
        t_pom, t_fe = cal_noisy.lut.invert(a[:1], a[1:])
        assert t_pom[0] == pytest.approx(pom, rel=0.05)
        assert t_fe[0] == pytest.approx(fe, abs=0.1)


def test_fingerprint_follows_content(ref, cal_clean, cal_noisy):
    again = calibrate(make_scans(ref))
    assert again.fingerprint == cal_clean.fingerprint
    assert cal_noisy.fingerprint != cal_clean.fingerprint
    assert len(cal_clean.fingerprint) == 16 and int(cal_clean.fingerprint, 16) >= 0


# ---------------------------------------------------------------- mafic fraction
def test_basis_vectors_match_the_physics():
    expected = {"albite": (1.628, 0.0209), "orthoclase": (1.516, 0.0352), "hedenbergite": (1.593, 0.1509),
                "fayalite": (1.263, 0.318), "magnetite": (0.947, 0.478)}
    for name, (p, f) in expected.items():
        got = basis_vector(name)
        assert got[0] == pytest.approx(p, rel=0.01) and got[1] == pytest.approx(f, rel=0.02), name
    # syenite is the 50/50 volume mix, so its vector is the mean of the two feldspars'
    s, a, o = basis_vector("syenite"), basis_vector("albite"), basis_vector("orthoclase")
    assert s == pytest.approx(((a[0] + o[0]) / 2, (a[1] + o[1]) / 2), rel=1e-6)


@pytest.mark.parametrize("thickness_mm", [10.0, 20.0, 40.0, 80.0])
def test_mafic_fraction_of_syenite_and_ore(cal_clean, resp, thickness_mm):
    e = resp.energies_kev
    rocks = {0.0: mu_of("syenite", e), 0.4: 0.6 * mu_of("syenite", e) + 0.4 * mu_of("hedenbergite", e)}
    for frac, mu in rocks.items():
        a = resp.attenuation(mu * thickness_mm).astype(np.float32)
        block = np.broadcast_to(a, (9, 9, 2))
        maps = material_maps(block, np.ones((9, 9), bool), cal_clean)
        assert maps.mafic_frac[4, 4] == pytest.approx(frac, abs=0.05)
        assert maps.thickness_mm[4, 4] == pytest.approx(thickness_mm, rel=0.03)


@pytest.mark.parametrize("mineral", ["fayalite", "magnetite"])
def test_dense_iron_minerals_read_well_above_one(cal_clean, resp, mineral):
    for t in (10.0, 20.0):
        a = resp.attenuation(mu_of(mineral, resp.energies_kev) * t).astype(np.float32)
        maps = material_maps(np.broadcast_to(a, (5, 5, 2)), np.ones((5, 5), bool), cal_clean)
        assert maps.mafic_frac[2, 2] > 2.0
        assert maps.fe_frac[2, 2] > 0.15


# ---------------------------------------------------------------- another machine
def test_other_machine_calibrates_from_its_own_scans():
    machine = other_machine()
    resp = build_response(machine, load_materials())
    pat = pixel_pattern(machine)
    noisy = calibrate(make_scans(machine, seed=11))
    assert noisy.pixels == 1000 and noisy.dark.shape == (1000, 2)
    np.testing.assert_array_equal(noisy.bad, pat.dead | pat.stuck | pat.noisy)
    # the noise-free calibration passes the same wedge inversion check as the reference machine
    cal = calibrate(make_scans(machine))
    mu_pom, mu_fe = mu_of("pom", resp.energies_kev), mu_of("iron", resp.energies_kev)
    for pom, fe in [(20.0, 1.0), (50.0, 2.0), (35.0, 4.0), (120.0, 1.5), (63.0, 2.6), (105.0, 3.7)]:
        a = resp.attenuation(mu_pom * pom + mu_fe * fe).astype(np.float32)
        t_pom, t_fe = cal.lut.invert(a[:1], a[1:])
        assert t_pom[0] == pytest.approx(pom, rel=0.02)
        assert t_fe[0] == pytest.approx(fe, rel=0.02)


# ---------------------------------------------------------------- unusable scans
def test_grid_too_small_is_refused(ref):
    scans = make_scans(ref, pom_mm=(0.0, 50.0), fe_mm=(0.0, 2.0, 4.0), lines=4)
    with pytest.raises(InputError, match=f"{SOURCE}.*wedge grid is too small"):
        calibrate(scans)


def test_air_not_above_dark_is_refused(ref):
    scans = make_scans(ref, seed=1, pom_mm=(0.0,), fe_mm=(0.0,), lines=8)
    with pytest.raises(InputError, match=f"{SOURCE}.*not above dark"):
        calibrate(dataclasses.replace(scans, air=scans.dark.copy()))


def test_malformed_scans_are_refused(ref):
    scans = make_scans(ref, pom_mm=(0.0,), fe_mm=(0.0,), lines=4)
    with pytest.raises(InputError, match=f"{SOURCE}.*air has 1249 pixels but dark has 1250"):
        calibrate(dataclasses.replace(scans, air=scans.air[:, 1:]))
    with pytest.raises(InputError, match=f"{SOURCE}.*dark: expected .lines, pixels, 2."):
        calibrate(dataclasses.replace(scans, dark=scans.dark[..., 0]))
    w = dataclasses.replace(scans.wedges[0], x0=1240)
    with pytest.raises(InputError, match=f"{SOURCE}.*wedge_000.tiff: columns 1240..1287 lie outside"):
        calibrate(dataclasses.replace(scans, wedges=(w,)))
    with pytest.raises(InputError, match="no wedge scans"):
        calibrate(dataclasses.replace(scans, wedges=()))


def test_simulator_scans_calibrate(ref):
    """The twin's own calibration scans (sorting.twin) calibrate to its detector."""
    render = pytest.importorskip("sorting.twin.render")
    renderer = render.Renderer.create(ref, load_materials(), ("albite",))
    cal = calibrate(renderer.calibration_scans(np.random.default_rng(2)))
    pat = pixel_pattern(ref)
    np.testing.assert_array_equal(cal.bad, pat.dead | pat.stuck | pat.noisy)
    mu_pom, mu_fe = mu_of("pom", renderer.response.energies_kev), mu_of("iron", renderer.response.energies_kev)
    a = renderer.response.attenuation(mu_pom * 60.0 + mu_fe * 2.0).astype(np.float32)
    t_pom, t_fe = cal.lut.invert(a[:1], a[1:])
    assert t_pom[0] == pytest.approx(60.0, rel=0.05) and t_fe[0] == pytest.approx(2.0, abs=0.1)
