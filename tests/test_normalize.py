"""Normalization: purity, dtypes, out= buffers, starved pixels, repairs and errors."""
from __future__ import annotations

import numpy as np
import pytest
from test_calibrate import make_scans, mu_of, plate_signal, raw_counts

from sorting.config import load_machine
from sorting.physics import load_materials
from sorting.stages.calibrate import calibrate
from sorting.stages.counts import STARVED_A
from sorting.stages.maps import material_maps, ratio
from sorting.stages.normalize import attenuation
from sorting.testing import starved
from sorting.twin.detector import build_response, pixel_pattern


@pytest.fixture(scope="module")
def machine():
    return load_machine()


@pytest.fixture(scope="module")
def resp(machine):
    return build_response(machine, load_materials())


@pytest.fixture(scope="module")
def cal(machine):
    return calibrate(make_scans(machine, seed=21))


def _plate_raw(machine, resp, material: str, t_mm: float, lines: int, x0: int, width: int, seed: int | None = 3):
    sig = plate_signal(machine, mu_of(material, resp.energies_kev) * t_mm, lines, width)
    rng = None if seed is None else np.random.default_rng(seed)
    return raw_counts(*sig, machine, x0, rng)


def _rock_block(machine, resp, lines=40, width=60, x0=500):
    """A 20 mm syenite disc (radius 14 px) on empty belt, noisy raw counts."""
    rows, cols = np.mgrid[0:lines, 0:width]
    disc = (rows - lines / 2) ** 2 + (cols - width / 2) ** 2 < 14**2
    belt = _plate_raw(machine, resp, "syenite", 0.0, lines, x0, width, seed=4)
    rock = _plate_raw(machine, resp, "syenite", 20.0, lines, x0, width, seed=5)
    return np.where(disc[..., None], rock, belt), disc


def test_attenuation_pure_float32_and_out(machine, resp, cal):
    raw, _ = _rock_block(machine, resp)
    before = raw.copy()
    a = attenuation(raw, cal, 500)
    np.testing.assert_array_equal(raw, before)
    assert a.dtype == np.float32 and a.shape == raw.shape
    out = np.full(raw.shape, np.nan, np.float32)
    got = attenuation(raw, cal, 500, out=out)
    assert got is out
    np.testing.assert_array_equal(out, a)
    with pytest.raises(ValueError, match=r"`out` \(shape \(40, 60\), float32\).*\(40, 60, 2\)"):
        attenuation(raw, cal, 500, out=np.empty((40, 60), np.float32))
    with pytest.raises(ValueError, match="float32"):
        attenuation(raw, cal, 500, out=np.empty(raw.shape, np.float64))


def test_attenuation_matches_the_definition(machine, resp, cal):
    raw = _plate_raw(machine, resp, "hedenbergite", 15.0, 16, 100, 50)
    a = attenuation(raw, cal, 100)
    dark, air = cal.dark[100:150].astype(np.float64), cal.air[100:150].astype(np.float64)
    expected = -np.log(np.maximum(raw - dark, 1.0) / (air - dark))  # none of these columns is bad
    np.testing.assert_allclose(a, expected, atol=2e-6)
    np.testing.assert_allclose(a.mean(axis=(0, 1)), resp.attenuation(mu_of("hedenbergite", resp.energies_kev) * 15.0),
                               atol=0.01)


@pytest.mark.parametrize("value", [0, 65535])
def test_extreme_counts_give_finite_maps(cal, value):
    raw = np.full((8, 30, 2), value, np.uint16)
    a = attenuation(raw, cal, 0)
    assert np.isfinite(a).all()
    if value == 0:  # no signal: the largest A the floor allows, ln(air - dark)
        good = ~cal.bad[:30]
        expected = np.log(cal.air[:30] - cal.dark[:30])[good]
        np.testing.assert_allclose(a[:, good], np.broadcast_to(expected, a[:, good].shape), rtol=1e-5)
        assert starved(raw, a, cal, 0).all()
    r = ratio(a)
    assert np.isfinite(r).all()
    maps = material_maps(a, np.ones((8, 30), bool), cal)
    for name in ("a_low", "a_high", "r", "t_pom_mm", "t_fe_mm", "fe_frac", "mafic_frac", "thickness_mm"):
        assert np.isfinite(getattr(maps, name)).all(), name


def test_starved_pixels_flagged_and_finite(machine, resp, cal):
    thick = _plate_raw(machine, resp, "iron", 25.0, 32, 200, 40)  # A_low ~ 8
    a = attenuation(thick, cal, 200)
    assert np.isfinite(a).all()
    flags = starved(thick, a, cal, 200)
    assert flags.shape == (32, 40) and flags.dtype == bool
    assert flags.mean() > 0.95
    thin = _plate_raw(machine, resp, "syenite", 20.0, 32, 200, 40)
    assert not starved(thin, attenuation(thin, cal, 200), cal, 200).any()
    # between the two: iron 14 mm has A_low ~ 5.5 but only ~6 quanta left per pixel
    mid = _plate_raw(machine, resp, "iron", 14.0, 32, 200, 40)
    a_mid = attenuation(mid, cal, 200)
    assert np.median(a_mid[..., 0]) < STARVED_A
    assert starved(mid, a_mid, cal, 200).mean() > 0.3


def test_bad_columns_repaired_without_stripe(machine, resp, cal):
    pat = pixel_pattern(machine)
    for col in np.flatnonzero(pat.dead | pat.stuck | pat.noisy):
        x0 = int(np.clip(col - 10, 0, machine.detector.pixels - 21))
        k = int(col) - x0
        raw = _plate_raw(machine, resp, "syenite", 25.0, 200, x0, 21, seed=int(col))
        a = attenuation(raw, cal, x0)
        assert np.isfinite(a).all()
        col_mean = a.mean(axis=0)  # (21, 2)
        others = np.r_[col_mean[:k], col_mean[k + 1:]]
        # no stripe: the repaired column reads like the others (column-mean noise ~0.002)
        np.testing.assert_allclose(col_mean[k], others.mean(axis=0), atol=0.01)
        # and its lines are the mean of the two neighbours, not the defect's counts
        np.testing.assert_allclose(a[:, k], 0.5 * (a[:, k - 1] + a[:, k + 1]), atol=1e-6)


def test_shape_errors_name_both_shapes(cal):
    raw = np.zeros((4, 30, 2), np.uint16)
    with pytest.raises(ValueError, match=r"\(4, 30, 2\).*x0=1240.*\(1250, 2\)"):
        attenuation(raw, cal, 1240)
    with pytest.raises(ValueError, match=r"\(4, 30\).*\(lines, width, 2\)"):
        attenuation(raw[..., 0], cal)
    with pytest.raises(ValueError, match="x0"):
        attenuation(raw, cal, -1)
    a = attenuation(raw, cal)
    with pytest.raises(ValueError, match=r"`a` \(shape \(4, 29, 2\)\) does not match `raw` \(shape \(4, 30, 2\)\)"):
        starved(raw, a[:, 1:], cal)
    with pytest.raises(ValueError, match=r"`mask` \(shape \(4, 29\)\) does not match `a` \(shape \(4, 30, 2\)\)"):
        material_maps(a, np.ones((4, 29), bool), cal)
    with pytest.raises(ValueError, match=r"`out` \(shape \(4, 29\), float32\).*\(4, 30\)"):
        ratio(a, out=np.empty((4, 29), np.float32))
    with pytest.raises(ValueError, match="channels"):
        ratio(a[..., :1])


def test_ratio_floor_and_out():
    a = np.array([[[0.3, 0.0], [3.2, 2.0], [0.01, -0.5]]], np.float32)
    before = a.copy()
    r = ratio(a)
    np.testing.assert_array_equal(a, before)
    np.testing.assert_allclose(r, [[0.3 / 0.02, 1.6, 0.01 / 0.02]], rtol=1e-6)
    assert r.dtype == np.float32
    out = np.empty((1, 3), np.float32)
    assert ratio(a, floor=0.5, out=out) is out
    np.testing.assert_allclose(out, [[0.6, 1.6, 0.02]], rtol=1e-6)


def test_material_maps_pure_masked_and_belt_does_not_leak(machine, resp, cal):
    raw, disc = _rock_block(machine, resp)
    a = attenuation(raw, cal, 500)
    a_before, mask_before = a.copy(), disc.copy()
    maps = material_maps(a, disc, cal, smooth_px=1.5)
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(disc, mask_before)
    expected = resp.attenuation(mu_of("syenite", resp.energies_kev) * 20.0)
    for name in ("a_low", "a_high", "r", "t_pom_mm", "t_fe_mm", "fe_frac", "mafic_frac", "thickness_mm"):
        m = getattr(maps, name)
        assert m.dtype == np.float32 and m.shape == disc.shape, name
        assert np.all(m[~disc] == 0), name
    assert maps.starved.dtype == bool and not maps.starved.any()
    # normalized convolution: the rim of the rock reads like its middle, not pulled to the belt's 0
    rim = disc & ~np.pad(disc, 1)[2:, 1:-1] | disc & ~np.pad(disc, 1)[:-2, 1:-1]
    assert abs(np.mean(maps.a_low[rim]) - expected[0]) < 0.02
    assert abs(np.mean(maps.a_low[disc]) - expected[0]) < 0.01
    assert abs(np.median(maps.mafic_frac[disc])) < 0.1
    assert np.median(maps.thickness_mm[disc]) == pytest.approx(20.0, rel=0.05)
    # smoothing lowers the pixel noise
    assert np.std(maps.a_low[disc]) < 0.7 * np.std(a[..., 0][disc])
    # a starved mask from the caller is used (inside the mask only)
    flags = np.zeros_like(disc)
    flags[:5] = True
    flags[20, 30] = True
    got = material_maps(a, disc, cal, starved_mask=flags).starved
    np.testing.assert_array_equal(got, flags & disc)
    # no smoothing: the maps take A as it is
    raw_maps = material_maps(a, disc, cal, smooth_px=0)
    np.testing.assert_array_equal(raw_maps.a_high[disc], a[..., 1][disc])


@pytest.mark.parametrize("rock, t_mm, expected", [("syenite", 40.0, 0.0), ("mix40", 40.0, 0.4),
                                                  ("hedenbergite", 20.0, 1.0), ("hedenbergite", 40.0, 1.0)])
def test_noisy_plates_read_their_mafic_fraction(machine, resp, cal, rock, t_mm, expected):
    """End to end on noisy counts and a noisy calibration. 40 mm of hedenbergite leaves
    ~10 quanta per pixel in the low channel: smoothing the logs would read ~1.15."""
    e = resp.energies_kev
    mu = 0.6 * mu_of("syenite", e) + 0.4 * mu_of("hedenbergite", e) if rock == "mix40" else mu_of(rock, e)
    raw = raw_counts(*plate_signal(machine, mu * t_mm, 48, 48), machine, 700, np.random.default_rng(9))
    a = attenuation(raw, cal, 700)
    maps = material_maps(a, np.ones((48, 48), bool), cal, smooth_px=1.5)
    assert np.median(maps.mafic_frac) == pytest.approx(expected, abs=0.08)
    assert np.median(maps.thickness_mm) == pytest.approx(t_mm, rel=0.05)


def test_basis_thickness_reads_the_calibration_table(machine, resp, cal):
    """One interleaved lookup gives exactly what the calibration's own inverse gives, for
    maps and for flat pixel lists, including pairs far outside the table (clamped)."""
    from sorting.stages.maps import basis_thickness

    rng = np.random.default_rng(7)
    a_high = rng.uniform(0.0, 1.2 * cal.lut.a_high_max, 5000).astype(np.float32)
    a_low = (a_high * rng.uniform(0.5, 4.0, 5000)).astype(np.float32)
    a_low[:4] = (1e6, -1.0, 0.0, 50.0)  # far off the table in every direction
    a_high[:4] = (0.0, 1e6, -3.0, 1e-4)
    want = cal.lut.invert(a_low, a_high)
    for got in (basis_thickness(a_low, a_high, cal),
                tuple(t.ravel() for t in basis_thickness(a_low.reshape(50, 100), a_high.reshape(50, 100), cal))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[0].dtype == np.float32 and got[0].flags.c_contiguous


def test_attenuation_kernel_matches_the_formula():
    """The stream's compiled path (uint16 counts) against A = ln(air - dark) - ln(max(I - dark, 1))
    in float64, and bad columns interpolated linearly from the nearest good ones, by hand."""
    from sorting.stages.counts import SIGNAL_FLOOR_ADU
    from sorting.stages.normalize import attenuation_into

    rng = np.random.default_rng(4)
    w = 40
    raw = rng.integers(0, 60000, (5, w, 2)).astype(np.uint16)
    raw[0, 3] = 0  # below dark: the signal floor
    dark = rng.uniform(90, 110, (w, 2)).astype(np.float32)
    log_flat = np.log(rng.uniform(50000, 60000, (w, 2))).astype(np.float32)
    bad = np.zeros(w, bool)
    bad[[0, 10, 11, w - 1]] = True
    out = attenuation_into(raw, dark, log_flat, bad, np.empty((5, w, 2), np.float32))
    expect = log_flat.astype(np.float64) - np.log(np.maximum(raw - dark.astype(np.float64), SIGNAL_FLOOR_ADU))
    good = ~bad
    np.testing.assert_allclose(out[:, good], expect[:, good], rtol=0, atol=2e-5)
    # columns 10, 11 lie 1/3 and 2/3 of the way from 9 to 12; the edges copy their neighbour
    np.testing.assert_allclose(out[:, 10], (2 * out[:, 9] + out[:, 12]) / 3, atol=1e-5)
    np.testing.assert_allclose(out[:, 11], (out[:, 9] + 2 * out[:, 12]) / 3, atol=1e-5)
    np.testing.assert_array_equal(out[:, 0], out[:, 1])
    np.testing.assert_array_equal(out[:, w - 1], out[:, w - 2])
    # and the same numbers as the general (numpy/OpenCV) path for other integer counts
    np.testing.assert_array_equal(out, attenuation_into(raw.astype(np.int32), dark, log_flat, bad,
                                                        np.empty((5, w, 2), np.float32)))
