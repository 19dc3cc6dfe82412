"""``sorting run --save-crops``: the running sorter keeps crops of the particles it decided, as an
``xrt-rocks/1`` dataset (docs/formats.md), so that a sample of them can go to the laboratory.

The loop only hands off. When saving is on, the pipeline keeps a ring of the raw counts next to
its attenuation ring (:class:`~sorting.realtime.stream.Pipeline`, ``keep_raw``) and calls
:meth:`CropSaver.on_chunk` once per chunk. A chosen particle (every N-th decided particle) waits
there until :data:`MARGIN_PX` lines of belt after it have arrived, then its box plus the margin
is copied out of the raw ring, with the air level the loop normalized those lines with and the
particle's mask, and handed to a **writer process**. The writer does everything else: it checks
the crop under the ``xrt-rocks/1`` rules with the batch path's own code
(:func:`sorting.stages.crops.cut_crop`: one whole rock, at least 4 px of empty belt on every
side, no part of another object, and the batch segmentation finds exactly this rock), encodes
the TIFFs and writes them. It is a separate process, so its Python and its encoding never hold
the loop's interpreter lock.

**The hand-off** costs the loop a copy of each window (its air levels and mask with it) and one
system call per chunk, and nothing of it runs in the loop's process afterwards. The window is
copied straight from the raw ring into an *arena*: anonymous shared memory (a memfd, every page
touched before the belt starts), used as a ring whose crops are taken out in the order they went
in (:class:`_ArenaRing`). Each crop's place there and its particle go in a fixed 120-byte header;
a hand-off's headers go down a non-blocking pipe in one write (at most ``PIPE_BUF`` bytes a
write, so each is whole or not at all). The writer copies each crop out of the arena and sends
back a one-byte receipt, which frees its room; the loop reads the receipts (one non-blocking
read) only when the arena looks full. At most ``queue_crops`` crops wait at once. When the
writer falls behind, there is no room and the crop is dropped and counted (``dropped``): the
loop never waits on the writer or the disk.

**The writer is not a fork of the loop.** A forked child shares every page of the loop's memory
copy-on-write: each page the loop writes afterwards (its rings, its heap) first takes a page
fault and a copy, 2 MB at once for the rings' huge pages, and on the reference belt that was
17,000 more page faults in 20 s and a step p99.9 twice as long, with the child doing nothing.
The writer is a fresh interpreter (``python -m sorting.realtime.crop_writer``) in its own process
group, handed its arguments pickled on its stdin and the arena and its pipe ends as descriptors;
it drops to the lowest priority as soon as it has read them. Its start-up (imports, arguments)
happens while saving starts, before the belt: the arguments (the calibration among them, some
megabytes) are more than a pipe holds, so the saver's write of them waits until the writer has
read them. (Before, a forked writer took the crops
from a ``multiprocessing.Queue``, whose feeder *thread* pickled each crop in the loop's process,
1.3 s of CPU in 20 s and thousands of preemptions of the loop: docs/performance.md.)

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

The writer process is started when saving starts, ignores the terminal's stop signals (the loop
owns shutdown), and ends with the loop's process: when that goes away, however it goes, the
header pipe reads as ended (the writer holds no copy of its sending end) and the writer writes
the crops whose headers came, lists what it wrote (rocks.csv, dataset.json) and exits. A writer
that dies is noticed at the next hand-off (its exit status, or the pipe it no longer reads),
reported once on stderr and in the summary (``writer_error``); the loop goes on without it.
:meth:`CropSaver.close` hands over the end of the stream and waits for the writer to write every
crop handed off; rocks.csv and dataset.json are each written whole and renamed into place.
An unpaced replay (``wait``) waits for room in the arena instead of dropping a crop.
"""
from __future__ import annotations

import mmap
import os
import select
import sys
import time
from collections import Counter, deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorting.errors import InputError
from sorting.io import AIR_COLUMN, RockDatasetWriter
from sorting.realtime.crop_writer import END_OF_STREAM, HEADER, MARGIN_PX

if TYPE_CHECKING:
    from sorting.io import CalibrationScans
    from sorting.realtime.events import Event
    from sorting.stages.air import AirTracker
    from sorting.stages.calibrate import Calibration
    from sorting.stages.particles import Particle, Particles, SegmentConfig

#: crops waiting for the writer; more are dropped (and counted)
QUEUE_CROPS = 256
#: the memory shared with the writer that handed-off crops wait in (at least two of the largest
#: window the raw ring can give); a crop that finds no room there is dropped (and counted)
ARENA_BYTES = 32 << 20
#: a crop's place in the arena starts on a cache line
_ALIGN = 64
#: headers per write: a pipe write of at most PIPE_BUF bytes is whole or not at all
_PER_WRITE = max(select.PIPE_BUF // HEADER.size, 1)
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
    ``queue_crops``: crops that may wait for the writer at once (one more is dropped).
    ``wait``: no room for a crop makes the loop wait for the writer instead of dropping it;
    only for a replay run as fast as possible (no line rate to keep up with, no valve due).
    ``air``: the loop's air tracker (its level is saved with each crop); None: the lines were
    normalized with the calibration's level, and the crops carry none.
    ``ring_lines``: the raw ring's lines (the largest window a crop can take).
    """

    def __init__(self, root: Path, scans: CalibrationScans, cal: Calibration, pixel_pitch_mm: float,
                 line_pitch_mm: float, seg: SegmentConfig, every: int = 1, queue_crops: int = QUEUE_CROPS,
                 meta: dict | None = None, wait: bool = False, air: AirTracker | None = None,
                 ring_lines: int = 1024):
        if every < 1:
            raise ValueError(f"--save-every must be >= 1, got {every}")
        if queue_crops < 1:
            raise ValueError(f"queue_crops must be >= 1, got {queue_crops}")
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
        self.handed = 0  # crops handed to the writer
        self.dropped = 0  # ... not: no room for them (the writer fell behind)
        self.skipped: Counter[str] = Counter()  # the loop side's reasons; the writer counts its own
        self.writer_error: str | None = None
        self._result: dict | None = None
        self._closed = False
        largest = _crop_bytes(int(ring_lines), self.pixels, int(ring_lines) // max(self.epoch_lines, 1) + 2,
                              int(ring_lines), self.pixels)
        self._ring = _ArenaRing(max(ARENA_BYTES, 2 * largest), int(queue_crops))
        # the arena: anonymous shared memory (a memfd: nothing to clean up however the processes
        # end), every page touched now (no page faults on the belt)
        arena_fd = os.memfd_create("sorting-crops")
        os.ftruncate(arena_fd, self._ring.size)
        self._arena = mmap.mmap(arena_fd, self._ring.size)
        self._u8 = np.frombuffer(self._arena, np.uint8)
        self._u8.fill(0)
        cap = int(queue_crops)
        self._batch = bytearray(cap * HEADER.size)  # this hand-off's headers, written at its end
        self._batch_view = memoryview(self._batch)
        self._nbatch = 0
        self._receipts = bytearray(max(cap, 4096))  # what os.readv of the writer's receipts reads into
        # crops: headers loop -> writer (the crops themselves are in the arena); receipts: one
        # byte per crop the writer has taken out of the arena, writer -> loop
        hdr_r, hdr_w = os.pipe()
        got_r, got_w = os.pipe()
        # (twice what they may hold: a pipe's pages are not always filled)
        _room_for(hdr_w, 2 * (cap + 1) * HEADER.size)
        _room_for(got_w, 2 * cap)
        os.set_blocking(hdr_w, False)  # the loop never blocks on the writer
        os.set_blocking(got_r, False)
        # the writer is not forked from the loop's process: a child of it shares every page of
        # the loop's memory, and each page the loop then writes is first copied (a page fault;
        # 2 MB at once for the rings' huge pages). It is a fresh interpreter, handed its arguments
        # pickled and the arena and pipe ends as descriptors; it then runs at the lowest priority.
        res_r, res_w = os.pipe()
        self._proc = _WriterProcess((arena_fd, hdr_r, got_w, res_w),
                                    (self._ring.size, writer, cal, float(pixel_pitch_mm), float(line_pitch_mm), seg,
                                     self.epoch_lines, os.getpid()))
        for fd in (arena_fd, hdr_r, got_w, res_w):  # the writer has its own copies
            os.close(fd)
        self._hdr, self._got = hdr_w, got_r
        self._conn = Connection(res_r, writable=False)

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

    def _writer_alive(self) -> bool:
        if self.writer_error is not None:
            return False
        code = self._proc.exitcode  # one waitpid(WNOHANG)
        if code is None:
            return True
        self._writer_failed(f"the crop writer process died (exit code {code})")
        return False

    def _writer_failed(self, why: str) -> None:
        """Reported once, on stderr and in the summary; the loop goes on without the writer."""
        if self.writer_error is None:
            self.writer_error = why
            sys.stderr.write(f"sorting run: --save-crops: {why}; crops are no longer saved\n")

    def _hand_off(self, ring: np.ndarray, last_line: int, final: bool) -> None:
        """The pending particles whose margin has arrived: each window copied into the arena,
        its header batched; one write of the headers at the end."""
        r = ring.shape[0]
        keep = []
        alive = self._writer_alive()
        u8 = self._u8
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
            if p.error is not None:  # (its event says so too: not reached)
                self.skipped["its own processing failed"] += 1
                continue
            k = e0 = 0
            if self.air is not None:
                e0, e1 = r0 // self.epoch_lines, r1 // self.epoch_lines
                if any(e not in self._levels for e in range(e0, e1 + 1)):
                    self.skipped["no air level kept for its lines"] += 1
                    continue
                k = e1 - e0 + 1  # one row per epoch the window spans (the writer expands it per line)
            h, w = r1 - r0 + 1, c1 - c0 + 1
            mh, mw = p.mask.shape
            off = self._reserve(_crop_bytes(h, w, k, mh, mw))
            if off is None:
                if self.writer_error is not None:  # died while an unpaced replay waited for it
                    alive = False
                    self.skipped["the writer process died"] += 1
                else:
                    self.dropped += 1
                continue
            # the window straight from the raw ring into the arena (the ring may then move on)
            nb, lb = h * w * 4, k * w * 8
            dst = u8[off:off + nb].view(np.uint16).reshape(h, w, 2)
            i0 = r0 & (r - 1)
            top = min(h, r - i0)
            dst[:top] = ring[i0:i0 + top, c0:c1 + 1]
            if top < h:  # the window wraps round the ring
                dst[top:] = ring[:h - top, c0:c1 + 1]
            if k:
                lv = u8[off + nb:off + nb + lb].view(np.float32).reshape(k, w, 2)
                for j in range(k):
                    lv[j] = self._levels[e0 + j][c0:c1 + 1]
            u8[off + nb + lb:off + nb + lb + mh * mw].reshape(mh, mw)[...] = p.mask
            HEADER.pack_into(self._batch, self._nbatch * HEADER.size, pid, off, h, w, k, r0, c0,
                              p.line0 - r0, p.line1 - r0, p.col0 - c0, p.col1 - c0, p.area_px, p.centroid_line,
                              p.centroid_px, p.cut, p.too_long, p.touches_border, p.split)
            self._nbatch += 1
        self._flush()
        self._pending = keep

    # ------------------------------------------------------------ the arena (loop side)
    def _reserve(self, nbytes: int) -> int | None:
        """Room in the arena for a crop of ``nbytes``: its offset, or None (no room; an unpaced
        replay waits for the writer to take crops out first, while there is a writer)."""
        if nbytes > self._ring.size:  # (the arena holds two of the largest window: not reached)
            return None
        ring = self._ring
        off = ring.fit(nbytes)
        if off is None:
            self._take_receipts()
            off = ring.fit(nbytes)
        while off is None and self.wait:
            self._flush()  # what this hand-off put in the arena so far, so that the writer can take it
            if not self._writer_alive():
                return None
            select.select([self._got], [], [], 0.2)
            self._take_receipts()
            off = ring.fit(nbytes)
        if off is not None:
            ring.put(off, nbytes)
        return off

    def _take_receipts(self) -> None:
        """The crops the writer has taken out of the arena since the last look (never waits)."""
        try:
            n = os.readv(self._got, [self._receipts])
        except OSError:  # none yet (or no writer any more)
            return
        self._ring.taken(n)

    def _flush(self) -> None:
        """The batched headers to the writer, at most PIPE_BUF bytes a write (each write whole or
        not at all). The pipe has room for every crop the arena may hold, so it is never full;
        were it, the crops that did not go are dropped (their room given back)."""
        n, self._nbatch = self._nbatch, 0
        sent = 0
        size = HEADER.size
        while sent < n:
            m = min(_PER_WRITE, n - sent)
            try:
                os.write(self._hdr, self._batch_view[sent * size:(sent + m) * size])
            except BlockingIOError:
                if self.wait and self._writer_alive():
                    select.select([], [self._hdr], [], 0.2)
                    continue
                self.dropped += self._ring.give_back(n - sent)
                break
            except OSError:  # the writer's end is closed: it died or is dying
                self._proc.join(1.0)
                if self._writer_alive():
                    self._writer_failed("the crop writer process stopped reading")
                self.skipped["the writer process died"] += self._ring.give_back(n - sent)
                break
            sent += m
        self.handed += sent

    # ------------------------------------------------------------ shutdown
    def close(self) -> dict:
        """Hand over the end of the stream and wait for the writer to write every crop handed off,
        rocks.csv and dataset.json; returns the counts. A dead writer is reported, not waited for."""
        if self._closed:
            return self.summary()
        self._closed = True
        t0 = time.monotonic()
        self._flush()
        end = HEADER.pack(END_OF_STREAM, *([0] * 11), 0.0, 0.0, False, False, False, False)
        while self._writer_alive():
            try:
                os.write(self._hdr, end)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > CLOSE_TIMEOUT_S:
                    break
                select.select([], [self._hdr], [], 0.2)
            except OSError:
                break  # its end closed: it has gone or is going (the wait below says which)
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
        os.close(self._hdr)
        os.close(self._got)
        self._conn.close()
        del self._u8
        try:
            self._arena.close()
        except BufferError:  # a view of it still held somewhere: the memory goes with it
            pass
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


class _ArenaRing:
    """Room in the arena (offsets only): a ring whose crops are taken out in the order they went
    in, at most ``cap`` of them at once."""

    def __init__(self, size: int, cap: int):
        self.size, self.cap = int(size), int(cap)
        self.out: deque[int] = deque()  # the offsets of the crops in it, oldest first
        self.head = 0  # the end of the newest

    def __len__(self) -> int:
        return len(self.out)

    def fit(self, nbytes: int) -> int | None:
        """Where a crop of ``nbytes`` goes: after the newest crop, or else at the start, before
        the oldest; None: no room (or ``cap`` crops in already)."""
        out = self.out
        if not out:
            self.head = 0
            return 0 if nbytes <= self.size else None
        if len(out) >= self.cap:
            return None
        head, tail = self.head, out[0]
        if head > tail:  # in use: tail .. head
            if head + nbytes <= self.size:
                return head
            return 0 if nbytes < tail else None
        # in use: tail .. the end and the start .. head (head never meets tail while a crop is in)
        return head if head + nbytes < tail else None

    def put(self, off: int, nbytes: int) -> None:
        """A crop of ``nbytes`` at ``off`` (from :meth:`fit`)."""
        self.out.append(off)
        self.head = off + nbytes

    def taken(self, n: int) -> None:
        """The oldest ``n`` crops have been taken out."""
        for _ in range(min(n, len(self.out))):
            self.out.popleft()

    def give_back(self, n: int) -> int:
        """The room of the newest ``n`` crops, which were not handed after all; returns n."""
        for _ in range(n):
            self.head = self.out.pop()
        return n


def _crop_bytes(h: int, w: int, k: int, mh: int, mw: int) -> int:
    """A crop's room in the arena: its window (h, w, 2) uint16, the air level of its k epochs
    (k, w, 2) float32 and the particle's mask (mh, mw) one byte a pixel, to a whole cache line."""
    return (h * w * 4 + k * w * 8 + mh * mw + _ALIGN - 1) // _ALIGN * _ALIGN


def _room_for(fd: int, nbytes: int) -> None:
    """A pipe that holds ``nbytes`` (Linux: 64 kB unless grown)."""
    try:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < nbytes:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, nbytes)
    except (ImportError, AttributeError, OSError):
        pass  # elsewhere, or not allowed: a full pipe drops crops (counted), it never blocks the loop


# ---------------------------------------------------------------- the writer process
class _WriterProcess:
    """The writer, a fresh interpreter (``python -m sorting.realtime.crop_writer``): its own process
    group (the terminal's Ctrl-C is the loop's), SCHED_IDLE once it has its arguments; ``fds``
    kept open in it under the same numbers, ``args`` pickled to its stdin. The part of
    ``multiprocessing.Process`` the saver uses: pid, exitcode, join, kill."""

    def __init__(self, fds: tuple[int, ...], args: tuple):
        import pickle
        import subprocess

        self._p = subprocess.Popen([sys.executable, "-m", "sorting.realtime.crop_writer", *map(str, fds)],
                                   stdin=subprocess.PIPE, pass_fds=fds, process_group=0)
        self.pid = self._p.pid
        try:
            self._p.stdin.write(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
            self._p.stdin.close()
        except OSError:  # it died at start: its exit code says so at the first hand-off
            pass

    @property
    def exitcode(self) -> int | None:
        return self._p.poll()

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self._p.poll() is None:
            self._p.kill()


def start_saving(pipeline, root: Path, scans: CalibrationScans, every: int = 1,
                 queue_crops: int = QUEUE_CROPS, wait: bool = False) -> CropSaver:
    """A :class:`CropSaver` for ``pipeline``, attached to it: the pipeline starts keeping its raw
    ring and hands each chunk's decided particles over, and each crop carries the air level the
    pipeline's tracker normalized it with. ``wait``: see :class:`CropSaver` (unpaced replays only)."""
    saver = CropSaver(root, scans, pipeline.cal, pipeline.timing.pixel_pitch_mm, pipeline.line_pitch_mm,
                      pipeline.seg, every, queue_crops, wait=wait, air=pipeline.air, ring_lines=pipeline.ring_lines)
    pipeline.attach_crop_sink(saver)
    return saver

