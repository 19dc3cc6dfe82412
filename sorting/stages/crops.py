"""Single rocks cut out of a belt recording: the particles, their mass estimate, and crops
that obey the ``xrt-rocks/1`` rules.

The particles are found by the belt's own stages (:func:`~sorting.stages.normalize.attenuation`,
:func:`~sorting.stages.segment.foreground`, :class:`~sorting.stages.stitch.StreamSegmenter`:
specks dropped, touching rocks split), block by block over the memory-mapped lines, so any
length of recording works in bounded memory. The calibration is the recording's own (no
air tracking: the crops are later normalized by the batch path with the same calibration).

Mass estimate (see docs/physics.md, "Mass from the basis decomposition"): each pixel's
calibrated POM and iron equivalent thicknesses weighed with the densities that make the two
ends of the mafic line (syenite, hedenbergite) exact, ``alpha * t_pom + beta * t_fe``, summed
over the particle. Attenuation is linear in the mass of each mineral crossed, so this reads
every rock-forming mineral's mass within a few per cent, from feldspar to magnetite.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sorting.physics import load_materials
from sorting.stages.features import EDGE_PX, FEATURE_NAMES, features_batch
from sorting.stages.maps import material_maps
from sorting.stages.normalize import MAFIC_ENDS, MIXTURES, attenuation, mafic_inverse
from sorting.stages.particles import Particle, Particles, SegmentConfig
from sorting.stages.segment import foreground, segment_crop
from sorting.stages.stitch import StreamSegmenter

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

#: empty belt kept around a rock in its crop when the belt is free that far
CROP_MARGIN_PX = 8
#: the least empty belt on every side (the ``xrt-rocks/1`` rule)
MIN_MARGIN_PX = 4
#: foreground blobs smaller than this (pixels) near a rock are read as detector noise
NOISE_PX = 4
#: lines per block when scanning a recording
BLOCK_LINES = 2048
#: a particle longer than this is emitted in pieces (``too_long``); generous: rocks come singly
MAX_PARTICLE_LINES = 4096


@lru_cache(maxsize=1)
def mafic_line_densities() -> tuple[float, float]:
    """Densities (g/cm3) of the two ends of the mafic line, syenite and hedenbergite, from the
    shipped material library (syenite: its mixture by volume)."""
    lib = load_materials()

    def density(name: str) -> float:
        parts = MIXTURES.get(name, {name: 1.0})
        return float(sum(frac * lib[m].density_g_cm3 for m, frac in parts.items()))

    return density(MAFIC_ENDS[0]), density(MAFIC_ENDS[1])


@lru_cache(maxsize=1)
def mass_coefficients() -> tuple[float, float]:
    """``(alpha, beta)``: the mass per unit area (g/cm3 x mm) of 1 mm of POM-equivalent and of
    1 mm of iron-equivalent thickness, chosen so that syenite and hedenbergite, the ends of the
    mafic line, weigh exactly their density: a pixel's mass thickness is
    ``alpha * t_pom + beta * t_fe`` (about 1.51 and 7.70 on the shipped library)."""
    rho_s, rho_h = mafic_line_densities()
    inv = mafic_inverse().astype(np.float64)  # (syenite, hedenbergite) mm per (POM, Fe) mm
    return float(rho_s * inv[0, 0] + rho_h * inv[1, 0]), float(rho_s * inv[0, 1] + rho_h * inv[1, 1])


def particle_mass_g(a: np.ndarray, mask: np.ndarray, cal: Calibration, pixel_pitch_mm: float,
                    line_pitch_mm: float) -> float:
    """The mass (g) a particle's attenuation implies: the sum over its pixels of the mass
    thickness ``alpha * t_pom + beta * t_fe`` (:func:`mass_coefficients`) times the pixel area.

    The basis thicknesses are read from the attenuation smoothed inside the rock (the
    features' 1 px Gaussian: it averages the few-photon noise of thick rock) on the interior,
    and from each pixel's own attenuation on the rim (``EDGE_PX``), where smoothing would
    spread the thicker interior outward.

    Parameters
    ----------
    a : (h, w, 2) float32 attenuation of the particle's box (a margin is allowed)
    mask : (h, w) bool, its pixels
    """
    alpha, beta = mass_coefficients()
    rough = material_maps(a, mask, cal, smooth_px=0.0)
    smooth = material_maps(a, mask, cal, smooth_px=1.0)
    k = 2 * EDGE_PX + 1
    inner = cv2.erode(mask.view(np.uint8), np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).view(bool)
    t_pom = np.where(inner, smooth.t_pom_mm, rough.t_pom_mm)
    t_fe = np.where(inner, smooth.t_fe_mm, rough.t_fe_mm)
    per_px = alpha * t_pom[mask].astype(np.float64) + beta * t_fe[mask].astype(np.float64)
    return float(per_px.sum()) * pixel_pitch_mm * line_pitch_mm * 1e-3


def find_particles(lines: np.ndarray, cal: Calibration, pixel_pitch_mm: float, line_pitch_mm: float,
                   config: SegmentConfig = SegmentConfig(), block_lines: int = BLOCK_LINES) -> Particles:
    """Every particle of a recording, in order along the belt (by centroid line).

    Parameters
    ----------
    lines : (N, P, 2) uint16 raw counts (a memory map will do: it is read block by block).
    """
    n, p = lines.shape[:2]
    seg = StreamSegmenter(p, cal, pixel_pitch_mm, line_pitch_mm, config, MAX_PARTICLE_LINES)
    out = []
    for i in range(0, n, block_lines):
        a = attenuation(np.asarray(lines[i:i + block_lines]), cal, 0)
        out.append(seg.push(i, foreground(a, cal, 0, config)))
    found = Particles.concat(out + [seg.flush()])
    return found[np.lexsort((found.centroid_px, found.centroid_line))]


def measure_particles(lines: np.ndarray, cal: Calibration, particles: Particles, pixel_pitch_mm: float,
                      line_pitch_mm: float, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's features (n, F) float32 and estimated mass (n,) float64 in g, from its
    own mask on its box's attenuation (with ``EDGE_PX`` of belt around it)."""
    x = np.zeros((len(particles), len(FEATURE_NAMES)), np.float32)
    mass = np.zeros(len(particles))
    n, p = lines.shape[:2]
    g = EDGE_PX
    for i0 in range(0, len(particles), batch):
        crops = []
        for j, c in enumerate(particles[i0:i0 + batch]):
            r0, c0 = max(c.line0 - g, 0), max(c.col0 - g, 0)
            raw = np.asarray(lines[r0:min(c.line1 + g + 1, n), c0:min(c.col1 + g + 1, p)])
            a = attenuation(raw, cal, c0)
            mask = np.zeros(a.shape[:2], bool)
            mask[c.line0 - r0:c.line1 + 1 - r0, c.col0 - c0:c.col1 + 1 - c0] = c.mask
            crops.append((a, mask))
            mass[i0 + j] = particle_mass_g(a, mask, cal, pixel_pitch_mm, line_pitch_mm)
        x[i0:i0 + len(crops)] = features_batch(crops, cal, pixel_pitch_mm, line_pitch_mm)
    return x, mass


@dataclass(frozen=True)
class RockCrop:
    """A rock's crop: raw counts (h, w, 2) uint16, its detector column ``x0``, the stream
    line ``first_line`` of its row 0 and, when it was cut with one, the air level (h, w, 2)
    float32, ln(air - dark), it is normalized with (``air``; None: the calibration's)."""

    counts: np.ndarray
    x0: int
    first_line: int
    air: np.ndarray | None = None


def cut_crop(lines: np.ndarray, cal: Calibration, particle: Particle, pixel_pitch_mm: float,
             line_pitch_mm: float, config: SegmentConfig = SegmentConfig(), margin_px: int = CROP_MARGIN_PX,
             min_margin_px: int = MIN_MARGIN_PX, x0: int = 0, first_line: int = 0,
             log_flat: np.ndarray | None = None) -> tuple[RockCrop | None, str | None]:
    """The particle's crop under the ``xrt-rocks/1`` rules, or why there is none.

    ``lines`` may be a window of the stream: its column 0 is detector column ``x0`` and its row
    0 stream line ``first_line`` (the particle's coordinates are in the window's; the crop's
    ``x0`` and ``first_line`` are the detector's and the stream's).

    The crop holds the particle whole, with ``margin_px`` of belt on each side where the belt
    is free that far and at least ``min_margin_px``, and no part of any other object (a
    blob under :data:`NOISE_PX` pixels is read as noise). The batch path
    (:func:`~sorting.stages.segment.segment_crop`) must then find exactly this one whole rock
    in it. Returns ``(crop, None)`` or ``(None, problem)``.

    ``log_flat`` (the shape of ``lines``, float32): ln(air - dark) per pixel, the air level the
    stream normalized these lines with (:class:`~sorting.stages.air.AirTracker`), in place of
    the calibration's; the crop then carries its own part of it (``RockCrop.air``), with which
    the batch path normalizes it as the stream did.
    """
    if particle.cut:
        return None, "cut by the start or end of the recording"
    if particle.too_long:
        return None, "too long to be one rock"
    if particle.split:
        return None, "split off a touching rock"
    if particle.touches_border:
        return None, "reaches the belt edge (may be cut)"
    n, p = lines.shape[:2]
    m = int(margin_px)
    r0, r1 = max(particle.line0 - m, 0), min(particle.line1 + m, n - 1)
    c0, c1 = max(particle.col0 - m, 0), min(particle.col1 + m, p - 1)
    room = (particle.line0 - r0, r1 - particle.line1, particle.col0 - c0, c1 - particle.col1)
    if min(room) < min_margin_px:
        return None, f"less than {min_margin_px} px from the edge of the recording"
    raw = np.asarray(lines[r0:r1 + 1, c0:c1 + 1])
    air = None if log_flat is None else np.asarray(log_flat[r0:r1 + 1, c0:c1 + 1], dtype=np.float32)
    fg = foreground(attenuation(raw, cal, x0 + c0, log_flat=air), cal, x0 + c0, config)
    own = np.zeros_like(fg)
    oy, ox = particle.line0 - r0, particle.col0 - c0
    own[oy:oy + particle.mask.shape[0], ox:ox + particle.mask.shape[1]] = particle.mask
    other = fg & ~own
    if other.any():
        k, lab, stats, _ = cv2.connectedComponentsWithStats(other.view(np.uint8), connectivity=8)
        big = [j for j in range(1, k) if stats[j, cv2.CC_STAT_AREA] >= NOISE_PX]
        other = np.isin(lab, big) if big else np.zeros_like(other)
    # the tightest allowed box first, then widened side by side while the belt stays free
    h, w = particle.mask.shape
    top, bottom, left, right = oy - min_margin_px, oy + h - 1 + min_margin_px, ox - min_margin_px, \
        ox + w - 1 + min_margin_px
    if other[top:bottom + 1, left:right + 1].any():
        return None, f"another object within {min_margin_px} px"
    grown = True
    while grown:
        grown = False
        if top > 0 and not other[top - 1, left:right + 1].any():
            top, grown = top - 1, True
        if bottom < other.shape[0] - 1 and not other[bottom + 1, left:right + 1].any():
            bottom, grown = bottom + 1, True
        if left > 0 and not other[top:bottom + 1, left - 1].any():
            left, grown = left - 1, True
        if right < other.shape[1] - 1 and not other[top:bottom + 1, right + 1].any():
            right, grown = right + 1, True
    counts = np.ascontiguousarray(raw[top:bottom + 1, left:right + 1])
    if air is not None:
        air = np.ascontiguousarray(air[top:bottom + 1, left:right + 1])
    cx0 = x0 + c0 + left
    _, problem = segment_crop(attenuation(counts, cal, cx0, log_flat=air), cal, cx0, pixel_pitch_mm, line_pitch_mm,
                              config)
    if problem is not None:
        return None, f"the crop does not hold one whole rock for the batch path ({problem})"
    return RockCrop(counts, cx0, first_line + r0 + top, air), None
