"""What the jets really hit: a simulated recording's truth scored against the event log.

A rock is blown out when some sent (non-late) pulse's valves span its centroid column and
the air is on when its centroid reaches the nozzle row; so neighbours can be co-ejected
and a misplaced pulse misses. Detection is scored separately: each truth rock should be
matched by exactly one particle whose centroid lies within 2 px of its own.
"""
from __future__ import annotations

import numpy as np

from sorting.config import SorterConfig
from sorting.offline.metallurgy import make_feed, sort_balance
from sorting.stages.eject import Timing, covers


def _truth_arrays(truth: list[dict]) -> dict[str, np.ndarray]:
    def col(key, dtype=float):
        return np.array([np.nan if t.get(key) is None else t[key] for t in truth], dtype=dtype)

    return {
        "centroid_line": col("centroid_line"), "centroid_px": col("centroid_px"),
        "first_line": col("first_line"), "last_line": col("last_line"),
        "x_min_px": col("x_min_px"), "x_max_px": col("x_max_px"),
        "mass_g": col("mass_g"), "sc2o3_ppm": col("sc2o3_ppm"),
        "is_sc": np.array([t.get("label") == "sc" for t in truth]),
        "touching": np.array([bool(int(t.get("touching") or 0)) for t in truth]),
    }


def match_particles(events: list[dict], truth: list[dict], tol_px: float = 2.0) -> dict:
    """Match events to truth rocks by centroid: counts found, missed, duplicated and ghosts."""
    t = _truth_arrays(truth)
    n = len(truth)
    hits = np.zeros(n, np.int64)
    ghosts = 0
    err = []
    if n:
        order = np.argsort(t["centroid_line"])
        cl_sorted = t["centroid_line"][order]
    for e in events:
        if not n:
            ghosts += 1
            continue
        lo = np.searchsorted(cl_sorted, e["centroid_line"] - tol_px)
        hi = np.searchsorted(cl_sorted, e["centroid_line"] + tol_px, side="right")
        cand = order[lo:hi]
        d = np.hypot(t["centroid_line"][cand] - e["centroid_line"], t["centroid_px"][cand] - e["centroid_px"])
        if cand.size and d.min() <= tol_px:
            k = cand[int(np.argmin(d))]
            hits[k] += 1
            err.append(float(d.min()))
        else:
            ghosts += 1
    single = ~t["touching"] if n else np.zeros(0, bool)
    return {
        "truth_rocks": n,
        "found_once": int(np.sum(hits == 1)),
        "missed": int(np.sum(hits == 0)),
        "duplicated": int(np.sum(hits > 1)),
        "unmatched_particles": ghosts,
        "non_touching_rocks": int(single.sum()),
        "non_touching_found_once": int(np.sum((hits == 1) & single)),
        "non_touching_found_once_share": float(np.mean(hits[single] == 1)) if single.any() else None,
        "centroid_error_px_p99": float(np.percentile(err, 99)) if err else None,
    }


def jets_outcome(events: list[dict], truth: list[dict], sorter: SorterConfig, timing: Timing) -> dict:
    """Which truth rocks the sent pulses blew out, and the metallurgical balance of that sort."""
    t = _truth_arrays(truth)
    sent = [e for e in events if e["decision"] == "eject" and not e["late"]]
    blown = covers(t["centroid_line"], t["centroid_px"],
                   np.array([e["valves"][0] for e in sent], np.int64),
                   np.array([e["valves"][-1] for e in sent], np.int64),
                   np.array([e["open_s"] for e in sent]), np.array([e["close_s"] for e in sent]),
                   sorter.ejector, timing)
    to_product = blown if sorter.sorting.eject == "sc" else ~blown
    feed = make_feed(t["is_sc"], t["mass_g"], t["sc2o3_ppm"])
    out = sort_balance(to_product, t["is_sc"], feed)
    out["blown_out"] = int(blown.sum())
    out["pulses_sent"] = len(sent)
    # a pulse whose air meets no rock centroid is a misfire (a ghost, or a mistimed command)
    cx_valve = np.floor(((t["centroid_px"] + 0.5) * timing.pixel_pitch_mm - sorter.ejector.offset_mm)
                        / sorter.ejector.valve_pitch_mm)
    arrive = (t["centroid_line"] + 0.5) / timing.line_rate_hz + sorter.ejector.distance_mm * timing.flight_s_per_mm
    misfires = 0
    for e in sent:
        hit = ((arrive >= e["open_s"]) & (arrive <= e["close_s"])
               & (cx_valve >= e["valves"][0]) & (cx_valve <= e["valves"][-1]))
        misfires += not hit.any()
    out["misfires"] = misfires
    return out
