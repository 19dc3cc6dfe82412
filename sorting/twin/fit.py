"""The twin of a machine it has never seen, fitted to that machine's calibration scans.

``sorting adapt`` regenerates the parent model's training rocks with the twin. Written on the
parent's own machine they carry that machine's spectrum and noise; on the new machine the
same rocks give other features (raw attenuations and their ratio shift, and the material
features are noisier at a lower flux or a harder spectrum). Every dataset brings the scans of
its own machine (dark, air and the crossed POM x iron wedge), and those pin down what the
features depend on:

- **the detector's statics**, read straight off the dark and air scans: dark level and
  spread, read noise, air level per channel, gain spread, defective pixels;
- **the two channels' spectral responses**, from the wedge cells' attenuation: the tube
  voltage, the tube filter (aluminium and copper), the front scintillator (material and
  thickness), the copper between the layers and the back scintillator are fitted by least
  squares to every usable cell's A, low and high (each scintillator pair the material
  library knows is tried, from several tube voltages);
- **the flux**, from the wedge cells' equivalent quanta (signal squared over photon
  variance, read noise removed, gain cancels): the fitted spectra give the quanta per photon
  of each cell, their median ratio to the measured quanta is the photons per pixel and line;
- **the pitches**, from the dataset (``pixel_pitch_mm``, ``line_pitch_mm``).

The parametrization is the twin's own (docs/physics.md), so the fit is only as good as that
model of the machine: an energy-integrating dual-layer detector behind a filtered tungsten
tube. Its residuals are reported: a machine the model cannot describe shows as a wedge fit
far worse than the scans' own noise. Fitted parameters can trade against each other (more
copper in the tube or between the layers); what the fit fixes is what matters here, the
channels' effective spectra over the range of attenuation the wedge spans.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from sorting.config import BeltConfig, DetectorConfig, Layer, MachineConfig, TubeConfig
from sorting.physics import MaterialLibrary
from sorting.physics.spectra import spectrum_kvp_range, tube_spectrum
from sorting.stages.calibrate import Calibration, WedgeCells, robust_sigma, wedge_cells

#: scintillators the fit tries for each layer (those of them the material library knows)
SCINTILLATORS = ("csi", "gos", "znse", "cdwo4")
#: parts of the model that are not fitted (they trade with the fitted filters)
WINDOW = Layer("beryllium", 1.0)
PHOTODIODE = Layer("silicon", 0.3)
BELT = ("rubber", 4.0)
#: tube voltages the fit starts from, kV
STARTS_KVP = (80.0, 120.0, 160.0)
#: wedge cells fitted: A below this (thicker cells are starved and carry little spectral shape)
FIT_MAX_A = 6.0
#: model error allowed per cell in the least squares, added to the cell's own standard error
SIGMA_A_FLOOR = 0.005
#: (name, lower, upper) of the fitted continuous parameters
PARAMETERS = (
    ("kvp", None, None),  # bounds from the shipped spectrum table
    ("tube_al_mm", 0.0, 10.0),
    ("tube_cu_mm", 0.0, 3.0),
    ("front_mm", 0.02, 3.0),
    ("inter_cu_mm", 0.0, 3.0),
    ("back_mm", 0.3, 12.0),
)


@dataclass(frozen=True)
class MachineFit:
    """A fitted :class:`MachineConfig` and how well it explains the scans.

    ``rms_a``: rms of (model - measured) A over the fitted wedge cells, low and high;
    ``noise_a``: the cells' own median standard error of A, low and high (a good fit has
    ``rms_a`` within a few times the scan noise plus :data:`SIGMA_A_FLOOR`);
    ``flux_spread``: the robust relative spread of the per-cell flux estimates.
    """

    machine: MachineConfig
    rms_a: tuple[float, float]
    noise_a: tuple[float, float]
    cells: int
    flux_spread: float

    def describe(self) -> str:
        m = self.machine
        d, t = m.detector, m.tube
        filt = " + ".join(f"{f.thickness_mm:.2f} mm {f.material}" for f in t.filters)
        inter = " + ".join(f"{f.thickness_mm:.2f} mm {f.material}" for f in d.interlayer)
        return (f"{t.kvp:.0f} kVp through {filt}; {d.front.thickness_mm:.2f} mm {d.front.material} | {inter} | "
                f"{d.back.thickness_mm:.2f} mm {d.back.material}; {m.flux_photons_per_px_line:.0f} photons per "
                f"pixel and line; {d.pixel_pitch_mm:g} x {m.line_pitch_mm:g} mm pixels; wedge fit rms A "
                f"{self.rms_a[0]:.4f} / {self.rms_a[1]:.4f} over {self.cells} cells")

    def digest(self) -> str:
        """Short hash of the fitted config, its name aside (names the fitted machine)."""
        return _config_digest(self.machine)


def _config_digest(machine: MachineConfig) -> str:
    text = json.dumps({**asdict(machine), "name": ""}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _fitted_cells(cells: WedgeCells) -> np.ndarray:
    """(K, 2) bool: the cells (and channels) the fit uses, with a usable A below FIT_MAX_A."""
    return np.isfinite(cells.a) & np.isfinite(cells.a_sd) & (cells.a <= FIT_MAX_A)


def _rms(a: np.ndarray, cells: WedgeCells, ok: np.ndarray) -> tuple[float, float]:
    """rms of ``a`` (K, 2) - the cells' measured A over the cells ``ok``, low and high."""
    return tuple(float(np.sqrt(np.mean((a[:, c] - cells.a[:, c])[ok[:, c]] ** 2))) for c in range(2))


class _Model:
    """The two channels' response to the wedge cells on the spectrum table's 1 keV grid."""

    def __init__(self, cells: WedgeCells, library: MaterialLibrary, front: str, back: str):
        _, hi = spectrum_kvp_range()
        e, _ = tube_spectrum(hi)  # the table's whole 1 keV grid
        self.e = e
        mats = ["pom", "iron", "aluminium", "copper", front, back, WINDOW.material, PHOTODIODE.material, BELT[0]]
        mu = library.mu_per_mm(mats, e)
        self.mu = dict(zip(["pom", "iron", "al", "cu", "front", "back", "window", "diode", "belt"], mu))
        self.fixed = np.exp(-self.mu["window"] * WINDOW.thickness_mm - self.mu["belt"] * BELT[1])
        self.diode = np.exp(-self.mu["diode"] * PHOTODIODE.thickness_mm)
        t = cells.t_mm
        self.trans = np.exp(-np.outer(t[:, 0], self.mu["pom"]) - np.outer(t[:, 1], self.mu["iron"]))  # (K, E)

    def deposits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Photon fluence n(E) (normalized) times absorption per channel, (E, 2), and the same with E."""
        kvp, al, cu, front, inter, back = x
        _, flu = tube_spectrum(float(kvp))
        flu = flu * self.fixed * np.exp(-self.mu["al"] * al - self.mu["cu"] * cu)
        flu = flu / flu.sum()
        p_front = 1.0 - np.exp(-self.mu["front"] * front)
        between = np.exp(-self.mu["front"] * front) * self.diode * np.exp(-self.mu["cu"] * inter)
        p_back = between * (1.0 - np.exp(-self.mu["back"] * back))
        dep = np.stack([flu * p_front, flu * p_back], axis=1)  # photons absorbed per channel
        return dep * self.e[:, None], dep * (self.e**2)[:, None]

    def attenuation(self, x: np.ndarray) -> np.ndarray:
        w, _ = self.deposits(x)
        air = w.sum(axis=0)
        return -np.log(np.maximum(self.trans @ w, 1e-300) / air)  # (K, 2)

    def quanta_per_photon(self, x: np.ndarray) -> np.ndarray:
        """Equivalent quanta per incident photon of each cell, (K, 2): mean**2 / var for flux 1."""
        w, w2 = self.deposits(x)
        return (self.trans @ w) ** 2 / np.maximum(self.trans @ w2, 1e-300)


def fit_machine(scans, cal: Calibration, pixel_pitch_mm: float, line_pitch_mm: float,
                library: MaterialLibrary, name: str | None = None) -> MachineFit:
    """Fit the twin's machine to ``scans`` (:class:`~sorting.io.CalibrationScans`) and ``cal``
    (the calibration made from them); see the module docstring.

    Raises ValueError when the scans leave too few usable wedge cells or no scintillator the
    library knows.
    """
    from scipy.optimize import least_squares

    cells = wedge_cells(scans, cal)
    ok = _fitted_cells(cells)
    if ok.sum() < 8:
        raise ValueError(f"only {int(ok.sum())} wedge cells with a usable attenuation: too few to fit a machine")
    sigma = np.sqrt(np.where(ok, cells.a_sd, 1.0) ** 2 + SIGMA_A_FLOOR**2)
    known = [s for s in SCINTILLATORS if s in library.materials]
    if not known:
        raise ValueError(f"the material library knows none of the scintillators {', '.join(SCINTILLATORS)}")
    lo, hi = spectrum_kvp_range()
    lower = np.array([lo] + [p[1] for p in PARAMETERS[1:]])
    upper = np.array([hi] + [p[2] for p in PARAMETERS[1:]])
    best = None
    for front, back in itertools.product(known, known):
        model = _Model(cells, library, front, back)

        def residuals(x, model=model):
            return ((model.attenuation(x) - cells.a) / sigma)[ok]

        for kvp in STARTS_KVP:
            x0 = np.clip(np.array([kvp, 1.0, 0.1, 0.3, 0.5, 3.0]), lower, upper)
            res = least_squares(residuals, x0, bounds=(lower, upper), x_scale=[20.0, 1.0, 0.1, 0.1, 0.2, 1.0],
                                diff_step=1e-4)
            if best is None or res.cost < best[0]:
                best = (res.cost, res.x, model, front, back)
    _, x, model, front, back = best
    rms = _rms(model.attenuation(x), cells, ok)
    noise = tuple(float(np.median(cells.a_sd[ok[:, c], c])) for c in range(2))
    # the flux: measured quanta over the fitted quanta per photon, cell by cell (both channels)
    q = model.quanta_per_photon(x)
    good = ok & np.isfinite(cells.quanta) & (cells.quanta > 0)
    ratios = (cells.quanta / q)[good]
    flux = float(np.median(ratios)) if ratios.size else 5000.0
    spread = float(robust_sigma(np.log(ratios))) if ratios.size else float("nan")

    good_px = ~cal.bad
    dark_raw = scans.dark.astype(np.float32)
    dark_mean = dark_raw.mean(axis=0)[good_px]
    dark_spread = float(robust_sigma(dark_mean.astype(np.float64)))
    read = float(np.median(dark_raw.std(axis=0, ddof=1)[good_px]))
    signal = (cal.air - cal.dark)[good_px].astype(np.float64)
    air_level = np.median(signal, axis=0)
    gain_spread = float(np.mean([float(robust_sigma(signal[:, c] / air_level[c])) for c in range(2)]))
    kvp, al, cu, t_front, t_inter, t_back = (float(v) for v in x)
    speed = 3.0  # m/s: only the line pitch reaches the rocks; the line rate follows from it
    machine = MachineConfig(
        name=name or "",
        tube=TubeConfig(kvp=round(kvp, 2), filters=(WINDOW, Layer("aluminium", round(al, 4)),
                                                    Layer("copper", round(cu, 4)))),
        detector=DetectorConfig(
            pixels=int(cal.bad.size), pixel_pitch_mm=float(pixel_pitch_mm), front=Layer(front, round(t_front, 4)),
            interlayer=(PHOTODIODE, Layer("copper", round(t_inter, 4))), back=Layer(back, round(t_back, 4)),
            air_level_adu=(round(float(air_level[0]), 1), round(float(air_level[1]), 1)),
            dark_offset_adu=round(float(np.median(dark_mean)), 1),
            dark_spread_adu=round(dark_spread, 2), read_noise_adu=round(read, 3),
            gain_nonuniformity=round(min(gain_spread, 0.5), 4), dead_pixels=int(cal.bad.sum())),
        belt=BeltConfig(speed_m_s=speed, line_rate_hz=speed * 1000.0 / float(line_pitch_mm), material=BELT[0],
                        thickness_mm=BELT[1]),
        flux_photons_per_px_line=round(flux, 1),
    )
    if name is None:
        machine = replace(machine, name=f"fitted_{_config_digest(machine)}")
    return MachineFit(machine, rms, noise, int(ok.sum()), spread)


def wedge_rms(machine: MachineConfig, scans, cal: Calibration, library: MaterialLibrary) -> tuple[float, float]:
    """How well ``machine`` (e.g. the parent's recorded one) explains the wedge cells of
    ``scans``: rms of (model - measured) A, low and high, over the cells :func:`fit_machine` fits."""
    from sorting.twin.detector import build_response

    cells = wedge_cells(scans, cal)
    resp = build_response(machine, library)
    mu = library.mu_per_mm(["pom", "iron"], resp.energies_kev)
    a = resp.attenuation(np.outer(cells.t_mm[:, 0], mu[0]) + np.outer(cells.t_mm[:, 1], mu[1]))
    return _rms(a, cells, _fitted_cells(cells))
