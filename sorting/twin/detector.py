"""Energy-integrating dual-layer ("sandwich") detector.

The tube spectrum passes the tube filters and the belt, then the front scintillator
(low-energy channel), the inter-layer (photodiode substrate + filter), and the back
scintillator (high-energy channel). A photon of energy E absorbed in a layer deposits
E there, so the signal of a channel is a compound-Poisson sum:

    mean = Phi * sum_E n(E) T(E) p(E) E         var = Phi * sum_E n(E) T(E) p(E) E**2

with n the spectrum normalised to one photon, T the object's transmission, p the
absorption probability of the layer and Phi the photons per pixel per line. The two
layers absorb disjoint photons, so their noise is independent. Counts are sampled as
equivalent quanta, ``n_eq = mean**2 / var``: ``Poisson(n_eq) * var / mean`` has exactly
that mean and variance.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from sorting.config import MachineConfig
from sorting.physics.materials import MaterialLibrary
from sorting.physics.spectra import tube_spectrum

#: above this many equivalent quanta the Poisson law is replaced by its normal limit
_GAUSS_NEQ = 400.0


@dataclass(frozen=True)
class DetectorResponse:
    """Noise-free response of the two channels, in ADU above dark, for gain 1.

    ``weights[:, c] @ T`` is the mean signal of channel ``c`` through an object of
    transmission ``T(E)``, ``weights_sq[:, c] @ T`` its variance. Transmission 1
    (air) gives ``air_level_adu``.
    """

    energies_kev: np.ndarray  # (E,)
    weights: np.ndarray  # (E, 2) float64
    weights_sq: np.ndarray  # (E, 2) float64
    spectrum: np.ndarray  # (E,) photons per pixel per line at the detector face (air)

    @property
    def air_adu(self) -> np.ndarray:
        return self.weights.sum(axis=0)

    def mean_var(self, transmission: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``transmission`` (..., E) -> mean and variance (..., 2) in ADU above dark."""
        w = self.weights.astype(transmission.dtype, copy=False)
        w2 = self.weights_sq.astype(transmission.dtype, copy=False)
        return transmission @ w, transmission @ w2

    def attenuation(self, line_integral: np.ndarray) -> np.ndarray:
        """Noise-free A = -ln(I/I0) per channel for ``line_integral`` (..., E) = sum mu*t."""
        mean, _ = self.mean_var(np.exp(-np.asarray(line_integral, dtype=np.float64)))
        return -np.log(mean / self.air_adu)


def build_response(machine: MachineConfig, library: MaterialLibrary,
                   energy_bin_kev: float | None = None) -> DetectorResponse:
    """Detector weights for ``machine``, binned at ``energy_bin_kev`` (default: the config's)."""
    tube, det, belt = machine.tube, machine.detector, machine.belt
    e1, fluence = tube_spectrum(tube.kvp, tube.anode_angle_deg)
    pre = [(f.material, f.thickness_mm) for f in tube.filters] + [(belt.material, belt.thickness_mm)]
    for name, t in pre:
        fluence = fluence * np.exp(-library.mu_per_mm([name], e1)[0] * t)
    # rebin the 1 keV table to the working bins, fluence-weighted energies
    step = energy_bin_kev or det.energy_bin_kev
    edges = np.arange(0.0, tube.kvp + step, step)
    idx = np.clip(np.digitize(e1, edges) - 1, 0, edges.size - 2)
    flu = np.bincount(idx, weights=fluence, minlength=edges.size - 1)
    e_mean = np.bincount(idx, weights=fluence * e1, minlength=edges.size - 1)
    keep = flu > flu.sum() * 1e-7
    energies = e_mean[keep] / flu[keep]
    n = flu[keep] / flu[keep].sum() * machine.flux_photons_per_px_line

    mu = library.mu_per_mm([det.front.material, det.back.material], energies)
    p_front = 1.0 - np.exp(-mu[0] * det.front.thickness_mm)
    between = np.exp(-mu[0] * det.front.thickness_mm)
    for layer in det.interlayer:
        between = between * np.exp(-library.mu_per_mm([layer.material], energies)[0] * layer.thickness_mm)
    p_back = between * (1.0 - np.exp(-mu[1] * det.back.thickness_mm))
    dep = np.stack([n * p_front * energies, n * p_back * energies], axis=1)  # keV per line
    dep_sq = np.stack([n * p_front * energies**2, n * p_back * energies**2], axis=1)
    gain = np.asarray(det.air_level_adu, dtype=float) / dep.sum(axis=0)  # ADU per keV
    return DetectorResponse(energies, dep * gain, dep_sq * gain**2, n)


@dataclass(frozen=True)
class PixelPattern:
    """Fixed pattern of one physical detector: gains, dark offsets and defects."""

    gain: np.ndarray  # (P, 2) float32, relative gain, mean 1
    dark: np.ndarray  # (P, 2) float32, dark offset in ADU
    read_noise: np.ndarray  # (P, 2) float32, read noise sigma in ADU
    dead: np.ndarray  # (P,) bool: reads dark only
    stuck: np.ndarray  # (P,) bool: reads a constant
    noisy: np.ndarray  # (P,) bool: read noise far above the rest


def pixel_pattern(machine: MachineConfig) -> PixelPattern:
    """The detector's fixed pattern, drawn from a seed derived from the machine's name,
    so a dataset, a recording and their calibration scans all see the same detector."""
    det = machine.detector
    rng = np.random.default_rng(zlib.crc32(machine.name.encode()))
    p = det.pixels
    gain = rng.normal(1.0, det.gain_nonuniformity, (p, 2)).clip(0.5, 1.5).astype(np.float32)
    dark = (det.dark_offset_adu + rng.normal(0.0, det.dark_spread_adu, (p, 2))).clip(0, 60000).astype(np.float32)
    read = np.full((p, 2), det.read_noise_adu, dtype=np.float32)
    dead = np.zeros(p, bool)
    stuck = np.zeros(p, bool)
    noisy = np.zeros(p, bool)
    # defects cycle dead, stuck, noisy; keep them off the outermost columns
    cols = rng.choice(np.arange(2, max(p - 2, 3)), size=min(det.dead_pixels, max(p - 4, 0)), replace=False)
    for i, c in enumerate(cols):
        [dead, stuck, noisy][i % 3][c] = True
    read[noisy] *= 30.0
    return PixelPattern(gain, dark, read, dead, stuck, noisy)


def sample_counts(mean: np.ndarray, var: np.ndarray, pattern: PixelPattern,
                  rng: np.random.Generator, columns: slice | np.ndarray = slice(None),
                  out: np.ndarray | None = None) -> np.ndarray:
    """Raw uint16 counts for a block of pixels.

    Parameters
    ----------
    mean, var : (L, W, 2) ndarray of float32
        Noise-free signal above dark and its compound-Poisson variance, gain 1.
    pattern : the detector's fixed pattern; ``columns`` selects the W detector columns.
    rng : the random generator (the caller owns the seed).
    out : (L, W, 2) ndarray of uint16, optional.

    Pixels with few equivalent quanta get the scaled Poisson law; elsewhere its normal
    limit, with the read noise folded into the same draw (one normal deviate per pixel).
    """
    mean = np.asarray(mean, dtype=np.float32)
    var = np.asarray(var, dtype=np.float32)
    gain = pattern.gain[columns]
    dark = pattern.dark[columns]
    read = pattern.read_noise[columns]
    # in place where it pays: this runs over every pixel of every simulated line
    tmp = np.multiply(mean, mean)
    tmp2 = np.maximum(var, np.float32(1e-12))
    tmp2 *= np.float32(_GAUSS_NEQ)
    small = np.flatnonzero(tmp < tmp2)
    signal = rng.standard_normal(mean.shape, dtype=np.float32)
    np.multiply(var, gain * gain, out=tmp)
    tmp += read * read
    np.sqrt(tmp, out=tmp)
    signal *= tmp
    np.multiply(mean, gain, out=tmp)
    signal += tmp
    signal += dark
    if small.size:
        m = mean.ravel()[small]
        v = np.maximum(var.ravel()[small], np.float32(1e-12))
        g = np.broadcast_to(gain, mean.shape).ravel()[small]
        rd = np.broadcast_to(read, mean.shape).ravel()[small]
        dk = np.broadcast_to(dark, mean.shape).ravel()[small]
        quanta = rng.poisson(m * m / v).astype(np.float32)
        signal.ravel()[small] = (quanta * (v / np.maximum(m, np.float32(1e-12))) * g + dk
                                 + rd * rng.standard_normal(small.size, dtype=np.float32))
    dead = pattern.dead[columns]
    if dead.any():
        signal[:, dead] = dark[dead] + read[dead] * rng.standard_normal(signal[:, dead].shape, dtype=np.float32)
    stuck = pattern.stuck[columns]
    if stuck.any():
        signal[:, stuck] = 65535.0
    np.rint(signal, out=signal)
    np.clip(signal, 0, 65535, out=signal)
    if out is None:
        return signal.astype(np.uint16)
    out[...] = signal
    return out
