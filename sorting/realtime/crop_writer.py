"""The crop writer of ``sorting run --save-crops``: a process of its own, started by
:class:`sorting.realtime.crops.CropSaver` as ``python -m sorting.realtime.crop_writer``.

It reads each handed-off crop's header from a pipe and the crop itself from the memory shared
with the loop (the arena), sends a one-byte receipt once the crop is out of the arena, checks
the crop under the ``xrt-rocks/1`` rules with the batch path's own code and writes it; at the
end of the stream (or when the loop's process is gone) it writes rocks.csv and dataset.json and
reports its counts. See :mod:`sorting.realtime.crops` for the whole hand-off.
"""
from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import sys
from collections import Counter
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from sorting.io import AIR_COLUMN, RockDatasetWriter, RockRow
from sorting.stages.crops import CROP_MARGIN_PX, MIN_MARGIN_PX, cut_crop
from sorting.stages.particles import Particle

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration
    from sorting.stages.particles import SegmentConfig

#: belt lines and columns kept around a particle's box when the belt is free that far
MARGIN_PX = CROP_MARGIN_PX
#: one handed-off crop on the pipe to the writer: particle number, arena offset, window lines,
#: columns and air epochs, the window's first stream line and detector column, the particle's
#: box in the window, its area and centroid, its four flags. Particle number -1 ends the stream.
HEADER = struct.Struct("<12q2d4?4x")
END_OF_STREAM = -1
#: how often an idle writer looks whether the loop's process is still there
PARENT_CHECK_S = 0.5


def writer_process() -> None:
    """``python -m sorting.realtime.crop_writer ARENA CROPS RECEIPTS RESULT``: the writer process."""
    import pickle

    arena_fd, crops, receipts, result = (int(x) for x in sys.argv[1:5])
    args = pickle.load(sys.stdin.buffer)
    _writer_main(arena_fd, args[0], crops, receipts, Connection(result, readable=False), *args[1:])


def _writer_main(arena_fd: int, arena_bytes: int, crops: int, receipts: int, conn, writer: RockDatasetWriter,
                 cal: Calibration, pp: float, lp: float, seg: SegmentConfig, epoch_lines: int,
                 parent: int) -> None:
    """The writer process: crops from the arena as their headers come on ``crops`` (a receipt
    on ``receipts`` as each is taken out) until the end of the stream (or the loop's process is
    gone), then rocks.csv and dataset.json, and ``("done", counts)`` on ``conn``."""
    # a stop signal (Ctrl-C to the terminal's process group, a supervisor's SIGTERM) is the
    # loop's: it stops after its chunk and then closes the saver, which needs this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # only the writer's ends of the pipes are here: the loop's process dying (however it dies)
    # closes the other end, which reads as the end of the headers, not as a wait for more
    lowest_priority()
    import cv2

    cv2.setNumThreads(1)
    arena = mmap.mmap(arena_fd, arena_bytes)
    os.close(arena_fd)
    u8 = np.frombuffer(arena, np.uint8)
    size = HEADER.size
    written = 0
    skipped: Counter[str] = Counter()
    pending = bytearray()
    try:
        ended = False
        while not ended:
            ready, _, _ = select.select([crops], [], [], PARENT_CHECK_S)
            if not ready:
                if not _running(parent):
                    break  # the loop's process is gone: list what was written, and go
                continue
            try:
                data = os.read(crops, 64 * size)
            except OSError:
                break
            if not data:
                break  # the loop's process is gone (its end closed with it)
            pending += data
            n = len(pending) // size
            for j in range(n):
                head = HEADER.unpack_from(pending, j * size)
                if head[0] == END_OF_STREAM:
                    ended = True
                    break
                item = _take(u8, head)
                try:
                    os.write(receipts, b"\x01")  # its room in the arena is free again
                except OSError:
                    pass  # the loop's process is gone: what it handed is still written
                try:
                    problem = _write_one(writer, cal, pp, lp, seg, epoch_lines, *item)
                except Exception as exc:  # noqa: BLE001 - one bad crop never stops the saving (nor the belt)
                    problem = f"write error: {type(exc).__name__}"
                if problem is None:
                    written += 1
                else:
                    skipped[problem] += 1
            del pending[:n * size]
        writer.close()
        conn.send(("done", {"written": written, "skipped": dict(skipped)}))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the loop's process
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise


def _take(u8: np.ndarray, head: tuple) -> tuple:
    """A crop out of the arena (copies: its room may be reused as soon as the receipt goes):
    ``_write_one``'s particle number, particle, window, levels, first line and first column."""
    pid, off, h, w, k, r0, c0, line0, line1, col0, col1, area, cl, cp, cut, too_long, border, split = head
    nb, lb = h * w * 4, k * w * 8
    mh, mw = line1 - line0 + 1, col1 - col0 + 1
    window = u8[off:off + nb].view(np.uint16).reshape(h, w, 2).copy()
    levels = u8[off + nb:off + nb + lb].view(np.float32).reshape(k, w, 2).copy() if k else None
    mask = u8[off + nb + lb:off + nb + lb + mh * mw].reshape(mh, mw).astype(bool)
    p = Particle(line0, line1, col0, col1, mask, area, cl, cp, cut, too_long, border, split, None)
    return pid, p, window, levels, r0, c0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def lowest_priority() -> None:
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


if __name__ == "__main__":
    writer_process()
