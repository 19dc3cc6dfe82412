"""`sorting run`: a recording or a live TCP line stream through the loop, events to a log,
valve commands to UDP, a summary (scored against truth.csv when the recording has one)."""
from __future__ import annotations

import json
import sys

from sorting.errors import InputError
from sorting.realtime.runner import (
    build_pipeline,
    check_chunk_lines,
    run_loop,
    timing_of,
)
from sorting.realtime.sinks import EventLog, UDPValveSink


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
    if s.get("tramp") or s.get("over_cap") or s.get("splices") or s.get("too_long"):
        lines.append(f"belt objects: tramp metal {s.get('tramp', 0)}, too long (pieces) {s.get('too_long', 0)}, "
                     f"over the air cap {s.get('over_cap', 0)}, splices {s.get('splices', 0)} "
                     f"({s.get('splice_lines', 0)} lines)")
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
    from sorting.config import load_sorter
    from sorting.io import read_belt_recording
    from sorting.stages.inference import load_model

    rec = read_belt_recording(args.recording)
    model = load_model(args.model)
    sorter = load_sorter(args.sorter)
    return rec, model, sorter


def truth_read(truth: list[dict], lines: int) -> list[dict]:
    """The truth rocks whose last line the run read: a run stopped by a signal is scored on
    the belt it saw, not counted as missing the rest. Rows of another ``kind`` than rock (a
    truth.csv may list splices or tramp too) are not rocks."""
    return [r for r in truth if r["last_line"] < lines and r.get("kind") in (None, "", "rock")]


def cli_run(args) -> int:
    from sorting.offline.outcome import jets_outcome, match_particles
    from sorting.realtime.sinks import parse_hostport
    from sorting.realtime.sources import TCPLineSource, replay

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
    from sorting.offline.outcome import jets_outcome, match_particles
    from sorting.realtime.lanes import run_lanes
    from sorting.realtime.sinks import parse_hostport

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
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(s, indent=2, default=float) + "\n")
    return 0
