"""The compiled feature kernel against a slow, readable numpy/OpenCV/scipy reference.

``reference_features`` computes one rock at a time from the definitions in the
``sorting.stages.features`` docstrings, with independent tools: OpenCV's Gaussian blur and erosion,
scipy's bilinear ``map_coordinates`` for the basis table, numpy's histogram and interp for the
quantiles, explicit shifts for the texture window. The kernel must agree to float32
round-off on every feature (RTOL, ATOL, Q_ATOL below), on simulated rocks and on the
awkward cases.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from sorting.stages import features_kernel as kernel
from sorting.stages.features import (
    FAYALITE_LEVEL,
    FEATURE_NAMES,
    N_FEATURES,
    OXIDE_LEVEL,
    TEXTURE_WINDOW_MM,
    features_batch,
    features_from_ring,
    particle_features,
)

#: kernel vs reference: float32 maps (blur sums in another order, exp/ln to < 1 ulp), float64
#: statistics ...
RTOL, ATOL = 2e-5, 2e-5
#: ... but a pixel whose mafic_frac is within that round-off of a bin edge may fall in either
#: bin and move a quantile by its share of the bin's weight: a tenth of the 0.02 bin
Q_ATOL = 2e-3


# ---------------------------------------------------------------- the reference
def _window_px(pitch_mm):
    """Half-width (px) of the texture box, from its definition by search: the odd width of at
    least 3 px whose length is closest to TEXTURE_WINDOW_MM (a tie goes to the wider)."""
    n = min(range(3, 1001, 2), key=lambda n: (abs(n * pitch_mm - TEXTURE_WINDOW_MM), -n))
    return (n - 1) // 2


def reference_basis(a_low, a_high, lut):
    """(t_pom, t_fe) mm by exact bilinear interpolation of the calibration's table (scipy;
    edges replicated), at the float32 coordinates ``sorting.stages.maps.basis_thickness`` forms."""
    n_r, n_a = lut.t_pom_mm.shape
    x = a_high * np.float32(1.0 / lut.a_high_step)
    y = (a_low / np.maximum(a_high, np.float32(1e-3)) - np.float32(lut.r_min)) * np.float32(1.0 / lut.r_step)
    coords = np.stack([np.clip(y, -1.0, n_r), np.clip(x, -1.0, n_a)]).astype(np.float64)
    return tuple(ndimage.map_coordinates(t.astype(np.float64), coords, order=1, mode="nearest").astype(np.float32)
                 for t in (lut.t_pom_mm, lut.t_fe_mm))


def reference_features(a, mask, cal, pp, lp):
    """The features of one rock, the plain way (float64 statistics)."""
    from sorting.stages.maps import mafic_line, smooth_inside

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(N_FEATURES)
    r, c = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    pad = 4 + max(_window_px(pp), _window_px(lp))
    m = np.pad(mask[r[0]:r[-1] + 1, c[0]:c[-1] + 1], pad)
    ab = np.pad(np.nan_to_num(np.asarray(a, np.float32)[r[0]:r[-1] + 1, c[0]:c[-1] + 1], nan=0.0, posinf=0.0,
                              neginf=0.0), ((pad, pad), (pad, pad), (0, 0)))
    m8 = m.astype(np.uint8)
    f = {}
    area = m.sum() * pp * lp
    f["area_mm2"], f["equiv_diameter_mm"] = area, np.sqrt(4 * area / np.pi)
    mo = cv2.moments(m8, binaryImage=True)
    cov = np.array([[mo["mu20"] / mo["m00"] * pp * pp + pp * pp / 12, mo["mu11"] / mo["m00"] * pp * lp],
                    [mo["mu11"] / mo["m00"] * pp * lp, mo["mu02"] / mo["m00"] * lp * lp + lp * lp / 12]])
    lam = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
    f["length_mm"], f["width_mm"] = 4 * np.sqrt(lam[0]), 4 * np.sqrt(lam[1])
    f["elongation"] = f["length_mm"] / max(f["width_mm"], 1e-6)
    # smoothing: normalized Gaussian (sigma 1 px) of the transmission inside the rock (OpenCV)
    sa = smooth_inside(ab, m, 1.0)
    a_low, a_high = sa[..., 0][m], sa[..., 1][m]
    t_pom, t_fe = reference_basis(a_low, a_high, cal.lut)
    fe, mafic, thick = mafic_line(t_pom, t_fe)
    starved = ab[..., 0][m] > np.float32(cal.starved_a_low)
    f["thickness_mean_mm"] = thick.astype(float).mean()
    f["volume_cm3"] = np.maximum(thick, 0).astype(float).sum() * pp * lp * 1e-3
    core = m8
    for r_ in (2, 1):
        e = cv2.erode(m8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_ + 1,) * 2))
        if e.any():
            core = e
            break
    core = core.astype(bool)[m]  # over the rock's pixels, raster order
    if starved.any():
        core = next((k for k in (core & ~starved, ~starved) if k.any()), core)
    f["interior_share"] = core.sum() / m.sum()
    f["starved_share"] = starved.sum() / m.sum()
    lo, hi = a_low[core].astype(float), a_high[core].astype(float)
    f["a_low_mean"], f["a_high_mean"] = lo.mean(), hi.mean()
    f["r_mean"] = lo.sum() / max(hi.sum(), 1e-3 * lo.size)
    w = np.maximum(thick[core], 0).astype(float)
    if not w.sum() > 0:
        w = np.ones_like(w)
    mc = mafic[core]
    for name, vals in (("mafic", mc), ("fe_frac", fe[core])):
        v = vals.astype(float)
        f[f"{name}_mean"] = np.average(v, weights=w)
        f[f"{name}_std"] = np.sqrt(np.average((v - f[f"{name}_mean"]) ** 2, weights=w))
    # bins of 0.02 over mafic_frac -1 .. 8, the ends catch the rest; the bin found in float32
    # as the kernel does (np.histogram's float64 differs for a value within 2e-7 of an edge)
    edges = -1.0 + 0.02 * np.arange(451)
    bins = np.clip(mc * np.float32(50.0) + np.float32(50.0), 0.0, 449.5).astype(int)
    cum = np.r_[0, np.cumsum(np.bincount(bins, weights=w, minlength=450))]
    for q in (10, 25, 50, 75, 90):
        f[f"mafic_p{q:02d}"] = np.interp(q / 100 * cum[-1], cum, edges)
    f["fayalite_share"] = w[mc > FAYALITE_LEVEL].sum() / w.sum()
    f["oxide_share"] = w[mc > OXIDE_LEVEL].sum() / w.sum()
    # texture: the mean of mafic_frac over the core pixels in the box around each core pixel,
    # by explicit shifts in float64
    bx, by = _window_px(pp), _window_px(lp)
    core2d = np.zeros(m.shape, bool)
    core2d[m] = core
    maf2d = np.zeros(m.shape)
    maf2d[m] = mafic
    maf2d[~core2d] = 0.0
    num, den = np.zeros(m.shape), np.zeros(m.shape)
    for dy in range(-by, by + 1):
        for dx in range(-bx, bx + 1):
            num += np.roll(maf2d, (dy, dx), axis=(0, 1))  # the pad keeps the wrap on empty belt
            den += np.roll(core2d.astype(float), (dy, dx), axis=(0, 1))
    dev = maf2d[core2d] - num[core2d] / den[core2d]
    f["mafic_texture"] = np.sqrt(np.average(dev ** 2, weights=w))
    out = np.array([f[name] for name in FEATURE_NAMES])
    out[~np.isfinite(out)] = 0.0
    return out


def assert_close(got, want, what=""):
    got, want = np.atleast_2d(got), np.atleast_2d(want)
    for j, name in enumerate(FEATURE_NAMES):
        atol = Q_ATOL if name.startswith("mafic_p") else ATOL
        np.testing.assert_allclose(got[:, j], want[:, j], rtol=RTOL, atol=atol, err_msg=f"{name} {what}")


# ---------------------------------------------------------------- data
@pytest.fixture(scope="module")
def rocks(small_rocks):
    """(cal, pixel pitch, line pitch, [(a, mask)]): simulated rocks, attenuation and segmentation
    as the batch path makes them."""
    from sorting.io import read_rocks_dataset
    from sorting.stages.calibrate import calibrate
    from sorting.stages.normalize import attenuation
    from sorting.stages.segment import segment_crop

    ds = read_rocks_dataset(small_rocks)
    cal = calibrate(ds.calibration)
    pp, lp = float(ds.pixel_pitch_mm), float(ds.line_pitch_mm)
    crops = []
    for i in range(0, len(ds.rows), 3):
        a = attenuation(ds.crop(i), cal, ds.rows[i].x0)
        mask, problem = segment_crop(a, cal, ds.rows[i].x0, pp, lp)
        if problem is None:
            crops.append((a, mask))
    return cal, pp, lp, crops


def _plate(shape, mask, a_low, a_high, seed, noise=0.02):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape + (2,), np.float32)
    a[mask] = (a_low, a_high)
    a += rng.normal(0.0, noise, a.shape).astype(np.float32)
    return a


# ---------------------------------------------------------------- tests
def test_exp_and_ln_within_an_ulp():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.0, 88.0, 20000), rng.uniform(-15.0, 1.0, 20000), [0.0, -1.0, 1.0]])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    kernel.exp_f32(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 1.0 * np.spacing(want.astype(np.float32)))
    y = np.concatenate([10.0 ** rng.uniform(-30, 38, 20000), rng.uniform(0.5, 2.0, 20000), [1e-30, 1.0, 2.0]])
    y = y.astype(np.float32)
    kernel.ln_f32(y, got)
    want = np.log(y.astype(np.float64))
    assert np.all(np.abs(got - want) <= 1.0 * np.spacing(np.abs(want).astype(np.float32)) + 1e-12)


def test_simulated_rocks_match_the_reference(rocks):
    cal, pp, lp, crops = rocks
    assert len(crops) >= 30
    got = features_batch(crops, cal, pp, lp)
    want = np.stack([reference_features(a, m, cal, pp, lp) for a, m in crops])
    assert_close(got, want)
    # the material features are live, not a constant: a mix of lithologies
    assert np.ptp(got[:, FEATURE_NAMES.index("mafic_mean")]) > 0.5


@pytest.mark.parametrize("pp, lp", [(0.8, 1.6), (0.5, 0.6)])
def test_other_pitches_match_the_reference(rocks, pp, lp):
    """Other texture windows (5 x 3 px, 9 x 7 px: columns x rows) and anisotropic pixels."""
    cal, _, _, crops = rocks
    few = crops[:8]
    assert_close(features_batch(few, cal, pp, lp), np.stack([reference_features(a, m, cal, pp, lp) for a, m in few]))


def test_basis_is_exact_bilinear(rocks):
    """A uniform plate: the normalized smoothing keeps A inside, so every pixel reads the table
    at one point; fe_frac is t_fe / (t_pom + t_fe) there, by hand from the four cells."""
    cal, pp, lp, _ = rocks
    lut = cal.lut
    m = np.zeros((30, 30), bool)
    m[3:27, 3:27] = True
    for a_low, a_high in ((1.234, 0.617), (2.71, 1.05), (0.9, 0.52)):
        a = np.zeros((30, 30, 2), np.float32)
        a[m] = (a_low, a_high)
        f = dict(zip(FEATURE_NAMES, particle_features(a, m, cal, pp, lp).tolist()))
        x = np.float32(a_high) * np.float32(1.0 / lut.a_high_step)
        y = (np.float32(a_low) / np.float32(a_high) - np.float32(lut.r_min)) * np.float32(1.0 / lut.r_step)
        i, j = int(np.floor(y)), int(np.floor(x))
        fy, fx = float(y) - i, float(x) - j
        assert 0.05 < fx < 0.95 or 0.05 < fy < 0.95  # between cells, where remap's 1/32 steps differ

        pom, fe = (((1 - fy) * ((1 - fx) * t[i, j] + fx * t[i, j + 1])
                    + fy * ((1 - fx) * t[i + 1, j] + fx * t[i + 1, j + 1]))
                   for t in (lut.t_pom_mm.astype(float), lut.t_fe_mm.astype(float)))
        assert f["fe_frac_mean"] == pytest.approx(fe / (pom + fe), rel=2e-5)
        assert f["a_low_mean"] == pytest.approx(a_low, rel=1e-5)


def test_awkward_crops_match_the_reference(rocks):
    cal, pp, lp, _ = rocks
    shape = (24, 30)
    cases = {}
    disc = np.zeros(shape, np.uint8)
    cv2.ellipse(disc, (15, 12), (11, 8), 30.0, 0, 360, 1, -1)
    disc = disc.astype(bool)
    cases["plate"] = (_plate(shape, disc, 1.4, 0.7, 1), disc)
    starved = _plate(shape, disc, 1.4, 0.7, 2)
    starved[disc & (np.arange(shape[1]) < 14)] = (12.0, 8.0)  # half the rock lets nothing through the low channel
    cases["half starved"] = (starved, disc)
    cases["all starved"] = (_plate(shape, disc, 12.0, 8.0, 3), disc)
    broken = _plate(shape, disc, 1.4, 0.7, 4)
    broken[12, 15] = (np.nan, 0.5)
    broken[10, 12] = (np.inf, -np.inf)
    broken[0, 0] = np.nan  # outside the rock
    cases["NaN and inf"] = (broken, disc)
    one = np.zeros(shape, bool)
    one[5, 7] = True
    cases["one pixel"] = (_plate(shape, one, 0.8, 0.45, 5), one)
    two = np.zeros(shape, bool)
    two[5, 7:9] = True
    cases["two pixels"] = (_plate(shape, two, 0.8, 0.45, 6), two)
    line = np.zeros(shape, bool)
    line[3:21, 9] = True
    cases["thin line"] = (_plate(shape, line, 0.8, 0.45, 7), line)
    thick_line = np.zeros(shape, bool)
    thick_line[3:21, 9:12] = True  # eroded by 1, not by 2
    cases["3 px wide"] = (_plate(shape, thick_line, 0.8, 0.45, 8), thick_line)
    cases["empty"] = (_plate(shape, disc, 0.8, 0.45, 9), np.zeros(shape, bool))
    cases["negative"] = (_plate(shape, disc, -0.05, -0.03, 10), disc)  # noise-level rock, weights fall back
    got = features_batch(list(cases.values()), cal, pp, lp)
    for (name, (a, m)), row in zip(cases.items(), got):
        assert np.isfinite(row).all(), name
        assert_close(row, reference_features(a, m, cal, pp, lp), name)
    f = dict(zip(FEATURE_NAMES, got[list(cases).index("half starved")]))
    assert 0.3 < f["starved_share"] < 0.7 and f["interior_share"] < 1.0 - f["starved_share"]
    assert not got[list(cases).index("empty")].any()


def test_margin_views_and_neighbours_change_nothing(rocks):
    """Exactly the same numbers with a margin or trimmed, from a strided view of a wide
    buffer, with float64 input, alone or beside other rocks, into a float32 ``out``."""
    cal, pp, lp, crops = rocks
    a, m = crops[5]
    r, c = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    trimmed = (a[r[0]:r[-1] + 1, c[0]:c[-1] + 1], m[r[0]:r[-1] + 1, c[0]:c[-1] + 1])
    alone = particle_features(*trimmed, cal, pp, lp)
    a_copy, m_copy = a.copy(), m.copy()
    np.testing.assert_array_equal(particle_features(a, m, cal, pp, lp), alone)
    assert np.array_equal(a, a_copy, equal_nan=True) and np.array_equal(m, m_copy)
    ring = np.full((m.shape[0] + 6, 1250, 2), np.nan, np.float32)  # as the stream's ring buffer
    ring[3:3 + m.shape[0], 400:400 + m.shape[1]] = a
    view = ring[3:3 + m.shape[0], 400:400 + m.shape[1]]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(particle_features(view, m, cal, pp, lp), alone)
    np.testing.assert_array_equal(particle_features(a.astype(np.float64), m, cal, pp, lp), alone)
    out = np.full((3, N_FEATURES), np.nan, np.float32)
    batch = [crops[0], (view, m), crops[9]]
    assert features_batch(batch, cal, pp, lp, out=out) is out
    np.testing.assert_array_equal(out[1], alone)
    np.testing.assert_array_equal(out[0], particle_features(*crops[0], cal, pp, lp))
    strided_out = np.zeros((3, 2 * N_FEATURES), np.float32)[:, ::2]
    np.testing.assert_array_equal(features_batch(batch, cal, pp, lp, out=strided_out), out)


def test_features_from_the_ring_are_the_crops_features(rocks):
    """The belt's path (boxes gathered from the ring buffer by a compiled copy, wrapping around
    its end) gives bit for bit what the crops give through :func:`features_batch`."""
    cal, pp, lp, crops = rocks
    picked = crops[:7]
    rows = 1 << int(np.ceil(np.log2(sum(a.shape[0] for a, _ in picked) + 8)))
    ring = np.full((rows, 1250, 2), np.nan, np.float32)  # NaN: any pixel read outside a box shows
    boxes, line = [], rows - picked[0][0].shape[0] // 2  # the first box wraps around the ring's end
    for k, (a, m) in enumerate(picked):
        col0 = 37 * k + 3
        for r in range(a.shape[0]):
            ring[(line + r) % rows, col0:col0 + a.shape[1]] = a[r]
        boxes.append((line, col0, a.shape[0], a.shape[1]))
        line += a.shape[0] + 1
    out = np.full((len(picked), N_FEATURES), np.nan, np.float32)
    got = features_from_ring(ring, np.array(boxes, np.int64), [np.ascontiguousarray(m) for _, m in picked], cal, pp,
                             lp, out=out)
    assert got is out
    np.testing.assert_array_equal(out, features_batch(picked, cal, pp, lp))


def test_one_compiled_version_serves_every_layout(rocks):
    """Contiguous crops, strided views and other dtypes all reach the kernel as one numba
    type, so the stream's warm-up compiles (or loads) everything the belt will call."""
    cal, pp, lp, crops = rocks
    a, m = crops[2]
    particle_features(np.full((16, 16, 2), 0.5, np.float32), np.eye(16, dtype=bool), cal, pp, lp)
    n = len(kernel.particles.signatures)
    wide = np.zeros((a.shape[0], a.shape[1] + 10, 2), np.float32)
    wide[:, 5:-5] = a
    for crop in (a, wide[:, 5:-5], a.astype(np.float64), a[::-1]):
        features_batch([(crop, m), (crop, m.astype(np.uint8))], cal, pp, lp)
    assert len(kernel.particles.signatures) == n == 1
