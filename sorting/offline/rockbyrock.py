"""Rock-by-rock test work: tie the particles a recording shows to the laboratory's assays.

Numbered rocks are fed one at a time, in order; the particles of the recording come in the
same order along the belt. The two sequences are aligned by dynamic programming on their
order and on mass: the pipeline's mass estimate of each particle against the mass the
laboratory weighed. Real test work is messy, and the alignment models each slip so that one
slip does not shift every label after it:

- a **debris** particle (a chip, a fragment) matches no feed number;
- a **missed** rock (fed, not scanned) or a sample **lost** in the laboratory leaves a feed
  number without a particle or without an assay;
- a **touching pair** (two consecutive rocks in contact) is one particle whose mass is the sum
  of two assays.

The model is a pair hidden Markov model: from feed slot to feed slot, a particle is debris
with probability ``p_debris``; a slot is missed with ``p_missed``, merged with the next one
with ``p_touching``, or matched. A match's log mass error ``ln(w) - ln(e')`` (``e'`` the
calibrated estimate) follows a Gaussian with a broad tail, of width
``sigma(e') = sqrt(sigma0**2 + tau**2 / e')`` (small rocks, few pixels: a noisier estimate).
Forward-backward gives each possible tie its posterior probability; a tie is kept only when it
is near-certain (``min_posterior``) and its mass error is within ``tolerance_sigmas`` of the
measured scatter at its mass.
Everything else is left out with its reason: a wrong label is far worse than a missing one.

The estimate's calibration comes from the data: a coarse search of the scale, then rounds of
forward-backward and a robust (Huber) fit of ``ln(w / e)`` over the confident matches:
an intercept, and with enough matches also slopes on ``ln(e)`` and on any covariates given
(e.g. the particle's position on the mafic line), since another machine's estimate may be
biased by size or composition. The scatter is the robust spread of what remains (with enough
matches, ``sigma0`` and ``tau`` by maximum likelihood under the same tailed error model).

Pure functions on arrays; no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from sorting.stages.calibrate import robust_sigma

#: slot and particle states
TIED, LOST, MISSED, TOUCHING, AMBIGUOUS, MASS, DEBRIS = \
    "tied", "lost", "missed", "touching", "ambiguous", "mass", "debris"
_NEG = -np.inf


@dataclass(frozen=True)
class AlignmentConfig:
    """Priors and acceptance rules of :func:`align`.

    p_debris : chance of an unnumbered particle (debris, a fragment) before any feed slot.
    p_missed : chance that a numbered rock leaves no particle (not scanned, off the belt).
    p_touching : chance that a rock arrives in contact with the next one (one particle for two).
    tail_share, tail_sigmas : share and width (in sigmas) of the broad tail of the mass error.
    min_sigma_ln : floor of the measured scatter of ``ln(w / e')`` (the laboratory's balance
        and the estimate are never better than this).
    tolerance_sigmas : a tie whose mass error exceeds this many sigmas is left out.
    min_posterior : a tie is kept only when its posterior probability reaches this.
    scale_search_ln : the estimate's scale is first searched within ``exp(+-this)``.
    min_matches_for_slopes : below this many confident matches only the scale is fitted.
    rounds : forward-backward and refit rounds.
    """

    p_debris: float = 0.05
    p_missed: float = 0.02
    p_touching: float = 0.02
    tail_share: float = 0.05
    tail_sigmas: float = 6.0
    min_sigma_ln: float = 0.01
    tolerance_sigmas: float = 6.0
    min_posterior: float = 0.99
    scale_search_ln: float = math.log(5.0)
    min_matches_for_slopes: int = 40
    rounds: int = 8

    def __post_init__(self) -> None:
        for name in ("p_debris", "p_missed", "p_touching", "tail_share"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise ValueError(f"AlignmentConfig.{name} must be in (0, 0.5), got {v!r}")
        if self.p_missed + self.p_touching >= 0.5:
            raise ValueError("AlignmentConfig: p_missed + p_touching must stay below 0.5")
        for name in ("tail_sigmas", "min_sigma_ln", "tolerance_sigmas", "scale_search_ln"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"AlignmentConfig.{name} must be > 0, got {v!r}")
        if not 0.5 < self.min_posterior <= 1.0:
            raise ValueError(f"AlignmentConfig.min_posterior must be in (0.5, 1], got {self.min_posterior!r}")
        if self.rounds < 1 or self.min_matches_for_slopes < 1:
            raise ValueError("AlignmentConfig.rounds and min_matches_for_slopes must be >= 1")


@dataclass(frozen=True)
class Alignment:
    """What :func:`align` found. Slots are the feed numbers 1..N in order (index k is feed
    number k + 1); particles are in belt order.

    slot_particle : (N,) int64, the particle tied to each slot with confidence (-1: none).
        Only slots with status ``tied`` (assayed) or ``lost`` (no assay) have one.
    slot_status : (N,) str: ``tied``; ``lost`` (no assay); ``missed`` (most likely no
        particle); ``touching`` (most likely shares one particle with a neighbour);
        ``mass`` (the tie is certain by order but the masses disagree beyond the tolerance);
        ``ambiguous`` (no explanation reaches ``min_posterior``).
    slot_candidate : (N,) int64, the most probable single particle of each slot (-1: none),
        for reports; a candidate is not a tie.
    slot_posterior : (N,) float64, that candidate's posterior probability.
    slot_touch_particle : (N,) int64, for a ``touching`` slot the particle most likely to hold
        it together with a neighbour (-1: none), for reports.
    slot_residual_ln : (N,) float64, ``ln(w) - ln(e')`` of the candidate (NaN: none or no assay).
    particle_status : (n,) str: ``tied``, ``lost`` (tied to a feed number without assay),
        ``debris``, ``touching``, ``ambiguous``.
    particle_slot : (n,) int64, the slot each particle is tied to (-1: none).
    calibrated_mass_g : (n,) float64, the estimate after calibration, ``e'``.
    coefficients : the fitted ``ln(w / e)`` model (intercept first; then slopes on ``ln(e)``
        and the covariates, centred, when they were fitted).
    sigma0_ln, sigma_tau : the scatter model ``sigma(e') = sqrt(sigma0**2 + tau**2 / e')`` of
        ``ln(w / e')`` (``tau`` in sqrt(g); 0 when too few matches to fit it).
    particle_sigma_ln : (n,) float64, ``sigma`` at each particle's calibrated mass.
    sigma_ln, tolerance_ln : the scatter at the median assayed mass, and the tolerance there
        (each tie is checked against ``tolerance_sigmas`` times its own ``sigma``).
    log_likelihood : of the whole alignment under the final model.
    """

    slot_particle: np.ndarray
    slot_status: np.ndarray
    slot_candidate: np.ndarray
    slot_posterior: np.ndarray
    slot_touch_particle: np.ndarray
    slot_residual_ln: np.ndarray
    particle_status: np.ndarray
    particle_slot: np.ndarray
    calibrated_mass_g: np.ndarray
    coefficients: tuple[float, ...]
    sigma0_ln: float
    sigma_tau: float
    particle_sigma_ln: np.ndarray
    sigma_ln: float
    tolerance_ln: float
    log_likelihood: float
    rounds: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(particle, slot)`` of every confident tie to an assayed slot, in slot order."""
        return [(int(self.slot_particle[k]), int(k)) for k in range(self.slot_status.size)
                if self.slot_status[k] == TIED]


# ------------------------------------------------------------------ the pair HMM
@numba.njit(cache=True)
def _lse(a: float, b: float) -> float:
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


@numba.njit(cache=True)
def _forward(f_debris, f_match, f_touch, l_debris, l_missed, l_match, l_touch):
    """F[i, k]: log probability of the first i particles and k slots, ending at a slot
    boundary. f_match (n, N), f_touch (n, N) (column k: slots k and k+1; the last is -inf)."""
    n, m = f_match.shape
    f = np.full((n + 1, m + 1), -np.inf)
    f[0, 0] = 0.0
    for i in range(n + 1):
        for k in range(m + 1):
            if i == 0 and k == 0:
                continue
            v = -np.inf
            if i >= 1:
                v = _lse(v, f[i - 1, k] + l_debris + f_debris[i - 1])
            if k >= 1:
                v = _lse(v, f[i, k - 1] + l_missed)
            if i >= 1 and k >= 1:
                v = _lse(v, f[i - 1, k - 1] + l_match + f_match[i - 1, k - 1])
            if i >= 1 and k >= 2:
                v = _lse(v, f[i - 1, k - 2] + l_touch + f_touch[i - 1, k - 2])
            f[i, k] = v
    return f


@numba.njit(cache=True)
def _backward(f_debris, f_match, f_touch, l_debris, l_missed, l_match, l_touch):
    """B[i, k]: log probability of the particles from i and the slots from k."""
    n, m = f_match.shape
    b = np.full((n + 1, m + 1), -np.inf)
    b[n, m] = 0.0
    for i in range(n, -1, -1):
        for k in range(m, -1, -1):
            if i == n and k == m:
                continue
            v = -np.inf
            if i < n:
                v = _lse(v, b[i + 1, k] + l_debris + f_debris[i])
            if k < m:
                v = _lse(v, b[i, k + 1] + l_missed)
            if i < n and k < m:
                v = _lse(v, b[i + 1, k + 1] + l_match + f_match[i, k])
            if i < n and k + 1 < m:
                v = _lse(v, b[i + 1, k + 2] + l_touch + f_touch[i, k])
            b[i, k] = v
    return b


def _log_normal_pdf(x: np.ndarray, mu: float, sigma: float | np.ndarray) -> np.ndarray:
    z = (x - mu) / sigma
    return -0.5 * z * z - np.log(sigma * math.sqrt(2.0 * math.pi))


def _log_error_pdf(r: np.ndarray, sigma: float | np.ndarray, cfg: AlignmentConfig) -> np.ndarray:
    """Log density of a match's mass error: a Gaussian with a broad tail."""
    core = _log_normal_pdf(r, 0.0, sigma) + math.log(1.0 - cfg.tail_share)
    tail = _log_normal_pdf(r, 0.0, cfg.tail_sigmas * sigma) + math.log(cfg.tail_share)
    return np.logaddexp(core, tail)


@dataclass(frozen=True)
class _Posteriors:
    log_z: float
    match: np.ndarray  # (n, N)
    touch: np.ndarray  # (n, N): particle i covers slots k, k+1
    missed: np.ndarray  # (N,)
    debris: np.ndarray  # (n,)


def _posteriors(le: np.ndarray, lw: np.ndarray, sigma: np.ndarray, pop: tuple[float, float],
                cfg: AlignmentConfig, need: bool = True) -> _Posteriors:
    """Forward-backward for calibrated log estimates ``le`` (n,), their scatter ``sigma`` (n,)
    and log assay masses ``lw`` (N,) (NaN: no assay)."""
    n, m = le.size, lw.size
    mu, sd = pop
    known = np.isfinite(lw)
    f_match = np.empty((n, m))
    r = lw[None, :] - le[:, None]
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))[:, None]
    f_match[:, known] = _log_error_pdf(r[:, known], sig, cfg)
    # a slot without an assay: any rock of the population
    f_match[:, ~known] = _log_normal_pdf(le, mu, sd)[:, None]
    f_touch = np.full((n, m), -np.inf)
    if m >= 2:
        both = known[:-1] & known[1:]
        lsum = np.logaddexp(np.where(both, lw[:-1], 0.0), np.where(both, lw[1:], 0.0))
        rt = lsum[None, :] - le[:, None]
        ft = np.where(both[None, :], _log_error_pdf(rt, sig, cfg),
                      _log_normal_pdf(le, mu + math.log(2.0), sd)[:, None])
        f_touch[:, :-1] = ft
    # an unnumbered particle: anything from a crumb to a rock, broadly
    f_debris = _log_normal_pdf(le, mu - 1.0, 2.0 * sd + 0.5)
    l_debris = math.log(cfg.p_debris)
    l_step = math.log(1.0 - cfg.p_debris)
    l_missed = l_step + math.log(cfg.p_missed)
    l_touch = l_step + math.log(cfg.p_touching)
    l_match = l_step + math.log(1.0 - cfg.p_missed - cfg.p_touching)
    args = (f_debris, np.ascontiguousarray(f_match), np.ascontiguousarray(f_touch),
            l_debris, l_missed, l_match, l_touch)
    fw = _forward(*args)
    log_z = float(fw[n, m])
    if not need:
        return _Posteriors(log_z, np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), np.zeros(0))
    bw = _backward(*args)
    with np.errstate(invalid="ignore"):
        p_match = np.exp(fw[:n, :m] + l_match + f_match + bw[1:, 1:] - log_z)
        p_touch = np.zeros((n, m))
        if m >= 2:
            p_touch[:, :-1] = np.exp(fw[:n, :m - 1] + l_touch + f_touch[:, :-1] + bw[1:, 2:] - log_z)
        p_missed = np.exp(fw[:, :m] + l_missed + bw[:, 1:] - log_z).sum(axis=0)
        p_debris = np.exp(fw[:n, :] + l_debris + f_debris[:, None] + bw[1:, :] - log_z).sum(axis=1)
    return _Posteriors(log_z, np.nan_to_num(p_match), np.nan_to_num(p_touch), np.nan_to_num(p_missed),
                       np.nan_to_num(p_debris))


# ------------------------------------------------------------------ calibration of the estimate
def _huber_fit(z: np.ndarray, y: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Huber regression of y on the design z (IRLS, threshold 1.345 robust sigmas)."""
    beta = np.linalg.lstsq(z, y, rcond=None)[0]
    for _ in range(rounds):
        res = y - z @ beta
        s = max(float(robust_sigma(res)), 1e-6)
        u = np.abs(res) / (1.345 * s)
        w = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
        sw = np.sqrt(w)
        new = np.linalg.lstsq(z * sw[:, None], y * sw, rcond=None)[0]
        if np.allclose(new, beta, atol=1e-7):
            return new
        beta = new
    return beta


def _design(log_est: np.ndarray, covariates: np.ndarray, slopes: bool) -> np.ndarray:
    """Columns: 1; with slopes, ln(e) and each covariate, centred on their medians."""
    cols = [np.ones_like(log_est)]
    if slopes:
        for c in (log_est, *covariates.T):
            cols.append(c - np.median(c))
    return np.stack(cols, axis=1)


def _scatter(res: np.ndarray, mass: np.ndarray, fit_tau: bool, cfg: AlignmentConfig) -> tuple[float, float]:
    """``(sigma0, tau)`` of the residuals ``res`` of matches of calibrated mass ``mass`` (g):
    the robust spread alone, or with ``fit_tau`` the maximum likelihood of the tailed error
    model over a grid of both."""
    mad = max(float(robust_sigma(res)), cfg.min_sigma_ln)
    if not fit_tau:
        return mad, 0.0
    s0 = np.exp(np.linspace(np.log(cfg.min_sigma_ln), np.log(max(4.0 * mad, 2.0 * cfg.min_sigma_ln)), 40))
    taus = np.r_[0.0, np.exp(np.linspace(np.log(1e-3), np.log(1.0), 40))]
    best, arg = -np.inf, (mad, 0.0)
    inv_m = 1.0 / np.maximum(mass, 1e-6)
    for tau in taus:
        sig = np.sqrt(s0[:, None] ** 2 + tau * tau * inv_m[None, :])  # (grid, matches)
        ll = _log_error_pdf(res[None, :], sig, cfg).sum(axis=1)
        j = int(np.argmax(ll))
        if ll[j] > best:
            best, arg = float(ll[j]), (float(s0[j]), float(tau))
    return arg


def _sigmas(mass: np.ndarray, sigma0: float, tau: float, cfg: AlignmentConfig) -> np.ndarray:
    return np.maximum(np.sqrt(sigma0 * sigma0 + tau * tau / np.maximum(mass, 1e-6)), cfg.min_sigma_ln)


def align(est_mass_g: np.ndarray, assay_mass_g: np.ndarray, covariates: np.ndarray | None = None,
          config: AlignmentConfig = AlignmentConfig()) -> Alignment:
    """Tie particles (in belt order) to feed slots (in feed order) by order and mass.

    Parameters
    ----------
    est_mass_g : (n,) array of the pipeline's mass estimate of each particle, > 0 (in any
        consistent unit: its scale is calibrated here).
    assay_mass_g : (N,) array of the laboratory's mass of feed numbers 1..N; NaN where the
        sample has no assay (lost in the laboratory).
    covariates : (n, c) array, optional: particle properties the estimate's bias may depend
        on (e.g. the mean mafic fraction); used once there are enough confident matches.
    config : AlignmentConfig

    Returns
    -------
    Alignment

    Raises
    ------
    ValueError
        An estimate that is not finite and > 0, an assay mass that is not NaN or > 0, no
        particles, no assayed slot, or covariates of the wrong shape.
    """
    cfg = config
    e = np.asarray(est_mass_g, dtype=np.float64).reshape(-1)
    w = np.asarray(assay_mass_g, dtype=np.float64).reshape(-1)
    n, m = e.size, w.size
    if n == 0 or m == 0:
        raise ValueError(f"nothing to align: {n} particles, {m} feed slots")
    if not np.all(np.isfinite(e) & (e > 0)):
        raise ValueError("every estimated mass must be finite and > 0")
    known = np.isfinite(w)
    if np.any(known & ~(w > 0)) or np.any(np.isinf(w)):
        raise ValueError("assay masses must be > 0 (NaN for a sample without assay)")
    if not known.any():
        raise ValueError("no feed slot has an assay")
    cov = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(n, -1)
    if not np.all(np.isfinite(cov)):
        raise ValueError("covariates must be finite")
    le0, lw = np.log(e), np.log(w)
    lwk = lw[known]
    pop = (float(np.median(lwk)), max(float(np.std(lwk)), 0.3))

    # 1. coarse scale: the alignment likelihood over a grid of scales, with a broad error
    broad = np.full(n, 0.15)
    grid = np.linspace(-cfg.scale_search_ln, cfg.scale_search_ln, 25) + (pop[0] - float(np.median(le0)))
    scores = [_posteriors(le0 + c, lw, broad, pop, cfg, need=False).log_z for c in grid]
    beta = np.array([grid[int(np.argmax(scores))]])
    slopes = False
    sigma0, tau = 0.15, 0.0
    le = le0 + beta[0]
    sig = broad
    post = _posteriors(le, lw, sig, pop, cfg)
    rounds = 0
    # 2. refine: confident matches -> robust fit of ln(w / e) -> scatter -> forward-backward
    for rounds in range(1, cfg.rounds + 1):
        k_best = post.match.argmax(axis=0)
        p_best = post.match[k_best, np.arange(m)]
        sure = known & (p_best >= 0.9)
        if sure.sum() < 2:
            break
        idx = k_best[sure]
        y = lw[sure] - le0[idx]
        slopes = int(sure.sum()) >= cfg.min_matches_for_slopes
        z_all = _design(le0, cov, slopes)
        new_beta = _huber_fit(z_all[idx], y) if slopes else np.array([float(np.median(y))])
        new_le = le0 + z_all @ new_beta
        new_s0, new_tau = _scatter(y - z_all[idx] @ new_beta, np.exp(new_le[idx]), slopes, cfg)
        new_sig = _sigmas(np.exp(new_le), new_s0, new_tau, cfg)
        done = (new_beta.size == beta.size and np.max(np.abs(new_le - le)) < 1e-4
                and np.max(np.abs(new_sig - sig) / sig) < 1e-3)
        beta, le, sigma0, tau, sig = new_beta, new_le, new_s0, new_tau, new_sig
        post = _posteriors(le, lw, sig, pop, cfg)
        if done:
            break
    tol = cfg.tolerance_sigmas * sig  # per particle
    sigma_ref = float(_sigmas(np.array([math.exp(pop[0])]), sigma0, tau, cfg)[0])

    # 3. decisions
    k_best = post.match.argmax(axis=0)
    p_best = post.match[k_best, np.arange(m)]
    resid = np.where(known, lw - le[k_best], np.nan)
    covering = post.touch.copy()  # particle i holds slot k in a pair starting at k or k - 1
    covering[:, 1:] += post.touch[:, :-1]
    p_touch_slot = covering.sum(axis=0)
    slot_particle = np.full(m, -1, np.int64)
    slot_status = np.empty(m, dtype=object)
    for k in range(m):
        if p_best[k] >= cfg.min_posterior:
            if not known[k]:
                slot_status[k], slot_particle[k] = LOST, k_best[k]
            elif abs(resid[k]) <= tol[k_best[k]]:
                slot_status[k], slot_particle[k] = TIED, k_best[k]
            else:
                slot_status[k] = MASS
        elif not known[k]:
            slot_status[k] = LOST
        elif p_touch_slot[k] >= 0.5:
            slot_status[k] = TOUCHING
        elif post.missed[k] >= 0.5 and p_best[k] < 0.5:
            slot_status[k] = MISSED
        else:
            slot_status[k] = AMBIGUOUS
    particle_slot = np.full(n, -1, np.int64)
    particle_status = np.empty(n, dtype=object)
    particle_status[:] = AMBIGUOUS
    p_touch_particle = post.touch.sum(axis=1)
    for i in range(n):
        if post.debris[i] >= 0.5:
            particle_status[i] = DEBRIS
        elif p_touch_particle[i] >= 0.5:
            particle_status[i] = TOUCHING
    for k in np.flatnonzero(slot_particle >= 0):
        i = slot_particle[k]
        particle_slot[i] = k
        particle_status[i] = TIED if slot_status[k] == TIED else LOST
    cand = np.where(p_best >= 0.5, k_best, -1).astype(np.int64)
    touch_particle = np.where(slot_status == TOUCHING, covering.argmax(axis=0), -1).astype(np.int64)
    return Alignment(slot_particle, slot_status.astype(str), cand, p_best, touch_particle,
                     np.where(cand >= 0, resid, np.nan),
                     particle_status.astype(str), particle_slot, np.exp(le), tuple(float(b) for b in beta),
                     float(sigma0), float(tau), sig, sigma_ref, cfg.tolerance_sigmas * sigma_ref, post.log_z, rounds,
                     {"slopes": bool(slopes), "population_ln": pop})
