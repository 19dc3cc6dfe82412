"""`sorting run`: a recording or a live TCP line stream through the loop, events to a log,
valve commands to UDP, a summary (scored against truth.csv when the recording has one)."""
from __future__ import annotations

import json
import sys

from sorting.cli.options import option
from sorting.errors import InputError, Interrupted
from sorting.realtime.parallel import check_workers, queue_chunks, run_parallel
from sorting.realtime.runner import (
    build_pipeline,
    check_chunk_lines,
    signal_name,
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
        f"particles {s['particles']}: eject {s['ejected']}, pass {s['passed']}, late ejects {s['late_ejects']}, "
        f"undecided (overload) {s.get('undecided', 0)}, "
        f"cut {s['cut']}, gaps {s['gaps']} ({s['dropped_lines']} lines dropped)",
        f"latency ms (last line in -> decision out): p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
        f"p99.9 {lat['p999']:.2f}  max {lat['max']:.2f}; CPU {_num(s['cpu_fraction'], '.2f')} of stream time",
    ]
    if s.get("particle_errors"):
        lines.append(f"particle errors {s['particle_errors']}: their own processing raised; each passed, logged with "
                     "its `error` (stage: exception) in the event log")
    if s.get("tramp") or s.get("over_cap") or s.get("splices") or s.get("too_long"):
        lines.append(f"belt objects: tramp metal {s.get('tramp', 0)}, too long (pieces) {s.get('too_long', 0)}, "
                     f"over the air cap {s.get('over_cap', 0)}, splices {s.get('splices', 0)} "
                     f"({s.get('splice_lines', 0)} lines)")
    if s.get("stopped_by_signal"):
        sig = s.get("signal") or "a signal"
        lines.append(f"stopped by a signal ({sig}): the event log holds every particle decided until then; "
                     f"an interrupted run exits {exit_status(s)}")
    if any(s.get("alarms", {}).values()):
        affected = ", ".join(f"{k} {v}" for k, v in s["fault_lines"].items() if v)
        lines.append("alarms (fault episodes): " + ", ".join(f"{k} {v}" for k, v in s["alarms"].items() if v)
                     + (f"; lines affected: {affected}" if affected else ""))
    if detection:
        lines.append(f"detection: {detection['found_once']}/{detection['truth_rocks']} truth rocks found once, "
                     f"{detection['missed']} missed, {detection['duplicated']} duplicated, "
                     f"{detection['unmatched_particles']} particles matching no rock")
    if outcome:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def ppm(x):
            return "n/a" if x is None else f"{x:.0f} ppm Sc2O3"

        lines.append(f"sort (what the jets hit): mass pull {pct(outcome['mass_pull'])}, Sc recovery "
                     f"{pct(outcome['sc_recovery'])}, feed {ppm(outcome['feed_grade_ppm'])} -> product "
                     f"{ppm(outcome['product_grade_ppm'])}, reject {ppm(outcome['reject_grade_ppm'])}, upgrade "
                     f"{'n/a' if outcome['upgrade_ratio'] is None else format(outcome['upgrade_ratio'], '.2f') + 'x'}, "
                     f"misfires {outcome['misfires']}")
        lines.append(jets_line(s, outcome))
    return "\n".join(lines)


def exit_status(summary: dict) -> int:
    """0 for a run that read its whole stream; 128 + signum (130 SIGINT, 143 SIGTERM) for a run
    stopped by a signal: an interrupted run is not a finished one, even with a complete log."""
    from sorting.realtime.runner import signal_number

    if not summary.get("stopped_by_signal"):
        return 0
    return 128 + (signal_number(summary.get("signal")) or 2)


def jets_line(summary: dict, outcome: dict) -> str:
    """Why "eject N" (the particles the jets were fired at) is not the number of rocks that left
    with the air: a pulse also catches the neighbours lying under the same air, a misfire
    catches none, and a late eject is never sent."""
    sent, blown = outcome["pulses_sent"], outcome["blown_out"]
    late_ejects = summary["ejected"] - sent
    extra = blown - (sent - outcome["misfires"])
    if extra > 0:
        why = f"{extra} more than the pulses that hit, because neighbours lying under the same air went with them"
    elif extra < 0:
        why = f"{-extra} fewer than the pulses that hit, because some pulses hit the same rock"
    else:
        why = "one per pulse that hit"
    return (f"jets: eject {summary['ejected']} counts the particles the jets were fired at"
            + (f" ({late_ejects} late, not sent)" if late_ejects else "")
            + f"; they blew out {blown} rocks ({why}); the product holds {outcome['n_product']} rocks")


def stop_if_interrupted(summary: dict) -> dict:
    """For verbs that run the loop as one step of their work (``demo``, ``bench``): a loop stopped
    by a signal ends the verb with 128 + signum instead of carrying on with a partial result."""
    if summary.get("stopped_by_signal"):
        raise Interrupted(exit_status(summary) - 128)
    return summary


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
    from sorting.io import check_output_file
    from sorting.realtime.sinks import parse_hostport
    from sorting.realtime.sources import TCPLineSource, replay

    with option("--chunk-lines"):
        check_chunk_lines(args.chunk_lines)
    # output files are checked before minutes of sorting, not after
    check_output_file(args.events, "--events")
    if args.summary_json:
        check_output_file(args.summary_json, "--summary-json")
    if args.save_every < 1:
        raise InputError("--save-every", f"must be at least 1, got {args.save_every}")
    if args.save_crops is not None and args.workers != 1:
        raise InputError("--save-crops", "works with one worker only (--workers 1)")
    rec, model, sorter = _load_run_inputs(args)
    timing = timing_of(rec.meta)
    with option("--workers"):
        check_workers(args.workers)
    pipeline = build_pipeline(rec.calibration, model, sorter, timing, str(args.sorter), args.chunk_lines,
                              shed_late=bool(args.realtime or args.listen), queue_chunks=queue_chunks(args.workers))
    saver = None
    if args.save_crops is not None:
        from sorting.realtime.crops import check_save_dir, start_saving

        check_save_dir(args.save_crops)
        # a replay run as fast as possible waits for the writer (no crop lost); a paced replay
        # or a live stream never waits: a crop the writer cannot take is dropped and counted
        saver = start_saving(pipeline, args.save_crops, rec.calibration, args.save_every,
                             wait=not (args.realtime or args.listen))
    valves = None
    if args.udp:
        host, port = parse_hostport(args.udp, "--udp")
        with option("--udp"):
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
    try:
        result = run_parallel(chunks, pipeline, args.model, args.workers, log=log, valves=valves,
                              keep_events=rec.truth is not None, total_lines=total, progress=not args.quiet,
                              on_signal=stop)
    finally:
        crops = saver.close() if saver is not None else None
    if crops is not None:
        result.summary["save_crops"] = crops
        print(f"crops: {crops['written']} written to {crops['dir']} (every {crops['every']}), "
              f"{crops['dropped']} dropped (writer behind), {crops['crops_skipped']} skipped"
              + (": " + "; ".join(f"{k} {v}" for k, v in sorted(crops["skipped"].items())) if crops["skipped"]
                 else ""), file=sys.stderr)
        if crops.get("writer_error"):
            listed = (args.save_crops / "rocks.csv").is_file()
            print(f"crops: {crops['writer_error']}; " + (f"{args.save_crops}/rocks.csv lists the crops written"
                                                         if listed else f"{args.save_crops} has no rocks.csv"),
                  file=sys.stderr)
    if args.workers > 1:
        s = result.summary
        print(f"{args.workers} processes: the loop and {args.workers - 1} feature workers "
              f"({s['local_chunks']} chunks classified in the loop, {sum(s['worker_chunks'])} by the workers)")
    if source is not None:
        result.summary["tcp"] = {k: getattr(source, k) for k in
                                 ("connections", "frames", "lines", "rejected", "broken", "stale", "seq_gaps")}
    if valves is not None:
        result.summary["valve_datagrams"] = valves.sent
        valves.close()
    return _score_and_report(args, rec, sorter, timing, result.summary, [e.to_json() for e in result.events], log)


def _score_and_report(args, rec, sorter, timing, summary: dict, events: list[dict], log) -> int:
    """Score the run against truth.csv (if any), print the summary, write --summary-json and
    give the exit status. A stop signal in here does not cut the report short: it is held
    until the report is out, then the run exits 128 + signum as if it had come a moment earlier."""
    from sorting.offline.outcome import jets_outcome, match_particles
    from sorting.realtime.runner import StopOnSignal

    with StopOnSignal() as stop:
        detection = outcome = None
        if rec.truth is not None and not args.listen:
            truth = truth_read(rec.truth, summary["lines"])
            detection = match_particles(events, truth)
            outcome = jets_outcome(events, truth, sorter, timing)
            summary["detection"], summary["outcome"] = detection, outcome
        status = _report(args, summary, outcome, detection, log)
    if status == 0 and stop.requested:
        sys.stderr.write(f"sorting run: stopped by {signal_name(stop.signum)} after the run\n")
        status = 128 + stop.signum
    return status


def _report(args, summary: dict, outcome, detection, log) -> int:
    """Print the summary, write --summary-json, and give the run's exit status."""
    print(format_summary(summary, outcome, detection))
    print(f"events: {args.events} ({log.count} particles)")
    if args.summary_json:
        try:
            args.summary_json.write_text(json.dumps(summary, indent=2, default=float) + "\n")
        except OSError as exc:
            raise InputError("--summary-json", f"{args.summary_json}: cannot write ({exc.strerror})") from None
    sys.stdout.flush()
    return exit_status(summary)
