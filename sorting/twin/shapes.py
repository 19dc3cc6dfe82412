"""3-D rock shapes and their mineral path lengths, as the beam sees them.

A crushed rock is modelled as a convex body: an ellipsoid (lying on its flattest
axis, as rocks settle on a belt) cut by a few random planes, which gives the facets
and edges of crushed rock. The beam runs vertically, so the projected thickness at a
pixel is the length of the vertical chord through the body. The rock's mineral volume
is spread over the projection with grain-scale texture (smooth random modal variation)
and disseminated oxide grains (sphere chords at random points).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sorting.config import OreConfig
from sorting.twin.ore import RockComposition

_GRAIN_SHARE = 0.6  # share of a grain mineral's volume in discrete grains, the rest in the matrix


@dataclass(frozen=True)
class RockImage:
    """A rendered rock on the (line, pixel) grid of its bounding box.

    paths_mm : (h, w, M) float32, path length through each mineral (sums to thickness)
    mask : (h, w) bool, thickness > 0
    """

    paths_mm: np.ndarray
    mask: np.ndarray
    size_mm: float

    @property
    def thickness_mm(self) -> np.ndarray:
        return self.paths_mm.sum(axis=2)


def _body_thickness(size_mm: float, line_pitch_mm: float, pixel_pitch_mm: float,
                    rng: np.random.Generator) -> np.ndarray:
    a = size_mm / 2.0
    b = a * rng.uniform(0.55, 0.95)
    c = b * rng.uniform(0.45, 0.85)
    theta = rng.uniform(0, np.pi)
    half = a + 1.0
    ys = np.arange(-half, half + 1e-9, line_pitch_mm)
    xs = np.arange(-half, half + 1e-9, pixel_pitch_mm)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    # body frame: rotate the belt grid by theta
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    q = 1.0 - (u / a) ** 2 - (v / b) ** 2
    inside = q > 0
    zh = np.where(inside, c * np.sqrt(np.clip(q, 0, None)), 0.0)
    z_hi, z_lo = zh.copy(), -zh
    # random planes n.p <= d cut caps off: facets of crushed rock
    for _ in range(int(rng.integers(4, 10))):
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        # plane distance: cut between 55 % and 95 % of the support radius in that direction
        support = np.sqrt((a * n[0]) ** 2 + (b * n[1]) ** 2 + (c * n[2]) ** 2)
        d = support * rng.uniform(0.55, 0.95)
        rhs = d - n[0] * u - n[1] * v
        if abs(n[2]) < 1e-6:
            cut = rhs < 0
            z_hi = np.where(cut, z_lo, z_hi)
            continue
        bound = rhs / n[2]
        if n[2] > 0:
            z_hi = np.minimum(z_hi, bound)
        else:
            z_lo = np.maximum(z_lo, bound)
    t = np.clip(z_hi - z_lo, 0.0, None)
    # surface roughness, a few percent at the millimetre scale
    rough = _smooth_fields(t.shape, 1, 1.5, rng)[..., 0]
    t = t * (1.0 + 0.04 * rough)
    t[t < 0.3] = 0.0  # a sliver thinner than 0.3 mm is not seen as rock
    return t.astype(np.float32)


def _smooth_fields(shape: tuple[int, int], n: int, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent smooth Gaussian random fields of unit variance, (h, w, n) float32."""
    noise = rng.standard_normal(shape + (n,), dtype=np.float32)
    f = cv2.GaussianBlur(noise, (0, 0), max(sigma_px, 0.5)).reshape(shape + (n,))
    # a blur of white noise with a Gaussian of sigma s has variance 1 / (4 pi s^2)
    return f * np.float32(np.sqrt(4.0 * np.pi) * max(sigma_px, 0.5))


def _grain_chords(mask: np.ndarray, volume_mm3: float, grain_mm: float, px_area_mm2: float,
                  pixel_pitch_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Path length through randomly placed spherical grains of diameter ``grain_mm``."""
    r = grain_mm / 2.0
    n_grains = rng.poisson(volume_mm3 / (4.0 / 3.0 * np.pi * r**3))
    out = np.zeros(mask.shape, np.float32)
    if n_grains == 0 or not mask.any():
        return out
    rows, cols = np.nonzero(mask)
    pick = rng.integers(0, rows.size, n_grains)
    np.add.at(out, (rows[pick], cols[pick]), 1.0)
    # chord of a sphere integrated over a pixel, as a stamp
    k = int(np.ceil(r / pixel_pitch_mm)) + 1
    g = (np.arange(-k, k + 1) * pixel_pitch_mm)
    rho2 = g[:, None] ** 2 + g[None, :] ** 2
    stamp = 2.0 * np.sqrt(np.clip(r * r - rho2, 0, None))
    # scale so one grain carries its own volume
    stamp *= (4.0 / 3.0 * np.pi * r**3) / max(stamp.sum() * px_area_mm2, 1e-9)
    return cv2.filter2D(out, -1, stamp.astype(np.float32), borderType=cv2.BORDER_CONSTANT)


def render_rock(comp: RockComposition, size_mm: float, ore: OreConfig, line_pitch_mm: float,
                pixel_pitch_mm: float, rng: np.random.Generator) -> RockImage:
    """Shape, texture and grains of one rock on a tight (line, pixel) bounding box."""
    t = _body_thickness(size_mm, line_pitch_mm, pixel_pitch_mm, rng)
    mask = t > 0
    if not mask.any():  # a tiny rock sampled between pixel centres: keep one pixel
        t[t.shape[0] // 2, t.shape[1] // 2] = 0.5
        mask = t > 0
    r0, r1 = np.nonzero(mask.any(axis=1))[0][[0, -1]]
    c0, c1 = np.nonzero(mask.any(axis=0))[0][[0, -1]]
    t = t[r0:r1 + 1, c0:c1 + 1]
    mask = mask[r0:r1 + 1, c0:c1 + 1]
    px_area = line_pitch_mm * pixel_pitch_mm
    volume = float(t.sum()) * px_area

    frac = comp.volume_fraction
    m = frac.size
    grain_idx = [comp.minerals.index(g) for g in comp.grain_minerals if g in comp.minerals]
    matrix_frac = frac.copy()
    grains = np.zeros(t.shape + (m,), np.float32)
    grain_size = ore.oxide_grain_size_mm
    for gi in grain_idx:
        if frac[gi] <= 0:
            continue
        grains[..., gi] = _grain_chords(mask, volume * frac[gi] * _GRAIN_SHARE, grain_size, px_area,
                                        pixel_pitch_mm, rng)
        matrix_frac[gi] -= frac[gi] * _GRAIN_SHARE
    grain_path = np.minimum(grains.sum(axis=2), t)
    scale = np.where(grains.sum(axis=2) > 0, grain_path / np.maximum(grains.sum(axis=2), 1e-9), 1.0)
    grains *= scale[..., None]

    # matrix texture: each mineral's share varies smoothly at the grain scale
    sigma_px = ore.grain_size_mm / pixel_pitch_mm
    present = np.nonzero(matrix_frac > 0)[0]
    weights = np.zeros(t.shape + (m,), np.float32)
    fields = _smooth_fields(t.shape, present.size, sigma_px, rng)
    weights[..., present] = matrix_frac[present].astype(np.float32) * np.exp(ore.texture_strength * fields)
    wsum = weights.sum(axis=2, keepdims=True)
    matrix_path = (t - grain_path)[..., None]
    paths = np.where(wsum > 0, weights / np.maximum(wsum, 1e-12), 0.0) * matrix_path + grains
    paths[~mask] = 0.0
    return RockImage(paths.astype(np.float32), mask, size_mm)


def sample_size_mm(ore: OreConfig, rng: np.random.Generator) -> float:
    """Rock size, log-uniform between the ore's limits (crusher product after screening)."""
    return float(np.exp(rng.uniform(np.log(ore.size_min_mm), np.log(ore.size_max_mm))))
