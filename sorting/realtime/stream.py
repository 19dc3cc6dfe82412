"""The real-time loop: detector lines in, valve commands out (docs/formats.md and docs/cli.md, the event log).

Per chunk (default 32 lines): calibrated normalization into preallocated buffers ->
per-pixel foreground -> stitching across chunks (each particle once, complete when the
line after its last line arrives) -> features on the particle's box, cut from a ring
buffer of attenuation lines (the same code as training) -> one ONNX batch -> valve plan.

Fail-safe: when one particle's own processing raises (splitting its component, features,
inference, planning), that particle passes, logged with an ``error`` key, and the belt goes
on. Each stage runs on the chunk's whole batch; only when the batch raises is it redone one
particle at a time, so the common path pays nothing and the other particles of the chunk get
the decisions a clean run gives them.
"""
from __future__ import annotations

import time

import numba
import numpy as np

from sorting.config import SorterConfig
from sorting.realtime.counters import Counters
from sorting.realtime.events import Event
from sorting.realtime.health import ChunkHealth, LineHealth, good_runs, runs
from sorting.realtime.inflight import ChunkJob, FeatureQueue, ring_buffer
from sorting.stages import split
from sorting.stages.air import AirSums, AirTracker
from sorting.stages.calibrate import Calibration
from sorting.stages.counts import repair_plan
from sorting.stages.eject import Timing, plan_one, plan_parameters
from sorting.stages.features import FEATURE_NAMES, features_from_ring, particle_features
from sorting.stages.inference import OnnxModel
from sorting.stages.linepass import normalize_lines
from sorting.stages.particles import Particles, SegmentConfig
from sorting.stages.segment import detector_arrays
from sorting.stages.splice import SpliceFinder
from sorting.stages.stitch import StreamSegmenter
from sorting.stages.stitch import warm_up as stitch_warm_up
from sorting.stages.tramp import TrampFinder

#: a particle is left undecided when less than this remains before its command is due
SHED_MARGIN_MS = 1.0
#: spare ring lines beyond a particle's own (its box is read from the ring when it completes)
CROP_MARGIN_PX = 4
#: the alarm kind of an episode of particle errors (consecutive chunks with failed particles)
ERROR_ALARM = "particle_error"


#: decimals of the logged centroid line, centroid column, area, score, open, close, latency, slack
_LOG_DECIMALS = (3, 3, 2, 6, 6, 6, 3, 3)
_LOG_SCALE = np.array([10.0 ** d for d in _LOG_DECIMALS])
N_LOGGED = len(_LOG_DECIMALS)


@numba.njit(cache=True, nogil=True)
def _chunk_plan(ints, p):
    """Per particle of a chunk (``ints`` rows: first line, first column, last line, last
    column, area px): its valve plan (:func:`sorting.stages.eject.plan_one`) and its box in the
    ring. Returns valve_lo, valve_hi, times (4, n: open, close, command, deadline_ms) and boxes
    (n, 4: first line, first column, height, width)."""
    n = ints.shape[0]
    lo, hi = np.empty(n, np.int64), np.empty(n, np.int64)
    times = np.empty((4, n), np.float64)
    boxes = np.empty((n, 4), np.int64)
    for i in range(n):
        line0, col0, line1, col1 = ints[i, 0], ints[i, 1], ints[i, 2], ints[i, 3]
        lo[i], hi[i], times[0, i], times[1, i], times[2, i], times[3, i] = plan_one(
            float(line0), float(line1), float(col0), float(col1), p)
        boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = line0, col0, line1 - line0 + 1, col1 - col0 + 1
    return lo, hi, times, boxes


@numba.njit(cache=True, nogil=True)
def _round_rows(values, scale):
    """Row r of ``values`` rounded in place to ``scale[r]`` (10 ** decimals) as ``np.round``
    does it: scale, round half to even, unscale."""
    for r in range(scale.size):
        for i in range(values.shape[1]):
            values[r, i] = np.rint(values[r, i] * scale[r]) / scale[r]


@numba.njit(cache=True, nogil=True)
def _chunk_numbers(ints, cents, scores, times, arrival, ring_mask, t_out, resp_s, rate, px_area, scale):
    """A chunk's logged numbers, (N_LOGGED + 2, n): rows 0..7 rounded (:data:`_LOG_DECIMALS`):
    centroid line, centroid column (detector), area mm2, score, open s, close s, latency ms
    (last line -> decision at ``t_out``), slack ms; rows 8, 9: latency and slack unrounded."""
    n = ints.shape[0]
    out = np.empty((N_LOGGED + 2, n), np.float64)
    for i in range(n):
        area, last = ints[i, 4], ints[i, 2]
        latency = (t_out - arrival[last & ring_mask]) * 1000.0
        slack = (times[0, i] - resp_s - last / rate) * 1000.0 - latency
        out[0, i] = cents[i, 0]
        # the column centroid from its integer sum (one division, as the stitcher made it)
        out[1, i] = np.rint(cents[i, 1] * area) / max(area, 1)
        out[2, i] = area * px_area
        out[3, i] = scores[i]
        out[4, i], out[5, i] = times[0, i], times[1, i]
        out[6, i], out[7, i] = latency, slack
        out[8, i], out[9, i] = latency, slack
    _round_rows(out, scale)
    return out


def _completion_order(done: Particles) -> Particles:
    """A chunk's particles by last line (then first line, first column): the order in which the
    stream completes them, whatever the chunk size; the order of their events."""
    if len(done) > 1:
        order = np.lexsort((done.col0, done.line0, done.line1))
        if (order[1:] < order[:-1]).any():
            return done[order]
    return done


class Pipeline(FeatureQueue):
    """One chunk at a time, in stream order. Not thread-safe; one per belt."""

    def __init__(self, cal: Calibration, model: OnnxModel, sorter: SorterConfig, timing: Timing,
                 seg: SegmentConfig = SegmentConfig(), chunk_lines: int = 32, max_particle_lines: int = 512,
                 line_pitch_mm: float | None = None, shed_late: bool = False, queue_chunks: int = 0):
        """``shed_late``: on a live stream, leave particles whose command is already due
        undecided instead of classifying them (overload protection; off for replays run as
        fast as possible, where wall-clock age means nothing).
        ``queue_chunks``: chunks whose particles may wait for feature workers (:meth:`attach`)
        at once; the ring grows to hold them besides the longest particle, in memory shared
        with processes forked after this (0: one process, a private ring)."""
        if queue_chunks < 0:
            raise ValueError(f"queue_chunks must be >= 0, got {queue_chunks}")
        self.shed_late = shed_late
        self.cal, self.model, self.sorter, self.timing = cal, model, sorter, timing
        self.seg = seg
        self.pixels = timing.pixels
        self.line_pitch_mm = line_pitch_mm or timing.belt_speed_m_s * 1000.0 / timing.line_rate_hz
        self.threshold = sorter.sorting.threshold if sorter.sorting.threshold is not None else model.threshold
        self.eject_sc = sorter.sorting.eject == "sc"
        self.eject_tramp = sorter.sorting.tramp == "eject"
        self.max_valves = int(sorter.ejector.max_valves)
        self.segmenter = StreamSegmenter(self.pixels, cal, timing.pixel_pitch_mm, self.line_pitch_mm, seg,
                                         max_particle_lines)
        # the ring must still hold a particle's first lines (and margin) when it completes
        # (and, with feature workers, while the chunks queued after it are written)
        self.queue_chunks = int(queue_chunks)
        self.chunk_lines, self.max_particle_lines = int(chunk_lines), int(max_particle_lines)
        self.ring_lines = 1 << int(np.ceil(np.log2(max_particle_lines + (2 + self.queue_chunks) * chunk_lines
                                                   + 2 * CROP_MARGIN_PX + 8)))
        self._ring = ring_buffer((self.ring_lines, self.pixels, 2), shared=self.queue_chunks > 0)
        self._ring.fill(0.0)  # touch every page now (np.zeros maps them lazily): no page faults on the belt
        self._arrival = np.zeros(self.ring_lines, np.float64)
        self.crop_sink = None  # --save-crops (attach_crop_sink); nothing is kept otherwise
        self._raw_ring: np.ndarray | None = None
        self._a = np.empty((chunk_lines, self.pixels, 2), np.float32)
        self._mask = np.empty((chunk_lines, self.pixels), bool)
        self._line_lag = np.arange(max(chunk_lines, 1) - 1, -1, -1) / timing.line_rate_hz
        self._x = np.empty((64, len(FEATURE_NAMES)), np.float32)
        self._plan_p = plan_parameters(sorter.ejector, timing)
        self.counters = Counters()
        self._init_queue()  # feature workers (attach): none yet
        self._next_id = 0
        self._expected: int | None = None
        self._cost_ms = 0.5  # running mean of the time to decide one particle
        self._chunk_failed = self._chunk_decided = self._error_episode = False
        self.health = LineHealth(cal)
        self.air = AirTracker(cal)
        # belt splices (whole-width steel lines) and tramp metal (steel the model never judges)
        self.splice = SpliceFinder(cal, 0, self.pixels, seg)
        self._splice_spans: list[tuple[int, int]] = []  # recent splice lines, (first, last) stream lines
        self.tramp = TrampFinder(cal)
        # the fused line pass's arguments, prepared once
        self._dark_flat = np.ascontiguousarray(cal.dark).reshape(-1)
        self._repair = repair_plan(cal.bad)
        self._det = detector_arrays(cal, 0, self.pixels, seg)
        # wall seconds per stage, for the benchmark's "where the time goes"
        self.stage_s = dict.fromkeys(("normalize", "segment", "features", "classify", "decide"), 0.0)
        self._warm_up()

    def attach_crop_sink(self, sink) -> None:
        """--save-crops: from now on keep a ring of the raw counts (the same lines as the
        attenuation ring) and call ``sink.on_chunk(raw_ring, last_line, done, events)`` once per
        chunk, and ``sink.finish(raw_ring, last_line)`` at the end of the stream
        (:class:`sorting.realtime.crops.CropSaver`). Without a sink the loop keeps nothing."""
        self._raw_ring = np.zeros((self.ring_lines, self.pixels, 2), np.uint16)
        self._raw_ring.fill(0)  # touch every page now
        self.crop_sink = sink

    def _warm_up(self) -> None:
        """Pay first-call costs (lazily built material tables: ~60 ms; the ONNX session's first
        run) before the belt starts, not on the first rock's deadline."""
        a = np.full((16, 16, 2), 0.5, np.float32)
        mask = np.zeros((16, 16), bool)
        mask[4:12, 4:12] = True
        particle_features(a, mask, self.cal, self.timing.pixel_pitch_mm, self.line_pitch_mm, out=self._x[0])
        np.nan_to_num(self._x[:1], copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        features_from_ring(self._ring, np.array([[self.ring_lines - 1, 0, 2, 2]], np.int64), [np.ones((2, 2), bool)],
                           self.cal, self.timing.pixel_pitch_mm, self.line_pitch_mm, out=self._x[1:2])
        self.model.scores_f32(self._x[:1])
        # the compiled kernels load from their cache (or compile, on a fresh install: ~seconds)
        # at their first call: make it here, on throwaway state, with the loop's argument types
        raw = np.zeros((2, self.pixels, 2), np.uint16)
        a = np.zeros((2, self.pixels, 2), np.float32)
        mask = np.empty((2, self.pixels), bool)
        health = LineHealth(self.cal)
        acc = AirTracker(self.cal).accumulators()  # throwaway sums
        # a faulty chunk's own flags, and a healthy chunk's shared read-only ones (another type)
        faulty = ChunkHealth(np.zeros(2, bool), np.zeros(self.pixels, bool), {})
        healthy = ChunkHealth(np.zeros(2, bool), np.zeros(self.pixels, bool), {})
        healthy.bad_lines.flags.writeable = healthy.bad_cols.flags.writeable = False
        for first in (0, 2):
            health.check(raw, first)
            for flags in (faulty, healthy):
                self._normalize_lines(raw, flags, a, mask, acc)
            raw.flags.writeable = False  # a replayed recording's lines are read-only: another type
        stitch_warm_up()
        # splice screen and correction (on a throwaway finder: a splice line in the middle), and
        # the tramp statistics
        finder = SpliceFinder(self.cal, 0, self.pixels, self.seg)
        a = np.zeros((5, self.pixels, 2), np.float32)
        a[2] = 1.0
        mask = np.zeros((5, self.pixels), bool)
        mask[2] = True
        if finder.screen(mask):
            finder.correct(a, mask, np.zeros(0, bool), np.zeros(self.pixels, bool))
        AirTracker(self.cal).retract(a[:1], mask[:1], np.zeros(self.pixels, bool))
        self.tramp.warm_up(self._ring)
        # the touching-rock split: its compiled flooding, and the gate's OpenCV calls
        yy, xx = np.mgrid[:24, :44]
        discs = ((yy - 12) ** 2 + (xx - 11) ** 2 < 100) | ((yy - 12) ** 2 + (xx - 29) ** 2 < 100)  # a neck
        split.split_touching(discs, self.timing.pixel_pitch_mm, self.line_pitch_mm, self.seg)
        ints, cents = np.zeros((1, 5), np.int64), np.zeros((1, 2), np.float64)
        lo, hi, times, boxes = _chunk_plan(ints, self._plan_p)
        _chunk_numbers(ints, cents, np.zeros(1, np.float32), times, self._arrival, self.ring_lines - 1, 0.0,
                       0.0, self.timing.line_rate_hz, 1.0, _LOG_SCALE)

    # ------------------------------------------------------------ input side
    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > self._a.shape[0]:
            self._a = np.empty((n, self.pixels, 2), np.float32)
            self._mask = np.empty((n, self.pixels), bool)
            self._line_lag = np.arange(n - 1, -1, -1) / self.timing.line_rate_hz
        return self._a[:n], self._mask[:n]

    def step(self, first_line: int, raw: np.ndarray, t_in: float) -> list[Event]:
        """Process lines ``first_line ..`` that entered at wall time ``t_in``: raw (L, P, 2)
        uint16. Returns the decisions made meanwhile, in completion order.

        A chunk is cut at the air tracker's epoch boundaries (multiples of its epoch lines),
        so the tracked air level a line is normalized with does not depend on chunking. A
        chunk of no lines changes nothing.
        """
        if self._pool is not None:
            return self._step_queued(first_line, raw, t_in)
        events = self._epochs(first_line, raw, t_in)
        self._end_chunk()
        return events

    def _epochs(self, first_line: int, raw: np.ndarray, t_in: float) -> list[Event]:
        """:meth:`step`'s work, cut at the air tracker's epoch boundaries."""
        epoch = self.air.epoch_lines
        n = raw.shape[0]
        if n == 0:
            return []
        boundary = (first_line // epoch + 1) * epoch
        if first_line + n > boundary:
            k = boundary - first_line
            events = self._step(first_line, raw[:k], t_in - (n - k) / self.timing.line_rate_hz)
            self.air.end_epoch()
            return events + self._epochs(boundary, raw[k:], t_in)
        events = self._step(first_line, raw, t_in)
        if first_line + n == boundary:
            self.air.end_epoch()
        return events

    def _step(self, first_line: int, raw: np.ndarray, t_in: float) -> list[Event]:
        n = raw.shape[0]
        a, mask = self._buffers(n)
        t0 = time.perf_counter()
        c = self.counters
        expected = self._expected
        if expected is not None and first_line > expected:
            c.gaps += 1
            c.dropped_lines += first_line - expected
        self._expected = first_line + n
        # garbage lines (saturated, tube trip) never reach segmentation; a frozen module's
        # columns never hold a particle; the air level follows drift from empty belt
        raw = np.ascontiguousarray(raw)  # a recording's or the wire's lines already are: no copy
        health = self.health.check(raw, first_line)
        i0 = first_line & (self.ring_lines - 1)
        wraps = i0 + n > self.ring_lines
        if not wraps:
            a = self._ring[i0:i0 + n]  # straight into the ring (whole lines: a C-contiguous block)
        # attenuation, foreground, a frozen module's columns, the air tracker's sums: line by line
        self._normalize_lines(raw, health, a, mask, self.air.accumulators())
        if self.splice.screen(mask):
            self._take_out_splices(first_line, a, mask, health)
        # each line's own acquisition time (t_in is the chunk's last line): the wait for the
        # chunk to fill is part of a particle's latency, as the valves see it
        if wraps:
            idx = (first_line + np.arange(n)) & (self.ring_lines - 1)
            self._ring[idx] = a
            self._arrival[idx] = t_in - self._line_lag[-n:]
        else:
            self._arrival[i0:i0 + n] = t_in - self._line_lag[-n:]
        t1 = time.perf_counter()
        c.chunks += 1
        c.lines += n
        if health.bad_lines.any():
            # bad lines act as a gap: what was open comes out cut, and so does what starts
            # after (the segmenter sees lines missing before the next good run)
            done = Particles.concat([self.segmenter.push(first_line + start, mask[start:stop])
                                     for start, stop in good_runs(health.bad_lines)])
        else:
            done = self.segmenter.push(first_line, mask)
        st = self.stage_s
        st["normalize"] += t1 - t0
        st["segment"] += time.perf_counter() - t1
        done = _completion_order(done)
        events = self._decide(done) if len(done) else []
        if self._raw_ring is not None:
            self._keep_raw(first_line, raw, done, events)
        return events

    def _keep_raw(self, first_line: int, raw: np.ndarray, done: Particles, events: list[Event]) -> None:
        """--save-crops: the chunk's raw counts into the raw ring, then the sink's hand-off."""
        n = raw.shape[0]
        i0 = first_line & (self.ring_lines - 1)
        if i0 + n <= self.ring_lines:
            self._raw_ring[i0:i0 + n] = raw
        else:
            self._raw_ring[(first_line + np.arange(n)) & (self.ring_lines - 1)] = raw
        self.crop_sink.on_chunk(self._raw_ring, first_line + n - 1, done, events)

    def _normalize_lines(self, raw: np.ndarray, health: ChunkHealth, a: np.ndarray, mask: np.ndarray,
                         sums: AirSums) -> None:
        """The chunk through the fused line pass (:mod:`sorting.stages.linepass`)."""
        normalize_lines(raw, self._dark_flat, self.air.log_flat.reshape(-1), self._repair, self._det,
                        health.bad_cols, health.bad_lines, sums, a, mask)

    def _take_out_splices(self, first_line: int, a: np.ndarray, mask: np.ndarray, health: ChunkHealth) -> None:
        """Splice lines of the chunk (rare): the steel taken out of ``a``, the lines segmented
        again, and their former "empty belt" (steel) taken back out of the air tracker."""
        a0, m0 = a.copy(), mask.copy()
        done = self.splice.correct(a, mask, health.bad_lines, health.bad_cols)
        if not done.any():
            return
        self.air.retract(a0[done], m0[done], health.bad_cols)
        c = self.counters
        c.splice_lines, c.splices = self.splice.lines, self.splice.episodes
        starts, stops = runs(done)
        spans = self._splice_spans
        spans.extend((first_line + int(b), first_line + int(e) - 1) for b, e in zip(starts, stops))
        keep_from = first_line - self.ring_lines
        self._splice_spans = [sp for sp in spans if sp[1] >= keep_from]

    def finish(self) -> list[Event]:
        """End of stream: particles still open are cut (and, with feature workers, every chunk
        still out is waited for and decided)."""
        done = _completion_order(self.segmenter.flush())
        if self._pool is not None:
            self._steps += 1
            events = self._decide(done)
            self._chunk_ends()
            return events + self._drain(everything=True)
        events = self._decide(done)
        self._end_chunk()
        if self.crop_sink is not None:
            last = (self._expected or 0) - 1
            self.crop_sink.on_chunk(self._raw_ring, last, done, events)
            self.crop_sink.finish(self._raw_ring, last)
        return events

    def _end_chunk(self) -> None:
        """An episode of particle errors (one alarm) runs over consecutive chunks with a failed
        particle; a chunk whose particles all went through cleanly ends it (a chunk that
        completes no particle says nothing either way)."""
        if self._chunk_decided:
            if self._chunk_failed and not self._error_episode:
                self.counters.error_episodes += 1
            self._error_episode = self._chunk_failed
            self._chunk_failed = self._chunk_decided = False

    @property
    def alarms(self) -> dict[str, int]:
        """Alarms so far per kind: the line-health fault episodes and the particle-error episodes."""
        return {**self.health.episodes, ERROR_ALARM: self.counters.error_episodes}

    # ------------------------------------------------------------ the fail-safe fallbacks
    def _plan_each(self, ints: np.ndarray, err: list) -> tuple:
        """:func:`_chunk_plan` one particle at a time, after the chunk's batch raised. A particle
        whose plan raises gets no valve and an air window due when its last line has passed the
        scan line (it passes; its slack reads negative)."""
        n = ints.shape[0]
        lo, hi = np.zeros(n, np.int64), np.full(n, -1, np.int64)
        times = np.empty((4, n), np.float64)
        boxes = np.empty((n, 4), np.int64)
        for i in range(n):
            try:
                r = _chunk_plan(ints[i:i + 1], self._plan_p)
                lo[i], hi[i], times[:, i], boxes[i] = r[0][0], r[1][0], r[2][:, 0], r[3][0]
            except Exception as exc:  # noqa: BLE001 - this particle passes; the belt goes on
                err[i] = err[i] or f"planning: {type(exc).__name__}"
                line0, col0, line1, col1 = ints[i, :4].tolist()
                times[:3, i] = (line1 + 1) / self.timing.line_rate_hz  # (only its logged slack reads them)
                times[3, i] = np.inf  # never shed as undecided: it is not classified anyway
                boxes[i] = line0, col0, line1 - line0 + 1, col1 - col0 + 1
        return lo, hi, times, boxes

    def _features(self, boxes: np.ndarray, masks: list, out: np.ndarray, index: np.ndarray | None,
                  err: list | None, n: int) -> list | None:
        """``features_from_ring`` into ``out`` for the particles ``index`` (None: all) of the
        chunk; when the batch raises, one particle at a time (a particle computes alone in its
        box: the same numbers), a failing one left at zeros with its error. Returns ``err``."""
        pp, lp = self.timing.pixel_pitch_mm, self.line_pitch_mm
        try:
            features_from_ring(self._ring, boxes, masks, self.cal, pp, lp, out=out)
            return err
        except Exception:  # noqa: BLE001 - isolate the failing particle(s) below
            pass
        err = err if err is not None else [None] * n
        for j in range(boxes.shape[0]):
            try:
                features_from_ring(self._ring, boxes[j:j + 1], masks[j:j + 1], self.cal, pp, lp, out=out[j:j + 1])
            except Exception as exc:  # noqa: BLE001 - this particle passes; the belt goes on
                out[j] = 0.0
                i = j if index is None else int(index[j])
                err[i] = err[i] or f"features: {type(exc).__name__}"
        return err

    @staticmethod
    def _failed(err: list, undecided: np.ndarray | None) -> np.ndarray:
        """(n,) bool: the particles that failed (or, given ``undecided``, failed or were shed)."""
        failed = np.array([e is not None for e in err], bool)
        return failed if undecided is None else failed | undecided

    def _scores_each(self, x: np.ndarray, skip: np.ndarray | None, err: list) -> np.ndarray:
        """The model's scores one particle at a time, after the chunk's batch raised; a failing
        one scores 0 with its error."""
        scores = np.zeros(x.shape[0], np.float32)
        for i in range(x.shape[0]):
            if skip is not None and skip[i]:
                continue
            try:
                scores[i] = np.clip(self.model.scores_f32(x[i:i + 1]), 0.0, 1.0)[0]
            except Exception as exc:  # noqa: BLE001 - this particle passes; the belt goes on
                err[i] = err[i] or f"inference: {type(exc).__name__}"
        return scores

    # ------------------------------------------------------------ decisions
    def _decide(self, done: Particles) -> list[Event]:
        """A chunk's completed particles: planned (:meth:`_prepare`), classified
        (:meth:`classify`: features, scores, tramp) and decided (:meth:`_finish`); with feature
        workers attached (:meth:`attach`), classified by a worker while the loop goes on, and
        decided in stream order when their scores are back."""
        job = self._prepare(done)
        if self._pool is None:
            return self._finish(job, self.classify(job.request))
        return self._queue(job)

    def _prepare(self, done: Particles) -> ChunkJob:
        """Everything of a chunk's decisions that reads the stream's state as it stands now
        (the plan, the overload shedding, line health, splices), and the request to classify it."""
        t0 = time.perf_counter()
        n = len(done)
        # per particle: first line, first column, last line, last column, area (px); centroid line, column
        # (column by column into fresh arrays: a third of np.stack's cost at a handful of particles)
        ints = np.empty((n, 5), np.int64)
        ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3], ints[:, 4] = (done.line0, done.col0, done.line1, done.col1,
                                                                      done.area_px)
        cents = np.empty((n, 2), np.float64)
        cents[:, 0], cents[:, 1] = done.centroid_line, done.centroid_px
        # per particle, once one's own processing has raised: "stage: ExceptionType" or None;
        # None as a whole on the common path (each stage below runs on the chunk's batch and
        # goes one particle at a time only when that raises)
        err = list(done.errors) if done.failed else None
        # the valve plan, and each box (first line, first column, height, width) in the ring
        try:
            lo, hi, times, boxes = _chunk_plan(ints, self._plan_p)
        except Exception:  # noqa: BLE001 - isolate the failing particle(s)
            err = err if err is not None else [None] * n
            lo, hi, times, boxes = self._plan_each(ints, err)
        # overload: a particle whose command is already due cannot be ejected any more;
        # it is not classified (that time goes to the particles still in time), passes and is
        # logged late and undecided
        undecided = None
        if self.shed_late:
            age_ms = (t0 - self._arrival[ints[:, 2] & (self.ring_lines - 1)]) * 1000.0
            # deciding this chunk's particles takes about n times the running cost of one
            busy_ms = SHED_MARGIN_MS + self._cost_ms * n
            shed = age_ms + busy_ms > times[3]
            if shed.any():
                undecided = shed
        on_splice = [False] * n
        if self._splice_spans and n and self._splice_spans[-1][1] >= int(ints[:, 0].min()):
            sp = np.array(self._splice_spans, np.int64)
            on_splice = ((sp[None, :, 0] <= ints[:, 2:3]) & (sp[None, :, 1] >= ints[:, 0:1])).any(axis=1).tolist()
        # next to a frozen detector module a particle may be mis-read (it passes); none can be
        # when no column froze since the chunk's earliest particle began
        last_bad = self.health.last_bad_line
        suspect = [False] * n
        if n > 0 and last_bad >= 0 and last_bad >= int(ints[:, 0].min()):
            suspect = [self.health.suspect(*box) for box in zip(done.line0.tolist(), done.line1.tolist(),
                                                                  done.col0.tolist(), done.col1.tolist())]
        judge = ~done.too_long
        request = (boxes, done.masks, err, undecided, judge)
        return ChunkJob(done, ints, cents, lo, hi, times, request, on_splice, suspect, time.perf_counter() - t0)

    def classify(self, request: tuple) -> tuple:
        """Features, scores and the tramp check of one chunk's particles (``request`` from
        :meth:`_prepare`: boxes, masks, errors so far, shed particles, particles the tramp check
        may judge), from the ring. Returns (scores with failed, shed and tramp particles at 0,
        tramp flags, errors, features seconds, particles featured, scores-and-tramp seconds).
        A feature worker runs this on its read-only view of the ring."""
        boxes, masks, err, undecided, judge = request
        n = boxes.shape[0]
        if n > self._x.shape[0]:
            self._x = np.empty((2 * n, self._x.shape[1]), np.float32)
        x = self._x[:n]
        t0 = time.perf_counter()
        # not classified: shed (overload) or failed
        skip = undecided
        if err is not None:
            skip = self._failed(err, undecided)
        n_skip = int(np.count_nonzero(skip)) if skip is not None else 0
        # every particle of the chunk in one pass (the same kernel as training), its box read
        # from the ring
        if n_skip:
            x[skip] = 0.0
            keep = np.flatnonzero(~skip)
            if keep.size:
                xk = np.empty((keep.size, x.shape[1]), np.float32)
                err = self._features(boxes[keep], [masks[i] for i in keep], xk, keep, err, n)
                x[keep] = xk
        elif n:
            err = self._features(boxes, masks, x, None, err, n)
        t1 = time.perf_counter()
        if n:
            try:
                scores = np.clip(self.model.scores_f32(x), 0.0, 1.0)
            except Exception:  # noqa: BLE001 - isolate the failing particle(s)
                err = err if err is not None else [None] * n
                scores = self._scores_each(x, self._failed(err, undecided), err)
        else:
            scores = np.zeros(0, np.float32)
        # tramp metal: the sorter's setting decides, never the model (its score is not used)
        if undecided is not None:
            judge = judge & ~undecided
        if err is not None:
            judge = judge & ~self._failed(err, None)
        try:
            tramp = self.tramp.find(self._ring, boxes, masks, x, use=judge)
        except Exception as exc:  # noqa: BLE001 - the particles it judged pass, with the error
            err = err if err is not None else [None] * n
            for i in np.flatnonzero(judge).tolist():
                err[i] = err[i] or f"tramp: {type(exc).__name__}"
            tramp = np.zeros(n, bool)
        skip = None
        if err is not None:
            skip = self._failed(err, undecided)
        elif undecided is not None:
            skip = undecided
        if skip is not None:
            scores[skip] = 0.0
        if tramp.any():
            scores[tramp] = 0.0
        return scores, tramp, err, t1 - t0, n - n_skip, time.perf_counter() - t1

    def _finish(self, job: ChunkJob, result: tuple) -> list[Event]:
        """The chunk's decisions and events from its classification (:meth:`classify`)."""
        scores, tramp, err, feat_s, n_featured, cls_s = result
        done, lo, hi, times = job.done, job.lo, job.hi, job.times
        undecided = job.request[3]
        n = len(done)
        if n_featured:
            self._cost_ms += 0.1 * ((job.prepare_s + feat_s) * 1000.0 / n_featured - self._cost_ms)
        n_tramp = int(np.count_nonzero(tramp))
        failed = self._failed(err, None) if err is not None else None
        t2 = time.perf_counter()
        is_sc = scores >= self.threshold
        eject = is_sc if self.eject_sc else ~is_sc
        if n_tramp:
            is_sc[tramp] = False
            eject[tramp] = self.eject_tramp
        if failed is not None:
            eject = eject & ~failed  # a particle whose own processing raised passes
        t_out = time.perf_counter()
        px_area = self.timing.pixel_pitch_mm * self.line_pitch_mm
        c = self.counters
        # Python scalars once per chunk, not numpy scalars per particle and field; rounded for
        # the log once per chunk (decisions use the unrounded numbers)
        numbers = _chunk_numbers(job.ints, job.cents, scores, times, self._arrival, self.ring_lines - 1, t_out,
                                 self.sorter.ejector.response_ms / 1000.0, self.timing.line_rate_hz, px_area,
                                 _LOG_SCALE)
        rounded = zip(*numbers[:N_LOGGED].tolist())
        slack_l = numbers[N_LOGGED + 1].tolist()
        eject_l, sc_l = eject.tolist(), is_sc.tolist()
        und_l = undecided.tolist() if undecided is not None else [False] * n
        lo_l, hi_l = lo.tolist(), hi.tolist()
        tramp_l = tramp.tolist()
        on_splice, suspect_l = job.on_splice, job.suspect
        err_l = err if err is not None else [None] * n
        cap = self.max_valves
        first = self._next_id
        self._next_id += n
        events = []
        for i, (line0, line1, col0, col1, cut, too_long, split_, border, r) in enumerate(zip(
                done.line0.tolist(), done.line1.tolist(), done.col0.tolist(), done.col1.tolist(), done.cut.tolist(),
                done.too_long.tolist(), done.split.tolist(), done.touches_border.tolist(), rounded)):
            # a particle cut by a gap or the end of stream may be a fragment: it passes, logged
            suspect = suspect_l[i]
            und = und_l[i]
            n_valves = hi_l[i] - lo_l[i] + 1
            wanted = eject_l[i] and not cut and not too_long and not suspect and not und and n_valves >= 1
            # the air cap: an eject that needs more valves than the sorter allows passes
            over = wanted and n_valves > cap
            fire = wanted and not over
            # no command in time: negative slack, or left undecided
            late = slack_l[i] < 0 or und
            events.append(Event(
                first + i, line0, line1, col0, col1, r[0], r[1], r[2], r[3],
                "eject" if fire else "pass",
                list(range(lo_l[i], hi_l[i] + 1)) if fire else [],
                r[4] if fire else None, r[5] if fire else None, r[6], r[7], late,
                "sc" if sc_l[i] else "waste", cut, too_long, split_, border, suspect, und,
                "tramp" if tramp_l[i] else "rock", over, on_splice[i], err_l[i]))
            c.over_cap += over
            if fire:
                c.ejected += 1
                c.late_ejects += late
            else:
                c.passed += 1
                c.undecided += und
        if failed is not None:
            k = int(np.count_nonzero(failed))
            c.particle_errors += k
            self._chunk_failed |= k > 0
        self._chunk_decided |= n > 0
        c.particles += n
        c.tramp += n_tramp
        c.latency.add_many(numbers[N_LOGGED])
        c.cut += int(np.count_nonzero(done.cut))
        c.too_long += int(np.count_nonzero(done.too_long))
        st = self.stage_s
        st["features"] += job.prepare_s + feat_s
        st["classify"] += cls_s
        st["decide"] += time.perf_counter() - t2
        return events
