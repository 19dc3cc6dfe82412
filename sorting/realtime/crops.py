"""``sorting run --save-crops``: the running sorter keeps crops of the particles it decided, as an
``xrt-rocks/1`` dataset (docs/formats.md), so that a sample of them can go to the laboratory.

The loop only hands off. When saving is on, the pipeline keeps a ring of the raw counts next to
its attenuation ring (:class:`~sorting.realtime.stream.Pipeline`, ``keep_raw``) and calls
:meth:`CropSaver.on_chunk` once per chunk. A chosen particle (every N-th decided particle) waits
there until :data:`MARGIN_PX` lines of belt after it have arrived, then its box plus the margin
is copied out of the raw ring (one small array copy) and put on a bounded queue. A writer
thread does everything else: it checks the crop under the ``xrt-rocks/1`` rules with the
batch path's own code (:func:`sorting.stages.crops.cut_crop`: one whole rock, at least 4 px of
empty belt on every side, no part of another object, and the batch segmentation finds exactly
this rock), encodes the TIFF and writes it. When the writer falls behind, the queue is full and
the crop is dropped and counted (``dropped``): the loop never waits on the disk.

A particle that cannot give a valid crop is skipped and counted by reason (``skipped``): at the
belt edge or cut by the start/end of the stream or a gap, split off a touching rock, another
object within 4 px, too long, tramp metal, on a belt splice, undecided (overload) or failed.
Counts are never invented: nothing is zeroed out of a crop to make it fit the rules.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorting.errors import InputError
from sorting.io import RockDatasetWriter, RockRow
from sorting.stages.crops import CROP_MARGIN_PX, MIN_MARGIN_PX, cut_crop

if TYPE_CHECKING:
    from sorting.io import CalibrationScans
    from sorting.realtime.events import Event
    from sorting.stages.calibrate import Calibration
    from sorting.stages.particles import Particle, Particles, SegmentConfig

#: belt lines and columns kept around a particle's box when the belt is free that far
MARGIN_PX = CROP_MARGIN_PX
#: crops waiting for the writer; more are dropped (and counted)
QUEUE_CROPS = 256


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
    """

    def __init__(self, root: Path, scans: CalibrationScans, cal: Calibration, pixel_pitch_mm: float,
                 line_pitch_mm: float, seg: SegmentConfig, every: int = 1, queue_crops: int = QUEUE_CROPS,
                 meta: dict | None = None, wait: bool = False):
        if every < 1:
            raise ValueError(f"--save-every must be >= 1, got {every}")
        self.root = Path(root)
        self.every = int(every)
        self.wait = bool(wait)
        self.cal, self.seg = cal, seg
        self.pp, self.lp = float(pixel_pitch_mm), float(line_pitch_mm)
        self.pixels = cal.pixels
        self.writer = RockDatasetWriter(self.root, {"pixel_pitch_mm": self.pp, "line_pitch_mm": self.lp,
                                                    **(meta or {})}, scans, extra_columns=("first_line",))
        self._pending: list[tuple[int, Particle]] = []  # (particle number, particle) waiting for margin
        self._queue: queue.Queue = queue.Queue(maxsize=queue_crops)
        self.handed = 0  # crops put on the queue
        self.dropped = 0  # ... not: the queue was full (the writer fell behind)
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.write_errors = 0
        self._lock = threading.Lock()  # written/skipped are updated by the writer thread
        self._thread = threading.Thread(target=self._work, name="crop-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ loop side
    def on_chunk(self, ring: np.ndarray, last_line: int, done: Particles, events: list[Event]) -> None:
        """Called by the loop once per chunk with its raw ring, the last stream line in it and the
        chunk's completed particles with their events (same order). Only hands off."""
        every = self.every
        for i, ev in enumerate(events):
            pid = ev.particle
            if pid % every:
                continue
            why = self._not_decided(ev)
            if why is not None:
                self._skip(why)
                continue
            self._pending.append((pid, done[i]))
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

    def _hand_off(self, ring: np.ndarray, last_line: int, final: bool) -> None:
        r = ring.shape[0]
        keep = []
        for pid, p in self._pending:
            if not final and p.line1 + MARGIN_PX > last_line:
                keep.append((pid, p))
                continue
            r0 = max(p.line0 - MARGIN_PX, 0, last_line - r + 1)
            r1 = min(p.line1 + MARGIN_PX, last_line)
            c0, c1 = max(p.col0 - MARGIN_PX, 0), min(p.col1 + MARGIN_PX, ring.shape[1] - 1)
            if r0 > p.line0:
                self._skip("overwritten in the ring before its margin arrived")
                continue
            rows = np.arange(r0, r1 + 1) & (r - 1)
            window = ring[rows, c0:c1 + 1]  # a copy (fancy index): the ring may now move on
            try:
                self._queue.put((pid, p, window, r0, c0), block=self.wait)
                self.handed += 1
            except queue.Full:
                self.dropped += 1
        self._pending = keep

    def _skip(self, why: str) -> None:
        with self._lock:
            self.skipped[why] += 1

    # ------------------------------------------------------------ writer thread
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pid, p, window, r0, c0 = item
            try:
                self._write_one(pid, p, window, r0, c0)
            except Exception as exc:  # noqa: BLE001 - one bad crop never stops the saving (nor the belt)
                with self._lock:
                    self.write_errors += 1
                    self.skipped[f"write error: {type(exc).__name__}"] += 1

    def _write_one(self, pid: int, p: Particle, window: np.ndarray, r0: int, c0: int) -> None:
        local = p._replace(line0=p.line0 - r0, line1=p.line1 - r0, col0=p.col0 - c0, col1=p.col1 - c0)
        # the window's edges are the margin, the detector edges or the stream's start/end: the
        # batch path's own rules decide (at least MIN_MARGIN_PX of free belt, grown to MARGIN_PX)
        crop, problem = cut_crop(window, self.cal, local, self.pp, self.lp, self.seg, margin_px=MARGIN_PX,
                                 min_margin_px=MIN_MARGIN_PX, x0=c0, first_line=r0)
        if crop is None:
            self._skip(_reason(problem))
            return
        row = RockRow(rock_id=str(pid), file=f"rocks/particle_{pid:07d}.tiff", x0=crop.x0, label=None,
                      sc2o3_ppm=None, mass_g=None, split=None, extra={"first_line": str(crop.first_line)})
        self.writer.add(row, crop.counts)
        with self._lock:
            self.written += 1

    def close(self) -> dict:
        """Let the writer finish the queue, write rocks.csv and dataset.json; returns the counts."""
        self._queue.put(None)
        self._thread.join()
        self.writer.close()
        return self.summary()

    def summary(self) -> dict:
        with self._lock:
            skipped = dict(self.skipped)
            written = self.written
        return {"dir": str(self.root), "every": self.every, "written": written, "dropped": self.dropped,
                "crops_skipped": sum(skipped.values()), "skipped": skipped}


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
    ring and hands each chunk's decided particles over. ``wait``: see :class:`CropSaver`
    (unpaced replays only)."""
    saver = CropSaver(root, scans, pipeline.cal, pipeline.timing.pixel_pitch_mm, pipeline.line_pitch_mm,
                      pipeline.seg, every, queue_crops, wait=wait)
    pipeline.attach_crop_sink(saver)
    return saver
