"""Per-particle features: geometry from hand computation, material values from plates whose
raw counts come straight from the detector physics (``Renderer.signal`` = build_response's
weights through Beer-Lambert), invariances and degenerate input."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from sorting.stages.features import (
    FAYALITE_LEVEL,
    FEATURE_NAMES,
    FEATURE_VERSION,
    N_FEATURES,
    OXIDE_LEVEL,
    TEXTURE_WINDOW_MM,
    dataset_features,
    features_batch,
    particle_features,
    texture_window,
)
from sorting.testing import feature_table

MINERALS = ("albite", "orthoclase", "hedenbergite", "hastingsite", "fayalite", "magnetite")
SYENITE = {"albite": 0.5, "orthoclase": 0.5}
ORE40 = {"albite": 0.3, "orthoclase": 0.3, "hedenbergite": 0.4}  # 40 % hedenbergite by volume
PITCH = 0.8


@pytest.fixture(scope="module")
def twin():
    from sorting.config import load_machine
    from sorting.physics import load_materials
    from sorting.stages.calibrate import calibrate
    from sorting.twin.render import Renderer

    renderer = Renderer.create(load_machine(), load_materials(), MINERALS)
    cal = calibrate(renderer.calibration_scans(np.random.default_rng(0)))
    return renderer, cal


def plate(twin, fractions, thickness_mm, mask, x0=300, noise_seed=None):
    """Raw counts of a uniform plate over ``mask``: noise-free (dark + gain * mean) unless a seed is given."""
    renderer, cal = twin
    paths = np.zeros((1, len(MINERALS)), np.float32)
    for name, f in fractions.items():
        paths[0, MINERALS.index(name)] = f * thickness_mm
    mean, var = renderer.signal(paths)
    sig, sig_var = renderer.blank(*mask.shape)
    sig[mask] = mean[0]
    sig_var[mask] = var[0]
    if noise_seed is not None:
        raw = renderer.counts(sig, sig_var, x0, np.random.default_rng(noise_seed))
    else:
        cols = slice(x0, x0 + mask.shape[1])
        raw = np.rint(renderer.pattern.dark[cols] + renderer.pattern.gain[cols] * sig).astype(np.uint16)
    from sorting.stages.normalize import attenuation

    return attenuation(raw, cal, x0)


def rect_mask(shape=(40, 60), r0=8, c0=8, h=24, w=44):
    m = np.zeros(shape, bool)
    m[r0:r0 + h, c0:c0 + w] = True
    return m


def feats(a, mask, cal, pp=PITCH, lp=PITCH):
    return dict(zip(FEATURE_NAMES, particle_features(a, mask, cal, pp, lp).tolist()))


def test_names():
    assert len(FEATURE_NAMES) == N_FEATURES == len(set(FEATURE_NAMES))
    assert isinstance(FEATURE_VERSION, str) and FEATURE_VERSION


def test_plate_geometry(twin):
    _, cal = twin
    m = rect_mask()
    f = feats(plate(twin, SYENITE, 20.0, m), m, cal)
    assert f["area_mm2"] == pytest.approx(24 * 44 * 0.64, rel=1e-6)
    assert f["equiv_diameter_mm"] == pytest.approx(np.sqrt(4 * 24 * 44 * 0.64 / np.pi), rel=1e-6)
    # a rectangle of n pixels of pitch p has variance (n p)^2 / 12 along the side
    assert f["length_mm"] == pytest.approx(4 * 44 * PITCH / np.sqrt(12), rel=1e-4)
    assert f["width_mm"] == pytest.approx(4 * 24 * PITCH / np.sqrt(12), rel=1e-4)
    assert f["elongation"] == pytest.approx(44 / 24, rel=1e-4)
    assert f["thickness_mean_mm"] == pytest.approx(20.0, rel=0.03)
    assert f["volume_cm3"] == pytest.approx(24 * 44 * 0.64 * 20.0 / 1000, rel=0.03)
    assert f["starved_share"] == 0.0 and f["interior_share"] == pytest.approx(20 * 40 / (24 * 44))


@pytest.mark.parametrize("axes, angle", [((40, 15), 30.0), ((25, 20), 0.0), ((30, 6), 115.0)])
def test_ellipse_axes(twin, axes, angle):
    _, cal = twin
    rows, cols = np.mgrid[0:100, 0:100] - 49.5
    th = np.deg2rad(angle)
    u, v = cols * np.cos(th) + rows * np.sin(th), -cols * np.sin(th) + rows * np.cos(th)
    m = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0  # pixel centres inside the ellipse
    f = feats(plate(twin, SYENITE, 10.0, m), m, cal)
    # a uniform ellipse of semi-axes a, b: moment axes 2a, 2b; pixelization moves them < 1/2 px
    assert f["length_mm"] == pytest.approx(2 * axes[0] * PITCH, abs=0.5 * PITCH)
    assert f["width_mm"] == pytest.approx(2 * axes[1] * PITCH, abs=0.5 * PITCH)
    assert f["elongation"] == pytest.approx(axes[0] / axes[1], rel=0.06)
    assert f["area_mm2"] == pytest.approx(np.pi * axes[0] * axes[1] * PITCH ** 2, rel=0.03)


def test_anisotropic_pitch_is_physical(twin):
    """A 20 mm radius disc seen with 0.8 mm pixels and 1.6 mm lines is 25 x 12.5 px."""
    _, cal = twin
    rows, cols = np.mgrid[0:40, 0:70]
    m = ((cols - 35) / 25.0) ** 2 + ((rows - 20) / 12.5) ** 2 <= 1.0
    f = feats(plate(twin, SYENITE, 10.0, m), m, cal, pp=0.8, lp=1.6)
    assert f["area_mm2"] == pytest.approx(np.pi * 20.0 ** 2, rel=0.03)
    assert f["elongation"] == pytest.approx(1.0, abs=0.05)
    assert f["length_mm"] == pytest.approx(40.0, rel=0.05)


def test_mafic_fraction_of_plates(twin):
    _, cal = twin
    m = rect_mask()
    for t in (8.0, 30.0):
        syenite = feats(plate(twin, SYENITE, t, m), m, cal)
        ore = feats(plate(twin, ORE40, t, m), m, cal)
        assert syenite["mafic_mean"] == pytest.approx(0.0, abs=0.03)
        assert ore["mafic_mean"] == pytest.approx(0.4, abs=0.03)
        assert syenite["mafic_p10"] <= syenite["mafic_p50"] <= syenite["mafic_p90"]
        assert ore["mafic_p50"] == pytest.approx(0.4, abs=0.03)
        assert ore["fe_frac_mean"] > syenite["fe_frac_mean"]
        assert ore["r_mean"] > syenite["r_mean"] * 0.95  # more Fe, yet thicker in A_high
        for f in (syenite, ore):
            assert f["fayalite_share"] == 0.0 and f["oxide_share"] == 0.0
            assert f["mafic_std"] < 0.03 and f["fe_frac_std"] < 0.03  # uniform plates


def test_hot_spot_levels_sit_between_the_minerals():
    """Independent 2x2 solve of each mineral on the syenite -> hedenbergite basis."""
    from sorting.stages.normalize import MAFIC_ENDS, basis_vector

    ends = np.array([basis_vector(m) for m in MAFIC_ENDS]).T

    def reading(name):
        s, h = np.linalg.solve(ends, np.array(basis_vector(name)))
        return h / (s + h)

    assert reading("hastingsite") < FAYALITE_LEVEL < reading("fayalite") < OXIDE_LEVEL < reading("magnetite")


def test_hot_spot_shares_of_dense_plates(twin):
    _, cal = twin
    m = rect_mask()
    fay = feats(plate(twin, {"fayalite": 1.0}, 15.0, m), m, cal)
    mag = feats(plate(twin, {"magnetite": 1.0}, 10.0, m), m, cal)
    assert fay["fayalite_share"] == 1.0 and fay["oxide_share"] == 0.0
    assert mag["fayalite_share"] == 1.0 and mag["oxide_share"] == 1.0
    # half syenite, half fayalite side by side: half the volume above the level
    half = plate(twin, SYENITE, 15.0, m)
    half[:, 30:] = plate(twin, {"fayalite": 1.0}, 15.0 / 0.782, m)[:, 30:]  # equal equivalent thickness
    f = feats(half, m, cal)
    assert f["fayalite_share"] == pytest.approx(0.5, abs=0.08)
    assert f["mafic_p10"] < 0.2 and f["mafic_p90"] > 2.5


def test_texture_window_in_mm():
    """4 mm: 5 px of 0.8 mm, 3 px of 1.2 or 1.6 mm (the odd width closest to 4 mm), 7 px of
    0.6 mm, at least 3 px; a tie (3.5 or 4.5 mm at 0.5 mm, 3 or 5 mm at 1 mm) goes to the wider.
    Over many pitches, the formula agrees with a search over odd widths."""
    from test_features_kernel import _window_px

    assert TEXTURE_WINDOW_MM == 4.0
    pitches = (0.8, 1.2, 1.6, 0.6, 3.0, 0.5, 1.0)
    assert [texture_window(p, 2 * p) for p in pitches] == [(5, 3), (3, 3), (3, 3), (7, 3), (3, 3), (9, 5), (5, 3)]
    for p in np.linspace(0.3, 5.0, 471) + 0.0013:  # off the exact ties, which the hand values cover
        assert texture_window(p, p) == (2 * _window_px(p) + 1,) * 2


def test_texture_of_homogeneous_plates_is_zero(twin):
    """A uniform plate has no deviation from any local mean: what is left is the integer
    rounding of the noise-free counts, the level of its mafic_std (< 0.01, 40 x below the
    syenite-ore step of 0.4)."""
    _, cal = twin
    m = rect_mask()
    for mix, t in ((SYENITE, 8.0), (SYENITE, 40.0), (ORE40, 30.0)):
        f = feats(plate(twin, mix, t, m), m, cal)
        assert f["mafic_texture"] == pytest.approx(0.0, abs=0.01)
        assert f["mafic_texture"] <= f["mafic_std"]


def _striped(twin, period_px, t=20.0):
    """80 x 32 px plate of syenite and 40 % hedenbergite ore (mafic 0 and 0.4, same
    equivalent thickness) in column bands of ``period_px / 2``."""
    m = rect_mask((40, 84), 4, 2, 32, 80)
    a = plate(twin, SYENITE, t, m)
    ore = plate(twin, ORE40, t, m)
    cols = (np.arange(m.shape[1]) // (period_px // 2)) % 2 == 1
    a[:, cols] = ore[:, cols]
    return a, m


def test_texture_sees_grains_not_bands(twin):
    """Bands of 16 mm (20 px, far wider than the 4 mm box) deviate from their local mean only
    near their edges: 3 edges in the 76 core columns, each touching <= 8 columns (box
    half-width 2 + the blur's ~2 px, both sides), deviation <= half the step 0.4: texture
    <= 0.2 x sqrt(24 / 76) = 0.112, while their std is half the step, 0.2 (a square wave).
    Bands of 2.4 mm (3 px, below the box) deviate from the local mean everywhere."""
    _, cal = twin
    wide = feats(*_striped(twin, 40), cal)
    fine = feats(*_striped(twin, 6), cal)
    assert wide["mafic_mean"] == pytest.approx(0.2, abs=0.03)
    assert wide["mafic_std"] == pytest.approx(0.2, abs=0.03)
    assert wide["mafic_texture"] < 0.112
    assert wide["mafic_texture"] < 0.25 * wide["mafic_std"]  # the banding is rock-scale, not texture
    assert fine["mafic_texture"] > 0.05  # 5 x the uniform plates' residual
    assert fine["mafic_texture"] > 2.0 * wide["mafic_texture"]


def test_margin_and_purity(twin):
    _, cal = twin
    m = np.zeros((70, 80), np.uint8)
    cv2.ellipse(m, (40, 35), (25, 18), 20, 0, 360, 1, -1)
    m = m.astype(bool)
    a = plate(twin, ORE40, 25.0, m, noise_seed=4)
    a_copy, m_copy = a.copy(), m.copy()
    full = particle_features(a, m, cal, PITCH, PITCH)
    assert np.array_equal(a, a_copy) and np.array_equal(m, m_copy)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    for margin in (0, 1, 4):
        box = (slice(rows[0] - margin, rows[-1] + 1 + margin), slice(cols[0] - margin, cols[-1] + 1 + margin))
        assert np.array_equal(particle_features(a[box], m[box], cal, PITCH, PITCH), full)
    out = np.full(N_FEATURES, -1.0, np.float32)
    assert particle_features(a, m, cal, PITCH, PITCH, out=out) is out and np.array_equal(out, full)
    with pytest.raises(ValueError, match="out"):
        particle_features(a, m, cal, PITCH, PITCH, out=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="mask"):
        particle_features(a, m[1:], cal, PITCH, PITCH)


def test_degenerate_input_is_finite(twin):
    _, cal = twin
    a = np.zeros((9, 9, 2), np.float32)
    empty = particle_features(a, np.zeros((9, 9), bool), cal, PITCH, PITCH)
    assert empty.shape == (N_FEATURES,) and not empty.any()
    one = np.zeros((9, 9), bool)
    one[4, 4] = True
    a[4, 4] = (0.5, 0.3)
    f = particle_features(a, one, cal, PITCH, PITCH)
    assert np.isfinite(f).all() and f[FEATURE_NAMES.index("area_mm2")] == pytest.approx(0.64)
    line = np.zeros((9, 9), bool)
    line[4, 1:8] = True
    assert np.isfinite(particle_features(a, line, cal, PITCH, PITCH)).all()
    m = rect_mask((20, 20), 2, 2, 16, 16)
    starved = np.zeros((20, 20, 2), np.float32)
    starved[m] = (12.0, 9.0)  # nothing gets through the low channel
    f = dict(zip(FEATURE_NAMES, particle_features(starved, m, cal, PITCH, PITCH)))
    assert all(np.isfinite(v) for v in f.values()) and f["starved_share"] == 1.0
    nan = starved.copy()
    nan[5, 5] = np.nan
    nan[6, 6] = np.inf
    assert np.isfinite(particle_features(nan, m, cal, PITCH, PITCH)).all()


def test_feature_table(twin):
    _, cal = twin
    assert feature_table([], cal, PITCH, PITCH).shape == (0, N_FEATURES)
    assert feature_table(iter(()), cal, PITCH, PITCH).dtype == np.float32
    m = rect_mask()
    crops = [(plate(twin, SYENITE, 10.0, m), m), (plate(twin, ORE40, 20.0, m), m)]
    table = feature_table(crops, cal, PITCH, PITCH)
    assert table.shape == (2, N_FEATURES)
    assert np.array_equal(table[1], particle_features(*crops[1], cal, PITCH, PITCH))


def test_dataset_features_marks_failed_rows(twin):
    renderer, cal = twin
    m = rect_mask()
    good = plate(twin, ORE40, 20.0, m)
    raw_good = np.rint(renderer.pattern.dark[300:360] + renderer.pattern.gain[300:360]
                       * (renderer.air_mean * np.exp(-good))).astype(np.uint16)
    raw_empty = np.rint(renderer.pattern.dark[0:30] + renderer.pattern.gain[0:30]
                        * np.broadcast_to(renderer.air_mean, (20, 30, 2))).astype(np.uint16)
    rows = (SimpleNamespace(rock_id="a1", x0=300), SimpleNamespace(rock_id="b2", x0=0))
    crops = {0: raw_good, 1: raw_empty}
    ds = SimpleNamespace(rows=rows, crop=crops.__getitem__, pixel_pitch_mm=PITCH, line_pitch_mm=PITCH)
    x, ok, problems = dataset_features(ds, cal, progress=False)
    assert x.shape == (2, N_FEATURES) and x.dtype == np.float32
    assert ok.tolist() == [True, False]
    assert problems == ["b2: no rock in the crop"]
    assert np.isnan(x[1]).all() and np.isfinite(x[0]).all()
    assert x[0, FEATURE_NAMES.index("area_mm2")] == pytest.approx(24 * 44 * 0.64)
    x1, ok1, _ = dataset_features(ds, cal, indices=[1, 0], progress=False)
    assert ok1.tolist() == [False, True] and np.array_equal(x1[1], x[0])


def test_dataset_features_on_simulated_rocks(tmp_path):
    from sorting.config import load_machine, load_ore
    from sorting.io import read_rocks_dataset
    from sorting.physics import load_materials
    from sorting.stages.calibrate import calibrate
    from sorting.twin import simulate_rocks

    root = simulate_rocks(tmp_path / "rocks", 12, 5, load_machine(), load_ore(), load_materials(), progress=False)
    ds = read_rocks_dataset(root)
    cal = calibrate(ds.calibration)
    x, ok, problems = dataset_features(ds, cal, progress=False)
    assert ok.all(), problems  # every crop holds one whole rock by construction
    assert np.isfinite(x).all()
    area = x[:, FEATURE_NAMES.index("area_mm2")]
    assert np.all((area > 15.0) & (area < 0.25 * np.pi * 110.0 ** 2))


def test_one_broken_pixel_does_not_poison_the_rock(twin):
    _, cal = twin
    m = rect_mask()
    a = plate(twin, ORE40, 20.0, m)
    clean = feats(a, m, cal)
    a[20, 30] = np.nan
    broken = feats(a, m, cal)
    assert broken["mafic_mean"] == pytest.approx(clean["mafic_mean"], abs=0.01)
    assert broken["thickness_mean_mm"] == pytest.approx(clean["thickness_mean_mm"], rel=0.01)


# ---------------------------------------------------------------- the batch path
def _rocks(twin, n, seed=0):
    """``n`` noisy plates of varied size, shape and material, each with a belt margin."""
    rng = np.random.default_rng(seed)
    mixes = (SYENITE, ORE40, {"fayalite": 1.0}, {"hedenbergite": 1.0}, {"magnetite": 1.0})
    crops = []
    for i in range(n):
        h, w = int(rng.integers(4, 60)), int(rng.integers(4, 90))
        m = np.zeros((h + 8, w + 8), np.uint8)
        cv2.ellipse(m, (w // 2 + 4, h // 2 + 4), (max(w // 2, 1), max(h // 2, 1)), float(rng.uniform(0, 180)),
                    0, 360, 1, -1)
        if i % 3 == 0:  # a notch: a concave rock
            m[h // 2 + 4:, w // 2 + 2:w // 2 + 6] = 0
        m = m.astype(bool)
        t = float(rng.uniform(3.0, 45.0))
        a = plate(twin, mixes[i % len(mixes)], t, m, x0=int(rng.integers(0, 1000)), noise_seed=i + seed)
        crops.append((a, m))
    return crops


@pytest.mark.parametrize("pp, lp", [(PITCH, PITCH), (0.8, 1.6)])
def test_batch_matches_the_plain_computation(twin, pp, lp):
    """Plates of five materials, 3-45 mm, against the slow reference of test_features_kernel."""
    from test_features_kernel import assert_close, reference_features

    _, cal = twin
    crops = _rocks(twin, 12, seed=3)
    got = features_batch(crops, cal, pp, lp)
    for (a, m), row in zip(crops, got):
        assert_close(row, reference_features(a, m, cal, pp, lp), str(m.shape))


def test_batch_equals_singles_whatever_the_neighbours(twin):
    """More rocks than one canvas shelf and one batch hold, strided views, empty masks among them."""
    _, cal = twin
    crops = _rocks(twin, 90, seed=5)
    big = np.zeros((200, 40), bool)
    big[5:195, 5:35] = True  # taller than the others: its own shelf height
    crops.insert(7, (plate(twin, ORE40, 12.0, big, noise_seed=1), big))
    crops.insert(3, (np.zeros((6, 6, 2), np.float32), np.zeros((6, 6), bool)))
    wide = np.zeros((20, 1200, 2), np.float32)  # a strided view, as the stream's ring gives
    wide[:, 400:460] = crops[0][0][:20, :60] if crops[0][0].shape[1] >= 60 else 0.3
    view = wide[:, 400:460]
    vm = np.zeros((20, 60), bool)
    vm[3:17, 5:50] = True
    crops.append((view, vm))
    singles = np.stack([particle_features(a, m, cal, PITCH, PITCH) for a, m in crops])
    out = np.full((len(crops), N_FEATURES), np.nan, np.float32)
    got = features_batch(crops, cal, PITCH, PITCH, out=out)
    assert got is out
    assert not got[3].any()
    np.testing.assert_allclose(got, singles, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(features_batch(crops[::-1], cal, PITCH, PITCH), got[::-1])
    assert features_batch([], cal, PITCH, PITCH).shape == (0, N_FEATURES)
    with pytest.raises(ValueError, match="out"):
        features_batch(crops, cal, PITCH, PITCH, out=np.zeros((2, N_FEATURES), np.float32))
    with pytest.raises(ValueError, match="crop 1"):
        features_batch([crops[0], (crops[0][0], crops[0][1][1:])], cal, PITCH, PITCH)
