"""Running the loop: `sorting run` and `sorting demo`.

The loop owns shutdown: SIGINT/SIGTERM set a flag checked every chunk, and the event
log is flushed every chunk and closed on the way out, whatever happened.
"""
from __future__ import annotations

import contextlib
import gc
import json
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .calibrate import Calibration, calibrate
from .config import SorterConfig
from .eject import Timing, check_geometry
from .errors import InputError
from .model import OnnxModel
from .sinks import EventLog, UDPValveSink
from .sources import Chunk
from .stream import LatencyHistogram, Pipeline


@dataclass
class RunResult:
    summary: dict
    events: list[dict]


class _Stop:
    """SIGINT/SIGTERM -> stop after the current chunk."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.on_signal = on_signal  # e.g. a blocking source's stop(), so a silent peer cannot hold us
        self._old = {}

    def __enter__(self) -> "_Stop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller owns signals
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.on_signal is not None:
            self.on_signal()

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _opencv_threads(n: int):
    """OpenCV's own thread pool (not a BLAS one: threadpoolctl does not see it) at ``n``."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def run_loop(chunks: Iterable[Chunk], pipeline: Pipeline, log: EventLog | None = None,
             valves: UDPValveSink | None = None, keep_events: bool = True, total_lines: int | None = None,
             progress: bool = False, on_signal: Callable[[], None] | None = None) -> RunResult:
    """Drive ``pipeline`` over ``chunks``; returns the summary and (optionally) the events."""
    kept: list[dict] = []
    intake, step = LatencyHistogram(), LatencyHistogram()
    gc.collect()
    gc.freeze()  # start-up objects never need another full GC pass (DESIGN.md section 6)
    # the clocks start with the belt, after start-up (as the pipeline's warm-up)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    bar = tqdm(total=total_lines, unit="line", unit_scale=True, desc="sorting", disable=None if progress else True,
               mininterval=0.5)
    stopped = False
    try:
        # the loop is single-threaded by design (one core per belt or lane): a BLAS thread pool
        # would only spin against the other lanes and the acquisition
        def deliver(events: list[dict]) -> None:
            if not events:
                return
            if valves is not None:
                valves.send(events)
            if log is not None:
                log.write(events)
            if keep_events:
                kept.extend(events)

        with _Stop(on_signal) as stop, threadpool_limits(limits=1, user_api="blas"), _opencv_threads(1):
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
    summary["alarms"] = dict(pipeline.health.episodes)  # fault episodes per kind
    summary["fault_lines"] = dict(pipeline.health.lines)
    stream_s = c.lines / pipeline.timing.line_rate_hz
    summary.update({
        "stopped_by_signal": stopped,
        "intake_lag_ms": intake.summary(),
        "step_ms": step.summary(),
        "wall_s": wall,
        "stream_s": stream_s,
        "throughput_lines_s": c.lines / wall if wall > 0 else None,
        "realtime_factor": (c.lines / wall) / pipeline.timing.line_rate_hz if wall > 0 else None,
        "cpu_s": cpu,
        "cpu_fraction": cpu / stream_s if stream_s > 0 else None,
        "line_rate_hz": pipeline.timing.line_rate_hz,
        "pixels": pipeline.pixels,
    })
    return RunResult(summary, kept)


def timing_of(meta: dict) -> Timing:
    return Timing(float(meta["line_rate_hz"]), float(meta["belt_speed_m_s"]), float(meta["pixel_pitch_mm"]),
                  int(meta["detector_pixels"]))


#: chunks above this would only grow the ring buffer (~10 kB per line and ring line) without need
MAX_CHUNK_LINES = 4096


def check_chunk_lines(chunk_lines: int) -> None:
    if not 1 <= chunk_lines <= MAX_CHUNK_LINES:
        raise InputError("--chunk-lines", f"must be in 1..{MAX_CHUNK_LINES}, got {chunk_lines}")


def build_pipeline(scans, model: OnnxModel, sorter: SorterConfig, timing: Timing, sorter_path: str,
                   chunk_lines: int = 32, **window) -> Pipeline:
    """Calibrate from ``scans`` (or take a ready Calibration) and set up the loop; ``window`` =
    Pipeline's x0, width, claim (lanes)."""
    check_geometry(sorter.ejector, timing, sorter_path)
    check_chunk_lines(chunk_lines)
    cal = scans if isinstance(scans, Calibration) else calibrate(scans)
    if cal.pixels != timing.pixels:
        raise InputError(getattr(scans, "source", "calibration"),
                         f"calibration has {cal.pixels} pixels, the stream {timing.pixels}")
    return Pipeline(cal, model, sorter, timing, chunk_lines=chunk_lines, **window)


def _num(x, spec: str) -> str:
    """A summary number; n/a where it is undefined (an empty stream has no rate)."""
    return "n/a" if x is None else format(x, spec)


def format_summary(summary: dict, outcome: dict | None = None, detection: dict | None = None) -> str:
    s = summary
    lat = s["latency_ms"]
    lines = [
        f"lines {s['lines']} ({s['stream_s']:.2f} s of belt) in {s['wall_s']:.2f} s: "
        f"{_num(s['throughput_lines_s'], '.0f')} lines/s = {_num(s['realtime_factor'], '.2f')}x the "
        f"{s['line_rate_hz']:g} Hz line rate",
        f"particles {s['particles']}: eject {s['ejected']}, pass {s['passed']}, late ejects {s['late']}, "
        f"undecided (overload) {s.get('undecided', 0)}, "
        f"cut {s['cut']}, gaps {s['gaps']} ({s['dropped_lines']} lines dropped)",
        f"latency ms (last line in -> decision out): p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
        f"p99.9 {lat['p999']:.2f}  max {lat['max']:.2f}; CPU {_num(s['cpu_fraction'], '.2f')} of stream time",
    ]
    if s.get("stopped_by_signal"):
        lines.append("stopped by a signal: the event log holds every particle decided until then")
    if any(s.get("alarms", {}).values()):
        lines.append("alarms (fault episodes): " + ", ".join(f"{k} {v}" for k, v in s["alarms"].items() if v)
                     + "; lines affected: " + ", ".join(f"{k} {v}" for k, v in s["fault_lines"].items() if v))
    if detection:
        lines.append(f"detection: {detection['found_once']}/{detection['truth_rocks']} truth rocks found once, "
                     f"{detection['missed']} missed, {detection['duplicated']} duplicated, "
                     f"{detection['unmatched_particles']} particles matching no rock")
    if outcome:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def ppm(x):
            return "n/a" if x is None else f"{x:.0f} ppm"

        lines.append(f"sort (what the jets hit): mass pull {pct(outcome['mass_pull'])}, Sc recovery "
                     f"{pct(outcome['sc_recovery'])}, feed {ppm(outcome['feed_grade_ppm'])} -> product "
                     f"{ppm(outcome['product_grade_ppm'])}, reject {ppm(outcome['reject_grade_ppm'])}, upgrade "
                     f"{'n/a' if outcome['upgrade_ratio'] is None else format(outcome['upgrade_ratio'], '.2f') + 'x'}, "
                     f"misfires {outcome['misfires']}")
    return "\n".join(lines)


def _load_run_inputs(args):
    from .config import load_sorter
    from .formats import read_belt_recording
    from .model import load_model

    rec = read_belt_recording(args.recording)
    model = load_model(args.model)
    sorter = load_sorter(args.sorter)
    return rec, model, sorter


def truth_read(truth: list[dict], lines: int) -> list[dict]:
    """The truth rocks whose last line the run read: a run stopped by a signal is scored on
    the belt it saw, not counted as missing the rest."""
    return [r for r in truth if r["last_line"] < lines]


def cli_run(args) -> int:
    from .outcome import jets_outcome, match_particles
    from .sinks import parse_hostport
    from .sources import TCPLineSource, replay

    check_chunk_lines(args.chunk_lines)
    rec, model, sorter = _load_run_inputs(args)
    timing = timing_of(rec.meta)
    if args.workers != 1:
        return _cli_run_lanes(args, rec, sorter, timing)
    pipeline = build_pipeline(rec.calibration, model, sorter, timing, str(args.sorter), args.chunk_lines,
                              shed_late=bool(args.realtime or args.listen))
    valves = None
    if args.udp:
        host, port = parse_hostport(args.udp, "--udp")
        valves = UDPValveSink(host, port, sorter.ejector.valves)
    if args.listen:
        host, port = parse_hostport(args.listen, "--listen")
        try:
            source = TCPLineSource(timing.pixels, host, port, max_lines=args.chunk_lines)
        except OSError as exc:  # unknown host, address in use, not ours to bind
            raise InputError("--listen", f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        print(f"listening for the line stream on {source.address[0]}:{source.address[1]}", file=sys.stderr)
        chunks, total, stop = iter(source), None, source.stop
    else:
        chunks = replay(rec.lines, timing.line_rate_hz, args.chunk_lines, args.realtime)
        total, stop, source = rec.n_lines, None, None
    log = EventLog(args.events)
    result = run_loop(chunks, pipeline, log, valves, keep_events=rec.truth is not None, total_lines=total,
                      progress=not args.quiet, on_signal=stop)
    if source is not None:
        result.summary["tcp"] = {k: getattr(source, k) for k in
                                 ("connections", "frames", "lines", "rejected", "broken", "stale", "seq_gaps")}
    if valves is not None:
        result.summary["valve_datagrams"] = valves.sent
        valves.close()
    detection = outcome = None
    if rec.truth is not None and not args.listen:
        truth = truth_read(rec.truth, result.summary["lines"])
        detection = match_particles(result.events, truth)
        outcome = jets_outcome(result.events, truth, sorter, timing)
        result.summary["detection"] = detection
        result.summary["outcome"] = outcome
    print(format_summary(result.summary, outcome, detection))
    print(f"events: {args.events} ({log.count} particles)")
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(result.summary, indent=2, default=float) + "\n")
    return 0


def _cli_run_lanes(args, rec, sorter, timing) -> int:
    from .lanes import run_lanes
    from .outcome import jets_outcome, match_particles
    from .sinks import parse_hostport

    if args.listen:
        raise InputError("--workers", "lane-parallel mode reads a recording; it cannot take --listen")
    valves = None
    if args.udp:
        host, port = parse_hostport(args.udp, "--udp")
        valves = UDPValveSink(host, port, sorter.ejector.valves)
    log = EventLog(args.events)
    result = run_lanes(args.recording, args.model, args.sorter, args.workers, args.chunk_lines, args.realtime,
                       log=log, valves=valves)
    s = result["summary"]
    detection = outcome = None
    if rec.truth is not None:
        truth = truth_read(rec.truth, s["lines"])
        detection = match_particles(result["events"], truth)
        outcome = jets_outcome(result["events"], truth, sorter, timing)
        s["detection"], s["outcome"] = detection, outcome
    print(f"{args.workers} lane-parallel workers, columns {s['lanes']}")
    print(format_summary(s, outcome, detection))
    print(f"events: {args.events} ({log.count} particles)")
    if args.summary_json:
        args.summary_json.write_text(json.dumps(s, indent=2, default=float) + "\n")
    return 0
