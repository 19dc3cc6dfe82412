"""Raw counts -> attenuation, ratio and basis-material maps (pipeline stage 1).

Pure functions on arrays: inputs are never modified; the hot ones take a keyword-only
``out=``. One code path serves rock crops and belt chunks: a block of raw counts
plus ``x0``, the detector column of its column 0 (docs/formats.md).
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numba
import numpy as np

from sorting.physics import load_materials
from sorting.stages.counts import SIGNAL_FLOOR_ADU, repair_columns, repair_plan

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration

#: floors of the thickness denominators of the fractions, mm: thin rims read noisily
FRACTION_FLOOR_MM = 0.5
#: the basis fit's energy range, keV: where rock attenuation is measured
_BASIS_ENERGIES_KEV = np.arange(40.0, 150.5, 1.0)
#: rocks that are mixtures by volume; anything else is a material of the library
MIXTURES: dict[str, dict[str, float]] = {"syenite": {"albite": 0.5, "orthoclase": 0.5}}
#: the mafic line runs from this (0) to that (1)
MAFIC_ENDS = ("syenite", "hedenbergite")


# ---------------------------------------------------------------- attenuation
def attenuation_into(raw: np.ndarray, dark: np.ndarray, log_flat: np.ndarray, bad: np.ndarray,
                     out: np.ndarray) -> np.ndarray:
    """The kernel of :func:`attenuation`, on pre-sliced calibration columns (trusted inputs).

    ``raw`` (L, W, 2); ``dark``, ``log_flat`` = ln(air - dark) (W, 2) float32; ``bad`` (W,);
    ``out`` (L, W, 2) C-contiguous float32.
    """
    if out.size == 0:
        return out
    flat = out.reshape(out.shape[0], -1)
    plan = repair_plan(bad)
    if raw.dtype == np.uint16 and dark.dtype == np.float32 and log_flat.dtype == np.float32:
        # the stream's case: one compiled pass each side of OpenCV's vectorised log
        lines = out.shape[0]
        _above_dark(np.ascontiguousarray(raw).reshape(lines, -1), dark.reshape(-1), np.float32(SIGNAL_FLOOR_ADU),
                    flat)
        cv2.log(flat, dst=flat)
        _from_log(log_flat.reshape(-1), *plan, flat)
        return out
    np.subtract(raw, dark, out=out, casting="unsafe")  # in float32, as copy-then-subtract
    # OpenCV's max and log are markedly faster than numpy's here (docs/performance.md);
    # the counts are finite, so NaN handling does not differ
    cv2.max(flat, SIGNAL_FLOOR_ADU, dst=flat)
    cv2.log(flat, dst=flat)
    np.subtract(log_flat, out, out=out)
    repair_columns(out, bad)
    return out


@numba.njit(cache=True, nogil=True)
def _above_dark(raw: np.ndarray, dark: np.ndarray, floor: np.float32, out: np.ndarray) -> None:
    """out = max(raw - dark, floor) in float32; raw (L, 2W) uint16, dark (2W,) float32, out
    (L, 2W): a pixel's channels side by side (flat rows vectorise; (L, W, 2) loops do not)."""
    for i in range(out.shape[0]):
        row = raw[i]
        for k in range(out.shape[1]):
            out[i, k] = max(np.float32(row[k]) - dark[k], floor)


@numba.njit(cache=True, nogil=True)
def _from_log(log_flat: np.ndarray, bad_idx: np.ndarray, left: np.ndarray, right: np.ndarray,
              w_left: np.ndarray, w_right: np.ndarray, out: np.ndarray) -> None:
    """out = log_flat - out (out (L, 2W) holds ln(I - dark), log_flat (2W,)), then bad columns
    interpolated from their good neighbours, as :func:`repair_columns`."""
    for i in range(out.shape[0]):
        from_log_row(log_flat, bad_idx, left, right, w_left, w_right, out[i])


@numba.njit(cache=True, nogil=True)
def _from_log_pixels(log_flat: np.ndarray, bad_idx: np.ndarray, left: np.ndarray, right: np.ndarray,
                     w_left: np.ndarray, w_right: np.ndarray, out: np.ndarray) -> None:
    """:func:`_from_log` with a flat field per line: ``log_flat`` (L, 2W)."""
    for i in range(out.shape[0]):
        from_log_row(log_flat[i], bad_idx, left, right, w_left, w_right, out[i])


@numba.njit(cache=True, nogil=True, inline="always")
def from_log_row(log_flat: np.ndarray, bad_idx: np.ndarray, left: np.ndarray, right: np.ndarray,
                 w_left: np.ndarray, w_right: np.ndarray, row: np.ndarray) -> None:
    """One line of :func:`_from_log` (compiled callers: the streaming loop's fused line pass)."""
    for k in range(row.size):
        row[k] = log_flat[k] - row[k]
    for b in range(bad_idx.size):
        for c in range(2):
            row[2 * bad_idx[b] + c] = row[2 * left[b] + c] * w_left[b] + row[2 * right[b] + c] * w_right[b]


def counts_log_into(raw: np.ndarray, dark: np.ndarray, out: np.ndarray) -> None:
    """out = ln(max(raw - dark, SIGNAL_FLOOR_ADU)): the first half of :func:`attenuation_into`
    (trusted inputs: raw (L, 2W) uint16, dark (2W,) float32, out (L, 2W) float32, all C order);
    :func:`from_log_row` per line is the second."""
    _above_dark(raw, dark, np.float32(SIGNAL_FLOOR_ADU), out)
    cv2.log(out, dst=out)


def check_block(raw: np.ndarray, cal: Calibration, x0: int, name: str = "raw") -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[2] != 2:
        raise ValueError(f"`{name}` (shape {raw.shape}) must be (lines, width, 2)")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise ValueError(f"`{name}` must hold real counts, got dtype {raw.dtype}")
    if isinstance(x0, bool) or not isinstance(x0, (int, np.integer)):
        raise ValueError(f"`x0` must be an int, got {x0!r}")
    if x0 < 0 or x0 + raw.shape[1] > cal.pixels:
        raise ValueError(f"`{name}` (shape {raw.shape}) at x0={x0} does not fit the calibration "
                         f"(`cal.dark` shape {cal.dark.shape}): columns {x0}..{x0 + raw.shape[1] - 1}")
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raw = np.nan_to_num(raw, nan=0.0, posinf=65535.0, neginf=0.0)
    return raw


def check_out(out: np.ndarray | None, shape: tuple[int, ...], name: str = "out") -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"`{name}` (shape {out.shape}, {out.dtype}) must be C-contiguous float32 of shape {shape}")
    return out


def attenuation(raw: np.ndarray, cal: Calibration, x0: int = 0, *, out: np.ndarray | None = None,
                log_flat: np.ndarray | None = None) -> np.ndarray:
    """Attenuation maps ``A = -ln((I - dark) / (air - dark))`` per channel.

    Parameters
    ----------
    raw : (L, W, 2) ndarray of uint16
        Raw counts of detector columns ``x0 .. x0+W-1``.
    cal : Calibration
    x0 : detector column of ``raw``'s column 0.
    out : (L, W, 2) ndarray of float32, optional
    log_flat : (L, W, 2) ndarray of float32, optional
        ln(air - dark) per pixel, in place of the calibration's flat field: the air level the
        streaming loop tracked on empty belt (:class:`sorting.stages.air.AirTracker`) when it
        normalized these lines (a crop saved by the sorter carries it). The same arithmetic as
        the loop's line pass, so the same numbers.

    Returns
    -------
    (L, W, 2) ndarray of float32. Signals at or below dark are floored at 1 ADU, so
    starved pixels read large but finite A (at most ln(air - dark)); bad columns are
    interpolated from their nearest good neighbours.
    """
    raw = check_block(raw, cal, x0)
    out = check_out(out, raw.shape)
    cols = slice(x0, x0 + raw.shape[1])
    if log_flat is None:
        return attenuation_into(raw, cal.dark[cols], cal.log_flat[cols], cal.bad[cols], out)
    if np.shape(log_flat) != raw.shape:
        raise ValueError(f"`log_flat` (shape {np.shape(log_flat)}) must have the shape of `raw` {raw.shape}")
    if out.size == 0:
        return out
    lines = raw.shape[0]
    flat = out.reshape(lines, -1)
    dark = cal.dark[cols]
    if raw.dtype == np.uint16 and dark.dtype == np.float32:  # as the loop's line pass
        counts_log_into(np.ascontiguousarray(raw).reshape(lines, -1), np.ascontiguousarray(dark).reshape(-1), flat)
    else:
        np.subtract(raw, dark, out=out, casting="unsafe")
        cv2.max(flat, SIGNAL_FLOOR_ADU, dst=flat)
        cv2.log(flat, dst=flat)
    _from_log_pixels(np.ascontiguousarray(log_flat, dtype=np.float32).reshape(lines, -1),
                     *repair_plan(cal.bad[cols]), flat)
    return out


@lru_cache(maxsize=64)
def basis_vector(material: str) -> tuple[float, float]:
    """Millimetres of POM and of iron that attenuate like 1 mm of ``material``.

    Least-squares fit ``mu_m(E) ~ p mu_POM(E) + f mu_Fe(E)`` over 40-150 keV, from the
    shipped material library; ``material`` is a library name or one of :data:`MIXTURES`.
    These are physics constants: nearly independent of the machine.
    """
    lib = load_materials()
    parts = MIXTURES.get(material.lower(), {material: 1.0})
    mu = sum(frac * lib.mu_per_mm([name], _BASIS_ENERGIES_KEV)[0] for name, frac in parts.items())
    basis = lib.mu_per_mm(["pom", "iron"], _BASIS_ENERGIES_KEV).T
    (p, f), *_ = np.linalg.lstsq(basis, mu, rcond=None)
    return float(p), float(f)


@lru_cache(maxsize=1)
def mafic_inverse() -> np.ndarray:
    ends = np.array([basis_vector(m) for m in MAFIC_ENDS]).T  # columns: syenite, hedenbergite
    return np.linalg.inv(ends).astype(np.float32)


class _BasisTable:
    """The calibration's basis inverse with both thicknesses interleaved, (nR, nA, 2): one
    ``cv2.remap`` per lookup, and both values of a table cell in the same cache line.
    Bilinear weights are per channel, so it reads exactly what ``BasisLUT.invert`` reads."""

    def __init__(self, lut) -> None:
        self.table = np.ascontiguousarray(np.stack([lut.t_pom_mm, lut.t_fe_mm], axis=-1), dtype=np.float32)
        self.n_r, self.n_a = lut.t_pom_mm.shape
        self.x_scale = np.float32(1.0 / lut.a_high_step)
        self.r_min = np.float32(lut.r_min)
        self.y_scale = np.float32(1.0 / lut.r_step)


def basis_table(cal: Calibration) -> _BasisTable:
    """The calibration's basis table in the interleaved layout the lookups read (built once)."""
    return cal.derived("basis_table", lambda: _BasisTable(cal.lut))


