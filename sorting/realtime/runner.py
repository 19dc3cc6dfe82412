"""Running the loop over a source of chunks, as `sorting run`, `sorting demo` and the bench do.

The loop owns shutdown: SIGINT/SIGTERM set a flag checked every chunk, and the event
log is flushed every chunk and closed on the way out, whatever happened.
"""
from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sorting.config import SorterConfig
from sorting.errors import InputError
from sorting.parallel import opencv_threads
from sorting.realtime.counters import LatencyHistogram
from sorting.realtime.events import Event
from sorting.realtime.sinks import EventLog, UDPValveSink
from sorting.realtime.sources import Chunk
from sorting.realtime.stream import Pipeline
from sorting.stages.calibrate import Calibration, calibrate
from sorting.stages.eject import Timing, check_geometry
from sorting.stages.inference import OnnxModel


@dataclass
class RunResult:
    summary: dict
    events: list[Event]


class StopOnSignal:
    """SIGINT/SIGTERM -> stop after the current chunk; ``signum`` is the first signal received."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.on_signal = on_signal  # e.g. a blocking source's stop(), so a silent peer cannot hold us
        self._old = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller owns signals
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = int(signum)
        self.requested = True
        if self.on_signal is not None:
            self.on_signal()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def rates(lines: int, wall_s: float, cpu_s: float, line_rate_hz: float) -> dict:
    """A run's speed, as every summary gives it: stream seconds read, lines per wall second, the
    realtime factor (that over the line rate) and the CPU's share of stream time; None where a
    run too short to time leaves a rate undefined (no lines, or no measurable wall time)."""
    stream_s = lines / line_rate_hz
    return {
        "wall_s": wall_s,
        "stream_s": stream_s,
        "throughput_lines_s": lines / wall_s if wall_s > 0 else None,
        "realtime_factor": lines / wall_s / line_rate_hz if wall_s > 0 else None,
        "cpu_s": cpu_s,
        "cpu_fraction": cpu_s / stream_s if stream_s > 0 else None,
        "line_rate_hz": line_rate_hz,
    }


def run_loop(chunks: Iterable[Chunk], pipeline: Pipeline, log: EventLog | None = None,
             valves: UDPValveSink | None = None, keep_events: bool = True, total_lines: int | None = None,
             progress: bool = False, on_signal: Callable[[], None] | None = None) -> RunResult:
    """Drive ``pipeline`` over ``chunks``; returns the summary and (optionally) the events."""
    kept: list[Event] = []
    intake, step = LatencyHistogram(), LatencyHistogram()
    gc.collect()
    gc.freeze()  # start-up objects never need another full GC pass
    # the clocks start with the belt, after start-up (as the pipeline's warm-up)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    bar = tqdm(total=total_lines, unit="line", unit_scale=True, desc="sorting", disable=None if progress else True,
               mininterval=0.5)
    stopped = False
    signum = None
    try:
        # the loop is single-threaded by design (one core per process): a BLAS thread pool
        # would only spin against the feature workers and the acquisition
        def deliver(events: list[Event]) -> None:
            if not events:
                return
            if valves is not None:
                valves.send(events)
            if log is not None:
                log.write(events)
            if keep_events:
                kept.extend(events)

        with StopOnSignal(on_signal) as stop, threadpool_limits(limits=1, user_api="blas"), opencv_threads(1):
            for first, raw, t_in in chunks:
                t_step = time.perf_counter()
                # how long after its last line was acquired the loop took the chunk up (paced:
                # the wake-up's lateness plus any backlog), and how long the pipeline then took
                intake.add((t_step - t_in) * 1000.0)
                events = pipeline.step(first, raw, t_in)
                step.add((time.perf_counter() - t_step) * 1000.0)
                deliver(events)
                bar.update(raw.shape[0])
                if stop.requested:
                    stopped = True
                    break
            deliver(pipeline.finish())
            # a signal that came during the last chunk or the final flush still means the run was
            # interrupted: the caller exits 128 + signum (see signal_name)
            stopped = stopped or stop.requested
            signum = stop.signum
    finally:
        bar.close()
        if log is not None:
            log.close()
        gc.unfreeze()
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    c = pipeline.counters
    if valves is not None:
        c.valve_errors = valves.errors
    summary = c.summary()
    summary["alarms"] = pipeline.alarms  # fault episodes per kind, and episodes of particle errors
    summary["fault_lines"] = dict(pipeline.health.lines)
    summary.update({
        "stopped_by_signal": stopped,
        "signal": signal_name(signum) if stopped else None,
        "intake_lag_ms": intake.summary(),
        "step_ms": step.summary(),
        **rates(c.lines, wall, cpu, pipeline.timing.line_rate_hz),
        "pixels": pipeline.pixels,
    })
    return RunResult(summary, kept)


def signal_name(signum: int | None) -> str | None:
    """``"SIGINT"`` / ``"SIGTERM"`` for a signal number (None for None)."""
    return None if signum is None else signal.Signals(signum).name


def signal_number(name: str | None) -> int | None:
    """The inverse of :func:`signal_name`."""
    return None if name is None else int(signal.Signals[name])


def timing_of(meta: dict) -> Timing:
    return Timing(float(meta["line_rate_hz"]), float(meta["belt_speed_m_s"]), float(meta["pixel_pitch_mm"]),
                  int(meta["detector_pixels"]))


#: chunks above this would only grow the ring buffer (~10 kB per line and ring line) without need
MAX_CHUNK_LINES = 4096


def check_chunk_lines(chunk_lines: int) -> None:
    if not 1 <= chunk_lines <= MAX_CHUNK_LINES:
        raise ValueError(f"chunk lines must be in 1..{MAX_CHUNK_LINES}, got {chunk_lines}")


def build_pipeline(scans, model: OnnxModel, sorter: SorterConfig, timing: Timing, sorter_path: str,
                   chunk_lines: int = 32, **options) -> Pipeline:
    """Calibrate from ``scans`` (or take a ready Calibration) and set up the loop; ``options``:
    the Pipeline's ``shed_late``, ``queue_chunks``, ``seg``, ``max_particle_lines``."""
    check_geometry(sorter.ejector, timing, sorter_path)
    check_chunk_lines(chunk_lines)
    cal = scans if isinstance(scans, Calibration) else calibrate(scans)
    if cal.pixels != timing.pixels:
        raise InputError(getattr(scans, "source", "calibration"),
                         f"calibration has {cal.pixels} pixels, the stream {timing.pixels}")
    return Pipeline(cal, model, sorter, timing, chunk_lines=chunk_lines, **options)
