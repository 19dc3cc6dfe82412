"""A rock-by-rock test on the twin: numbered rocks fed one at a time, in order, then weighed
and assayed by a laboratory (``sorting simulate rockbyrock``).

Writes an ``xrt-belt/1`` recording (with ``truth.csv``), the laboratory's ``assays.csv``
(``seq,sc2o3_ppm,mass_g``) and ``truth_rockbyrock.csv``, what really happened. The mess of
real test work is part of it:

- **lost samples**: a share of the rocks have no row in ``assays.csv``;
- **weighing and assay noise**: the laboratory's masses carry ~0.5 % noise, its grades ~5 %;
- **debris**: small chips lying on the belt between two rocks, with no feed number;
- **touching pairs**: a rock pushed against the next one fed (they touch in projection);
- **missed rocks**: fed but never scanned (absent from the recording, present in the assays),
  or half off the belt edge.

Rocks are spaced along the belt (a gap of ``GAP_MM``), one at a time, at random positions
across it. Deterministic per seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sorting.config import MachineConfig, OreConfig
from sorting.errors import ParameterError
from sorting.io import BeltRecordingWriter
from sorting.io.tables import write_csv
from sorting.physics import MaterialLibrary
from sorting.twin.belt import LEAD_IN_LINES
from sorting.twin.ore import densities, grade_and_mass, mineral_list, sample_composition
from sorting.twin.render import Renderer
from sorting.twin.rocks import SimulatedRock, make_rock
from sorting.twin.shapes import render_rock

#: belt between two consecutive rocks (uniform in this range), mm
GAP_MM = (50.0, 110.0)
#: debris chips: size range, mm
DEBRIS_MM = (6.0, 12.0)
#: free belt kept between any object and the next, and from the belt edges, px
CLEAR_PX = 12
#: the laboratory: relative sd of a weighing and log sd of an assay
LAB_MASS_SD = 0.005
LAB_ASSAY_SD_LN = 0.05
EXTRA_TRUTH = ("kind", "seq", "lithotype", "size_mm", "touching")
ROCKBYROCK_COLUMNS = ("seq", "kind", "fate", "lost", "touching_with", "debris_before", "first_line", "last_line",
                      "x_min_px", "x_max_px", "centroid_line", "centroid_px", "mass_g", "sc2o3_ppm", "label",
                      "lab_mass_g", "lab_sc2o3_ppm", "lithotype")


@dataclass(frozen=True)
class RockByRockRates:
    """Shares of the rocks fed: lost in the laboratory, followed by a debris chip, in contact
    with the next rock, missed by the scanner (half never scanned, half off the belt edge)."""

    lost: float = 0.02
    debris: float = 0.05
    touching: float = 0.02
    missed: float = 0.01

    def __post_init__(self) -> None:
        for name in ("lost", "debris", "touching", "missed"):
            v = getattr(self, name)
            if not 0.0 <= v <= 0.5:
                raise ParameterError(name, f"must be in [0, 0.5], got {v!r}")


@dataclass
class _Object:
    mask: np.ndarray
    paths: np.ndarray
    line0: int
    col0: int


def _overlaps(a: _Object, b_mask: np.ndarray, lb: int, cb: int, grow: int = 0) -> bool:
    """Whether ``b_mask`` at (lb, cb), grown by ``grow`` px, meets ``a``'s pixels."""
    m = b_mask
    if grow:
        m = cv2.dilate(np.pad(b_mask.view(np.uint8), grow), np.ones((2 * grow + 1,) * 2, np.uint8)).view(bool)
        lb, cb = lb - grow, cb - grow
    ha, wa = a.mask.shape
    hb, wb = m.shape
    r0, r1 = max(a.line0, lb), min(a.line0 + ha, lb + hb)
    c0, c1 = max(a.col0, cb), min(a.col0 + wa, cb + wb)
    if r0 >= r1 or c0 >= c1:
        return False
    return bool(np.any(a.mask[r0 - a.line0:r1 - a.line0, c0 - a.col0:c1 - a.col0]
                       & m[r0 - lb:r1 - lb, c0 - cb:c1 - cb]))


def _touching_place(a: _Object, mask: np.ndarray, p: int, rng: np.random.Generator) -> tuple[int, int]:
    """Slide a rock from ``a``'s centre, downstream, until it no longer overlaps: there it
    touches ``a`` in projection (a one-pixel dilation meets it)."""
    h, w = mask.shape
    cy = a.line0 + a.mask.shape[0] / 2
    cx = a.col0 + a.mask.shape[1] / 2
    for _ in range(200):
        angle = rng.uniform(0.15 * np.pi, 0.85 * np.pi)  # downstream: it comes after a, in contact
        dy, dx = np.sin(angle), np.cos(angle)
        sy, sx = (1 if dy > 0 else -1), (1 if dx > 0 else -1)
        for step in np.arange(0.0, 2.0 * (max(a.mask.shape) + max(h, w)), 0.25):
            line0 = int(round(cy + dy * step - h / 2))
            col0 = int(round(cx + dx * step - w / 2))
            if not _overlaps(a, mask, line0, col0):
                # the first free place on the ray, or one pixel back towards a on one axis
                for at in ((line0, col0), (line0 - sy, col0), (line0, col0 - sx)):
                    on_belt = CLEAR_PX <= at[1] and at[1] + w <= p - CLEAR_PX
                    if on_belt and not _overlaps(a, mask, *at) and _overlaps(a, mask, *at, grow=1):
                        return at
                break
    raise RuntimeError("no touching placement found")  # a 1 m belt always has room


def _paint(mean: np.ndarray, var: np.ndarray, renderer: Renderer, obj: _Object, block0: int) -> tuple:
    """Render ``obj`` into the block starting at stream line ``block0``; columns beyond the
    detector are cut off (a rock off the belt edge). Returns its truth geometry or None."""
    p = mean.shape[1]
    rows, cols = np.nonzero(obj.mask)
    cc = cols + obj.col0
    keep = (cc >= 0) & (cc < p)
    rows, cols, cc = rows[keep], cols[keep], cc[keep]
    if rows.size == 0:
        return None
    m, v = renderer.signal(obj.paths[rows, cols])
    rr = rows + obj.line0 - block0
    mean[rr, cc] = m
    var[rr, cc] = v
    lines = rows + obj.line0
    return {"first_line": int(lines.min()), "last_line": int(lines.max()), "x_min_px": int(cc.min()),
            "x_max_px": int(cc.max()), "centroid_line": round(float(lines.mean()), 3),
            "centroid_px": round(float(cc.mean()), 3)}


def _chip(ore: OreConfig, machine: MachineConfig, rho: np.ndarray, rng: np.random.Generator) -> SimulatedRock:
    """A small fragment of ore (debris), rendered like any rock."""
    comp = sample_composition(ore, rng)
    img = render_rock(comp, float(rng.uniform(*DEBRIS_MM)), ore, machine.line_pitch_mm,
                      machine.detector.pixel_pitch_mm, rng)
    volumes = img.paths_mm.sum(axis=(0, 1)) * machine.line_pitch_mm * machine.detector.pixel_pitch_mm
    grade, mass = grade_and_mass(volumes, comp.sc2o3_ppm, rho)
    return SimulatedRock(img, comp.lithotype, grade, mass, "sc" if grade >= ore.label_cutoff_ppm else "waste")


def _plan(n: int, rates: RockByRockRates, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What happens to each feed number: fate, lost, touching the next, a chip before it."""
    fate = np.where(rng.random(n) < rates.missed, np.where(rng.random(n) < 0.5, "missed", "edge"), "scanned")
    lost = rng.random(n) < rates.lost
    touch_next = rng.random(n) < rates.touching
    touch_next[-1] = False
    for k in range(n - 1):  # a pair is two scanned rocks; no chains
        if touch_next[k]:
            if fate[k] != "scanned" or fate[k + 1] != "scanned" or (k > 0 and touch_next[k - 1]):
                touch_next[k] = False
    for k in range(1, n):
        if touch_next[k - 1]:
            touch_next[k] = False
    debris = rng.random(n) < rates.debris
    return {"fate": fate, "lost": lost, "touch_next": touch_next, "debris": debris}


def simulate_rockbyrock(out: Path, n: int, seed: int, machine: MachineConfig, ore: OreConfig,
                        library: MaterialLibrary, rates: RockByRockRates = RockByRockRates(),
                        progress: bool = True) -> Path:
    """Write the rock-by-rock test ``out``: an ``xrt-belt/1`` recording with ``truth.csv``,
    ``assays.csv`` and ``truth_rockbyrock.csv``."""
    if n < 1:
        raise ParameterError("n", f"must be at least 1, got {n}")
    out = Path(out)
    minerals = mineral_list(ore)
    renderer = Renderer.create(machine, library, minerals)
    rho = densities(minerals, library)
    p = machine.detector.pixels
    lp, pp = machine.line_pitch_mm, machine.detector.pixel_pitch_mm
    cal_seq, plan_seq, rock_seq, place_seq, noise_seq, lab_seq = np.random.SeedSequence(seed).spawn(6)
    plan = _plan(n, rates, np.random.default_rng(plan_seq))
    place = np.random.default_rng(place_seq)
    noise = np.random.default_rng(noise_seq)
    rock_rngs = [np.random.default_rng(s) for s in rock_seq.spawn(n)]
    meta = {
        "detector_pixels": p, "pixel_pitch_mm": pp, "line_rate_hz": machine.belt.line_rate_hz,
        "belt_speed_m_s": machine.belt.speed_m_s, "channels": ["low", "high"], "simulated": True,
        "machine": machine.name, "ore": ore.name, "seed": seed, "label_cutoff_ppm": ore.label_cutoff_ppm,
        "tube_kvp": machine.tube.kvp,
        "rockbyrock": {"rocks_fed": n, "lost": rates.lost, "debris": rates.debris, "touching": rates.touching,
                       "missed": rates.missed},
    }
    truth: list[dict] = []
    record: list[dict] = []
    written = 0
    scans = renderer.calibration_scans(np.random.default_rng(cal_seq))
    with BeltRecordingWriter(out, meta, scans, truth_columns=EXTRA_TRUTH) as writer, \
            threadpool_limits(limits=1, user_api="blas"):

        def flush(upto: int, objects: list[tuple[_Object, dict]]) -> None:
            """Lines ``written .. upto - 1``: empty belt with ``objects`` painted in."""
            nonlocal written
            mean, var = renderer.blank(upto - written, p)
            for obj, rec in objects:
                geo = _paint(mean, var, renderer, obj, written)
                rec.update(geo or {})
            writer.append(renderer.counts(mean, var, 0, noise))
            written = upto

        def gap_lines() -> int:
            return int(round(place.uniform(*GAP_MM) / lp))

        def lateral(w: int) -> int:
            return int(place.integers(CLEAR_PX, max(p - w - CLEAR_PX, CLEAR_PX) + 1))

        cursor = LEAD_IN_LINES
        k = 0
        bar = tqdm(total=n, desc="rocks", unit="rock", disable=None if progress else True)
        chip_no = 0
        while k < n:
            group = [k, k + 1] if plan["touch_next"][k] else [k]
            objects: list[tuple[_Object, dict]] = []
            gap = gap_lines()
            if plan["debris"][k]:
                chip_no += 1
                chip = _chip(ore, machine, rho, place)
                h, w = chip.image.mask.shape
                at = cursor + max((gap - h) // 2, 0)
                rec = {"kind": "debris", "rock_id": f"debris_{chip_no:03d}", "seq": None, "label": chip.label,
                       "sc2o3_ppm": round(chip.sc2o3_ppm, 2), "mass_g": round(chip.mass_g, 4),
                       "lithotype": chip.lithotype, "size_mm": round(chip.image.size_mm, 1), "touching": 0}
                objects.append((_Object(chip.image.mask, chip.image.paths_mm, at, lateral(w)), rec))
                gap = max(gap, h + 2 * CLEAR_PX + 2)
            # the group's rocks in a frame of their own (the first at line 0), then moved along
            # the belt so that the earliest starts after the gap
            placed: list[tuple[_Object, dict]] = []
            prev: _Object | None = None
            for j in group:
                rock = make_rock(ore, machine, rho, rock_rngs[j])
                mask = rock.image.mask
                h, w = mask.shape
                fate = str(plan["fate"][j])
                rec = {"seq": j + 1, "kind": "rock", "fate": fate, "lost": int(plan["lost"][j]),
                       "touching_with": None, "debris_before": int(plan["debris"][j]),
                       "mass_g": round(rock.mass_g, 4), "sc2o3_ppm": round(rock.sc2o3_ppm, 2), "label": rock.label,
                       "lithotype": rock.lithotype, "size_mm": round(rock.image.size_mm, 1)}
                if len(group) == 2:
                    rec["touching_with"] = group[1 - group.index(j)] + 1
                record.append(rec)
                if fate == "missed":
                    continue
                if prev is not None:
                    at = _touching_place(prev, mask, p, place)
                elif fate == "edge":
                    off = int(round(w * place.uniform(0.3, 0.6)))
                    at = (0, -off if place.random() < 0.5 else p - w + off)
                else:
                    at = (0, lateral(w))
                prev = _Object(mask, rock.image.paths_mm, at[0], at[1])
                placed.append((prev, rec))
            end = cursor + gap
            if placed:
                shift = cursor + gap - min(o.line0 for o, _ in placed)
                for o, rec in placed:
                    o.line0 += shift
                    end = max(end, o.line0 + o.mask.shape[0])
                objects += placed
            cursor = end
            flush(cursor, objects)
            for obj, rec in objects:
                if "first_line" in rec:
                    truth.append({"rock_id": rec.get("rock_id") or str(rec["seq"]), **{
                        c: rec.get(c) for c in ("first_line", "last_line", "x_min_px", "x_max_px", "centroid_line",
                                                "centroid_px", "label", "sc2o3_ppm", "mass_g", "kind", "seq",
                                                "lithotype", "size_mm")},
                        "touching": int(rec.get("touching_with") is not None)})
                if rec["kind"] == "debris":
                    record.append({c: rec.get(c) for c in ROCKBYROCK_COLUMNS} | {"fate": "scanned", "lost": None})
            k += len(group)
            bar.update(len(group))
        bar.close()
        flush(cursor + LEAD_IN_LINES, [])
        writer.close(truth, extra_meta={"rocks": len(truth)})
    _write_lab(out, record, np.random.default_rng(lab_seq))
    return out


def _write_lab(out: Path, record: list[dict], rng: np.random.Generator) -> None:
    """``assays.csv`` (what the laboratory reports) and ``truth_rockbyrock.csv``."""
    rocks = sorted((r for r in record if r["kind"] == "rock"), key=lambda r: r["seq"])
    assays = []
    for r in rocks:
        mass = r["mass_g"] * (1.0 + LAB_MASS_SD * rng.standard_normal())
        grade = r["sc2o3_ppm"] * float(np.exp(LAB_ASSAY_SD_LN * rng.standard_normal()))
        if r["lost"]:
            continue
        r["lab_mass_g"], r["lab_sc2o3_ppm"] = round(mass, 3), round(grade, 1)
        assays.append({"seq": r["seq"], "sc2o3_ppm": r["lab_sc2o3_ppm"], "mass_g": r["lab_mass_g"]})
    write_csv(out / "assays.csv", ("seq", "sc2o3_ppm", "mass_g"), assays)
    debris = [r for r in record if r["kind"] == "debris"]
    write_csv(out / "truth_rockbyrock.csv", ROCKBYROCK_COLUMNS, rocks + debris)
