"""Raw detector counts: the floor of a signal above dark, where the low channel starves,
and the repair of dead columns from their good neighbours (shared by calibration and
normalization)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: floor of a signal above dark (numerator and denominator), ADU: starved pixels give large finite A
SIGNAL_FLOOR_ADU = 1.0
#: the low channel is starved above this attenuation (transmission below 0.25 %)...
STARVED_A = 6.0
#: ... or with fewer equivalent quanta than this left in the pixel (relative noise above ~45 %);
#: the calibration turns this into a lower A threshold where the machine runs out of quanta first
STARVED_QUANTA = 5.0
#: the largest reading of the 16-bit detector
FULL_SCALE = 65535
#: what a line of raw counts can suffer: missing, saturated, dark (tube trip), frozen module
FAULT_KINDS = ("dropped", "saturated", "dark", "stuck_module")


def runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops (exclusive) of the runs of True in a 1-D bool array."""
    d = np.diff(np.concatenate(([0], flags.view(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


# ---------------------------------------------------------------- dead columns
class RepairPlan(NamedTuple):
    """How dead columns are filled: each bad column from its nearest good neighbours on the
    left and right, weighted by distance (compiled kernels take the group by name)."""

    bad_idx: np.ndarray  # (B,) int64
    left: np.ndarray  # (B,) int64
    right: np.ndarray  # (B,) int64
    w_left: np.ndarray  # (B,) float32
    w_right: np.ndarray  # (B,) float32


def _repair_plan(bad: np.ndarray):
    """Bad columns, their left and right good neighbours and the weights (1 - w, w); None
    when there is nothing to repair. Callers on the belt make it once per window."""
    bad = np.asarray(bad, dtype=bool)
    bad_idx = np.flatnonzero(bad)
    good = np.flatnonzero(~bad)
    plan = None
    if bad_idx.size and good.size:
        pos = np.searchsorted(good, bad_idx)
        left = good[np.clip(pos - 1, 0, None)]
        right = good[np.clip(pos, None, good.size - 1)]
        left = np.where(pos == 0, right, left)
        right = np.where(pos == good.size, left, right)
        span = right - left
        w = np.where(span > 0, (bad_idx - left) / np.maximum(span, 1), 0.0).astype(np.float32)
        plan = RepairPlan(bad_idx, left, right, 1.0 - w, w)
    return plan


def repair_columns(a: np.ndarray, bad: np.ndarray) -> None:
    """In place: columns ``bad`` (W,) of ``a`` (L, W, ...) interpolated from the nearest good columns."""
    plan = _repair_plan(bad)
    if plan is None:
        return
    bad_idx, left, right, w_left, w_right = plan
    shape = (-1,) + (1,) * (a.ndim - 2)
    a[:, bad_idx] = a[:, left] * w_left.reshape(shape) + a[:, right] * w_right.reshape(shape)


NO_REPAIR = RepairPlan(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                       np.zeros(0, np.float32), np.zeros(0, np.float32))



def repair_plan(bad: np.ndarray) -> RepairPlan:
    """The bad-column repair of :func:`from_log_row` for these columns: (bad columns, left and
    right good neighbours, their weights); empty arrays when there is nothing to repair."""
    plan = _repair_plan(bad)
    return NO_REPAIR if plan is None else plan
