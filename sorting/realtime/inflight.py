"""The chunks a pipeline's feature workers hold (sorting.realtime.parallel): sent out, or
classified in the loop when every worker's queue is full, and decided in stream order.

:class:`FeatureQueue` is the part of :class:`sorting.realtime.stream.Pipeline` that keeps
them; the pipeline gives it ``_epochs``, ``_decide``, ``classify``, ``_finish`` and
``_end_chunk``. Without workers attached none of this runs.
"""
from __future__ import annotations

import mmap
import pickle
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from sorting.stages.inference import OnnxModel

if TYPE_CHECKING:
    from sorting.realtime.events import Event


def ring_buffer(shape: tuple, shared: bool) -> np.ndarray:
    """A zeroed float32 array; ``shared``: in anonymous shared memory, which processes forked
    later see (and write) as this one does, and which goes with the last of them."""
    if not shared:
        return np.zeros(shape, np.float32)
    nbytes = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, nbytes), np.float32, int(np.prod(shape))).reshape(shape)


class ChunkJob:
    """One chunk's completed particles between planning and deciding (Pipeline._decide)."""

    __slots__ = ("done", "ints", "cents", "lo", "hi", "times", "request", "on_splice", "suspect", "prepare_s",
                 "key", "step", "line0", "result", "end")

    def __init__(self, done, ints, cents, lo, hi, times, request, on_splice, suspect, prepare_s):
        self.done, self.ints, self.cents, self.lo, self.hi, self.times = done, ints, cents, lo, hi, times
        self.request, self.on_splice, self.suspect, self.prepare_s = request, on_splice, suspect, prepare_s
        self.key = self.step = 0
        # the earliest stream line it reads from the ring (its boxes, its lines' arrival times)
        self.line0 = int(ints[:, 0].min()) if ints.shape[0] else 1 << 62
        self.result: tuple | None = None
        self.end = False  # the last job of its chunk: the chunk's episode bookkeeping follows it


class FeatureQueue:
    """Feature workers for :class:`sorting.realtime.stream.Pipeline` (see the module's description)."""

    def _init_queue(self) -> None:
        self._pool = None
        self._pending: deque[ChunkJob] = deque()
        self._waiting: dict[int, ChunkJob] = {}
        self._steps = self._jobs = 0
        self.local_jobs = 0  # chunks classified here because every worker's queue was full

    def attach(self, pool) -> None:
        """Classify chunks in ``pool``'s worker processes (forked after this pipeline was built:
        they share its ring) while this process goes on with the next lines; decisions stay
        here, in stream order, the same as without workers. ``pool`` has ``submit(key,
        request) -> bool`` (False: every worker's queue is full; the chunk is then classified
        here), ``poll(timeout_s=0)`` and ``wait(key)``, both giving the results in as (key,
        result) pairs and raising when a worker died. None detaches (with nothing left waiting)."""
        if pool is not None:
            need = self.queue_chunks * self.chunk_lines + self.max_particle_lines
            if self.queue_chunks < 1 or need > self.ring_lines:
                raise ValueError(f"the ring ({self.ring_lines} lines) must hold {self.queue_chunks} queued chunks of "
                                 f"{self.chunk_lines} lines and the longest particle ({self.max_particle_lines}); "
                                 "build the pipeline with queue_chunks >= 1")
        elif self._pending:
            raise RuntimeError("chunks are still waiting for the feature workers")
        self._pool = pool

    def detach(self) -> None:
        """Forget the feature workers and whatever was still out with them (the run ended)."""
        self._pool = None
        self._pending.clear()
        self._waiting.clear()

    def serve_features(self, model: OnnxModel) -> None:
        """Make this copy of the pipeline (in a feature worker forked from the loop's process)
        ready to :meth:`classify`: its own model session, the shared ring read-only (only the
        loop writes it), and the first-call costs paid with the argument types met on the belt
        (the read-only ring; boxes, masks and flags as they come out of a pipe: an unwarmed
        worker paid a 10-12 ms compile on its first chunk)."""
        self.model = model
        ring = self._ring.view()
        ring.flags.writeable = False
        self._ring = ring
        self.tramp.warm_up(ring)  # (passes the tramp gate on purpose)
        boxes = np.array([[self.ring_lines - 1, 0, 2, 2], [0, 1, 3, 2]], np.int64)
        masks = [np.ones((2, 2), bool), np.ones((3, 2), bool)]
        for request in ((boxes, masks, None, None, np.ones(2, bool)),
                        (boxes, masks, ["warm-up", None], np.array([False, True]), np.ones(2, bool))):
            self.classify(pickle.loads(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))

    def _step_queued(self, first_line: int, raw: np.ndarray, t_in: float) -> list[Event]:
        """:meth:`step` with feature workers: first make room in the ring for the chunk's lines
        (decide what still reads the lines they overwrite), then the chunk."""
        self._steps += 1
        events = self._drain(overwrite=first_line + raw.shape[0] - 1) if self._pending else []
        events += self._epochs(first_line, raw, t_in)
        self._chunk_ends()
        if self.shed_late and self._waiting:
            # live: a loop that keeps up has nothing to do until the next chunk's last line
            # arrives (a chunk period after this one's): it decides the chunks out with the
            # workers as their scores come back in the meantime, not a chunk later (a loop
            # that is behind has no such time: it goes on at once, pipelined)
            events += self._drain_until(t_in + raw.shape[0] / self.timing.line_rate_hz)
        return events

    def _drain_until(self, t_next: float) -> list[Event]:
        """Wait for the workers' results until wall time ``t_next`` at most, deciding in stream
        order what comes back; return as soon as nothing is out any more."""
        events: list[Event] = []
        while self._waiting:
            left = t_next - time.perf_counter()
            if left <= 0:
                break
            self._take(self._pool.poll(left))
            events += self._drain()
        return events

    def _chunk_ends(self) -> None:
        """The end of a chunk (a step) for the episodes of particle errors: now, when none of
        its particles wait; else after its last job is decided."""
        pending = self._pending
        if not pending:
            self._end_chunk()
        elif pending[-1].step == self._steps:
            pending[-1].end = True

    def _queue(self, job: ChunkJob) -> list[Event]:
        """Send ``job`` to a worker (or classify it here when every queue is full), then decide
        whatever is ready in stream order."""
        self._jobs += 1
        job.key, job.step = self._jobs, self._steps
        if job.ints.shape[0] == 0 or not self._pool.submit(job.key, job.request):
            self.local_jobs += job.ints.shape[0] > 0
            job.result = self.classify(job.request)
        else:
            self._waiting[job.key] = job
        self._pending.append(job)
        return self._drain()

    def _take(self, results: list) -> None:
        for key, result in results:
            self._waiting.pop(key).result = result

    def _drain(self, overwrite: int | None = None, everything: bool = False) -> list[Event]:
        """Decide the waiting chunks whose results are in, in stream order; wait for the oldest
        when ``everything`` is asked for, when more than ``queue_chunks`` wait, or when writing
        stream line ``overwrite`` into the ring would overwrite lines a waiting chunk reads."""
        events: list[Event] = []
        pending = self._pending
        if self._waiting:
            self._take(self._pool.poll())
        while pending:
            head = pending[0]
            if head.result is None:
                must = everything or len(pending) > self.queue_chunks or (
                    overwrite is not None and overwrite - min(j.line0 for j in pending) >= self.ring_lines)
                if not must:
                    break
                self._take(self._pool.wait(head.key))
                continue
            pending.popleft()
            events += self._finish(head, head.result)
            if head.end:
                self._end_chunk()
        return events
