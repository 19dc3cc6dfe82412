"""Valve geometry and ejection timing (docs/formats.md and docs/cli.md, the event log).

A particle scanned at lines ``first..last`` crosses the scan line between
``first / f`` and ``(last + 1) / f`` seconds (f = line rate) and flies ``distance_mm`` to
the nozzle row at belt speed. The air opens ``margin_mm`` ahead of its leading edge and
closes ``margin_mm`` behind its trailing edge, for at least ``min_pulse_ms``; the command
must leave ``response_ms`` before the air is due. Everything here is vectorised over the
particles completed in one chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from sorting.config import EjectorConfig
from sorting.errors import InputError


@dataclass(frozen=True)
class Timing:
    """The belt's clock and geometry, from the recording (not from the sorter YAML)."""

    line_rate_hz: float
    belt_speed_m_s: float
    pixel_pitch_mm: float
    pixels: int

    @property
    def flight_s_per_mm(self) -> float:
        return 1.0 / (self.belt_speed_m_s * 1000.0)


@dataclass(frozen=True)
class Ejection:
    """Parallel arrays, one entry per particle."""

    valve_lo: np.ndarray  # int, first valve (inclusive)
    valve_hi: np.ndarray  # int, last valve (inclusive); valve_hi < valve_lo when no valve reaches it
    open_s: np.ndarray
    close_s: np.ndarray
    command_s: np.ndarray  # when the command must leave the PC (open - response)
    deadline_ms: np.ndarray  # command time minus the particle's last line time: the pipeline's budget


def check_geometry(ejector: EjectorConfig, timing: Timing, where: str) -> None:
    """Refuse a sorter whose valve row does not cover the belt, or whose nozzles sit inside the scan."""
    width_mm = timing.pixels * timing.pixel_pitch_mm
    span = (ejector.offset_mm, ejector.offset_mm + ejector.valves * ejector.valve_pitch_mm)
    if span[1] <= 0 or span[0] >= width_mm:
        raise InputError(where, f"ejector: valves span {span[0]:g}-{span[1]:g} mm and miss the "
                         f"{width_mm:g} mm detector width")


def plan(first_line: np.ndarray, last_line: np.ndarray, x_min_px: np.ndarray, x_max_px: np.ndarray,
         ejector: EjectorConfig, timing: Timing) -> Ejection:
    """Valves and air window for each particle (whether or not it will be ejected): the array
    form of :func:`plan_one`, which the streaming loop calls per particle from its own
    compiled chunk kernel (tests compare the two)."""
    first = np.ascontiguousarray(first_line, dtype=np.float64)
    n = first.size
    lo, hi = np.empty(n, np.int64), np.empty(n, np.int64)
    out = np.empty((4, n))
    _plan(first, np.ascontiguousarray(last_line, dtype=np.float64), np.ascontiguousarray(x_min_px, dtype=np.float64),
          np.ascontiguousarray(x_max_px, dtype=np.float64), plan_parameters(ejector, timing), lo, hi, out)
    return Ejection(lo, hi, out[0], out[1], out[2], out[3])


class PlanParameters(NamedTuple):
    """The scalars of :func:`plan_one`, set once per belt (compiled code reads them by name)."""

    line_rate_hz: float
    flight_s_per_mm: float
    pixel_pitch_mm: float
    distance_mm: float
    margin_mm: float
    min_pulse_ms: float
    offset_mm: float
    valve_pitch_mm: float
    valves: float
    response_ms: float


def plan_parameters(ejector: EjectorConfig, timing: Timing) -> PlanParameters:
    return PlanParameters(*(float(v) for v in (
        timing.line_rate_hz, timing.flight_s_per_mm, timing.pixel_pitch_mm, ejector.distance_mm, ejector.margin_mm,
        ejector.min_pulse_ms, ejector.offset_mm, ejector.valve_pitch_mm, ejector.valves, ejector.response_ms)))


@numba.njit(cache=True, nogil=True, inline="always")
def plan_one(first, last, x_min, x_max, p):
    """One particle's (valve_lo, valve_hi, open_s, close_s, command_s, deadline_ms), float64
    lines and columns; ``p`` from :func:`plan_parameters`. (Compiled code calls it per
    particle: :func:`plan` here, the streaming loop's per-chunk kernel.)"""
    f, per_mm, pitch_mm, distance_mm, margin_mm = (p.line_rate_hz, p.flight_s_per_mm, p.pixel_pitch_mm,
                                                   p.distance_mm, p.margin_mm)
    min_pulse_ms, offset_mm, valve_pitch_mm, valves, response_ms = (p.min_pulse_ms, p.offset_mm, p.valve_pitch_mm,
                                                                    p.valves, p.response_ms)
    flight = distance_mm * per_mm
    margin = margin_mm * per_mm
    open_s = first / f + flight - margin
    close_s = (last + 1.0) / f + flight + margin
    short = min_pulse_ms / 1000.0 - (close_s - open_s)
    stretch = max(short, 0.0) / 2.0  # a short pulse grows on both sides, centred on the particle
    open_s = open_s - stretch
    close_s = close_s + stretch
    left_mm = x_min * pitch_mm - margin_mm - offset_mm
    right_mm = (x_max + 1.0) * pitch_mm + margin_mm - offset_mm
    lo = int(min(max(math.floor(left_mm / valve_pitch_mm), 0.0), valves - 1.0))
    hi = int(min(max(math.ceil(right_mm / valve_pitch_mm) - 1.0, 0.0), valves - 1.0))
    if right_mm <= 0:
        hi = -1
    if left_mm >= valves * valve_pitch_mm:
        lo = int(valves)
    command_s = open_s - response_ms / 1000.0
    return lo, hi, open_s, close_s, command_s, (command_s - last / f) * 1000.0


@numba.njit(cache=True, nogil=True)
def _plan(first, last, x_min, x_max, p, lo, hi, out) -> None:
    for i in range(first.size):
        lo[i], hi[i], out[0, i], out[1, i], out[2, i], out[3, i] = plan_one(first[i], last[i], x_min[i], x_max[i], p)


def covers(centroid_line: np.ndarray, centroid_px: np.ndarray, valve_lo: np.ndarray, valve_hi: np.ndarray,
           open_s: np.ndarray, close_s: np.ndarray, ejector: EjectorConfig, timing: Timing) -> np.ndarray:
    """Which rocks (rows) a set of air pulses (columns) blows out.

    A rock is blown out when some pulse's valves span its centroid column and the air is
    on when its centroid reaches the nozzle row. Returns (n_rocks,) bool.
    """
    cl = np.asarray(centroid_line, dtype=np.float64)
    cx_mm = (np.asarray(centroid_px, dtype=np.float64) + 0.5) * timing.pixel_pitch_mm - ejector.offset_mm
    valve = np.floor(cx_mm / ejector.valve_pitch_mm)
    arrive = (cl + 0.5) / timing.line_rate_hz + ejector.distance_mm * timing.flight_s_per_mm
    hit = np.zeros(cl.shape, bool)
    if len(open_s) == 0 or cl.size == 0:
        return hit
    order = np.argsort(open_s)
    o, c = np.asarray(open_s)[order], np.asarray(close_s)[order]
    lo, hi = np.asarray(valve_lo)[order], np.asarray(valve_hi)[order]
    # pulses are short: compare each rock with the pulses that opened before it arrives
    longest = float(np.max(c - o))
    start = np.searchsorted(o, arrive - longest, side="left")
    stop = np.searchsorted(o, arrive, side="right")
    for i in range(cl.size):
        j = slice(start[i], stop[i])
        hit[i] = bool(np.any((c[j] >= arrive[i]) & (lo[j] <= valve[i]) & (hi[j] >= valve[i])))
    return hit
