"""Per-pixel material maps of a rock, in plain numpy: the dual-energy ratio, the basis
(POM, iron) thicknesses, the mafic line, and the smoothing inside the rock before the
inversion. The commissioning tools estimate a rock's mass from them, and they are the
reference the compiled feature kernel is tested against (the kernel computes the same maps
in one pass, for the loop's speed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sorting.stages.calibrate import REMAP_BLOCK
from sorting.stages.normalize import (
    FRACTION_FLOOR_MM,
    basis_table,
    check_out,
    mafic_inverse,
)

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration


def ratio(a: np.ndarray, *, floor: float = 0.02, out: np.ndarray | None = None) -> np.ndarray:
    """Dual-energy ratio ``R = A_low / max(A_high, floor)``.

    Parameters
    ----------
    a : (..., 2) ndarray of float32
    floor : lower bound of the denominator; keeps R finite on empty belt.
    out : (...) ndarray of float32, optional

    Returns
    -------
    (...) ndarray of float32
    """
    a = np.asarray(a, dtype=np.float32)
    if a.ndim < 1 or a.shape[-1] != 2:
        raise ValueError(f"`a` (shape {a.shape}) must end in the 2 channels")
    if not floor > 0:
        raise ValueError(f"`floor` must be > 0, got {floor!r}")
    out = check_out(out, a.shape[:-1])
    np.maximum(a[..., 1], np.float32(floor), out=out)
    np.divide(a[..., 0], out, out=out)
    return out


@dataclass(frozen=True, eq=False)
class MaterialMaps:
    """Per-pixel material maps of one block, (L, W) float32, valid inside the mask and 0 outside.

    ``a_low``, ``a_high`` and ``r`` are the smoothed attenuations the inversion used.
    ``mafic_frac`` is the volume fraction of hedenbergite on the syenite -> hedenbergite
    line (0 syenite, 1 hedenbergite; denser iron minerals read well above 1) and
    ``thickness_mm`` the equivalent rock thickness along that line.
    """

    a_low: np.ndarray
    a_high: np.ndarray
    r: np.ndarray
    t_pom_mm: np.ndarray
    t_fe_mm: np.ndarray
    fe_frac: np.ndarray
    mafic_frac: np.ndarray
    thickness_mm: np.ndarray
    starved: np.ndarray  # (L, W) bool


def basis_thickness(a_low: np.ndarray, a_high: np.ndarray, cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """POM and iron thicknesses (mm) that attenuate like ``(a_low, a_high)``: the same numbers
    as ``cal.lut.invert``, in one table lookup.

    Parameters
    ----------
    a_low, a_high : (N,) or (L, W) ndarray of float32, same shape, C-contiguous

    Returns
    -------
    t_pom_mm, t_fe_mm : C-contiguous float32 arrays of the input's shape.
    """
    tab = basis_table(cal)
    shape = a_low.shape
    map_x = a_high * tab.x_scale
    map_y = np.maximum(a_high, np.float32(1e-3))
    np.divide(a_low, map_y, out=map_y)
    map_y -= tab.r_min
    map_y *= tab.y_scale
    # keep far-off (noise, inf) coordinates inside remap's fixed-point range (maximum and
    # minimum clip exactly as np.clip does, NaN included, without its Python wrapper)
    np.maximum(map_x, np.float32(-1.0), out=map_x)
    np.minimum(map_x, np.float32(tab.n_a), out=map_x)
    np.maximum(map_y, np.float32(-1.0), out=map_y)
    np.minimum(map_y, np.float32(tab.n_r), out=map_y)
    out = np.empty(shape + (2,), np.float32)
    if len(shape) == 2 and max(shape) < REMAP_BLOCK:
        blocks = [(map_x, map_y, out)]
    else:  # remap's rows and columns must stay below SHRT_MAX
        fx, fy, fo = map_x.reshape(-1), map_y.reshape(-1), out.reshape(-1, 2)
        blocks = [(fx[i:i + REMAP_BLOCK].reshape(1, -1), fy[i:i + REMAP_BLOCK].reshape(1, -1),
                   fo[i:i + REMAP_BLOCK].reshape(1, -1, 2)) for i in range(0, fx.size, REMAP_BLOCK)]
    for mx, my, o in blocks:
        if mx.size:
            m1, m2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
            cv2.remap(tab.table, m1, m2, cv2.INTER_LINEAR, dst=o, borderMode=cv2.BORDER_REPLICATE)
    t_pom, t_fe = cv2.split(out.reshape(out.shape[0], -1, 2) if out.ndim > 1 else out.reshape(1, -1, 2))
    return t_pom.reshape(shape), t_fe.reshape(shape)


def mafic_line(t_pom: np.ndarray, t_fe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Basis thicknesses -> (fe_frac, mafic_frac, thickness_mm) on the syenite -> hedenbergite
    line, float32 arrays of the input's shape (elementwise: any layout gives the same numbers)."""
    floor = np.float32(FRACTION_FLOOR_MM)
    total = t_pom + t_fe
    np.maximum(total, floor, out=total)
    fe_frac = np.divide(t_fe, total, out=total)
    inv = mafic_inverse()
    # a * x + b * y, each product rounded, as written out; fewer temporaries
    syenite = inv[0, 0] * t_pom
    tmp = inv[0, 1] * t_fe
    syenite += tmp
    mafic = inv[1, 0] * t_pom
    np.multiply(inv[1, 1], t_fe, out=tmp)
    mafic += tmp
    thickness = syenite + mafic
    np.maximum(thickness, floor, out=syenite)
    mafic /= syenite
    return fe_frac, mafic, thickness


def blurred_transmission(t_masked: np.ndarray, sigma_px: float, *, dst: np.ndarray | None = None) -> np.ndarray:
    """The numerator and denominator of the normalized convolution of :func:`smooth_inside`
    in one pass: ``t_masked`` (L, W, 4) float32 holds T_low * mask, T_high * mask, the mask
    and 0, all 0 outside the mask. Returns its Gaussian blur, (L, W, 4) float32 (into
    ``dst`` if given).

    One 4-channel image, not a 2-channel one and a mask: OpenCV's single-channel blur
    rounds differently depending on where a pixel sits in the image, the 4-channel one
    does not, so a rock gives the same numbers alone or beside others on a canvas (and a
    16-byte pixel moves as one complex128)."""
    return cv2.GaussianBlur(t_masked, (0, 0), sigma_px, dst=dst, borderType=cv2.BORDER_REPLICATE)


def smoothed_attenuation(blurred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-ln(blur(T mask) / blur(mask)) from the (..., 4) output of :func:`blurred_transmission`
    (channels T_low, T_high, mask, -): (A_low, A_high), float32 arrays of its shape without
    the channels (elementwise: any layout gives the same numbers)."""
    shape = blurred.shape[:-1]
    # contiguous channels (OpenCV deinterleaves fast); elementwise, so any layout gives the same numbers
    num_low, num_high, den, _ = (c.reshape(shape) for c in cv2.split(blurred.reshape(-1, 1, 4)))
    np.maximum(den, np.float32(1e-6), out=den)
    out = np.empty((2,) + shape, np.float32)
    np.divide(num_low, den, out=out[0])
    np.divide(num_high, den, out=out[1])
    # outside the mask num is 0; a tiny floor keeps the log finite there (zeroed later)
    flat = out.reshape(2, -1)
    np.maximum(flat, np.float32(1e-30), out=flat)
    cv2.log(flat, dst=flat)
    np.negative(out, out=out)
    return out[0], out[1]


def smooth_inside(a: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Normalized convolution inside the mask, blur(T * mask) / blur(mask), on the
    transmission T = exp(-A), so the belt does not leak in.

    Averaging T rather than A: -ln of a pixel with few quanta is biased high by about
    1/(2 quanta), and averaging the logs keeps that bias, while averaging T removes it
    (the basis table is built from mean transmissions too). At 40 mm of hedenbergite
    (~10 quanta left in the low channel) this is the difference between a mafic
    fraction of ~1.15 and ~1.0.
    """
    t = np.zeros(a.shape[:2] + (4,), np.float32)
    np.negative(a, out=t[..., :2])
    flat = t.reshape(t.shape[0], -1)
    cv2.exp(flat, dst=flat)  # channel 2 becomes exp(0) = 1: the mask after the multiply
    t[..., 3] = 0.0
    t *= mask[..., None]
    return np.stack(smoothed_attenuation(blurred_transmission(t, sigma_px)), axis=-1)


def material_maps(a: np.ndarray, mask: np.ndarray, cal: Calibration, *, smooth_px: float = 1.0,
                  starved_mask: np.ndarray | None = None) -> MaterialMaps:
    """Basis (POM, Fe) and mafic-fraction maps of a rock.

    Parameters
    ----------
    a : (L, W, 2) ndarray of float32, attenuation
    mask : (L, W) ndarray of bool, the rock's pixels
    cal : Calibration (its basis table)
    smooth_px : Gaussian sigma in pixels of the smoothing inside the mask (of the
        transmission, see :func:`smooth_inside`) before the non-linear inversion; 0 turns it off.
    starved_mask : (L, W) bool, optional (e.g. :func:`sorting.testing.starved`);
        default ``A_low > cal.starved_a_low``.

    Returns
    -------
    MaterialMaps
    """
    a = np.asarray(a, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(f"`a` (shape {a.shape}) must be (lines, width, 2)")
    if mask.shape != a.shape[:2]:
        raise ValueError(f"`mask` (shape {mask.shape}) does not match `a` (shape {a.shape})")
    if starved_mask is not None and np.shape(starved_mask) != mask.shape:
        raise ValueError(f"`starved_mask` (shape {np.shape(starved_mask)}) does not match `a` (shape {a.shape})")
    if not smooth_px >= 0:
        raise ValueError(f"`smooth_px` must be >= 0, got {smooth_px!r}")
    outside = ~mask
    sa = smooth_inside(a, mask, smooth_px) if smooth_px > 0 else a.copy()
    sa[outside] = 0.0
    a_low, a_high = np.ascontiguousarray(sa[..., 0]), np.ascontiguousarray(sa[..., 1])
    r = ratio(sa)
    t_pom, t_fe = basis_thickness(a_low, a_high, cal)
    t_pom[outside] = 0.0
    t_fe[outside] = 0.0
    fe_frac, mafic, thickness = mafic_line(t_pom, t_fe)
    if starved_mask is None:
        low_starved = a[..., 0] > np.float32(cal.starved_a_low)
    else:
        low_starved = np.asarray(starved_mask, dtype=bool)
    for m in (r, fe_frac, mafic, thickness):
        m[outside] = 0.0
    return MaterialMaps(a_low, a_high, r, t_pom, t_fe, fe_frac.astype(np.float32), mafic.astype(np.float32),
                        thickness.astype(np.float32), low_starved & mask)
