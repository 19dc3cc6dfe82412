"""Particle-parallel mode (--workers N): the loop acquires, segments and decides; feature
workers classify. The events equal one worker's; dead workers, signals and a failing event
log end the run as with one process."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest
from loop_helpers import run_loop, run_recording

from sorting.config import CONFIG_DIR, load_sorter
from sorting.io import read_belt_recording
from sorting.realtime.parallel import FeaturePool, queue_chunks
from sorting.realtime.runner import build_pipeline, timing_of
from sorting.realtime.sources import replay
from sorting.realtime.stream import Pipeline
from sorting.stages.inference import load_model

SORTER = CONFIG_DIR / "sorter_reference.yaml"
WALL_CLOCK = ("latency_ms", "slack_ms", "late")


def _strip(events):
    return [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in events]


@pytest.fixture(scope="module")
def one(small_belt, small_model):
    """One worker's run of the small belt (the reference every mode must equal)."""
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    return run_loop(replay(rec.lines, timing.line_rate_hz, 32),
                    build_pipeline(rec.calibration, load_model(small_model), load_sorter(SORTER), timing, str(SORTER)))


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_same_events_as_one_worker(small_belt, small_model, one, workers):
    many = run_recording(small_belt, small_model, SORTER, workers=workers)
    s = many.summary
    assert len(one.events) > 100
    assert _strip(many.events) == _strip(one.events)
    for key in ("particles", "ejected", "passed", "tramp", "cut", "lines", "chunks"):
        assert s[key] == one.summary[key], key
    assert s["workers"] == workers and len(s["worker_cpu_s"]) == len(s["worker_chunks"]) == workers - 1
    assert sum(s["worker_chunks"]) > 0  # the workers did classify
    # the run's CPU is the loop's and the workers'
    assert s["cpu_s"] == pytest.approx(s["loop_cpu_s"] + sum(s["worker_cpu_s"]))
    assert mp.active_children() == []


def test_a_slow_worker_fills_its_queue_and_the_loop_classifies_itself(small_belt, small_model, one, monkeypatch):
    """A worker 5 ms slower a chunk than the loop: its queue fills, the loop classifies the
    next chunks itself, waits at the queue bound for the oldest; the decisions do not change."""
    parent = os.getpid()
    real = Pipeline.classify

    def slow(self, request):
        if os.getpid() != parent and request[0].shape[0] > 1:
            time.sleep(0.005)
        return real(self, request)

    monkeypatch.setattr(Pipeline, "classify", slow)  # the workers fork after this: they inherit it
    many = run_recording(small_belt, small_model, SORTER, workers=2)
    s = many.summary
    assert s["local_chunks"] > 0 and s["worker_chunks"][0] > 0
    assert _strip(many.events) == _strip(one.events)


def test_the_ring_holds_the_queue_and_the_longest_particle(small_belt, small_model):
    """The ring: the next power of two of longest particle + (2 + queued chunks) chunks + 2 x 4
    crop margin + 8 lines; a pipeline without a queue is refused by the pool."""
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    model, sorter = load_model(small_model), load_sorter(SORTER)

    def ring(q, chunk=32):
        return build_pipeline(rec.calibration, model, sorter, timing, str(SORTER), chunk, queue_chunks=q).ring_lines

    assert queue_chunks(1) == 0 and queue_chunks(2) == 12 and queue_chunks(3) == 18
    assert ring(0) == 1024  # 512 + 64 + 16 = 592
    assert ring(12) == 1024  # 512 + 14 x 32 + 16 = 976
    assert ring(20) == 2048  # 512 + 22 x 32 + 16 = 1232
    assert ring(12, 64) == 2048  # 512 + 14 x 64 + 16 = 1424
    plain = build_pipeline(rec.calibration, model, sorter, timing, str(SORTER))
    with pytest.raises(ValueError, match="queue_chunks >= 1"):
        plain.attach(object())


def test_paced_workers_decide_as_one_worker(small_belt, small_model, one):
    """Paced (1.5 s of belt in real time) with the shedding rule on: the decisions equal one
    worker's, and latency and slack are timed together at the decision (an eject's latency
    plus its slack is its command's due time after its last line)."""
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    sorter = load_sorter(SORTER)
    paced = run_recording(small_belt, small_model, SORTER, workers=2, realtime=True)
    assert len(paced.events) == len(one.events)
    # a particle left undecided by an overloaded moment (a VM stall) is the only allowed difference
    undecided = [p["undecided"] for p in paced.events]
    assert sum(undecided) <= len(undecided) // 100
    assert all(p == o for p, o, u in zip(_strip(paced.events), _strip(one.events), undecided) if not u)
    assert paced.summary["wall_s"] >= 0.9 * rec.n_lines / timing.line_rate_hz  # it kept to the line clock
    fired = [e for e in paced.events if e["decision"] == "eject"]
    assert len(fired) > 50
    for e in fired:
        due_ms = e["open_s"] * 1000.0 - sorter.ejector.response_ms - e["last_line"] / timing.line_rate_hz * 1000.0
        assert abs(e["latency_ms"] + e["slack_ms"] - due_ms) < 0.01
        assert e["latency_ms"] > 0


class _TimedLog:
    """An event log that notes the wall time of its first write."""
    first = None
    count = 0

    def write(self, events):
        self.first = self.first or time.perf_counter()
        self.count += len(events)

    def close(self):
        pass


def test_a_worker_that_dies_ends_the_run_naming_it(small_belt, small_model, monkeypatch):
    """The feature worker exits at line 400 of a paced belt (0.1 s in, as if out of memory):
    the loop notices at its next chunk, not when the belt ends 1.4 s later, raises naming the
    worker, and leaves no process behind; what was decided before was logged."""
    parent = os.getpid()
    real = Pipeline.classify

    def dying(self, request):
        if os.getpid() != parent and request[0].shape[0] and request[0][:, 0].min() >= 400:
            os._exit(3)
        return real(self, request)

    monkeypatch.setattr(Pipeline, "classify", dying)
    log = _TimedLog()
    with pytest.raises(RuntimeError, match=r"feature worker 0 died \(exit code 3\)"):
        run_recording(small_belt, small_model, SORTER, workers=2, realtime=True, log=log)
    raised = time.perf_counter()
    assert log.first is not None and log.count > 0
    assert raised - log.first < 1.0
    assert mp.active_children() == []


def test_a_stop_signal_stops_at_one_chunk_with_a_complete_log(small_belt, small_model, monkeypatch):
    """SIGINT reaches the loop while chunks are out with the worker (sent by the worker itself,
    mid-belt, as a Ctrl-C to the process group would): the loop stops after its chunk, waits
    for what is out, and the events are exactly one worker's on the lines read."""
    parent = os.getpid()
    real = Pipeline.classify
    sent = mp.get_context("fork").Value("b", 0)

    def interrupting(self, request):
        if os.getpid() != parent and request[0].shape[0] and request[0][:, 0].min() >= 1600 and not sent.value:
            sent.value = 1
            os.kill(parent, signal.SIGINT)
            time.sleep(0.02)  # the loop reads on meanwhile: this chunk is still out when it stops
        return real(self, request)

    monkeypatch.setattr(Pipeline, "classify", interrupting)
    result = run_recording(small_belt, small_model, SORTER, workers=2)
    s = result.summary
    assert s["stopped_by_signal"] is True and s["signal"] == "SIGINT"
    rec = read_belt_recording(small_belt)
    assert 1600 < s["lines"] < rec.n_lines and s["lines"] % 32 == 0
    monkeypatch.setattr(Pipeline, "classify", real)
    timing = timing_of(rec.meta)
    ref = run_loop(replay(rec.lines[:s["lines"]], timing.line_rate_hz, 32),
                   build_pipeline(rec.calibration, load_model(small_model), load_sorter(SORTER), timing, str(SORTER)))
    assert len(ref.events) > 50
    assert _strip(result.events) == _strip(ref.events)
    assert mp.active_children() == []


def test_an_error_in_the_loop_stops_the_workers(small_belt, small_model):
    """The loop fails (here its event log's disk is full): the error reaches the caller, and no
    worker is left running behind it."""
    class FullDisk:
        writes = 0

        def write(self, events):
            self.writes += 1
            if self.writes == 2:
                raise OSError(28, "No space left on device")

        def close(self):
            pass

    with pytest.raises(OSError, match="No space left"):
        run_recording(small_belt, small_model, SORTER, workers=2, log=FullDisk())
    assert mp.active_children() == []


def test_a_worker_that_cannot_set_up_is_named(small_belt, small_model, monkeypatch):
    """A worker whose set-up raises (here its model session) fails the run before the belt
    starts, with the worker's error, and nothing is left running."""
    def broken(self, model):
        raise MemoryError("no room for the session")

    monkeypatch.setattr(Pipeline, "serve_features", broken)
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    pipe = build_pipeline(rec.calibration, load_model(small_model), load_sorter(SORTER), timing, str(SORTER),
                          queue_chunks=queue_chunks(2))
    with pytest.raises(RuntimeError, match="feature worker 0 failed: MemoryError: no room for the session"):
        FeaturePool(pipe, small_model, 1)
    assert mp.active_children() == []


def test_an_empty_recording_is_summed_up_by_both_paths(small_belt, small_model, tmp_path):
    """No lines: one worker and two processes both finish with the same summary (rates
    undefined, not a division by zero), written where --summary-json asks."""
    import shutil

    from sorting.cli import main

    empty = tmp_path / "empty"
    shutil.copytree(small_belt, empty)
    meta = json.loads((empty / "recording.json").read_text())
    meta["lines"] = 0
    (empty / "recording.json").write_text(json.dumps(meta))
    (empty / "lines.u16").write_bytes(b"")
    (empty / "truth.csv").unlink()
    sums = {}
    for workers in (1, 2):
        out = tmp_path / f"s{workers}.json"
        assert main(["run", str(empty), "--model", str(small_model), "--sorter", str(SORTER), "--events",
                     str(tmp_path / f"e{workers}.jsonl"), "--workers", str(workers), "--quiet",
                     "--summary-json", str(out)]) == 0
        sums[workers] = json.loads(out.read_text())
    for s in sums.values():
        assert s["lines"] == 0 and s["particles"] == 0 and s["stream_s"] == 0.0
        assert s["cpu_fraction"] is None  # no stream time to share
    assert (tmp_path / "e2.jsonl").read_text() == ""


def test_the_binary_messages_carry_what_pickle_carried():
    """A chunk's request and result through the flat binary layout come back equal to what
    went in, with writable arrays of the same dtypes and shapes (the kernels were warmed up
    for pickled ones); a chunk with a failed or shed particle goes pickled instead."""
    import numpy as np

    from sorting.realtime.parallel import JobEncoder, decode_job, decode_message, encode_result, unpack_request

    rng = np.random.default_rng(4)
    boxes = np.array([[1023, 5, 3, 4], [17, 900, 2, 6], [40, 0, 1, 1]], np.int64)
    masks = [rng.random((int(h), int(w))) > 0.4 for h, w in boxes[:, 2:4]]
    judge = np.array([True, False, True])
    enc = JobEncoder()
    enc.buf = np.zeros(8, np.uint8)  # too small: it grows
    msg = enc.encode(77, (boxes, masks, None, None, judge))
    # tag, padding, 3 int64, the boxes, judge, the mask pixels: counted by hand
    assert msg.size == 8 + 24 + 3 * 32 + 3 + sum(m.size for m in masks)
    key, request = decode_job(bytearray(msg.tobytes()))
    got = unpack_request(request)
    assert key == 77 and np.array_equal(got[0], boxes) and got[0].dtype == np.int64
    assert all(np.array_equal(a, b) and a.dtype == bool and a.shape == b.shape for a, b in zip(got[1], masks))
    assert got[2] is None and got[3] is None and np.array_equal(got[4], judge)
    assert all(a.flags.writeable and a.flags.c_contiguous for a in (got[0], got[4], *got[1]))
    assert enc.encode(1, (boxes, masks, ["features: ValueError", None, None], None, judge)) is None
    assert enc.encode(1, (boxes, masks, None, np.array([False, True, False]), judge)) is None

    result = (np.array([0.25, 0.0, 0.875], np.float32), np.array([False, True, False]), None, 0.0015, 2, 0.0007)
    key, back = decode_message(encode_result(12, result))
    assert key == 12 and back[2] is None and back[3:] == result[3:]
    assert np.array_equal(back[0], result[0]) and back[0].dtype == np.float32 and back[0].flags.writeable
    assert np.array_equal(back[1], result[1]) and back[1].dtype == bool and back[1].flags.writeable
    assert encode_result(12, result[:2] + (["tramp: KeyError", None, None],) + result[3:]) is None
