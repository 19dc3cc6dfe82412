"""Valve geometry and ejection timing (CONTRACT.md sections 5 and 7).

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

import numba
import numpy as np

from .config import EjectorConfig
from .errors import InputError


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
    if ejector.distance_mm <= 0:
        raise InputError(where, "ejector.distance_mm must be positive")


def plan(first_line: np.ndarray, last_line: np.ndarray, x_min_px: np.ndarray, x_max_px: np.ndarray,
         ejector: EjectorConfig, timing: Timing) -> Ejection:
    """Valves and air window for each particle (whether or not it will be ejected)."""
    first = np.ascontiguousarray(first_line, dtype=np.float64)
    n = first.size
    lo, hi = np.empty(n, np.int64), np.empty(n, np.int64)
    out = np.empty((4, n))
    # one compiled pass: ~25 numpy calls on a handful of particles cost ~40 us a chunk
    _plan(first, np.ascontiguousarray(last_line, dtype=np.float64), np.ascontiguousarray(x_min_px, dtype=np.float64),
          np.ascontiguousarray(x_max_px, dtype=np.float64), timing.line_rate_hz, timing.flight_s_per_mm,
          timing.pixel_pitch_mm, float(ejector.distance_mm), float(ejector.margin_mm), float(ejector.min_pulse_ms),
          float(ejector.offset_mm), float(ejector.valve_pitch_mm), int(ejector.valves), float(ejector.response_ms),
          lo, hi, out)
    return Ejection(lo, hi, out[0], out[1], out[2], out[3])


@numba.njit(cache=True, nogil=True)
def _plan(first, last, x_min, x_max, f, per_mm, pitch_mm, distance_mm, margin_mm, min_pulse_ms, offset_mm,
          valve_pitch_mm, valves, response_ms, lo, hi, out) -> None:
    flight = distance_mm * per_mm
    margin = margin_mm * per_mm
    for i in range(first.size):
        open_s = first[i] / f + flight - margin
        close_s = (last[i] + 1.0) / f + flight + margin
        short = min_pulse_ms / 1000.0 - (close_s - open_s)
        stretch = max(short, 0.0) / 2.0  # a short pulse grows on both sides, centred on the particle
        open_s = open_s - stretch
        close_s = close_s + stretch
        left_mm = x_min[i] * pitch_mm - margin_mm - offset_mm
        right_mm = (x_max[i] + 1.0) * pitch_mm + margin_mm - offset_mm
        lo[i] = int(min(max(math.floor(left_mm / valve_pitch_mm), 0.0), valves - 1.0))
        # a valve whose span only touches the particle's right edge stays closed
        hi[i] = int(min(max(math.ceil(right_mm / valve_pitch_mm) - 1.0, 0.0), valves - 1.0))
        if right_mm <= 0:
            hi[i] = -1
        if left_mm >= valves * valve_pitch_mm:
            lo[i] = valves
        command_s = open_s - response_ms / 1000.0
        out[0, i] = open_s
        out[1, i] = close_s
        out[2, i] = command_s
        out[3, i] = (command_s - last[i] / f) * 1000.0


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
