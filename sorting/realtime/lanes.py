"""Lane-parallel sorting for wide or fast belts: worker processes own column ranges.

Lane k owns the components whose leftmost column lies in its range and sees ``overlap_px``
more columns to its right, so every owned component is seen whole (a component touching
the lane's window edge is not owned: the lane to its left sees it whole). Ownership is
decided on the whole component before touching rocks are split, so no blob is split two
ways. The parent merges the lanes' decisions in the single worker's order: by the chunk
that completed them, then last line, first line and first column; the events are the same as one
worker's, apart from wall-clock latencies.

Workers read their columns in place from the memory-mapped recording's whole lines, so only
decisions cross process boundaries, batched every few milliseconds.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import operator
import os
import queue as queue_errors
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorting.errors import Interrupted
from sorting.realtime.runner import (
    RunResult,
    StopOnSignal,
    build_pipeline,
    opencv_threads,
    rates,
    signal_name,
    timing_of,
)
from sorting.realtime.stream import ERROR_ALARM, LatencyHistogram

#: a lane sees this many columns past its range: the widest blob of touching rocks it must see whole
DEFAULT_OVERLAP_MM = 200.0
#: a column a lane owns costs it about (1 + this) times a column it only sees: segmenting a
#: column costs about as much as the features, scores and plans of the rocks starting in it.
#: Measured on the reference belt (30 % occupancy, 2 lanes): lane CPU 1.22 / 1.40 s with equal
#: windows (owned 500 + 750), 1.20 / 1.22 s at 560 + 690 (this weight gives 562 + 688), and
#: 14.2-15.9x against 12.8-14.2x in four alternating pairs
OWNED_WEIGHT = 1.0


@dataclass(frozen=True)
class Lane:
    lo: int  # first column of the window
    hi: int  # one past the last column of the window
    own_lo: int  # owned leftmost columns: own_lo <= col0 < own_hi (absolute)
    own_hi: int


def lane_windows(pixels: int, workers: int, overlap_px: int, owned_weight: float = OWNED_WEIGHT) -> list[Lane]:
    """Owned ranges such that every lane has about the same work: its window's columns plus
    ``owned_weight`` times its owned columns (0: equal windows). The overlap is one-sided:
    lane k's window is its owned range and ``overlap_px`` more columns (the last lane's, none).

    With work C per lane, owned o_k = (C - overlap) / (1 + weight) but o_last = C / (1 + weight),
    and the o_k sum to ``pixels``: C = ((1 + weight) pixels + (workers - 1) overlap) / workers.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return [Lane(0, pixels, 0, pixels)]
    k1 = 1.0 + owned_weight
    work = (k1 * pixels + (workers - 1) * overlap_px) / workers
    bounds = [0]
    for k in range(1, workers):
        bounds.append(int(round(k * (work - overlap_px) / k1)))
    bounds.append(pixels)
    if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"{workers} lanes with {overlap_px} px overlap do not fit {pixels} pixels")
    lanes = []
    for k in range(workers):
        hi = pixels if k == workers - 1 else min(bounds[k + 1] + overlap_px, pixels)
        lanes.append(Lane(bounds[k], hi, bounds[k], bounds[k + 1]))
    return lanes


def _claim_rule(lane: Lane, pixels: int):
    """In window columns: own the component if its leftmost column is in the owned range and
    it does not touch a window edge that is not the belt edge."""
    lo, hi = lane.lo, lane.hi
    left_cut = lo > 0
    right_cut = hi < pixels

    def claim(col0: int, col1: int) -> bool:
        a0, a1 = col0 + lo, col1 + lo
        # a component starting on the next lane's first column touches that lane's cut, so it is ours
        if not lane.own_lo <= a0 <= (lane.own_hi if right_cut else lane.own_hi - 1):
            return False
        if left_cut and col0 == 0:
            return False  # cut by this window: the lane to the left sees it whole
        if right_cut and a1 == hi - 1:
            return False  # wider than the overlap: reaches past this window
        return True

    return claim


#: the single worker's order: the chunk that completed a particle, then its last line, first line, first column
_merge_order = operator.itemgetter(0, 1, 2, 3)


#: a lane that has not set up after this long is stuck (a fresh install compiles the kernels: ~1 min)
SETUP_TIMEOUT_S = 600.0


class _Watch:
    """The lanes' messages, and the lanes themselves: one that dies without its last message
    (killed, out of memory, a crash in compiled code) ends the run with an error within about
    a fifth of a second, however busy the other lanes keep the queue."""

    CHECK_S = 0.2  # how often the lanes' exit codes are looked at

    def __init__(self, procs: list, queue) -> None:
        self.procs, self.queue = procs, queue
        self.finished: list = [None] * len(procs)
        self._check_at = 0.0

    def message(self) -> tuple:
        while True:
            now = time.monotonic()
            if now >= self._check_at:
                self._check_at = now + self.CHECK_S
                gone = [k for k, p in enumerate(self.procs) if self.finished[k] is None and p.exitcode is not None]
                if gone:
                    # a lane's messages reach the pipe before it exits: while any are unread, its
                    # last one may be among them; with none left, it died without sending it
                    try:
                        return self.queue.get_nowait()
                    except queue_errors.Empty:
                        self.kill()
                        k = gone[0]
                        raise RuntimeError(f"lane {k} died (exit code {self.procs[k].exitcode}) "
                                           "before its last decisions") from None
            try:
                return self.queue.get(timeout=self.CHECK_S)
            except queue_errors.Empty:
                continue

    def kill(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join(5.0)


def _stop_before(chunk: int, reached, stop_at, lock) -> bool:
    """After a stop request every lane stops at the same chunk count: one more than any lane
    had started when the first of them saw the request (the one more covers a count another
    lane had just stored but this one could not see yet). True: do not process ``chunk``."""
    with lock:
        if stop_at.value < 0:
            stop_at.value = max(reached) + 1
        return chunk >= stop_at.value


def _die_with_parent(parent_pid: int) -> None:
    """A lane ends when the process that merges its decisions ends, however that ends."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass  # elsewhere the lane still looks for its parent at every flush
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent was gone before the lane could ask to go with it


def _arrivals(pipe, events: list[dict]) -> list[float]:
    """Acquisition time of each event's last line, as Python floats (numpy scalars cost the
    parent ~10 us each to unpickle)."""
    last = np.array([e["last_line"] for e in events], np.int64) & (pipe.ring_lines - 1)
    return pipe._arrival[last].tolist()


def _worker(k: int, lane: Lane, recording: str, model_path: str, sorter_path: str, chunk_lines: int,
            realtime: bool, parent: int, shared: dict, queue, flush_s: float) -> None:
    # a stop signal (Ctrl-C to the terminal's process group, a supervisor's SIGTERM to the
    # control group) is the parent's to act on: it asks every lane to stop at the same chunk
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    import cv2
    from threadpoolctl import threadpool_limits

    from sorting.config import load_sorter
    from sorting.io import read_belt_recording
    from sorting.realtime.sources import prefault, replay
    from sorting.stages.inference import load_model

    # one core per lane, as run_loop holds the single loop: BLAS and OpenCV thread pools would
    # only spin against the other lanes
    threadpool_limits(limits=1, user_api="blas")
    cv2.setNumThreads(1)
    go, stop, reached = shared["go"], shared["stop"], shared["reached"]
    try:
        rec = read_belt_recording(Path(recording))
        timing = timing_of(rec.meta)
        sorter = load_sorter(sorter_path)
        # the parent's calibration, inherited through fork: one physical copy of the 8 MB basis
        # table for all lanes, not one per lane fighting over the shared cache
        cal = shared["calibration"]
        pipe = build_pipeline(cal, load_model(model_path), sorter, timing, sorter_path, chunk_lines,
                              x0=lane.lo, width=lane.hi - lane.lo, claim=_claim_rule(lane, timing.pixels),
                              shed_late=realtime)
        # whole lines, as the detector delivers them: the pipeline reads its window's columns in place
        prefault(rec.lines)  # as the single loop's bench: the run measures the loop, not first-touch faults
        gc.collect()
        gc.freeze()  # as run_loop: start-up objects never need another full GC pass
        queue.put((k, "ready", None))
        while not go.wait(1.0):  # every lane starts on the same clock, after all have set up
            if os.getppid() != parent:
                return  # the parent is gone (killed during set-up): nobody will start us

        cpu0 = time.process_time()
        t0 = shared["t0"].value
        pending: list = []
        last_send = time.perf_counter()
        chunk = -1
        stopped = False
        for chunk, (first, raw, t_in) in enumerate(replay(rec.lines, timing.line_rate_hz, chunk_lines, realtime,
                                                          t0=t0)):
            reached[k] = chunk + 1
            if stop.value and _stop_before(chunk, reached, shared["stop_at"], shared["stop_lock"]):
                stopped, chunk = True, chunk - 1
                break
            events = pipe.step(first, raw, t_in)
            if events:
                pending.append((chunk, events, _arrivals(pipe, events)))
            now = time.perf_counter()
            if now - last_send >= flush_s:
                if os.getppid() != parent:  # the parent was killed: nobody reads the decisions any more
                    queue.cancel_join_thread()  # ... so do not wait at exit for the pipe to drain
                    return
                queue.put((k, chunk, pending))
                pending, last_send = [], now
        events = pipe.finish()
        if events:
            pending.append((chunk + 1, events, _arrivals(pipe, events)))
        queue.put((k, chunk + 1, pending))
        queue.put((k, None, {"stage_s": pipe.stage_s, "counters": pipe.counters.summary(),
                             "alarms": dict(pipe.health.episodes), "fault_lines": dict(pipe.health.lines),
                             "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - t0,
                             "lines": pipe.counters.lines, "stopped": stopped}))
    except BaseException as exc:  # noqa: BLE001 - report any worker failure to the parent
        queue.put((k, None, {"error": f"{type(exc).__name__}: {exc}"}))


def lane_plan(timing, workers: int, overlap_mm: float = DEFAULT_OVERLAP_MM) -> list[Lane]:
    """The lanes of ``workers`` processes on this detector (``ValueError`` when they do not fit)."""
    return lane_windows(timing.pixels, workers, int(np.ceil(overlap_mm / timing.pixel_pitch_mm)))


def run_lanes(recording: Path, model_path: Path, sorter_path: Path, workers: int = 2, chunk_lines: int = 32,
              realtime: bool = False, overlap_mm: float = DEFAULT_OVERLAP_MM, log=None, valves=None) -> RunResult:
    """Sort ``recording`` with ``workers`` lane processes; returns the summary and the merged events."""
    from sorting.io import read_belt_recording

    rec = read_belt_recording(recording)
    timing = timing_of(rec.meta)
    from sorting.config import load_sorter

    sorter = load_sorter(sorter_path)
    lanes = lane_plan(timing, workers, overlap_mm)
    from sorting.stages.calibrate import calibrate
    from sorting.stages.normalize import basis_table

    cal = calibrate(rec.calibration)
    basis_table(cal)  # built once, here, before the lanes fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    t_setup = time.perf_counter()
    shared = {
        "calibration": cal,  # reaches the lanes through fork (a Process's arguments are not pickled)
        "go": ctx.Event(), "t0": ctx.Value("d", 0.0),
        # set on SIGINT/SIGTERM; each lane reads it once a chunk, without a lock
        "stop": ctx.RawValue("b", 0),
        # ... and then the lanes agree on the chunk to stop at (see _stop_before)
        "reached": ctx.RawArray("q", workers), "stop_at": ctx.RawValue("q", -1), "stop_lock": ctx.Lock(),
    }
    procs = [ctx.Process(target=_worker, args=(k, lane, str(recording), str(model_path), str(sorter_path),
                                               chunk_lines, realtime, os.getpid(), shared, queue,
                                               0.002 if realtime else 0.05),
                         daemon=True) for k, lane in enumerate(lanes)]

    watch = _Watch(procs, queue)
    stopper = StopOnSignal(lambda: setattr(shared["stop"], "value", 1))
    stopper.__enter__()  # from before the lanes start: a signal during set-up must not orphan them
    try:
        # a forked lane inherits OpenCV's thread pool but not its threads: with a pool running
        # here, the lane's own cv2.setNumThreads(1) would wait forever to join them
        with opencv_threads(1):
            for p in procs:
                p.start()
        return _merge(watch, lanes, timing, sorter, shared, stopper, t_setup, realtime, log, valves)
    finally:
        stopper.__exit__()
        watch.kill()  # an error in the merge (a full disk under the log, say) must not leave lanes running


def _merge(watch: _Watch, lanes, timing, sorter, shared, stopper, t_setup, realtime, log, valves) -> dict:
    """Wait for the lanes to set up, merge their decisions as they come, and sum up the run."""

    workers = len(lanes)
    ready = 0
    done = [-1] * workers
    finished = watch.finished
    while ready < workers:
        k, tag, payload = watch.message()
        if tag is None and "error" in payload:
            watch.kill()
            raise RuntimeError(f"lane {k} failed: {payload['error']}")
        ready += tag == "ready"
        if stopper.requested:
            # before the belt started: nothing was decided (the lanes are killed); the CLI exits 128 + signum
            raise Interrupted(stopper.signum if stopper.signum is not None else signal.SIGINT)
        if time.perf_counter() - t_setup > SETUP_TIMEOUT_S:
            raise RuntimeError(f"the lanes were not set up after {SETUP_TIMEOUT_S:.0f} s")
    # the stream starts now for every lane (setup, like the single loop's, is not throughput)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    shared["t0"].value = t_start + 0.005
    shared["go"].set()
    buffer: list = []  # (chunk, line1, line0, col0, event, t_in)
    merged: list[dict] = []
    latency = LatencyHistogram()
    late = ejected = errors = error_episodes = 0
    error_episode = False  # the last chunk with particles had a failed one (as Pipeline._end_chunk)
    resp_s = sorter.ejector.response_ms / 1000.0

    def release(upto: int) -> None:
        nonlocal buffer, late, ejected, errors, error_episodes, error_episode
        ready = [b for b in buffer if b[0] <= upto]
        if not ready:
            return
        buffer = [b for b in buffer if b[0] > upto]
        ready.sort(key=_merge_order)
        out = [b[4] for b in ready]
        first = len(merged)
        if realtime:
            # paced, the lanes share the clock and latency runs to the merged release
            now = time.perf_counter()
            lats = []
            for b in ready:
                e, lat = b[4], (now - b[5]) * 1000.0
                if e["open_s"] is not None:
                    due_s = e["open_s"] - resp_s - e["last_line"] / timing.line_rate_hz
                    e["slack_ms"] = round(due_s * 1000.0 - lat, 3)
                else:
                    e["slack_ms"] = round(e["slack_ms"] + e["latency_ms"] - lat, 3)
                e["latency_ms"] = round(lat, 3)
                e["late"] = e["slack_ms"] < 0 or e["undecided"]  # as the lane's (and the single loop's) rule
                lats.append(lat)
            latency.add_many(np.array(lats))
        else:
            # unpaced, a lane may run ahead of the other, so the wait in the merge says nothing:
            # each event keeps its lane's own latency, slack and lateness
            latency.add_many(np.array([e["latency_ms"] for e in out]))
        chunk, failed = ready[0][0], False
        for i, (b, e) in enumerate(zip(ready, out)):
            e["particle"] = first + i
            if e["decision"] == "eject":
                ejected += 1
                late += e["late"]
            if b[0] != chunk:  # a chunk's particles are all here: one worker's episodes of particle errors
                error_episodes += failed and not error_episode
                error_episode, chunk, failed = failed, b[0], False
            if "error" in e:
                errors += 1
                failed = True
        error_episodes += failed and not error_episode
        error_episode = failed
        if valves is not None:
            valves.send(out)
        if log is not None:
            log.write(out)
        merged.extend(out)

    while any(f is None for f in finished):
        k, chunk, payload = watch.message()
        if chunk is None:
            finished[k] = payload
            if "error" in payload:
                watch.kill()
                raise RuntimeError(f"lane {k} failed: {payload['error']}")
            continue
        for c, events, t_ins in payload:
            buffer += [(c, e["last_line"], e["first_line"], e["x_min_px"], e, t_in) for e, t_in in zip(events, t_ins)]
        done[k] = max(done[k], chunk)
        release(min(done))
    release(1 << 62)
    if log is not None:
        log.close()
    # every decision is out: the lanes' exit (unmapping the recording) is teardown, as after run_loop
    wall = time.perf_counter() - t_start
    merge_cpu = time.process_time() - cpu_start
    for p in watch.procs:
        p.join(10.0)  # each has sent its last message: it is only exiting
    lines = max(f["lines"] for f in finished)  # the whole recording, unless a signal stopped the lanes
    stopped = stopper.requested or any(f["stopped"] for f in finished)
    cpu = sum(f["cpu_s"] for f in finished) + merge_cpu
    workers_c = [f["counters"] for f in finished]
    # every lane sees every line: stream-level counters agree across lanes; take the worst
    alarms = {kind: max(f["alarms"][kind] for f in finished) for kind in finished[0]["alarms"]}
    alarms[ERROR_ALARM] = error_episodes  # each lane's particles are its own: counted on the merged chunks
    fault_lines = {kind: max(f["fault_lines"][kind] for f in finished) for kind in finished[0]["fault_lines"]}
    summary = {
        "workers": workers, "lanes": [(lane.lo, lane.hi) for lane in lanes],
        # as the single loop: a signal received while the lanes ran means the run was interrupted
        "stopped_by_signal": stopped,
        "signal": signal_name(stopper.signum) if stopped else None,
        "chunks": max(c["chunks"] for c in workers_c), "lines": lines, "particles": len(merged),
        "ejected": ejected, "passed": len(merged) - ejected, "late": late,
        "undecided": sum(bool(e.get("undecided")) for e in merged), "cut": sum(bool(e["cut"]) for e in merged),
        "too_long": sum(bool(e["too_long"]) for e in merged), "particle_errors": errors,
        "tramp": sum(e.get("kind") == "tramp" for e in merged),
        "over_cap": sum(bool(e.get("over_cap")) for e in merged),
        "splices": max(c.get("splices", 0) for c in workers_c),
        "splice_lines": max(c.get("splice_lines", 0) for c in workers_c),
        "gaps": max(c["gaps"] for c in workers_c), "dropped_lines": max(c["dropped_lines"] for c in workers_c),
        "valve_errors": valves.errors if valves is not None else 0,
        "alarms": alarms, "fault_lines": fault_lines,
        "latency_ms": latency.summary(),
        # CPU seconds from the start of the stream (set-up excluded, as for the single loop)
        **rates(lines, wall, cpu, timing.line_rate_hz),
        "setup_s": t_start - t_setup, "pixels": timing.pixels, "merge_cpu_s": merge_cpu,
        "lane_cpu_s": [f["cpu_s"] for f in finished], "lane_wall_s": [f["wall_s"] for f in finished],
        "lane_stage_s": [f["stage_s"] for f in finished],
    }
    return RunResult(summary, merged)
