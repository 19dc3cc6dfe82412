"""`sorting serve`: the loop as a long-running service on the sorter's control PC, with the
operator page, Prometheus metrics, a JSON API for setpoints and, optionally, OPC UA."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from sorting.errors import InputError

OPCUA_URL = re.compile(r"^opc\.tcp://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})/?$")
#: a token shorter than this is refused (it would be guessed)
MIN_TOKEN_CHARS = 16
#: seconds the web process may take to start (it imports aiohttp and asyncua)
WEB_START_S = 60.0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the loop as a service: live TCP line stream, operator page, metrics, OPC UA")
    p.add_argument("machine", type=Path, help="folder with recording.json (machine keys) and calibration/; "
                   "any xrt-belt/1 recording serves")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sorter", type=Path, required=True, help="sorter YAML")
    p.add_argument("--listen", metavar="HOST:PORT", required=True, help="TCP line stream from the detector")
    p.add_argument("--http", metavar="HOST:PORT", required=True, help="operator page, /metrics and /api")
    p.add_argument("--events", type=Path, default=Path("events.jsonl"),
                   help="JSON-lines event log (default events.jsonl); rotated, see --rotate-mb/--rotate-hourly")
    p.add_argument("--audit", type=Path, default=None,
                   help="audit log of setpoint changes (default: audit.jsonl beside the event log)")
    p.add_argument("--udp", metavar="HOST:PORT", default=None, help="send valve commands as UDP datagrams")
    p.add_argument("--token-file", type=Path, default=None,
                   help="bearer token for writes (first line; the file must not be accessible to group or others); "
                   "without it every write is refused")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder of the models PUT /api/model may switch to (by file name)")
    p.add_argument("--opcua", metavar="opc.tcp://HOST:PORT", default=None, help="also serve OPC UA")
    p.add_argument("--chunk-lines", type=int, default=32)
    p.add_argument("--rotate-mb", type=float, default=100.0,
                   help="start a new event log file when the current one would exceed this (MB; 0: never)")
    p.add_argument("--rotate-hourly", action="store_true", help="also start a new event log file every hour")
    p.add_argument("--serial", default="", help="the sorter's serial number, for OPC UA Identification")


def read_token(path: Path) -> str:
    """The first line of the token file; refused if group or others may access the file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(path, f"cannot read the token file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "the token file is not a regular file")
    if st.st_mode & 0o077:
        raise InputError(path, f"the token file is accessible to group or others (mode {st.st_mode & 0o777:o}); "
                               "chmod 600 it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the token file ({getattr(exc, 'strerror', None) or exc})") from None
    token = text.splitlines()[0].strip() if text else ""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InputError(path, f"the token (first line) must be at least {MIN_TOKEN_CHARS} characters, no spaces")
    return token


def check_opcua(url: str) -> str:
    m = OPCUA_URL.match(url)
    if not m or not 0 < int(m["port"]) < 65536:
        raise InputError("--opcua", f"expected opc.tcp://HOST:PORT, got {url!r}")
    return url


def _start_web(cfg: dict):
    """The web process, its two sockets, and its answer (ready or error)."""
    from sorting.realtime.service import channel
    from sorting.resources import IMPORT_ROOT

    snap_a, snap_b = channel.pair()
    ctl_a, ctl_b = channel.pair()
    env = dict(os.environ)
    root = str(IMPORT_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.Popen([sys.executable, "-m", "sorting.realtime.service.web", str(snap_b.fileno()),
                             str(ctl_b.fileno())], pass_fds=(snap_b.fileno(), ctl_b.fileno()), env=env,
                            stdin=subprocess.DEVNULL)
    snap_b.close()
    ctl_b.close()
    ctl_a.send(channel.encode({"kind": "config", **cfg}))
    ctl_a.settimeout(0.5)
    deadline = time.monotonic() + WEB_START_S
    answer = None
    while answer is None and time.monotonic() < deadline:
        try:
            answer, _ = channel.decode(ctl_a.recv(channel.MAX_MESSAGE_BYTES))
        except (TimeoutError, OSError):
            if proc.poll() is not None:
                break
        except ValueError:
            continue
    ctl_a.settimeout(None)
    return proc, snap_a, ctl_a, answer


def _stop_web(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli_serve(args) -> int:
    from sorting.cli.options import option
    from sorting.cli.run import format_summary
    from sorting.config import load_sorter
    from sorting.realtime.runner import (
        StopOnSignal,
        build_pipeline,
        check_chunk_lines,
        timing_of,
    )
    from sorting.realtime.service import channel
    from sorting.realtime.service.audit import AuditLog
    from sorting.realtime.service.control import Control
    from sorting.realtime.service.loop import PreviewGeometry, ServiceLoop, model_card
    from sorting.realtime.service.machine import read_machine
    from sorting.realtime.service.rotate import RotatingEventLog
    from sorting.realtime.sinks import UDPValveSink, parse_hostport
    from sorting.realtime.sources import TCPLineSource
    from sorting.stages.inference import load_model

    # everything that can be wrong with the input fails here, before anything starts
    with option("--chunk-lines"):
        check_chunk_lines(args.chunk_lines)
    machine = read_machine(args.machine)
    model = load_model(args.model)
    sorter = load_sorter(args.sorter)
    timing = timing_of(machine.meta)
    listen = parse_hostport(args.listen, "--listen")
    http = parse_hostport(args.http, "--http")
    opcua = check_opcua(args.opcua) if args.opcua else None
    token = read_token(args.token_file) if args.token_file else None
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise InputError(args.models_dir, "--models-dir is not a folder")
    if args.rotate_mb < 0:
        raise InputError("--rotate-mb", f"must be >= 0, got {args.rotate_mb}")
    valves = None
    if args.udp:
        host, port = parse_hostport(args.udp, "--udp")
        with option("--udp"):
            valves = UDPValveSink(host, port, sorter.ejector.valves)
    try:
        source = TCPLineSource(timing.pixels, *listen, max_lines=args.chunk_lines, accept_timeout_s=None,
                               persistent=True, heartbeat=True, poll_s=0.1, line_rate_hz=timing.line_rate_hz)
    except OSError as exc:
        raise InputError("--listen", f"cannot listen on {listen[0]}:{listen[1]} ({exc.strerror or exc})") from None
    cfg = {"http": list(http), "opcua": opcua, "token": token, "model": args.model.name,
           "models_dir": str(args.models_dir.resolve()) if args.models_dir else None,
           "model_card": model_card(model.meta), "serial": args.serial}
    # from here on a signal is the normal stop: during start-up it ends the service as soon as the loop starts
    stop = StopOnSignal(source.stop).__enter__()
    proc, snap_sock, ctl_sock, answer = _start_web(cfg)
    try:
        if answer is None or answer.get("kind") != "ready":
            why = answer.get("message") if answer else "the web process did not start"
            source.close()
            raise InputError("--opcua" if opcua and "opc" in str(why).lower() else "--http", why)
        pipeline = build_pipeline(machine.calibration, model, sorter, timing, str(args.sorter), args.chunk_lines,
                                  shed_late=True)
        log = RotatingEventLog(args.events, max_bytes=int(args.rotate_mb * 1e6), hourly=args.rotate_hourly)
        audit = AuditLog(args.audit or args.events.parent / "audit.jsonl")
        geo = PreviewGeometry.for_machine(timing.pixels, timing.pixel_pitch_mm, pipeline.line_pitch_mm)
        cols = slice(0, timing.pixels, geo.sx)
        cal = pipeline.cal
        channel.send_nowait(snap_sock, {
            "kind": "hello", "machine": str(args.machine), "pixels": timing.pixels, "line_rate_hz": timing.line_rate_hz,
            "pixel_pitch_mm": timing.pixel_pitch_mm, "line_pitch_mm": pipeline.line_pitch_mm,
            "sx": geo.sx, "sy": geo.sy, "width": geo.width, "eject_class": sorter.sorting.eject,
            "pv_dark": cal.dark[cols, 1].tolist(), "pv_flat": (cal.air[cols, 1] - cal.dark[cols, 1]).tolist(),
        })
        control = Control(ctl_sock, args.models_dir)
        control.start()
        loop = ServiceLoop(pipeline, source, log, audit, snap_sock, control, args.model.name, valves=valves,
                           threshold_fixed=sorter.sorting.threshold is not None)
        print(f"sorting serve: line stream on {source.address[0]}:{source.address[1]}, page and API on "
              f"http://{answer['http'][0][0]}:{answer['http'][0][1]}/"
              + (f", OPC UA on {answer['opcua']}" if answer.get("opcua") else ""), file=sys.stderr, flush=True)
        try:
            summary = loop.run(stop)
        finally:
            control.stop()
    finally:
        stop.__exit__(None, None, None)
        time.sleep(0.2)  # the last snapshot reaches the page
        _stop_web(proc)
        source.close()
        if valves is not None:
            summary_valves = valves.sent
            valves.close()
    if valves is not None:
        summary["valve_datagrams"] = summary_valves
    summary["tcp"] = {k: getattr(source, k) for k in ("connections", "frames", "lines", "rejected", "broken",
                                                       "stale", "seq_gaps", "replaced", "restarts")}
    print(format_summary(summary))
    print(f"events: {args.events} ({log.count} particles"
          + (f", {len(log.rotations)} rotated files" if log.rotations else "") + f"); "
          f"{summary['changes']} setpoint changes")
    return 0
