"""Calibration from the machine's own scans: dark, air, bad pixels and the POM x Fe basis inverse.

Everything here is measured from :class:`~sorting.io.CalibrationScans`
(docs/formats.md); nothing about a particular machine is built in. The only
physics constants used are the attenuation coefficients of the two wedge materials
(POM and iron, fixed by the contract) from the material library.

The basis inverse (docs/physics.md) maps a pixel's attenuation pair
``(A_low, A_high)`` to the POM and iron thicknesses that attenuate the same way.
The forward map ``(pom, fe) -> (A_low, A_high)`` is fitted to the wedge cells in the
form the physics dictates, a non-negative mix of monochromatic transmissions
``-ln sum_k w_k exp(-mu_pom(E_k) pom - mu_fe(E_k) fe)``: a crude interpolant between
the few wedge steps misses the strong beam-hardening curvature of the low channel
(errors of 0.01-0.03 in A, i.e. ~0.03 mm Fe, enough to spoil a mafic fraction),
while this form is exact for an energy-integrating detector, smooth, monotone, and
extrapolates sanely into the starved corner of the grid, which it is not fitted on.
The fitted map is inverted onto a regular ``(R, A_high)`` table (R = A_low / A_high
keeps the thin band of physical pairs well resolved), column by column along its
iso-lines, and looked up bilinearly with ``cv2.remap``, clamped at the edges.

A wedge cell's A is ``-ln`` of its mean transmission (unbiased; the mean of per-pixel
logs is not, where few quanta are left), its equivalent quanta per pixel are measured
from the line-to-line noise, and from those the A at which the low channel starves.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy.optimize import nnls

from sorting.errors import InputError
from sorting.physics import MaterialLibrary, load_materials
from sorting.stages.counts import (
    SIGNAL_FLOOR_ADU,
    STARVED_A,
    STARVED_QUANTA,
    repair_columns,
)

if TYPE_CHECKING:
    from sorting.io import CalibrationScans

#: a wedge cell joins the forward fit while its mean A stays below this
#: (a cell average of hundreds of pixels is still accurate where single pixels are starved)
_CELL_MAX_A = 8.0
#: ... and while its A is known to better than this (standard error)
_CELL_MAX_SD_A = 0.02
#: energies of the monochromatic components of the forward model, keV (generic X-ray range)
_FIT_ENERGIES_KEV = np.arange(10.0, 301.0, 2.0)
#: sampling of the fitted forward map: (POM steps, Fe steps)
_FORWARD_SAMPLES = (1001, 241)
#: inverse table: (R rows, A_high columns)
_LUT_SHAPE = (1024, 1024)
#: robust bad-pixel tests: dead below this share of the median air signal
_DEAD_FRACTION = 0.1
#: noisy above median + this many robust sigmas (and above twice the median)
_NOISY_SIGMAS = 8.0
#: stuck: temporal std of air below this share of the median (zero variance)
_STUCK_STD_FRACTION = 0.05
_SATURATED_ADU = 65534.5
#: remap's coordinates are 16-bit: rows and columns per block below SHRT_MAX
REMAP_BLOCK = 32000


# ---------------------------------------------------------------- basis inverse
@dataclass(frozen=True, eq=False)
class BasisLUT:
    """Inverse map ``(A_low, A_high) -> (t_pom_mm, t_fe_mm)`` on a regular ``(R, A_high)`` grid.

    Row ``i`` holds ``R = r_min + i * r_step``, column ``j`` holds ``A_high = j * a_high_step``.
    """

    t_pom_mm: np.ndarray  # (nR, nA) float32
    t_fe_mm: np.ndarray  # (nR, nA) float32
    a_high_step: float
    r_min: float
    r_step: float
    wedge_a: np.ndarray = field(repr=False)  # (K, 2) float32, measured A (low, high) per wedge cell
    wedge_t_mm: np.ndarray = field(repr=False)  # (K, 2) float32, (pom, fe) per wedge cell
    wedge_used: np.ndarray = field(repr=False)  # (K, 2) bool, cell fitted in channel (low, high)
    fit_rms_a: tuple[float, float] = (0.0, 0.0)  # rms residual of the forward fit per channel

    @property
    def a_high_max(self) -> float:
        return self.a_high_step * (self.t_pom_mm.shape[1] - 1)

    def invert(self, a_low: np.ndarray, a_high: np.ndarray, *,
               out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """POM and iron thicknesses that attenuate like ``(a_low, a_high)``.

        Parameters
        ----------
        a_low, a_high : ndarray of float32, same shape (any)
            Attenuation of the low and high channel.
        out : pair of float32 C-contiguous arrays of that shape, optional.

        Returns
        -------
        t_pom_mm, t_fe_mm : float32 arrays of the input's shape. Pairs outside the
        calibrated range get the value at the nearest edge of the table.
        """
        a_low = np.asarray(a_low, dtype=np.float32)
        a_high = np.asarray(a_high, dtype=np.float32)
        if a_low.shape != a_high.shape:
            raise ValueError(f"`a_low` (shape {a_low.shape}) does not match `a_high` (shape {a_high.shape})")
        if out is None:
            out = (np.empty(a_low.shape, np.float32), np.empty(a_low.shape, np.float32))
        else:
            for name, o in zip(("out[0]", "out[1]"), out):
                if o.shape != a_low.shape or o.dtype != np.float32 or not o.flags.c_contiguous:
                    raise ValueError(f"`{name}` (shape {o.shape}, {o.dtype}) must be C-contiguous float32 "
                                     f"of the input's shape {a_low.shape}")
        n_r, n_a = self.t_pom_mm.shape
        map_x = a_high * np.float32(1.0 / self.a_high_step)
        map_y = np.maximum(a_high, np.float32(1e-3))
        np.divide(a_low, map_y, out=map_y)
        map_y -= np.float32(self.r_min)
        map_y *= np.float32(1.0 / self.r_step)
        # keep far-off (noise, inf) coordinates inside remap's fixed-point range
        np.clip(map_x, -1.0, n_a, out=map_x)
        np.clip(map_y, -1.0, n_r, out=map_y)
        if a_low.ndim == 2 and max(a_low.shape) < REMAP_BLOCK:
            blocks = [(map_x, map_y, out[0], out[1])]
        else:
            fx, fy, o0, o1 = (v.reshape(-1) for v in (map_x, map_y, out[0], out[1]))
            blocks = [tuple(v[i:i + REMAP_BLOCK].reshape(1, -1) for v in (fx, fy, o0, o1))
                      for i in range(0, fx.size, REMAP_BLOCK)]
        for mx, my, o0, o1 in blocks:
            if mx.size == 0:
                continue
            m1, m2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
            cv2.remap(self.t_pom_mm, m1, m2, cv2.INTER_LINEAR, dst=o0, borderMode=cv2.BORDER_REPLICATE)
            cv2.remap(self.t_fe_mm, m1, m2, cv2.INTER_LINEAR, dst=o1, borderMode=cv2.BORDER_REPLICATE)
        return out


@dataclass(frozen=True)
class _ForwardModel:
    """``A_c(pom, fe) = -ln sum_k w[k, c] exp(-mu_pom[k] pom - mu_fe[k] fe)``."""

    mu_pom: np.ndarray  # (K,) 1/mm
    mu_fe: np.ndarray  # (K,) 1/mm
    weights: np.ndarray  # (K, 2)

    def __call__(self, pom_mm: np.ndarray, fe_mm: np.ndarray) -> np.ndarray:
        pom_mm, fe_mm = np.asarray(pom_mm, float), np.asarray(fe_mm, float)
        trans = np.exp(-(pom_mm[..., None] * self.mu_pom + fe_mm[..., None] * self.mu_fe))
        return -np.log(np.maximum(trans @ self.weights, 1e-300))


def _fit_forward(cells_t: np.ndarray, cells_a: np.ndarray, cells_sd: np.ndarray, used: np.ndarray,
                 library: MaterialLibrary) -> tuple[_ForwardModel, tuple[float, float]]:
    mu_pom, mu_fe = library.mu_per_mm(["pom", "iron"], _FIT_ENERGIES_KEV)
    weights = np.zeros((_FIT_ENERGIES_KEV.size, 2))
    rms = []
    for c in range(2):
        t, a, sd = cells_t[used[:, c]], cells_a[used[:, c], c], cells_sd[used[:, c], c]
        design = np.exp(-(t[:, :1] * mu_pom + t[:, 1:] * mu_fe))
        # minimise the error in A (not in transmission), each cell weighted by its noise
        trans = np.exp(-a)
        row = 1.0 / (trans * np.sqrt(sd**2 + 1e-3**2))
        weights[:, c], _ = nnls(design * row[:, None], trans * row, maxiter=50 * design.shape[1])
        fit = -np.log(np.maximum(design @ weights[:, c], 1e-300))
        rms.append(float(np.sqrt(np.mean((fit - a) ** 2))))
    keep = weights.any(axis=1)
    return _ForwardModel(mu_pom[keep], mu_fe[keep], weights[keep]), (rms[0], rms[1])


def _build_lut(model: _ForwardModel, pom_max: float, fe_max: float
               ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Tabulate the inverse of ``model`` on a regular (R, A_high) grid.

    Each table column is one A_high. Its pairs (pom, fe) form an iso-line that runs
    from pure POM to the most iron, along which R rises with the iron; so per column,
    solve pom for each iron step (A_high is monotone in pom), evaluate R there with
    the model, and interpolate pom and fe at the table's R rows. No triangulation, and
    rows beyond the iso-line's ends take its end values (clamped at the band's edges).
    """
    n_pom, n_fe = _FORWARD_SAMPLES
    pom = np.linspace(0.0, pom_max, n_pom)
    fe = fe_max * np.linspace(0.0, 1.0, n_fe) ** 2  # thin iron moves R fastest
    grid = model(pom[:, None], fe[None, :])  # (n_pom, n_fe, 2)
    a_high_grid = np.maximum.accumulate(grid[..., 1], axis=0)
    n_r, n_a = _LUT_SHAPE
    a_step = float(a_high_grid.max()) / (n_a - 1)
    a_cols = np.arange(n_a) * a_step
    # pom on each column's iso-line, per iron step; NaN where that iron alone exceeds it
    pom_iso = np.empty((n_a, n_fe))
    for k in range(n_fe):
        pom_iso[:, k] = np.interp(a_cols, a_high_grid[:, k], pom, left=np.nan, right=np.nan)
    valid = np.isfinite(pom_iso)
    a_iso = model(np.where(valid, pom_iso, 0.0), np.broadcast_to(fe, pom_iso.shape))
    r_iso = a_iso[..., 0] / np.maximum(a_cols[:, None], 1e-12)
    # the ratio of vanishing layers is ill-defined; size the rows for A_high >= 0.1
    thick = valid & (a_cols[:, None] >= min(0.1, 0.1 * a_cols[-1]))
    r_min, r_max = float(r_iso[thick].min()), float(r_iso[thick].max())
    r_step = (r_max - r_min) / (n_r - 1)
    r_rows = r_min + np.arange(n_r) * r_step
    t_pom = np.zeros((n_r, n_a), np.float32)
    t_fe = np.zeros((n_r, n_a), np.float32)
    for j in range(1, n_a):
        ok = valid[j]
        if ok.sum() < 2:
            t_pom[:, j], t_fe[:, j] = t_pom[:, j - 1], t_fe[:, j - 1]
            continue
        r_line = np.maximum.accumulate(r_iso[j, ok])
        t_pom[:, j] = np.interp(r_rows, r_line, pom_iso[j, ok])
        t_fe[:, j] = np.interp(r_rows, r_line, fe[ok])
    return t_pom, t_fe, a_step, r_min, r_step


# ---------------------------------------------------------------- calibration
@dataclass(frozen=True)
class BadPixels:
    """Defective pixels found from dark and air statistics, (P,) bool each (either channel)."""

    dead: np.ndarray
    stuck: np.ndarray
    noisy: np.ndarray

    @property
    def any(self) -> np.ndarray:
        return self.dead | self.stuck | self.noisy


@dataclass(frozen=True, eq=False)
class Calibration:
    """Everything the normalization needs about one machine, measured from its scans."""

    dark: np.ndarray  # (P, 2) float32, averaged dark
    air: np.ndarray  # (P, 2) float32, averaged air, bad pixels repaired
    bad: np.ndarray  # (P,) bool: dead, stuck or noisy
    air_sigma_a: np.ndarray  # (P, 2) float32: per-pixel temporal noise of A in air
    lut: BasisLUT
    fingerprint: str  # short hex digest of dark, air, bad and the basis table
    #: low-channel A above which a pixel is starved (STARVED_A, or lower where the quanta run out first)
    starved_a_low: float = STARVED_A
    #: ln(air - dark), floored; what attenuation() subtracts from
    log_flat: np.ndarray = field(init=False, repr=False)

    #: tables derived from this calibration by the stages, built once each (see :meth:`derived`)
    _derived: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        flat = np.maximum(self.air - self.dark, np.float32(SIGNAL_FLOOR_ADU))
        object.__setattr__(self, "log_flat", np.log(flat).astype(np.float32))
        # read-only: the tables derived from these arrays are built once and never go stale
        for arr in (self.dark, self.air, self.bad, self.air_sigma_a, self.log_flat, self.lut.t_pom_mm,
                    self.lut.t_fe_mm):
            arr.flags.writeable = False

    def derived(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The table ``key`` derived from this calibration, made by ``build()`` on first use.

        The stages keep what they precompute from a calibration here (the basis lookup
        table, detection weights per column window, the feature kernel's constants), on
        the calibration itself rather than in module-level caches: whoever holds the
        calibration holds its tables, and its arrays are read-only, so they never go stale.
        """
        try:
            return self._derived[key]
        except KeyError:
            value = self._derived[key] = build()
            return value

    @property
    def pixels(self) -> int:
        return int(self.dark.shape[0])


def robust_sigma(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The standard deviation a normal bulk of ``x`` would have, from its median absolute
    deviation (x 1.4826): blind to a minority of outliers."""
    x = np.asarray(x)
    return np.median(np.abs(x - np.median(x, axis=axis, keepdims=True)), axis=axis) * 1.4826


def _robust_high(x: np.ndarray) -> np.ndarray:
    """Per channel: values far above the bulk (median + robust sigmas, and twice the median)."""
    med = np.median(x, axis=0)
    mad = robust_sigma(x, axis=0)
    # a floor of 1 ADU keeps noise-free (simulated) scans from flagging quantisation
    limit = np.maximum(np.maximum(med + _NOISY_SIGMAS * mad, 2.0 * med), med + 1.0)
    return x > limit


def find_bad_pixels(dark: np.ndarray, air: np.ndarray) -> BadPixels:
    """Dead, stuck and noisy pixels from dark and air scans.

    Parameters
    ----------
    dark, air : (n, P, 2) ndarray of uint16

    Stuck: reads saturated, or air with (almost) no temporal variance where the others
    have photon noise. Dead: air signal (air - dark) below a tenth of the channel's
    median (a pixel stuck near its dark level counts as dead). Noisy: temporal std of
    dark or air far above the channel's median (robust MAD test).
    """
    dark_m, air_m = dark.mean(axis=0), air.mean(axis=0)
    dark_sd, air_sd = dark.std(axis=0), air.std(axis=0)
    signal = air_m - dark_m
    # saturated pixels read the same beam on and off, which would also pass as dead
    saturated = ((air_m >= _SATURATED_ADU) | (dark_m >= _SATURATED_ADU)).any(axis=1)
    dead_px = (signal < _DEAD_FRACTION * np.median(signal, axis=0)).any(axis=1) & ~saturated
    med_sd = np.median(air_sd, axis=0)
    frozen = ((med_sd > 0) & (air_sd < _STUCK_STD_FRACTION * med_sd)).any(axis=1)
    stuck_px = saturated | (frozen & ~dead_px)
    noisy_px = (_robust_high(dark_sd) | _robust_high(air_sd)).any(axis=1) & ~stuck_px & ~dead_px
    return BadPixels(dead_px, stuck_px, noisy_px)


def _repair_pixels(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(P, 2) values with bad pixels linearly interpolated from the nearest good ones."""
    out = values.astype(np.float32, copy=True)
    repair_columns(out[None], bad)
    return out


def _check_scans(scans: CalibrationScans) -> str:
    where = scans.source or "calibration"
    for name in ("dark", "air"):
        arr = getattr(scans, name)
        if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.shape[2] != 2:
            raise InputError(where, f"{name}: expected (lines, pixels, 2) counts, got shape {np.shape(arr)}")
        if arr.shape[0] < 2:
            raise InputError(where, f"{name}: needs at least 2 lines to measure noise, got {arr.shape[0]}")
    if scans.dark.shape[1] != scans.air.shape[1]:
        raise InputError(where, f"air has {scans.air.shape[1]} pixels but dark has {scans.dark.shape[1]}")
    pixels = scans.dark.shape[1]
    for w in scans.wedges:
        c = w.counts
        if not isinstance(c, np.ndarray) or c.ndim != 3 or c.shape[2] != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise InputError(where, f"{w.file}: expected (lines, width, 2) counts, got shape {np.shape(c)}")
        if w.x0 < 0 or w.x0 + c.shape[1] > pixels:
            raise InputError(where, f"{w.file}: columns {w.x0}..{w.x0 + c.shape[1] - 1} lie outside "
                                    f"the detector's {pixels} pixels")
        if not (np.isfinite(w.pom_mm) and np.isfinite(w.fe_mm) and w.pom_mm >= 0 and w.fe_mm >= 0):
            raise InputError(where, f"{w.file}: pom_mm and fe_mm must be finite and >= 0, "
                                    f"got {w.pom_mm!r}, {w.fe_mm!r}")
    return where


def _wedge_cells(scans: CalibrationScans, dark: np.ndarray, flat: np.ndarray, read_var: np.ndarray,
                 bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct (pom, fe): A (2,), its standard error (2,) and the equivalent quanta per pixel (2,).

    A cell's A is ``-ln`` of its mean transmission, not the mean of per-pixel ``-ln``:
    the log of a noisy count is biased by about ``1/(2 quanta)``, which breaks the
    exact Beer-Lambert form the forward model is fitted in, for the thick cells.
    The quanta are ``signal**2 / variance`` per pixel over the scan's lines, read noise
    removed (gain cancels), infinite for noise-free scans.
    """
    sums: dict[tuple[float, float], np.ndarray] = {}
    for w in scans.wedges:
        cols = slice(w.x0, w.x0 + w.counts.shape[1])
        good = ~bad[cols]
        if not good.any():
            continue
        signal = w.counts[:, good].astype(np.float64) - dark[cols][good]  # (lines, g, 2)
        trans = (signal / flat[cols][good]).reshape(-1, 2)
        acc = np.zeros((6, 2))
        acc[0] = trans.shape[0]
        acc[1] = trans.sum(axis=0)
        acc[2] = (trans**2).sum(axis=0)
        if signal.shape[0] > 1:
            photon_var = np.maximum(signal.var(axis=0, ddof=1) - read_var[cols][good], 0.0)
            acc[3] = (signal.mean(axis=0) ** 2).sum(axis=0)
            acc[4] = photon_var.sum(axis=0)
            acc[5] = signal.shape[1]
        key = (float(w.pom_mm), float(w.fe_mm))
        sums[key] = sums.get(key, 0.0) + acc
    keys = sorted(sums)
    t = np.array(keys, dtype=np.float64).reshape(-1, 2)
    acc = np.array([sums[k] for k in keys]).reshape(-1, 6, 2)
    n = acc[:, 0]
    mean = acc[:, 1] / n
    var = np.maximum(acc[:, 2] / n - mean**2, 0.0)
    # a cell whose mean transmission is not clearly above zero has no usable A
    a = -np.log(np.maximum(mean, 1e-300))
    a_sd = np.where(mean > 0, np.sqrt(var / n) / np.maximum(mean, 1e-300), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        quanta = np.where(acc[:, 5] > 0, acc[:, 3] / acc[:, 4], np.nan)
    return t, a, a_sd, quanta


@dataclass(frozen=True)
class WedgeCells:
    """What the wedge scans measure, per distinct ``(pom, fe)`` cell: thicknesses ``t_mm``
    (K, 2), ``a`` = -ln(mean transmission) (K, 2) low and high, its standard error ``a_sd``
    (K, 2), and the equivalent quanta per pixel ``quanta`` (K, 2; read noise removed, gain
    cancels; NaN where a scan has a single line)."""

    t_mm: np.ndarray
    a: np.ndarray
    a_sd: np.ndarray
    quanta: np.ndarray


def wedge_cells(scans: CalibrationScans, cal: Calibration) -> WedgeCells:
    """The wedge cells of ``scans`` measured with ``cal`` (the calibration made from them):
    the same numbers :func:`calibrate` fits its forward model to."""
    read_var = scans.dark.astype(np.float32).var(axis=0, ddof=1).astype(np.float64)
    flat = np.maximum(cal.air - cal.dark, np.float32(SIGNAL_FLOOR_ADU))
    return WedgeCells(*_wedge_cells(scans, cal.dark, flat, read_var, cal.bad))


def _starved_a_low(cells_a: np.ndarray, quanta: np.ndarray) -> float:
    """The low-channel A at which a pixel keeps only STARVED_QUANTA equivalent quanta.

    Beam hardening makes the quanta fall slower than the transmission, so this is
    measured on the wedge cells (log quanta linear in A), not extrapolated from air.
    Capped at STARVED_A; noise-free scans (infinite quanta) give STARVED_A.
    """
    a, q = cells_a[:, 0], quanta[:, 0]
    ok = np.isfinite(q) & (q > 0) & (a >= 1.0) & (a <= _CELL_MAX_A)
    if ok.sum() < 3 or np.ptp(a[ok]) < 1.0:
        return STARVED_A
    slope, offset = np.polyfit(a[ok], np.log(q[ok]), 1)
    if not slope < 0:
        return STARVED_A
    return float(min((np.log(STARVED_QUANTA) - offset) / slope, STARVED_A))


def _listing(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.unique(values)) + "]"


def calibrate(scans: CalibrationScans, *, library: MaterialLibrary | None = None) -> Calibration:
    """Calibrate a machine from its dark, air and POM x Fe wedge scans.

    Parameters
    ----------
    scans : CalibrationScans
        ``dark`` and ``air`` (n, P, 2) uint16; ``wedges`` uniform (n, w, 2) scans at
        detector columns ``x0 .. x0+w-1`` through ``pom_mm`` of POM and ``fe_mm`` of iron.
    library : material library for the POM and iron attenuation (default: the shipped one).

    Raises
    ------
    InputError
        Naming ``scans.source``: malformed scans, air not above dark, too many bad
        pixels, or a wedge grid too small to span the basis.
    """
    where = _check_scans(scans)
    library = library or load_materials()
    dark_raw = scans.dark.astype(np.float32)
    air_raw = scans.air.astype(np.float32)
    found = find_bad_pixels(dark_raw, air_raw)
    bad = found.any
    pixels = bad.size
    if bad.sum() > pixels // 2:
        raise InputError(where, f"{int(bad.sum())} of {pixels} pixels are dead, stuck or noisy: "
                                "the dark and air scans look wrong (beam off during air?)")
    dark = dark_raw.mean(axis=0)
    signal = air_raw.mean(axis=0) - dark
    dark_sd = np.median(dark_raw.std(axis=0)[~bad], axis=0)
    med_signal = np.median(signal[~bad], axis=0)
    for c, name in enumerate(("low", "high")):
        if not med_signal[c] > max(10.0 * dark_sd[c], 10.0 * SIGNAL_FLOOR_ADU):
            raise InputError(where, f"air is not above dark in the {name} channel "
                                    f"(median air - dark = {med_signal[c]:.1f} ADU)")
    signal = _repair_pixels(signal, bad)
    air = (dark + np.maximum(signal, SIGNAL_FLOOR_ADU)).astype(np.float32)
    dark = dark.astype(np.float32)
    flat = np.maximum(air - dark, np.float32(SIGNAL_FLOOR_ADU))
    air_a = -np.log(np.maximum(air_raw - dark, np.float32(SIGNAL_FLOOR_ADU)) / flat)
    air_sigma_a = _repair_pixels(air_a.std(axis=0), bad)

    if not scans.wedges:
        raise InputError(where, "wedges.csv: no wedge scans")
    read_var = dark_raw.var(axis=0, ddof=1).astype(np.float64)
    cells_t, cells_a, cells_sd, quanta = _wedge_cells(scans, dark, flat, read_var, bad)
    used = (cells_a <= _CELL_MAX_A) & (cells_sd <= _CELL_MAX_SD_A)
    for c, name in enumerate(("low", "high")):
        u = cells_t[used[:, c]]
        if u.shape[0] < 6 or np.unique(u[:, 0]).size < 3 or np.unique(u[:, 1]).size < 3:
            raise InputError(where, f"wedges.csv: the wedge grid is too small: {u.shape[0]} usable cells in the "
                                    f"{name} channel over POM {_listing(cells_t[:, 0])} mm x Fe "
                                    f"{_listing(cells_t[:, 1])} mm; "
                                    "need at least 3 POM and 3 Fe thicknesses")
    model, rms = _fit_forward(cells_t, cells_a, cells_sd, used, library)
    t_pom, t_fe, a_step, r_min, r_step = _build_lut(model, cells_t[:, 0].max(), cells_t[:, 1].max())
    lut = BasisLUT(t_pom, t_fe, a_step, r_min, r_step, cells_a.astype(np.float32), cells_t.astype(np.float32),
                   used, rms)
    starved_a_low = _starved_a_low(cells_a, quanta)
    digest = hashlib.blake2b(digest_size=8)
    for arr in (dark, air, bad, t_pom, t_fe, np.float64(starved_a_low)):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return Calibration(dark, air, bad, air_sigma_a.astype(np.float32), lut, digest.hexdigest(), starved_a_low)
