"""The service's loop: lines from the TCP source through the pipeline, decisions to the valves
and the event log, and between chunks: setpoint changes applied, a snapshot published.

The loop runs in the main thread (it owns SIGINT/SIGTERM). It never waits on the web
side: a snapshot is one datagram sent without blocking (dropped and counted when the
web process is behind), and setpoint changes arrive ready in a deque it pops from.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
import math
import socket
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from sorting.parallel import opencv_threads
from sorting.realtime.counters import LatencyHistogram
from sorting.realtime.events import Event
from sorting.realtime.runner import StopOnSignal, rates
from sorting.realtime.service import channel
from sorting.realtime.service.audit import AuditLog, utc_iso
from sorting.realtime.service.control import Control
from sorting.realtime.service.rotate import RotatingEventLog
from sorting.realtime.sinks import UDPValveSink
from sorting.realtime.sources import TCPLineSource
from sorting.realtime.stream import Pipeline

#: the belt picture on the page: at most this many columns (every sx-th detector column)
PREVIEW_MAX_WIDTH = 320
#: rows of belt picture buffered between two snapshots at most (a snapshot is sent when full)
PREVIEW_ROWS = 256
#: seconds between snapshots while lines arrive (and while idle: the source's heartbeat)
PUBLISH_S = 0.1
#: no line for this long: the state is NotExecuting
IDLE_S = 1.0
#: over this share of the last second's lines unusable (tube off, detector saturated or dark): OutOfService
FATAL_BAD_SHARE = 0.5
#: particle codes on the page: how each was decided
PASS, EJECT, LATE, UNDECIDED, SUSPECT = 0, 1, 2, 3, 4
#: at most this many particles are sent with one snapshot (the page only draws)
MAX_PARTICLES_PER_SNAP = 2000


def model_card(meta: dict) -> dict:
    """What the page shows about a model: its metadata without the feature list."""
    card = {k: v for k, v in meta.items() if k != "feature_names"}
    card["n_features"] = len(meta.get("feature_names", ()))
    return card


@dataclass
class PreviewGeometry:
    """The belt picture: every ``sx``-th column and every ``sy``-th stream line, high channel."""

    sx: int
    sy: int
    width: int

    @classmethod
    def for_machine(cls, pixels: int, pixel_pitch_mm: float, line_pitch_mm: float) -> "PreviewGeometry":
        sx = max(1, math.ceil(pixels / PREVIEW_MAX_WIDTH))
        sy = max(1, round(sx * pixel_pitch_mm / line_pitch_mm))  # square picture pixels
        return cls(sx, sy, len(range(0, pixels, sx)))


class ServiceLoop:
    def __init__(self, pipeline: Pipeline, source: TCPLineSource, log: RotatingEventLog, audit: AuditLog,
                 snap_sock: socket.socket | None, control: Control | None, model_name: str,
                 valves: UDPValveSink | None = None, threshold_fixed: bool = False, publish_s: float = PUBLISH_S):
        self.pipeline, self.source, self.log, self.audit = pipeline, source, log, audit
        self.snap_sock, self.control, self.valves = snap_sock, control, valves
        self.model_name = model_name
        # the threshold follows the model's operating point on a swap unless the sorter YAML or
        # an operator set it
        self.threshold_fixed = threshold_fixed
        self.publish_s = publish_s
        t = pipeline.timing
        self.preview = PreviewGeometry.for_machine(t.pixels, t.pixel_pitch_mm, pipeline.line_pitch_mm)
        self._pv = np.zeros((PREVIEW_ROWS, self.preview.width), np.uint16)
        self._pv_rows = 0
        self._pv_first = 0  # stream line of the buffer's first row
        self.eject_sc = pipeline.eject_sc
        self.buckets = [0] * (len(channel.LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0
        self.product = [0, 0.0]  # particles, mass proxy (area_mm2 ** 1.5)
        self.reject = [0, 0.0]
        self._parts: list[list] = []
        self.changes = 0
        self.last_change: dict | None = None
        self.snaps_sent = self.snaps_dropped = 0
        self._card = model_card(pipeline.model.meta)
        self._card_dirty = True
        self._last_pub = -math.inf
        self._last_lines_t = -math.inf
        self._bad_window: deque = deque()  # (monotonic time, lines, unusable lines) per snapshot
        self._bad_seen = 0
        self._lines_seen = 0
        self.state = "NotAvailable"
        self.next_line = 0

    # ------------------------------------------------------------------ the loop
    def run(self, stop: StopOnSignal | None = None) -> dict:
        """Until the source ends or SIGINT/SIGTERM; returns the summary. ``stop``: signal
        handling the caller installed already (a signal during start-up then stops at once)."""
        pipe = self.pipeline
        intake, step = LatencyHistogram(), LatencyHistogram()
        gc.collect()
        gc.freeze()
        t_start, cpu_start = time.perf_counter(), time.process_time()
        stopped = False
        try:
            signals = contextlib.nullcontext(stop) if stop else StopOnSignal(self.source.stop)
            with signals as stop, threadpool_limits(limits=1, user_api="blas"), opencv_threads(1):
                if stop.requested:
                    self.source.stop()
                self.publish(force=True)
                for item in self.source:
                    if item is not None:
                        first, raw, t_in = item
                        t_step = time.perf_counter()
                        intake.add((t_step - t_in) * 1000.0)
                        events = pipe.step(first, raw, t_in)
                        step.add((time.perf_counter() - t_step) * 1000.0)
                        self.deliver(events)
                        self._preview_add(first, raw)
                        self.next_line = first + raw.shape[0]
                        self._last_lines_t = time.monotonic()
                    if self.control is not None and self.control.pending:
                        self.apply_pending()
                    self.publish()
                    if stop.requested:
                        stopped = True
                        break
                stopped = stopped or stop.requested
                self.deliver(pipe.finish())
                if self.control is not None and self.control.pending:
                    self.apply_pending()
        finally:
            self.state = "NotAvailable"
            self.publish(force=True, final=True)
            self.log.close()
            self.audit.close()
            gc.unfreeze()
        wall = time.perf_counter() - t_start
        cpu = time.process_time() - cpu_start
        c = pipe.counters
        if self.valves is not None:
            c.valve_errors = self.valves.errors
        s = c.summary()
        s.update({
            "alarms": pipe.alarms, "fault_lines": dict(pipe.health.lines),
            "stopped_by_signal": stopped, "intake_lag_ms": intake.summary(), "step_ms": step.summary(),
            **rates(c.lines, wall, cpu, pipe.timing.line_rate_hz), "pixels": pipe.pixels,
            "changes": self.changes, "threshold": pipe.threshold, "model": self.model_name,
            "snapshots": {"sent": self.snaps_sent, "dropped": self.snaps_dropped},
            "event_log_files": [str(p) for p in self.log.rotations] + [str(self.log.path)],
        })
        return s

    def deliver(self, events: list[Event]) -> None:
        if not events:
            return
        if self.valves is not None:
            self.valves.send(events)
        self.log.write(events)
        bounds, buckets = channel.LATENCY_BUCKETS_MS, self.buckets
        parts = self._parts
        for e in events:
            lat = e.latency_ms
            buckets[bisect.bisect_left(bounds, lat)] += 1
            self.latency_sum_ms += lat
            fired = e.ejected
            m = e.area_mm2 ** 1.5
            side = self.product if fired == self.eject_sc else self.reject
            side[0] += 1
            side[1] += m
            if len(parts) < MAX_PARTICLES_PER_SNAP:
                code = (LATE if e.late else EJECT) if fired else (
                    UNDECIDED if e.undecided else SUSPECT if e.cut or e.fault else PASS)
                parts.append([e.first_line, e.last_line, e.x_min_px, e.x_max_px, code])

    # ------------------------------------------------------------------ setpoints
    def apply_pending(self) -> None:
        """Apply the changes queued by the control thread; they are in force from the next chunk."""
        pending = self.control.pending
        while pending:
            item = pending.popleft()
            kind = item[0]
            if kind == "audit":
                self.audit.write(item[1])
                continue
            pipe = self.pipeline
            if kind == "threshold":
                _, value, who = item
                old = pipe.threshold
                pipe.threshold = value
                self.threshold_fixed = True
                self._record(who, "threshold", old, value)
            elif kind == "model":
                _, model, name, who = item
                old_name, old_thr = self.model_name, pipe.threshold
                pipe.model = model
                self.model_name = name
                self._card = model_card(model.meta)
                self._card_dirty = True
                self._record(who, "model", old_name, name)
                if not self.threshold_fixed and model.threshold != old_thr:
                    pipe.threshold = model.threshold
                    self._record(who, "threshold", old_thr, model.threshold, reason="the new model's operating point")

    def _record(self, who: str, what: str, old, new, reason: str | None = None) -> None:
        rec = {"change": what, "old": old, "new": new, "who": who, "time": utc_iso(), "from_line": self.next_line}
        if reason:
            rec["reason"] = reason
        self.log.write_record(rec)
        self.audit.write({"who": who, "what": what, "old": old, "new": new, "result": "applied",
                          "from_line": self.next_line, **({"reason": reason} if reason else {})})
        self.changes += 1
        self.last_change = rec

    # ------------------------------------------------------------------ snapshots
    def _preview_add(self, first: int, raw: np.ndarray) -> None:
        sy, sx = self.preview.sy, self.preview.sx
        off = (-first) % sy
        rows = raw[off::sy, ::sx, 1]
        k = rows.shape[0]
        if k == 0:
            return
        row0 = first + off
        if self._pv_rows and (row0 != self._pv_first + self._pv_rows * sy or self._pv_rows + k > PREVIEW_ROWS):
            self.publish(force=True)  # a gap in the stream, or the buffer is full
        if self._pv_rows == 0:
            self._pv_first = row0
        k = min(k, PREVIEW_ROWS - self._pv_rows)
        self._pv[self._pv_rows:self._pv_rows + k] = rows[:k]
        self._pv_rows += k

    def _update_state(self, now: float) -> None:
        health = self.pipeline.health
        lines, bad = self.pipeline.counters.lines, health.lines["saturated"] + health.lines["dark"]
        w = self._bad_window
        w.append((now, lines - self._lines_seen, bad - self._bad_seen))
        self._lines_seen, self._bad_seen = lines, bad
        while w and now - w[0][0] > 1.0:
            w.popleft()
        n = sum(x[1] for x in w)
        fatal = n > 0 and sum(x[2] for x in w) > FATAL_BAD_SHARE * n
        if fatal:
            self.state = "OutOfService"
        elif now - self._last_lines_t < IDLE_S:
            self.state = "Executing"
        else:
            self.state = "NotExecuting"

    def snapshot(self) -> dict:
        pipe, src = self.pipeline, self.source
        c = pipe.counters
        snap = {
            "kind": "snap", "t": time.time(), "state": self.state,
            "lines": c.lines, "chunks": c.chunks, "particles": c.particles, "ejects": c.ejected,
            "passes": c.passed, "late": c.late_ejects, "undecided": c.undecided, "cut": c.cut, "gaps": c.gaps,
            "dropped_lines": c.dropped_lines, "next_line": self.next_line,
            # fault episodes and particle-error episodes; tramp metal as the pieces seen
            "alarms": {**pipe.alarms, "tramp": c.tramp}, "fault_lines": dict(pipe.health.lines),
            "threshold": pipe.threshold, "model": self.model_name, "connected": src.connected,
            "peer": f"{src.peer[0]}:{src.peer[1]}" if src.peer else None,
            "tcp": {k: getattr(src, k) for k in ("connections", "frames", "lines", "rejected", "broken", "stale",
                                                  "seq_gaps", "replaced", "restarts")},
            "valve_datagrams": self.valves.sent if self.valves is not None else 0,
            "valve_errors": self.valves.errors if self.valves is not None else 0,
            "latency_buckets": self.buckets, "latency_sum_ms": self.latency_sum_ms,
            "product": self.product, "reject": self.reject, "eject_class": "sc" if self.eject_sc else "waste",
            "changes": self.changes, "last_change": self.last_change,
            "snaps_dropped": self.snaps_dropped, "events_written": self.log.count,
            "particles_new": self._parts,
            "pv_first_line": self._pv_first, "pv_rows": self._pv_rows,
        }
        if self._card_dirty:
            snap["model_card"] = self._card
        return snap

    def publish(self, force: bool = False, final: bool = False) -> None:
        """Send a snapshot if ``publish_s`` has passed (or ``force``); never blocks."""
        now = time.monotonic()
        if not force and now - self._last_pub < self.publish_s:
            return
        self._last_pub = now
        if not final:
            self._update_state(now)
        if self.control is not None:
            self.control.threshold = self.pipeline.threshold
            self.control.model_name = self.model_name
        if self.snap_sock is None:
            self._parts = []
            self._pv_rows = 0
            return
        snap = self.snapshot()
        ok = channel.send_nowait(self.snap_sock, snap, self._pv[:self._pv_rows].tobytes())
        if ok:
            self.snaps_sent += 1
            self._card_dirty = False
        else:
            self.snaps_dropped += 1
        self._parts = []
        self._pv_rows = 0
