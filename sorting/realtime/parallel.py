"""Particle-parallel sorting: one process acquires and segments, N - 1 others classify.

The loop's own process (the parent) runs every line through the fused line pass and the
stitching, writes the attenuation into a ring buffer in shared memory, plans each chunk's
completed particles and sends their boxes and masks (~15 kB a chunk) to a feature worker
over a pipe, as one flat binary message each way (pickle only for the rare chunk with a
failed or shed particle: pickling cost the loop ~50 us a chunk). The worker reads the boxes
from its read-only view of the same ring, computes features, scores and the tramp check with
the same code as one worker (:meth:`sorting.realtime.stream.Pipeline.classify`) and sends
the scores back. The parent decides in stream order, so the events are one worker's (apart
from wall-clock latency).

The gain comes from pipelining: while a worker classifies chunk k, the parent goes on with
chunks k + 1, k + 2, ... Each worker holds at most ``depth`` chunks; with every queue full,
the parent classifies the next chunk itself instead of waiting, and at most ``queue_chunks``
(depth times the processes) wait to be decided, so an overloaded live loop falls behind its
input, where the shedding rule (``SHED_MARGIN_MS``) sees it, rather than inside a queue.

A worker that dies (killed, out of memory, a crash in compiled code) ends the run with an
error naming it at the parent's next chunk; workers die with the parent; a stop signal is
the parent's alone (it stops after the current chunk and decides what is still out).
"""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import pickle
import select
import signal
import time
from pathlib import Path

import numpy as np

from sorting.errors import Interrupted
from sorting.parallel import opencv_threads
from sorting.realtime.runner import RunResult, StopOnSignal, rates, run_loop
from sorting.realtime.stream import Pipeline

#: chunks one worker may hold (sent, not yet answered); the prototype measured the gain flat from 4 to 8
DEPTH = 6
#: workers that have not set up after this long are stuck (a fresh install compiles the kernels: ~1 min)
SETUP_TIMEOUT_S = 600.0
#: how often a blocked parent looks at its workers' exit codes while it waits for a result
CHECK_S = 0.1
#: the most worker processes `--workers` may ask for
MAX_WORKERS = 64


def check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")


def queue_chunks(workers: int, depth: int = DEPTH) -> int:
    """Chunks that may wait to be decided with ``workers`` processes (0 for one: no queue)."""
    return 0 if workers <= 1 else depth * workers


def _die_with_parent(parent_pid: int) -> None:
    """A worker ends when the process that decides ends, however that ends."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass  # elsewhere the worker still ends when its pipe closes (EOF)
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent was gone before the worker could ask to go with it


#: the first byte of every message on a worker's pipe: a pickled object, a chunk's request
#: or a chunk's result in the flat binary layout (the common case: no particle failed or was
#: shed), which costs the loop a fraction of pickling's time
PICKLED, JOB, RESULT = 0, 1, 2
#: the binary layouts: JOB = tag, pad to 8, int64 key, n, mask pixels; int64 boxes (n, 4),
#: uint8 judge (n), the masks (mask pixels, bool); RESULT = tag, pad to 8, int64 key, n,
#: particles featured; float64 features and scores-and-tramp seconds; float32 scores (n),
#: bool tramp (n)
_JOB_HEAD, _RESULT_HEAD = 32, 48


def send_pickled(conn, obj) -> None:
    conn.send_bytes(bytes((PICKLED,)) + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class JobEncoder:
    """A chunk's request (:meth:`Pipeline._prepare`) as one JOB message, in a buffer reused
    from chunk to chunk; None when a particle already failed or was shed (those go pickled)."""

    def __init__(self) -> None:
        self.buf = np.zeros(1 << 16, np.uint8)

    def encode(self, key: int, request: tuple) -> np.ndarray | None:
        boxes, masks, err, undecided, judge = request
        if err is not None or undecided is not None:
            return None
        n = boxes.shape[0]
        n_px = 0
        for m in masks:
            n_px += m.size
        o_judge = _JOB_HEAD + 32 * n
        o_masks = o_judge + n
        total = o_masks + n_px
        if total > self.buf.size:
            self.buf = np.zeros(max(total, 2 * self.buf.size), np.uint8)
        buf = self.buf
        buf[0] = JOB
        head = buf[8:_JOB_HEAD].view(np.int64)
        head[0], head[1], head[2] = key, n, n_px
        buf[_JOB_HEAD:o_judge].view(np.int64).reshape(n, 4)[:] = boxes
        buf[o_judge:o_masks].view(np.bool_)[:] = judge
        if n:
            np.concatenate([m.reshape(-1) for m in masks], out=buf[o_masks:total].view(np.bool_))
        return buf[:total]


def decode_job(data: bytearray) -> tuple:
    """(key, request) of a JOB message, the arrays writable as pickle gives them (the masks
    are views of ``data``: used before the next message is read into it)."""
    a = np.frombuffer(data, np.uint8)
    key, n, n_px = a[8:_JOB_HEAD].view(np.int64).tolist()
    o_judge = _JOB_HEAD + 32 * n
    boxes = a[_JOB_HEAD:o_judge].view(np.int64).reshape(n, 4).copy()
    judge = a[o_judge:o_judge + n].view(np.bool_)
    flat = a[o_judge + n:o_judge + n + n_px].view(np.bool_)
    return key, (boxes, flat, None, None, judge)


def encode_result(key: int, result: tuple) -> bytes | None:
    """A chunk's classification (:meth:`Pipeline.classify`) as one RESULT message; None when a
    particle failed (its errors go pickled)."""
    scores, tramp, err, feat_s, n_featured, cls_s = result
    if err is not None:
        return None
    n = scores.shape[0]
    head = np.zeros(_RESULT_HEAD // 8, np.int64)
    head[1:4] = key, n, n_featured
    head[4:6].view(np.float64)[:] = feat_s, cls_s
    head.view(np.uint8)[0] = RESULT
    return b"".join((head.tobytes(), np.ascontiguousarray(scores, np.float32).tobytes(),
                     np.ascontiguousarray(tramp, np.bool_).tobytes()))


def decode_message(data: bytes) -> tuple:
    """A message from a worker: a pickled (tag or key, payload) pair, or a RESULT as
    (key, result) with writable arrays, as pickle gives them."""
    if data[0] == PICKLED:
        return pickle.loads(memoryview(data)[1:])
    head = np.frombuffer(data, np.int64, _RESULT_HEAD // 8)
    key, n, n_featured = head[1:4].tolist()
    feat_s, cls_s = head[4:6].view(np.float64).tolist()
    scores = np.frombuffer(data, np.float32, n, _RESULT_HEAD).copy()
    tramp = np.frombuffer(data, np.bool_, n, _RESULT_HEAD + 4 * n).copy()
    return key, (scores, tramp, None, feat_s, n_featured, cls_s)


def unpack_request(request: tuple) -> tuple:
    """A request as it came through the pipe (the masks as one flat array, in box order) as
    :meth:`Pipeline.classify` takes it (one mask per box, views of that array)."""
    boxes, flat = request[0], request[1]
    sizes = (boxes[:, 2] * boxes[:, 3]).tolist()
    ends = np.cumsum([0] + sizes).tolist()
    shapes = boxes[:, 2:4].tolist()
    masks = [flat[ends[i]:ends[i + 1]].reshape(shapes[i]) for i in range(len(sizes))]
    return (boxes, masks) + tuple(request[2:])


def _serve(k: int, pipeline: Pipeline, model_path: str, conn, parent: int) -> None:
    """Feature worker ``k``: (key, request) in, (key, result) out, until None or the pipe closes."""
    # a stop signal (Ctrl-C to the terminal's process group, a supervisor's SIGTERM) is the
    # parent's: it stops after its chunk and still needs this worker for what is out
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    status = 0
    try:
        import cv2
        from threadpoolctl import threadpool_limits

        from sorting.stages.inference import load_model

        threadpool_limits(limits=1, user_api="blas")  # one core each: thread pools would only spin
        cv2.setNumThreads(1)
        # its own ONNX session (the parent's runtime threads did not survive the fork), and the
        # ring read-only: only the parent writes it
        # (warmed up with pickled requests: a JOB's arrays meet the kernels with the same types,
        # writable and aligned)
        pipeline.serve_features(load_model(model_path))
        gc.collect()
        gc.freeze()
        send_pickled(conn, ("ready", None))
        cpu0 = time.process_time()
        jobs = 0
        buf = bytearray(1 << 16)
        while True:
            try:
                size = conn.recv_bytes_into(buf)
            except mp.BufferTooShort as exc:  # a larger message than any before: it is all in exc
                buf = bytearray(exc.args[0])
                size = len(buf)
            if buf[0] == PICKLED:
                msg = pickle.loads(memoryview(buf)[1:size])
                if msg is None:
                    break
                key, request = msg
            else:
                key, request = decode_job(buf)
            result = pipeline.classify(unpack_request(request))
            out = encode_result(key, result)
            if out is not None:
                conn.send_bytes(out)
            else:
                send_pickled(conn, (key, result))
            jobs += 1
        send_pickled(conn, ("done", {"cpu_s": time.process_time() - cpu0, "jobs": jobs}))
    except EOFError:
        pass  # the parent closed the pipe: nobody waits for anything any more
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        status = 1
        try:
            send_pickled(conn, ("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        conn.close()
        os._exit(status)  # no interpreter teardown (the parent's inherited objects are not ours)


class FeaturePool:
    """``workers`` feature processes forked from ``pipeline`` (built with ``queue_chunks``):
    the pool :meth:`Pipeline.attach` takes. Use as a context manager; leaving it ends the
    workers, killing them on an error."""

    def __init__(self, pipeline: Pipeline, model_path: str | Path, workers: int, depth: int = DEPTH,
                 setup_timeout_s: float = SETUP_TIMEOUT_S) -> None:
        if workers < 1 or depth < 1:
            raise ValueError(f"a pool needs workers >= 1 and depth >= 1, got {workers}, {depth}")
        self.depth = depth
        self._encoder = JobEncoder()
        self.in_flight = [0] * workers
        self._owner: dict[int, int] = {}
        self.stats: list[dict] = []
        self._poller = None
        self._fd: dict[int, tuple[int, bool]] = {}
        ctx = mp.get_context("fork")
        self.procs, self.conns = [], []
        t0 = time.monotonic()
        with StopOnSignal() as stop:
            try:
                # a forked worker inherits OpenCV's thread pool but not its threads: with a pool
                # running here, the worker's own cv2.setNumThreads(1) would wait forever to join them
                with opencv_threads(1):
                    for k in range(workers):
                        here, there = ctx.Pipe()
                        p = ctx.Process(target=_serve, args=(k, pipeline, str(model_path), there, os.getpid()),
                                        daemon=True, name=f"feature-worker-{k}")
                        p.start()
                        there.close()
                        self.procs.append(p)
                        self.conns.append(here)
                self._wait_ready(stop, t0, setup_timeout_s)
            except BaseException:
                self.kill()
                raise

    def _wait_ready(self, stop: StopOnSignal, t0: float, timeout_s: float) -> None:
        ready = [False] * len(self.procs)
        while not all(ready):
            if stop.requested:
                # before the belt started: nothing was decided; the CLI exits 128 + signum
                raise Interrupted(stop.signum if stop.signum is not None else signal.SIGINT)
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the feature workers were not set up after {timeout_s:.0f} s")
            for k, conn in enumerate(self.conns):
                if not ready[k] and conn.poll(CHECK_S / len(self.conns)):
                    tag, payload = self._recv(k)
                    ready[k] = tag == "ready"
                elif not ready[k] and self.procs[k].exitcode is not None:
                    raise RuntimeError(f"feature worker {k} died while setting up "
                                       f"(exit code {self.procs[k].exitcode})")

    # ------------------------------------------------------------ the pool Pipeline.attach takes
    def submit(self, key: int, request: tuple) -> bool:
        k = int(np.argmin(self.in_flight)) if len(self.in_flight) > 1 else 0
        if self.in_flight[k] >= self.depth:
            return False
        try:
            msg = self._encoder.encode(key, request)
            if msg is not None:
                self.conns[k].send_bytes(msg)
            else:
                boxes, masks = request[0], request[1]
                flat = np.concatenate([m.reshape(-1) for m in masks]) if masks else np.zeros(0, bool)
                send_pickled(self.conns[k], (key, (boxes, flat) + tuple(request[2:])))
        except OSError:  # its end of the pipe is gone
            self._dead(k)
        self.in_flight[k] += 1
        self._owner[key] = k
        return True

    def poll(self, timeout_s: float = 0.0) -> list:
        """The results that are in (one system call when none are), waiting up to ``timeout_s``
        for the first of them."""
        return self._collect(timeout_s)

    def wait(self, key: int) -> list:
        """The results that are in, waiting until ``key``'s is among them."""
        got: list = []
        while True:
            got += self._collect(CHECK_S)
            if any(g[0] == key for g in got):
                return got

    def _collect(self, timeout: float) -> list:
        """One look at every pipe and every worker (one poll system call): a message from each
        pipe that has one (more wait for the next look); a worker that has exited ends the run."""
        if self._poller is None:
            self._poller = select.poll()
            for k, (conn, p) in enumerate(zip(self.conns, self.procs)):
                self._poller.register(conn.fileno(), select.POLLIN)
                self._poller.register(p.sentinel, select.POLLIN)
                self._fd[conn.fileno()], self._fd[p.sentinel] = (k, True), (k, False)
        got = []
        dead = []
        for fd, _ in self._poller.poll(math.ceil(timeout * 1000)):
            k, is_pipe = self._fd[fd]
            if not is_pipe:
                dead.append(k)
                continue
            key, result = self._recv(k)
            self.in_flight[k] -= 1
            del self._owner[key]
            got.append((key, result))
        if dead:
            # a worker only exits when asked to: its last answers (already read above) are all it gives
            self._dead(dead[0])
        return got

    def _recv(self, k: int) -> tuple:
        try:
            tag, payload = decode_message(self.conns[k].recv_bytes())
        except (EOFError, OSError):
            self._dead(k)
        if tag == "error":
            self.kill()
            raise RuntimeError(f"feature worker {k} failed: {payload}")
        return tag, payload

    def _dead(self, k: int) -> None:
        """Worker ``k`` closed its pipe or exited without answering: end every worker and raise."""
        p = self.procs[k]
        p.join(1.0)  # its pipe closes as it exits: the exit code follows within moments
        code = p.exitcode
        self.kill()
        raise RuntimeError(f"feature worker {k} died (exit code {code}) with {self.in_flight[k]} chunks unanswered")

    # ------------------------------------------------------------ the end
    def close(self, timeout_s: float = 10.0) -> list[dict]:
        """Ask each worker to end; their CPU seconds and chunks classified, one dict each."""
        stats = []
        for k, conn in enumerate(self.conns):
            try:
                send_pickled(conn, None)
                if conn.poll(timeout_s):
                    tag, payload = self._recv(k)
                    if tag == "done":
                        stats.append(payload)
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout_s)
        self.kill()
        self.stats = stats
        return stats

    def kill(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                p.kill()
                p.join(5.0)
        for conn in self.conns:
            conn.close()
        self.conns = []

    def __enter__(self) -> "FeaturePool":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def run_parallel(chunks, pipeline: Pipeline, model_path: str | Path, workers: int, **run_loop_kwargs) -> RunResult:
    """:func:`sorting.realtime.runner.run_loop` with ``workers - 1`` feature workers beside
    this process (``pipeline`` built with ``queue_chunks``; ``workers`` 1: the plain loop).
    The summary adds the workers' CPU seconds to the loop's and tells where chunks were classified."""
    check_workers(workers)
    if workers == 1:
        result = run_loop(chunks, pipeline, **run_loop_kwargs)
        result.summary["workers"] = 1
        return result
    with FeaturePool(pipeline, model_path, workers - 1) as pool:
        pipeline.attach(pool)
        try:
            result = run_loop(chunks, pipeline, **run_loop_kwargs)
        except BaseException:
            pool.kill()
            raise
        finally:
            pipeline.detach()  # whatever happened, this pool is over
        stats = pool.close()
    s = result.summary
    loop_cpu = s["cpu_s"]
    worker_cpu = [st["cpu_s"] for st in stats]
    s.update(rates(s["lines"], s["wall_s"], loop_cpu + sum(worker_cpu), pipeline.timing.line_rate_hz))
    s.update({"workers": workers, "loop_cpu_s": loop_cpu, "worker_cpu_s": worker_cpu,
              "worker_chunks": [st["jobs"] for st in stats], "local_chunks": pipeline.local_jobs,
              "queue_chunks": pipeline.queue_chunks, "ring_lines": pipeline.ring_lines})
    return result


def run_recording(recording: str | Path, model_path: str | Path, sorter_path: str | Path, workers: int = 2,
                  chunk_lines: int = 32, realtime: bool = False, **run_loop_kwargs) -> RunResult:
    """Sort a recording with ``workers`` processes (the bench's and the tests' way in)."""
    from sorting.config import load_sorter
    from sorting.io import read_belt_recording
    from sorting.realtime.runner import build_pipeline, timing_of
    from sorting.realtime.sources import prefault, replay
    from sorting.stages.inference import load_model

    rec = read_belt_recording(Path(recording))
    timing = timing_of(rec.meta)
    pipe = build_pipeline(rec.calibration, load_model(model_path), load_sorter(sorter_path), timing,
                          str(sorter_path), chunk_lines, shed_late=realtime, queue_chunks=queue_chunks(workers))
    prefault(rec.lines)  # the run measures the loop, not first-touch faults
    return run_parallel(replay(rec.lines, timing.line_rate_hz, chunk_lines, realtime), pipe, model_path, workers,
                        **run_loop_kwargs)
