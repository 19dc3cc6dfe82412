"""Labeled rocks from the machine itself: a rock-by-rock recording plus the laboratory's
assays -> an ``xrt-rocks/1`` dataset (``sorting dataset``).

1. The recording's particles are found by the belt's own stages (:mod:`sorting.stages.crops`),
   in order along the belt, each with its features and estimated mass.
2. The assay file is checked against them (feed numbers the particles cannot explain, too few
   rows), and the particles are aligned with the feed numbers by order and mass
   (:func:`sorting.offline.rockbyrock.align`).
3. Each confident tie whose crop obeys the format's rules becomes a row: ``rock_id`` = the feed
   number, ``first_line``, the laboratory's grade and mass, the label from the cut-off grade.
   Everything else is listed in ``excluded.csv`` with its reason.

The recording's ``truth.csv``, if any, is never read.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.io import RockDatasetWriter, RockRow, read_assays, read_belt_recording
from sorting.io.tables import write_csv
from sorting.offline.rockbyrock import LOST, TIED, AlignmentConfig, align
from sorting.stages.calibrate import calibrate
from sorting.stages.crops import cut_crop, find_particles, measure_particles
from sorting.stages.features import FEATURE_NAMES
from sorting.stages.particles import SegmentConfig

EXCLUDED_COLUMNS = ("seq", "particle_first_line", "reason", "detail")
#: reasons, in the order the summary lists them
REASONS = ("lost", "missed", "touching", "ambiguous", "mass", "crop", "debris")
#: feed numbers may run past the particles found by this share (missed rocks), and at least by
MISSED_ALLOWANCE = 0.1
MISSED_ALLOWANCE_MIN = 3
_MAFIC = FEATURE_NAMES.index("mafic_mean")
_MIN_MASS_G = 1e-3


@dataclass(frozen=True)
class DatasetSummary:
    assayed: int
    kept: int
    excluded: dict  # reason -> rows of excluded.csv
    particles: int
    feed_numbers: int
    sigma_ln: float
    tolerance_ln: float
    coefficients: tuple[float, ...]

    def line(self) -> str:
        rocks = {r: c for r, c in self.excluded.items() if r not in ("lost", "debris") and c}
        n_out = sum(rocks.values())
        text = f"kept {self.kept} of {self.assayed} assayed rocks"
        text += f"; excluded {n_out}" + (": " + ", ".join(f"{c} {r}" for r, c in rocks.items()) if n_out else "")
        if self.excluded.get("lost"):
            text += f"; {self.excluded['lost']} feed numbers without assay (lost samples)"
        if self.excluded.get("debris"):
            text += f"; {self.excluded['debris']} particles without feed number (debris)"
        return text + (f"; mass estimate scatter {100 * self.sigma_ln:.1f} % at the median rock, "
                       f"tolerance {100 * self.tolerance_ln:.0f} %")


def _label(grade: float, cutoff: float) -> str:
    return "sc" if grade >= cutoff else "waste"


def check_cutoff_ppm(cutoff_ppm: float) -> None:
    if not (math.isfinite(cutoff_ppm) and cutoff_ppm > 0):
        raise ValueError(f"the label cut-off must be a number > 0 ppm Sc2O3, got {cutoff_ppm!r}")


def build_dataset(recording: Path, assays_path: Path, out: Path, cutoff_ppm: float,
                  config: AlignmentConfig = AlignmentConfig(), seg: SegmentConfig = SegmentConfig()
                  ) -> DatasetSummary:
    """Write the ``xrt-rocks/1`` dataset ``out`` and ``out/excluded.csv``; see the module docstring.

    Raises
    ------
    InputError
        A bad recording or assay file, an assay file the recording cannot explain, an
        ``out`` that is a file.
    ValueError
        A cut-off that is not > 0.
    """
    check_cutoff_ppm(cutoff_ppm)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    rec = read_belt_recording(recording, with_truth=False)
    assays = read_assays(assays_path)
    cal = calibrate(rec.calibration)
    pp, lp = rec.pixel_pitch_mm, rec.line_pitch_mm
    particles = find_particles(rec.lines, cal, pp, lp, seg)
    n = len(particles)
    if n == 0:
        raise InputError(recording, "no particles found in the recording: nothing to tie the assays to")
    # the assay file must be one the recording can explain
    if len(assays) < n / 2:
        raise InputError(assays.path, f"{len(assays)} rows for {n} particles found in {recording}: fewer than half "
                                      "the rocks seen are assayed (is this the assay file of this test?)")
    limit = n + max(MISSED_ALLOWANCE_MIN, math.ceil(MISSED_ALLOWANCE * n))
    top = int(assays.seq[-1])
    if top > limit:
        raise InputError(assays.path, f"feed number {top} is unknown: the recording shows {n} particles, so feed "
                                      f"numbers above {limit} cannot be on it (is this the recording of this test?)")
    x, mass = measure_particles(rec.lines, cal, particles, pp, lp)
    est = np.maximum(mass, _MIN_MASS_G)
    n_slots = top
    slot_mass = np.full(n_slots, np.nan)
    slot_mass[assays.seq - 1] = assays.mass_g
    slot_row = np.full(n_slots, -1, np.int64)
    slot_row[assays.seq - 1] = np.arange(len(assays))
    al = align(est, slot_mass, covariates=x[:, _MAFIC:_MAFIC + 1], config=config)

    excluded: list[dict] = []

    def exclude(seq: int | None, i: int, reason: str, detail: str) -> None:
        excluded.append({"seq": seq, "particle_first_line": particles[i].line0 if i >= 0 else None,
                         "reason": reason, "detail": detail})

    meta = {"detector_pixels": rec.pixels, "pixel_pitch_mm": pp, "line_pitch_mm": lp,
            "channels": ["low", "high"], "label_cutoff_ppm": float(cutoff_ppm),
            "source_recording": str(recording), "source_assays": str(assays_path),
            "rockbyrock": {"particles": n, "feed_numbers": n_slots, "assayed": len(assays),
                           "mass_model_ln": list(al.coefficients), "mass_sigma0_ln": al.sigma0_ln,
                           "mass_sigma_tau": al.sigma_tau, "mass_tolerance_sigmas": config.tolerance_sigmas}}
    kept = 0
    listed = set()
    with RockDatasetWriter(out, meta, rec.calibration, extra_columns=("first_line", "est_mass_g")) as writer:
        for k in range(n_slots):
            seq, status, j = k + 1, al.slot_status[k], int(slot_row[k])
            cand = int(al.slot_candidate[k])
            if status == LOST:
                i = int(al.slot_particle[k]) if al.slot_particle[k] >= 0 else cand
                listed.add(i)
                exclude(seq, i, "lost", "feed number without a row in the assay file")
                continue
            w = float(assays.mass_g[j])
            if status != TIED:
                if status == "touching":
                    cand = int(al.slot_touch_particle[k])
                if cand >= 0:
                    listed.add(cand)
                exclude(seq, cand, status, _detail(status, al, k, w, cand, config.tolerance_sigmas))
                continue
            i = int(al.slot_particle[k])
            listed.add(i)
            crop, problem = cut_crop(rec.lines, cal, particles[i], pp, lp, seg)
            if crop is None:
                reason = "touching" if particles[i].split else "crop"
                exclude(seq, i, reason, problem)
                continue
            grade = float(assays.sc2o3_ppm[j])
            writer.add(RockRow(rock_id=str(seq), file=f"rocks/rock_{seq:05d}.tiff", x0=crop.x0,
                               label=_label(grade, cutoff_ppm), sc2o3_ppm=grade, mass_g=w, split=None,
                               extra={"first_line": str(crop.first_line),
                                      "est_mass_g": f"{al.calibrated_mass_g[i]:.3f}"}),
                       crop.counts)
            kept += 1
        touching_particles = {int(i) for i in np.flatnonzero(al.particle_status == "touching")}
        for i in range(n):
            if i in listed or al.particle_slot[i] >= 0 or i in touching_particles:
                continue
            status = al.particle_status[i]
            c = particles[i]
            flags = [t for t, on in (("reaches the belt edge", c.touches_border),
                                     ("split off a touching rock", c.split),
                                     ("cut by the recording's start or end", c.cut)) if on]
            exclude(None, i, "debris" if status == "debris" else "ambiguous",
                    f"particle of {al.calibrated_mass_g[i]:.3g} g (estimated) tied to no feed number"
                    + (f" ({', '.join(flags)})" if flags else ""))
    # feed numbers in order, then the particles without one in belt order
    excluded.sort(key=lambda r: (r["seq"] is None, r["seq"] or 0, r["particle_first_line"] or 0))
    write_csv(out / "excluded.csv", EXCLUDED_COLUMNS, excluded)
    counts = Counter(r["reason"] for r in excluded)
    return DatasetSummary(len(assays), kept, {r: counts.get(r, 0) for r in REASONS}, n, n_slots, al.sigma_ln,
                          al.tolerance_ln, al.coefficients)


def _detail(status: str, al, k: int, w: float, cand: int, tolerance_sigmas: float) -> str:
    if status == "missed":
        return "no particle for this feed number (not scanned)"
    if status == "touching":
        return "shares one particle with a neighbouring feed number (rocks in contact)"
    if status == "mass":
        return (f"tied by order, but the laboratory's {w:.3g} g and the estimated "
                f"{al.calibrated_mass_g[al.slot_candidate[k]]:.3g} g differ by "
                f"{100 * abs(math.expm1(al.slot_residual_ln[k])):.0f} % (tolerance at this mass "
                f"{100 * math.expm1(tolerance_sigmas * al.particle_sigma_ln[cand]):.0f} %)")
    where = f"best particle's posterior {al.slot_posterior[k]:.2f}" if cand >= 0 else "no particle is likely"
    return f"cannot be tied with confidence ({where})"
