"""``sorting run --save-crops``: the running sorter keeps crops of the particles it decided, as an
``xrt-rocks/1`` dataset (docs/formats.md), so that a sample of them can go to the laboratory.

The loop only hands off. When saving is on, the pipeline keeps a ring of the raw counts next to
its attenuation ring (:class:`~sorting.realtime.stream.Pipeline`, ``keep_raw``) and calls
:meth:`CropSaver.on_chunk` once per chunk. A chosen particle (every N-th decided particle) waits
there until :data:`MARGIN_PX` lines of belt after it have arrived, then its box plus the margin
is copied out of the raw ring (one small array copy), with the air level the loop normalized
those lines with, and put on a bounded queue to a **writer process**. The writer does
everything else: it checks the crop under the ``xrt-rocks/1`` rules with the batch path's own
code (:func:`sorting.stages.crops.cut_crop`: one whole rock, at least 4 px of empty belt on
every side, no part of another object, and the batch segmentation finds exactly this rock),
encodes the TIFFs and writes them. It is a separate process, so its Python and its encoding
never hold the loop's interpreter lock. When the writer falls behind, the queue is full and the
crop is dropped and counted (``dropped``): the loop never waits on the writer or the disk.

**The air level.** The loop normalizes each line with the air (flat-field) level it tracks on
empty belt (:class:`~sorting.stages.air.AirTracker`), which moves once per epoch of
``epoch_lines`` stream lines; the calibration's own level is only where it starts. A crop is
saved with the level each of its pixels was normalized with (``air_file``: ln(air - dark), one
float32 per pixel and channel), and the batch path (``sorting predict``, ``train``, ...)
normalizes the crop with it when present: the same counts and the same level give the same
attenuation, mask and features as on the belt. The saver keeps a copy of the level of each
epoch still in the ring: :meth:`on_chunk` is called once per slice of lines the loop
normalized, before the tracker ends that slice's epoch, so the level it reads then is the one
those lines were normalized with.

A particle that cannot give a valid crop is skipped and counted by reason (``skipped``): at the
belt edge or cut by the start/end of the stream or a gap, split off a touching rock, another
object within 4 px, too long, tramp metal, on a belt splice, undecided (overload) or failed.
Counts are never invented: nothing is zeroed out of a crop to make it fit the rules.

The writer process is forked when saving starts, ignores the terminal's stop signals (the loop
owns shutdown), and ends with the loop's process: when that goes away, however it goes, the
writer lists what it wrote (rocks.csv, dataset.json) and exits. A writer that dies is noticed at
the next hand-off, reported once on stderr and in the summary (``writer_error``); the loop goes
on without it. :meth:`CropSaver.close` hands over the end of the stream and waits for the
writer to write every crop handed off; rocks.csv and dataset.json are each written whole and
renamed into place.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorting.errors import InputError
from sorting.io import AIR_COLUMN, RockDatasetWriter, RockRow
from sorting.realtime.runner import opencv_threads
from sorting.stages.crops import CROP_MARGIN_PX, MIN_MARGIN_PX, cut_crop

if TYPE_CHECKING:
    from sorting.io import CalibrationScans
    from sorting.realtime.events import Event
    from sorting.stages.air import AirTracker
    from sorting.stages.calibrate import Calibration
    from sorting.stages.particles import Particle, Particles, SegmentConfig

#: belt lines and columns kept around a particle's box when the belt is free that far
MARGIN_PX = CROP_MARGIN_PX
#: crops waiting for the writer; more are dropped (and counted)
QUEUE_CROPS = 256
#: how often an idle writer looks whether the loop's process is still there
PARENT_CHECK_S = 0.5
#: longest wait for a live writer to finish at close (then it is killed and reported)
CLOSE_TIMEOUT_S = 300.0


def check_save_dir(path: Path, option: str = "--save-crops") -> None:
    """The dataset folder must be new or empty (a half-overwritten dataset would mix two runs)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise InputError(option, f"{path} exists and is not a folder")
        if any(path.iterdir()):
            raise InputError(option, f"{path} exists and is not empty")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(option, f"cannot create {path} ({exc.strerror})") from None


class CropSaver:
    """Keeps crops of decided particles; see the module docstring.

    ``every``: keep every N-th decided particle (by its ``particle`` number: 0, N, 2N, ...).
    ``queue_crops``: the hand-off queue's length (a full queue drops the crop).
    ``wait``: a full queue makes the loop wait for the writer instead of dropping the crop;
    only for a replay run as fast as possible (no line rate to keep up with, no valve due).
    ``air``: the loop's air tracker (its level is saved with each crop); None: the lines were
    normalized with the calibration's level, and the crops carry none.
    """

    def __init__(self, root: Path, scans: CalibrationScans, cal: Calibration, pixel_pitch_mm: float,
                 line_pitch_mm: float, seg: SegmentConfig, every: int = 1, queue_crops: int = QUEUE_CROPS,
                 meta: dict | None = None, wait: bool = False, air: AirTracker | None = None):
        if every < 1:
            raise ValueError(f"--save-every must be >= 1, got {every}")
        self.root = Path(root)
        self.every = int(every)
        self.wait = bool(wait)
        self.pixels = cal.pixels
        self.air = air
        self.epoch_lines = air.epoch_lines if air is not None else 0
        self._levels: dict[int, np.ndarray] = {}  # epoch -> the tracked ln(air - dark) (P, 2) its lines had
        extra = ("first_line", AIR_COLUMN) if air is not None else ("first_line",)
        # the folder and its calibration/ now, before the belt starts; the rows in the writer
        writer = RockDatasetWriter(self.root, {"pixel_pitch_mm": float(pixel_pitch_mm),
                                               "line_pitch_mm": float(line_pitch_mm), **(meta or {})}, scans,
                                   extra_columns=extra)
        self._pending: list[tuple[int, Particle]] = []  # (particle number, particle) waiting for margin
        self.handed = 0  # crops put on the queue
        self.dropped = 0  # ... not: the queue was full (the writer fell behind)
        self.skipped: Counter[str] = Counter()  # the loop side's reasons; the writer counts its own
        self.writer_error: str | None = None
        self._result: dict | None = None
        self._closed = False
        ctx = mp.get_context("fork")
        self._queue = ctx.Queue(maxsize=int(queue_crops))
        here, there = ctx.Pipe(duplex=False)
        # a forked child inherits OpenCV's thread pool but not its threads (see realtime.parallel)
        with opencv_threads(1):
            self._proc = ctx.Process(target=_writer_main, name="crop-writer", daemon=True,
                                     args=(self._queue, there, writer, cal, float(pixel_pitch_mm),
                                           float(line_pitch_mm), seg, self.epoch_lines, os.getpid()))
            self._proc.start()
        there.close()
        self._conn = here

    # ------------------------------------------------------------ loop side
    def on_chunk(self, ring: np.ndarray, last_line: int, done: Particles, events: list[Event]) -> None:
        """Called by the loop once per chunk with its raw ring, the last stream line in it and the
        chunk's completed particles with their events (same order). Only hands off."""
        if self.air is not None:
            e = last_line // self.epoch_lines
            if e not in self._levels:  # the first call of an epoch: the level its lines are normalized with
                self._levels[e] = self.air.log_flat.copy()
                oldest = (last_line - ring.shape[0]) // self.epoch_lines
                for k in [k for k in self._levels if k < oldest]:
                    del self._levels[k]
        every = self.every
        for i, ev in enumerate(events):
            pid = ev.particle
            if pid % every:
                continue
            why = self._not_decided(ev)
            if why is not None:
                self.skipped[why] += 1
                continue
            self._pending.append((pid, done[i]))  # a Particle: a picklable tuple
        if self._pending:
            self._hand_off(ring, last_line, final=False)

    def finish(self, ring: np.ndarray, last_line: int) -> None:
        """End of stream: hand off what is still waiting for its margin (with what belt there is)."""
        if self._pending:
            self._hand_off(ring, last_line, final=True)

    @staticmethod
    def _not_decided(ev: Event) -> str | None:
        if ev.error:
            return "its own processing failed"
        if ev.undecided:
            return "undecided (overload)"
        if ev.kind == "tramp":
            return "tramp metal"
        if ev.splice:
            return "on a belt splice"
        return None

    def _writer_alive(self) -> bool:
        if self.writer_error is not None:
            return False
        code = self._proc.exitcode  # one waitpid(WNOHANG)
        if code is None:
            return True
        self.writer_error = f"the crop writer process died (exit code {code})"
        sys.stderr.write(f"sorting run: --save-crops: {self.writer_error}; crops are no longer saved\n")
        return False

    def _hand_off(self, ring: np.ndarray, last_line: int, final: bool) -> None:
        r = ring.shape[0]
        keep = []
        alive = self._writer_alive()
        for pid, p in self._pending:
            if not final and p.line1 + MARGIN_PX > last_line:
                keep.append((pid, p))
                continue
            if not alive:
                self.skipped["the writer process died"] += 1
                continue
            r0 = max(p.line0 - MARGIN_PX, 0, last_line - r + 1)
            r1 = min(p.line1 + MARGIN_PX, last_line)
            c0, c1 = max(p.col0 - MARGIN_PX, 0), min(p.col1 + MARGIN_PX, ring.shape[1] - 1)
            if r0 > p.line0:
                self.skipped["overwritten in the ring before its margin arrived"] += 1
                continue
            levels = None
            if self.air is not None:
                epochs = range(r0 // self.epoch_lines, r1 // self.epoch_lines + 1)
                if any(e not in self._levels for e in epochs):
                    self.skipped["no air level kept for its lines"] += 1
                    continue
                # (k, w, 2): one row per epoch the window spans (the writer expands it per line)
                levels = np.stack([self._levels[e][c0:c1 + 1] for e in epochs])
            rows = np.arange(r0, r1 + 1) & (r - 1)
            window = ring[rows, c0:c1 + 1]  # a copy (fancy index): the ring may now move on
            local = p._replace(line0=p.line0 - r0, line1=p.line1 - r0, col0=p.col0 - c0, col1=p.col1 - c0)
            if self._put((pid, local, window, levels, r0, c0)):
                self.handed += 1
            else:
                self.dropped += 1
        self._pending = keep

    def _put(self, item) -> bool:
        if not self.wait:
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                return False
        while True:  # an unpaced replay waits for the writer, while there is one
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                if not self._writer_alive():
                    return False

    # ------------------------------------------------------------ shutdown
    def close(self) -> dict:
        """Hand over the end of the stream and wait for the writer to write every crop handed off,
        rocks.csv and dataset.json; returns the counts. A dead writer is reported, not waited for."""
        if self._closed:
            return self.summary()
        self._closed = True
        t0 = time.monotonic()
        while self._writer_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                if time.monotonic() - t0 > CLOSE_TIMEOUT_S:
                    break
        while self._result is None and self.writer_error is None:
            if self._conn.poll(0.2):
                try:
                    tag, payload = self._conn.recv()
                except (EOFError, OSError):  # its end closed without a word: it has gone or is going
                    self._proc.join(5.0)
                    if self._writer_alive():
                        self._proc.kill()
                        self._proc.join()
                    if self.writer_error is None:
                        self._writer_alive()
                    break
                if tag == "done":
                    self._result = payload
                else:
                    self.writer_error = f"the crop writer failed: {payload}"
            elif not self._writer_alive():
                break
            elif time.monotonic() - t0 > CLOSE_TIMEOUT_S:
                self._proc.kill()
                self.writer_error = f"the crop writer did not finish within {CLOSE_TIMEOUT_S:g} s (killed)"
        self._proc.join(5.0)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
        if self._result is None:
            self._queue.cancel_join_thread()  # nobody reads what is left: do not wait to flush it
        self._queue.close()
        self._conn.close()
        return self.summary()

    def summary(self) -> dict:
        res = self._result or {"written": 0, "skipped": {}}
        skipped = Counter(self.skipped)
        skipped.update(res["skipped"])
        out = {"dir": str(self.root), "every": self.every, "written": res["written"], "dropped": self.dropped,
               "crops_skipped": sum(skipped.values()), "skipped": dict(skipped), "handed": self.handed}
        if self.writer_error is not None:
            out["writer_error"] = self.writer_error
        return out


# ---------------------------------------------------------------- the writer process
def _writer_main(q, conn, writer: RockDatasetWriter, cal: Calibration, pp: float, lp: float, seg: SegmentConfig,
                 epoch_lines: int, parent: int) -> None:
    """The writer process: crops from ``q`` until None (or the loop's process is gone), then
    rocks.csv and dataset.json, and ``("done", counts)`` on ``conn``."""
    # a stop signal (Ctrl-C to the terminal's process group, a supervisor's SIGTERM) is the
    # loop's: it stops after its chunk and then closes the saver, which needs this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the queue's sending end came along with the fork: closed here, a message the loop's
    # process left half-written when it died reads as the end of the pipe instead of a wait
    # for bytes that will never come (the loop's process holds the only other copy)
    q._writer.close()
    _lowest_priority()
    import cv2

    cv2.setNumThreads(1)
    written = 0
    skipped: Counter[str] = Counter()
    try:
        while True:
            try:
                item = q.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                if os.getppid() != parent:
                    break  # the loop's process is gone: list what was written, and go
                continue
            except (EOFError, OSError, ValueError):
                break  # the loop's end of the queue broke (its process died mid-message)
            if item is None:
                break
            try:
                problem = _write_one(writer, cal, pp, lp, seg, epoch_lines, *item)
            except Exception as exc:  # noqa: BLE001 - one bad crop never stops the saving (nor the belt)
                problem = f"write error: {type(exc).__name__}"
            if problem is None:
                written += 1
            else:
                skipped[problem] += 1
        writer.close()
        conn.send(("done", {"written": written, "skipped": dict(skipped)}))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the loop's process
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise


def _lowest_priority() -> None:
    """The writer runs only on CPU time nobody else wants (Linux SCHED_IDLE; elsewhere the
    highest nice value): on a busy machine it falls behind and crops are dropped, rather than
    taking a core from the loop."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass


def _write_one(writer: RockDatasetWriter, cal: Calibration, pp: float, lp: float, seg: SegmentConfig,
               epoch_lines: int, pid: int, p: Particle, window: np.ndarray, levels: np.ndarray | None, r0: int,
               c0: int) -> str | None:
    """One handed-off window: its crop checked and written; None, or why it was left out."""
    log_flat = None
    if levels is not None:
        # each window line's epoch -> that epoch's level (the first epoch is r0's)
        idx = (r0 + np.arange(window.shape[0])) // epoch_lines - r0 // epoch_lines
        log_flat = levels[idx]
    # the window's edges are the margin, the detector edges or the stream's start/end: the
    # batch path's own rules decide (at least MIN_MARGIN_PX of free belt, grown to MARGIN_PX)
    crop, problem = cut_crop(window, cal, p, pp, lp, seg, margin_px=MARGIN_PX, min_margin_px=MIN_MARGIN_PX, x0=c0,
                             first_line=r0, log_flat=log_flat)
    if crop is None:
        return _reason(problem)
    extra = {"first_line": str(crop.first_line)}
    if crop.air is not None:
        extra[AIR_COLUMN] = f"air/particle_{pid:07d}.tiff"
    row = RockRow(rock_id=str(pid), file=f"rocks/particle_{pid:07d}.tiff", x0=crop.x0, label=None,
                  sc2o3_ppm=None, mass_g=None, split=None, extra=extra)
    writer.add(row, crop.counts, crop.air)
    return None


def _reason(problem: str) -> str:
    """cut_crop's reason, in the stream's words (the window's edge is the detector's or the stream's)."""
    if problem.startswith("less than"):
        return f"less than {MIN_MARGIN_PX} px of belt to the detector edge or the stream's start or end"
    if problem.startswith("cut by"):
        return "cut by the start or end of the stream or a gap"
    return problem


def start_saving(pipeline, root: Path, scans: CalibrationScans, every: int = 1,
                 queue_crops: int = QUEUE_CROPS, wait: bool = False) -> CropSaver:
    """A :class:`CropSaver` for ``pipeline``, attached to it: the pipeline starts keeping its raw
    ring and hands each chunk's decided particles over, and each crop carries the air level the
    pipeline's tracker normalized it with. ``wait``: see :class:`CropSaver` (unpaced replays only)."""
    saver = CropSaver(root, scans, pipeline.cal, pipeline.timing.pixel_pitch_mm, pipeline.line_pitch_mm,
                      pipeline.seg, every, queue_crops, wait=wait, air=pipeline.air)
    pipeline.attach_crop_sink(saver)
    return saver
