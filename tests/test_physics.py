"""The detector model against physics: reference attenuations, ratio invariants, noise.

Expected values come from docs/physics.md (an independent forward model of the
reference machine) or are rebuilt here from the tube spectrum and the attenuation
coefficients, not from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_calibrate import make_scans, mu_of, raw_counts

from sorting.config import load_machine, load_ore
from sorting.physics import load_materials, tube_spectrum
from sorting.stages.calibrate import calibrate
from sorting.stages.normalize import attenuation
from sorting.twin.detector import build_response, pixel_pattern, sample_counts

#: docs/physics.md: A_high at 20 mm, R at 20 mm, A_high at 50 mm, R at 50 mm
REFERENCE_TABLE = {
    "syenite": (0.957, 1.658, 2.325, 1.468),
    "quartz": (0.955, 1.604, 2.332, 1.436),
    "hedenbergite": (1.749, 1.788, 3.948, 1.472),
    "fayalite": (2.471, 1.709, 5.376, 1.392),
    "magnetite": (3.064, 1.625, 6.572, 1.337),
    "iron": (4.849, 1.445, 10.288, 1.230),
}
#: docs/physics.md: R at equal A_high = 1.0
REFERENCE_R_AT_A1 = {"syenite": 1.648, "mix40": 1.881, "hedenbergite": 2.024, "fayalite": 2.173, "magnetite": 2.235}


@pytest.fixture(scope="module")
def machine():
    return load_machine()


@pytest.fixture(scope="module")
def resp(machine):
    return build_response(machine, load_materials())


def _mu(name: str, energies: np.ndarray) -> np.ndarray:
    if name == "mix40":  # 60 % syenite + 40 % hedenbergite by volume
        return 0.6 * mu_of("syenite", energies) + 0.4 * mu_of("hedenbergite", energies)
    return mu_of(name, energies)


def _a_r(resp, mu: np.ndarray, t_mm: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    a = resp.attenuation(np.multiply.outer(np.atleast_1d(t_mm), mu))
    return a[:, 1], a[:, 0] / a[:, 1]


@pytest.mark.parametrize("name", list(REFERENCE_TABLE))
def test_reference_attenuation_table(resp, name):
    a_high, r = _a_r(resp, _mu(name, resp.energies_kev), np.array([20.0, 50.0]))
    got = (a_high[0], r[0], a_high[1], r[1])
    np.testing.assert_allclose(got, REFERENCE_TABLE[name], rtol=0.02)


def _thickness_at_a_high(resp, mu: np.ndarray, target: float) -> float:
    lo, hi = 0.0, 1000.0
    for _ in range(60):  # bisection: A_high rises monotonically with thickness
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _a_r(resp, mu, mid)[0][0] < target else (lo, mid)
    return 0.5 * (lo + hi)


def test_ratio_at_equal_a_high_orders_by_effective_z(resp):
    order = ["albite", "quartz", "syenite", "aluminium", "mix40", "hedenbergite", "fayalite", "magnetite", "iron"]
    r = {}
    for name in order:
        mu = _mu(name, resp.energies_kev)
        t = _thickness_at_a_high(resp, mu, 1.0)
        a_high, r_name = _a_r(resp, mu, t)
        assert a_high[0] == pytest.approx(1.0, abs=1e-6)
        r[name] = float(r_name[0])
    assert [r[n] for n in order] == sorted(r.values()), r
    for name, expected in REFERENCE_R_AT_A1.items():
        assert r[name] == pytest.approx(expected, rel=0.03), name


def test_ratio_falls_with_thickness_for_every_mineral(resp):
    minerals = sorted(load_ore().mineral_sc2o3_ppm) + ["syenite"]
    t = np.linspace(1.0, 150.0, 150)
    for name in minerals:
        _, r = _a_r(resp, _mu(name, resp.energies_kev), t)
        assert np.all(np.diff(r) < 0), name


def _independent_noise(machine, line_integral_fn) -> tuple[np.ndarray, np.ndarray]:
    """Mean and compound-Poisson variance (2,) in ADU per channel, rebuilt from the
    1 keV tube spectrum, the filters, the belt and the layer absorptions."""
    lib = load_materials()
    tube, det, belt = machine.tube, machine.detector, machine.belt
    e, fluence = tube_spectrum(tube.kvp, tube.anode_angle_deg)
    keep = fluence > 0
    e, fluence = e[keep], fluence[keep]
    for layer in list(tube.filters) + [belt]:
        fluence = fluence * np.exp(-lib.mu_per_mm([layer.material], e)[0] * layer.thickness_mm)
    n = fluence / fluence.sum() * machine.flux_photons_per_px_line
    front = lib.mu_per_mm([det.front.material], e)[0] * det.front.thickness_mm
    p_low = 1.0 - np.exp(-front)
    reach = np.exp(-front)
    for layer in det.interlayer:
        reach = reach * np.exp(-lib.mu_per_mm([layer.material], e)[0] * layer.thickness_mm)
    p_high = reach * (1.0 - np.exp(-lib.mu_per_mm([det.back.material], e)[0] * det.back.thickness_mm))
    trans = np.exp(-line_integral_fn(e))
    mean, var = np.empty(2), np.empty(2)
    for c, p in enumerate((p_low, p_high)):
        gain = det.air_level_adu[c] / np.sum(n * p * e)  # ADU per keV deposited
        mean[c] = np.sum(n * trans * p * e) * gain
        var[c] = np.sum(n * trans * p * e**2) * gain**2
    return mean, var


@pytest.mark.parametrize("plate", ["air", "syenite_30mm", "iron_12mm"])
def test_noise_is_compound_poisson_and_independent_between_channels(machine, resp, plate):
    material, t_mm = {"air": ("syenite", 0.0), "syenite_30mm": ("syenite", 30.0), "iron_12mm": ("iron", 12.0)}[plate]
    pat = pixel_pattern(machine)
    good = np.flatnonzero(~(pat.dead | pat.stuck | pat.noisy))[100:140]
    lines = 4000
    mean, var = resp.mean_var(np.exp(-mu_of(material, resp.energies_kev) * t_mm))
    shape = (lines, good.size, 2)
    raw = sample_counts(np.broadcast_to(mean, shape).astype(np.float32),
                        np.broadcast_to(var, shape).astype(np.float32), pat, np.random.default_rng(5), good)
    signal = (raw.astype(np.float64) - pat.dark[good]) / pat.gain[good]  # per-pixel ADU at gain 1
    exp_mean, exp_var = _independent_noise(machine, lambda e: mu_of(material, e) * t_mm)
    read_var = (pat.read_noise[good] / pat.gain[good]).astype(np.float64) ** 2
    # means within 5 standard errors (plus 0.5 % for the model's 2 keV energy bins)
    mean_err = np.abs(signal.mean(axis=0) - exp_mean)
    assert np.all(mean_err < 5 * np.sqrt((exp_var + read_var) / lines) + 0.005 * exp_mean)
    np.testing.assert_allclose(signal.var(axis=0), exp_var + read_var, rtol=0.10)
    # the two layers absorb disjoint photons: no correlation between the channels
    z = (signal - signal.mean(axis=0)) / signal.std(axis=0)
    assert abs(np.mean(z[..., 0] * z[..., 1])) < 0.05


def test_noise_free_plate_recovers_its_attenuation(machine, resp):
    cal = calibrate(make_scans(machine, lines=4, wedge_lines=2))
    x0, width = 540, 64  # holds the dead pixel 570: repaired from its neighbours
    for material, t_mm in [("syenite", 30.0), ("hedenbergite", 20.0), ("iron", 5.0)]:
        mu = mu_of(material, resp.energies_kev) * t_mm
        mean, _ = resp.mean_var(np.exp(-mu))
        sig = np.broadcast_to(mean, (8, width, 2)).astype(np.float32)
        raw = raw_counts(sig, sig, machine, x0, None)
        a = attenuation(raw, cal, x0)
        expected = resp.attenuation(mu)
        np.testing.assert_allclose(a, np.broadcast_to(expected, a.shape), atol=1e-3, err_msg=material)
