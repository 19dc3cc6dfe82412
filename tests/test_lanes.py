"""Lane-parallel mode: the same events as one worker, and lane geometry by hand."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from sorting.config import CONFIG_DIR, load_sorter
from sorting.io import read_belt_recording
from sorting.realtime.lanes import Lane, _claim_rule, lane_windows, run_lanes
from sorting.realtime.runner import build_pipeline, run_loop, timing_of
from sorting.realtime.sources import replay
from sorting.stages.inference import load_model

SORTER = CONFIG_DIR / "sorter_reference.yaml"
WALL_CLOCK = ("latency_ms", "slack_ms", "late")


def test_windows_cover_the_belt_with_a_one_sided_overlap():
    lanes = lane_windows(1250, 2, 250, owned_weight=0.0)
    # equal windows: own_0 + overlap == P - own_1 start  ->  b = (1250 - 250) / 2 = 500
    assert lanes == [Lane(0, 750, 0, 500), Lane(500, 1250, 500, 1250)]
    # an owned column weighs 2 seen ones: (b + 250) + b == 2 (1250 - b)  ->  b = 562.5
    assert lane_windows(1250, 2, 250, owned_weight=1.0) == [Lane(0, 812, 0, 562), Lane(562, 1250, 562, 1250)]
    # three lanes, weight 4: 5 o + 250 for the first two, 5 o for the last, o summing to 1250
    # -> work 2250, owned 400, 400, 450
    assert [(lane.own_lo, lane.own_hi) for lane in lane_windows(1250, 3, 250, 4.0)] == [(0, 400), (400, 800),
                                                                                          (800, 1250)]
    three = lane_windows(1000, 3, 100, owned_weight=0.0)
    assert [lane.hi - lane.lo for lane in three] == [400, 400, 400]
    assert three[0].own_lo == 0 and three[-1].own_hi == 1000
    assert all(a.own_hi == b.own_lo for a, b in zip(three, three[1:]))
    assert lane_windows(800, 1, 250) == [Lane(0, 800, 0, 800)]


def test_claim_rule_by_hand():
    left, right = lane_windows(1250, 2, 250, owned_weight=0.0)
    own_left, own_right = _claim_rule(left, 1250), _claim_rule(right, 1250)
    # window columns: left lane 0..749 (absolute 0..749), right lane 0..749 (absolute 500..1249)
    assert own_left(10, 50)  # a plain rock in the left range
    assert own_left(480, 560)  # crosses the border: the left lane sees it whole
    assert not own_right(0, 60)  # ... and the right lane sees it cut at its window edge
    assert own_left(500, 540) and not own_right(0, 40)  # starts on the right lane's first column
    assert own_right(1, 40) and not own_left(501, 540)  # starts inside the right range
    assert not own_left(700, 749)  # reaches the left window's cut edge: too wide to be sure
    assert own_right(600, 749)  # the belt edge is not a cut


@pytest.mark.parametrize("workers", [2, 3])
def test_lanes_give_the_same_events_as_one_worker(small_belt, small_model, workers):
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    model, sorter = load_model(small_model), load_sorter(SORTER)
    one = run_loop(replay(rec.lines, timing.line_rate_hz, 32), build_pipeline(rec.calibration, model, sorter,
                                                                             timing, str(SORTER)))
    many = run_lanes(small_belt, small_model, SORTER, workers=workers)
    strip = lambda evs: [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in evs]  # noqa: E731
    assert len(one.events) > 100
    assert strip(many.events) == strip(one.events)
    assert many.summary["particles"] == one.summary["particles"]
    assert many.summary["ejected"] == one.summary["ejected"]


@pytest.mark.parametrize("x0", [0, 300, 750])
def test_a_window_reads_whole_lines_as_its_own_columns(small_belt, small_model, x0):
    """A lane is fed the detector's whole lines and reads its columns in place; the same
    pipeline fed a copy of just its columns must decide and flag exactly the same, faults
    included (a frozen module inside the window, saturated and dark lines, a gap)."""
    import numpy as np

    from sorting.stages.calibrate import calibrate
    from sorting.twin.faults import FaultSpec, inject

    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    cal = calibrate(rec.calibration)
    model, sorter = load_model(small_model), load_sorter(SORTER)
    width = 500  # x0 = 0: the first lane's window; 750: the last one, up to the belt's edge (1250 px)
    faults = [FaultSpec("dropped", 700, 20), FaultSpec("saturated", 1500, 10), FaultSpec("dark", 2500, 200),
              FaultSpec("stuck_module", 3500, 600, col0=x0 + 100, n_cols=64), FaultSpec("dark", 5000, 1)]
    chunks = list(inject(replay(rec.lines, timing.line_rate_hz, 32), faults, cal, seed=1))
    runs = []
    for cols in (slice(None), slice(x0, x0 + width)):
        pipe = build_pipeline(cal, model, sorter, timing, str(SORTER), x0=x0, width=width)
        events = []
        for first, raw, t_in in chunks:
            part = raw[:, cols]
            if cols.start is not None:
                part = np.ascontiguousarray(part)  # the window's own columns, as a copy
            events += pipe.step(first, part, t_in)
        events += pipe.finish()
        runs.append((events, dict(pipe.health.lines), dict(pipe.health.episodes)))
    (whole, lines_w, eps_w), (own, lines_o, eps_o) = runs
    strip = lambda evs: [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in evs]  # noqa: E731
    assert len(own) > 20 and lines_o["stuck_module"] > 0 and lines_o["saturated"] == 10
    assert strip(whole) == strip(own)
    assert (lines_w, eps_w) == (lines_o, eps_o)


def test_paced_lanes_decide_as_one_worker_and_time_from_the_merge(small_belt, small_model):
    """Paced (1.5 s of belt in real time), the merged events re-time latency to the release:
    decisions equal the single worker's, and latency and slack are re-timed together (an eject's
    latency plus its slack is its command's due time after its last line, whatever the clock)."""
    rec = read_belt_recording(small_belt)
    timing = timing_of(rec.meta)
    sorter = load_sorter(SORTER)
    one = run_loop(replay(rec.lines, timing.line_rate_hz, 32),
                   build_pipeline(rec.calibration, load_model(small_model), sorter, timing, str(SORTER)))
    paced = run_lanes(small_belt, small_model, SORTER, workers=2, realtime=True)
    strip = lambda e: {k: v for k, v in e.items() if k not in WALL_CLOCK}  # noqa: E731
    assert len(paced.events) == len(one.events)
    # a particle left undecided by an overloaded moment (a VM stall) is the only allowed difference
    undecided = [p["undecided"] for p in paced.events]
    assert sum(undecided) <= len(undecided) // 100
    assert all(strip(p) == strip(o) for p, o, u in zip(paced.events, one.events, undecided) if not u)
    s = paced.summary
    assert s["wall_s"] >= 0.9 * rec.n_lines / timing.line_rate_hz  # it did keep to the line clock
    resp_ms = sorter.ejector.response_ms
    fired = [e for e in paced.events if e["decision"] == "eject"]
    assert len(fired) > 50
    for e in fired:
        due_ms = e["open_s"] * 1000.0 - resp_ms - e["last_line"] / timing.line_rate_hz * 1000.0
        assert abs(e["latency_ms"] + e["slack_ms"] - due_ms) < 0.01
        assert e["latency_ms"] > 0
    assert s["late"] == sum(e["late"] for e in fired)


def _timed_log():
    """An event log that notes the wall time of its first write."""
    class Log:
        first = None
        count = 0

        def write(self, events):
            self.first = self.first or time.perf_counter()
            self.count += len(events)

        def close(self):
            pass

    return Log()


def test_a_lane_that_dies_ends_the_run_with_an_error_not_a_hang(small_belt, small_model, monkeypatch):
    """A lane killed early in a paced belt (here: it exits at line 400, 0.1 s in, as if out of
    memory) sends no last message. The parent must notice while the other lane still streams
    (it would go on for another 1.4 s), stop it, and raise; what was merged was logged."""
    import multiprocessing as mp

    from sorting.realtime.stream import Pipeline

    real_step = Pipeline.step

    def dying_step(self, first_line, raw, t_in):
        if self.x0 > 0 and first_line >= 400:
            os._exit(3)
        return real_step(self, first_line, raw, t_in)

    monkeypatch.setattr(Pipeline, "step", dying_step)  # the lanes fork after this: they inherit it
    log = _timed_log()
    with pytest.raises(RuntimeError, match=r"lane 1 died \(exit code 3\)"):
        run_lanes(small_belt, small_model, SORTER, workers=2, realtime=True, log=log)
    raised = time.perf_counter()
    assert log.first is not None and log.count > 0  # decisions from before the death were merged
    # the belt had 1.4 s to go; _Watch gives up on a dead lane within ~0.2 s
    assert raised - log.first < 1.0
    assert mp.active_children() == []


def test_a_stop_signal_stops_every_lane_at_the_same_chunk(small_belt, small_model, monkeypatch):
    """SIGINT reaches the parent while the lanes are far apart (unpaced, lane 0 slowed more than
    lane 1): they agree on one chunk to stop at (the one after the furthest lane's), so the
    merged events are exactly one worker's on the lines read, and the run says it was stopped."""
    from sorting.realtime.stream import Pipeline

    real_step = Pipeline.step

    def skewed_step(self, first_line, raw, t_in):
        time.sleep(0.003 if self.x0 == 0 else 0.001)  # lane 0 falls behind lane 1
        if self.x0 == 0 and first_line == 1600:
            os.kill(os.getppid(), signal.SIGINT)  # as a Ctrl-C, once, mid-belt
        return real_step(self, first_line, raw, t_in)

    monkeypatch.setattr(Pipeline, "step", skewed_step)
    result = run_lanes(small_belt, small_model, SORTER, workers=2)
    s = result.summary
    assert s["stopped_by_signal"] is True and s["signal"] == "SIGINT"
    rec = read_belt_recording(small_belt)
    assert 1600 + 32 * 10 < s["lines"] < rec.n_lines and s["lines"] % 32 == 0  # lane 1 was well ahead
    monkeypatch.setattr(Pipeline, "step", real_step)
    timing = timing_of(rec.meta)
    one = run_loop(replay(rec.lines[:s["lines"]], timing.line_rate_hz, 32),
                   build_pipeline(rec.calibration, load_model(small_model), load_sorter(SORTER), timing, str(SORTER)))
    strip = lambda evs: [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in evs]  # noqa: E731
    assert len(one.events) > 50
    assert strip(result.events) == strip(one.events)


def test_an_error_in_the_merge_stops_the_lanes(small_belt, small_model):
    """The merging parent fails (here its event log's disk is full): the error reaches the
    caller, and no lane process is left running behind it."""
    import multiprocessing as mp

    class FullDisk:
        writes = 0

        def write(self, events):
            self.writes += 1
            if self.writes == 2:
                raise OSError(28, "No space left on device")

        def close(self):
            pass

    with pytest.raises(OSError, match="No space left"):
        run_lanes(small_belt, small_model, SORTER, workers=2, log=FullDisk())
    assert mp.active_children() == []


def test_an_empty_recording_is_summed_up_by_both_paths(small_belt, small_model, tmp_path):
    """No lines: one worker and two lanes both finish with the same summary (rates undefined,
    not a division by zero), written where --summary-json asks."""
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
