"""One particle must never stop the belt: a stage that raises for chosen particles in the
middle of the belt (splitting, features, inference, planning) costs those particles only.

Each test replays the small simulated belt (conftest ``small_belt``) with one stage function
replaced by one that raises for the chosen particles and calls the real function otherwise.
The other particles must get exactly a clean run's events (clock keys aside), the chosen ones
pass with an ``error`` key naming the stage, the summary counts them, and the alarms count
the episodes. The chosen particles and the expected episode count come from the clean run's
events and the chunk arithmetic (a particle completes in the chunk holding the line after
its last line), not from the code under test.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import numpy as np
import pytest
from conftest import SORTER_YAML
from loop_helpers import run_loop

import sorting.realtime.stream as stream
import sorting.stages.stitch as stitch
from sorting.cli import main
from sorting.realtime.health import FAULT_KINDS
from sorting.realtime.runner import build_pipeline, timing_of
from sorting.realtime.sources import replay
from sorting.stages.inference import OnnxModel
from sorting.stages.particles import SegmentConfig

CHUNK = 32
CLOCK_KEYS = ("latency_ms", "slack_ms", "late")
#: what a failed particle keeps from its clean self: where and what it is
PLACE_KEYS = ("first_line", "last_line", "x_min_px", "x_max_px", "centroid_line", "centroid_px", "area_mm2", "cut",
              "too_long", "touches_border", "fault")


class Boom(RuntimeError):
    """The injected failure."""


# ------------------------------------------------------------------ fixtures and helpers
def _run(rec, model, sorter):
    pipe = build_pipeline(rec.calibration, model, sorter, timing_of(rec.meta), str(SORTER_YAML), CHUNK)
    return run_loop(replay(rec.lines, rec.line_rate_hz, CHUNK), pipe)


@pytest.fixture(scope="module")
def clean(rec, model, sorter):
    """The clean run, and the components the stitcher handed to ``split.pieces`` (line0, col0)."""
    calls = set()
    real = stitch.pieces

    def spy(mask, line0, col0, *args, **kwargs):
        calls.add((line0, col0))
        return real(mask, line0, col0, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stitch, "pieces", spy)
        result = _run(rec, model, sorter)
    assert result.summary["particle_errors"] == 0 and not any("error" in e for e in result.events)
    return result, calls


def _chunk(e) -> int:
    return (e["last_line"] + 1) // CHUNK


def _targets(events, eligible=lambda e: True) -> list[dict]:
    """Four particles to fail, each the only one on its first line: a clean-run eject after
    line 1500; two in consecutive chunks after line 2500 (one episode); one after line 3800."""
    per_line = Counter(e["first_line"] for e in events)
    cand = [e for e in events if per_line[e["first_line"]] == 1 and eligible(e)]
    first = next(e for e in cand if e["first_line"] >= 1500 and e["decision"] == "eject")
    pair = next((a, b) for a, b in zip(cand, cand[1:]) if a["first_line"] >= 2500 and _chunk(b) == _chunk(a) + 1)
    last = next(e for e in cand if e["first_line"] >= 3800)
    return [first, *pair, last]


def _episodes(events, failed: set[int]) -> int:
    """Runs of consecutive chunks (those that complete particles) holding a failed particle."""
    chunks = sorted({_chunk(e) for e in events})
    bad = {_chunk(e) for e in events if e["first_line"] in failed}
    return sum(c in bad and (k == 0 or chunks[k - 1] not in bad) for k, c in enumerate(chunks))


def _strip(events, drop=()):
    return [{k: v for k, v in e.items() if k not in CLOCK_KEYS and k not in drop} for e in events]


def _check(rec, clean_events, result, targets: list[dict], stage: str) -> None:
    failed = {t["first_line"] for t in targets}
    s, events = result.summary, result.events
    assert s["lines"] == rec.n_lines and s["stopped_by_signal"] is False  # the belt went on to its end
    assert len(events) == len(clean_events) == s["particles"]
    bad = [e for e in events if e["first_line"] in failed]
    good = [e for e in events if e["first_line"] not in failed]
    # the others: exactly the clean run's decisions, ids included (no particle was lost)
    assert _strip(good) == _strip([e for e in clean_events if e["first_line"] not in failed])
    assert not any("error" in e for e in good)
    # the chosen ones: passed, flagged with the stage and the exception type, otherwise the same particle
    assert len(bad) == len(targets) == 4
    by_line = {e["first_line"]: e for e in clean_events}
    for e in bad:
        assert e["error"] == f"{stage}: Boom"
        assert e["decision"] == "pass" and e["valves"] == [] and e["open_s"] is None and e["close_s"] is None
        c = by_line[e["first_line"]]
        assert {k: e[k] for k in PLACE_KEYS} == {k: c[k] for k in PLACE_KEYS}
        assert e["particle"] == c["particle"]
    assert any(by_line[t]["decision"] == "eject" for t in failed)  # an eject became a pass
    assert s["particle_errors"] == 4
    assert s["ejected"] == sum(e["decision"] == "eject" for e in clean_events) - sum(
        by_line[t]["decision"] == "eject" for t in failed)
    # by hand: three groups of failures, the middle one spanning two consecutive chunks
    assert _episodes(clean_events, failed) == 3
    assert s["alarms"] == {**dict.fromkeys(FAULT_KINDS, 0), stream.ERROR_ALARM: 3}


# ------------------------------------------------------------------ each stage fails for the chosen particles
def test_a_split_that_raises_passes_its_component_whole(rec, model, sorter, clean, monkeypatch):
    clean_result, calls = clean
    targets = _targets(clean_result.events, lambda e: (e["first_line"], e["x_min_px"]) in calls)
    failed = {t["first_line"] for t in targets}
    real = stitch.pieces

    def pieces(mask, line0, col0, *args, **kwargs):
        if line0 in failed:
            raise Boom("a rock of the wrong shape")
        return real(mask, line0, col0, *args, **kwargs)

    monkeypatch.setattr(stitch, "pieces", pieces)
    _check(rec, clean_result.events, _run(rec, model, sorter), targets, "splitting")


def test_features_that_raise_pass_only_their_particles(rec, model, sorter, clean, monkeypatch):
    targets = _targets(clean[0].events)
    failed = {t["first_line"] for t in targets}
    real = stream.features_from_ring

    def features(ring, boxes, masks, *args, **kwargs):
        if np.isin(boxes[:, 0], list(failed)).any():
            raise Boom("features")
        return real(ring, boxes, masks, *args, **kwargs)

    monkeypatch.setattr(stream, "features_from_ring", features)
    _check(rec, clean[0].events, _run(rec, model, sorter), targets, "features")


def test_inference_that_raises_passes_only_its_particles(rec, model, sorter, clean, monkeypatch):
    """The model fails on the chosen particles' feature rows (recorded as the loop computes
    them), in whatever batch they come."""
    targets = _targets(clean[0].events)
    failed = {t["first_line"] for t in targets}
    rows: list[np.ndarray] = []
    real_features, real_scores = stream.features_from_ring, OnnxModel.scores_f32

    def features(ring, boxes, masks, *args, out, **kwargs):
        real_features(ring, boxes, masks, *args, out=out, **kwargs)
        for i in np.flatnonzero(np.isin(boxes[:, 0], list(failed))):
            rows.append(np.where(np.isinf(out[i]), np.float32(np.nan), out[i]))
        return out

    def scores(self, x):
        if any(np.array_equal(x[i], r, equal_nan=True) for r in rows for i in range(x.shape[0])):
            raise Boom("inference")
        return real_scores(self, x)

    monkeypatch.setattr(stream, "features_from_ring", features)
    monkeypatch.setattr(OnnxModel, "scores_f32", scores)
    result = _run(rec, model, sorter)
    assert len(rows) == 4
    _check(rec, clean[0].events, result, targets, "inference")


def test_planning_that_raises_passes_only_its_particles(rec, model, sorter, clean, monkeypatch):
    targets = _targets(clean[0].events)
    failed = {t["first_line"] for t in targets}
    real = stream._chunk_plan

    def plan(ints, p):
        if np.isin(ints[:, 0], list(failed)).any():
            raise Boom("planning")
        return real(ints, p)

    monkeypatch.setattr(stream, "_chunk_plan", plan)
    _check(rec, clean[0].events, _run(rec, model, sorter), targets, "planning")


def test_failed_particles_pass_when_the_jets_blow_out_waste(rec, model, sorter, monkeypatch):
    """A failed particle scores 0 (class waste): with the jets on waste it must still pass."""
    waste = dataclasses.replace(sorter, sorting=dataclasses.replace(sorter.sorting, eject="waste"))
    clean_events = _run(rec, model, waste).events
    targets = _targets(clean_events)
    failed = {t["first_line"] for t in targets}
    real = stream.features_from_ring

    def features(ring, boxes, masks, *args, **kwargs):
        if np.isin(boxes[:, 0], list(failed)).any():
            raise Boom("features")
        return real(ring, boxes, masks, *args, **kwargs)

    monkeypatch.setattr(stream, "features_from_ring", features)
    _check(rec, clean_events, _run(rec, model, waste), targets, "features")


def test_failures_and_overload_together(rec, model, sorter, clean, monkeypatch):
    """With overload shedding on, a particle shed as undecided is never classified, so its
    failing features cannot fail it; the others fail as without shedding. The chunk holding
    the last line of the pair's second particle is stamped long ago (its particles are
    overdue and shed), every other chunk in the future (none is shed, however slow the run)."""
    first, a, b, last = _targets(clean[0].events)
    overdue = {b["last_line"] // CHUNK}

    def run():
        pipe = build_pipeline(rec.calibration, model, sorter, timing_of(rec.meta), str(SORTER_YAML), CHUNK,
                              shed_late=True)
        chunks = ((f, raw, -1000.0 if f // CHUNK in overdue else time.perf_counter() + 1000.0)
                  for f, raw, _ in replay(rec.lines, rec.line_rate_hz, CHUNK))
        return run_loop(chunks, pipe)

    calm = run()
    failed = {t["first_line"] for t in (first, a, b, last)}
    real = stream.features_from_ring

    def features(ring, boxes, masks, *args, **kwargs):
        if np.isin(boxes[:, 0], list(failed)).any():
            raise Boom("features")
        return real(ring, boxes, masks, *args, **kwargs)

    monkeypatch.setattr(stream, "features_from_ring", features)
    result = run()
    shed = [e for e in result.events if e["last_line"] // CHUNK in overdue]
    assert shed and all(e["undecided"] and e["decision"] == "pass" for e in shed)
    assert not any(e["undecided"] for e in result.events if e["last_line"] // CHUNK not in overdue)
    assert not any("error" in e for e in shed)  # b among them: shed, not failed
    assert [e["first_line"] for e in result.events if "error" in e] == [first["first_line"], a["first_line"],
                                                                        last["first_line"]]
    assert result.summary["undecided"] == len(shed) and result.summary["particle_errors"] == 3
    assert result.summary["alarms"][stream.ERROR_ALARM] == _episodes(clean[0].events, failed - {b["first_line"]}) == 3
    keep = failed - {b["first_line"]}
    assert _strip([e for e in result.events if e["first_line"] not in keep]) == _strip(
        [e for e in calm.events if e["first_line"] not in keep])


# ------------------------------------------------------------------ the command line, one and two processes
def test_cli_run_reports_particle_errors_with_one_worker_and_with_workers(small_belt, small_model, clean, tmp_path,
                                                                       monkeypatch, capsys):
    """`sorting run` and `sorting run --workers 2` (the feature workers fork after the patch: they inherit
    it): the same events, the errors in the event log, the summary text and its JSON."""
    targets = _targets(clean[0].events)
    failed = {t["first_line"] for t in targets}
    real = stream.features_from_ring

    def features(ring, boxes, masks, *args, **kwargs):
        if np.isin(boxes[:, 0], list(failed)).any():
            raise Boom("features")
        return real(ring, boxes, masks, *args, **kwargs)

    monkeypatch.setattr(stream, "features_from_ring", features)
    logs = {}
    for workers in (1, 2):
        events, summary = tmp_path / f"events{workers}.jsonl", tmp_path / f"summary{workers}.json"
        assert main(["run", str(small_belt), "--model", str(small_model), "--sorter", str(SORTER_YAML),
                     "--events", str(events), "--summary-json", str(summary), "--workers", str(workers),
                     "--quiet"]) == 0
        out = capsys.readouterr().out
        assert "particle errors 4:" in out and "particle_error 3" in out
        s = json.loads(summary.read_text())
        assert s["particle_errors"] == 4 and s["alarms"][stream.ERROR_ALARM] == 3
        logs[workers] = [json.loads(line) for line in events.read_text().splitlines()]
        errs = [e for e in logs[workers] if "error" in e]
        assert sorted(e["first_line"] for e in errs) == sorted(failed)
        assert all(e["error"] == "features: Boom" and e["decision"] == "pass" for e in errs)
    assert _strip(logs[2]) == _strip(logs[1])


def test_the_alarm_counts_episodes_not_particles(rec, model, sorter, clean, monkeypatch):
    """Every particle of 20 consecutive chunks fails: one episode, however many particles."""
    events = clean[0].events
    chunks = sorted({_chunk(e) for e in events if 2000 <= e["first_line"]})[:20]
    failed = {e["first_line"] for e in events if _chunk(e) in chunks}
    real = stream.features_from_ring

    def features(ring, boxes, masks, *args, **kwargs):
        if np.isin(boxes[:, 0], list(failed)).any():
            raise Boom("features")
        return real(ring, boxes, masks, *args, **kwargs)

    monkeypatch.setattr(stream, "features_from_ring", features)
    result = _run(rec, model, sorter)
    n_failed = sum(e["first_line"] in failed for e in events)
    assert n_failed > 100
    assert result.summary["particle_errors"] == n_failed == sum("error" in e for e in result.events)
    assert result.summary["alarms"][stream.ERROR_ALARM] == _episodes(events, failed) == 1
    assert not any(e["decision"] == "eject" for e in result.events if "error" in e)


# ------------------------------------------------------------------ what is not a particle's still ends the run
@pytest.mark.parametrize("where", ["line pass", "stitching", "event log"])
def test_errors_beyond_one_particle_still_end_the_run(rec, model, sorter, monkeypatch, where):
    """The chunk's line pass, the stitcher's run tracking and the event log are not one
    particle's work: an error there ends the run (here in the middle of the belt)."""
    pipe = build_pipeline(rec.calibration, model, sorter, timing_of(rec.meta), str(SORTER_YAML), CHUNK)

    class Log:
        def write(self, events):
            if where == "event log" and events[0].first_line > 2000:
                raise OSError(28, "No space left on device")

        def close(self):
            pass

    if where == "line pass":
        real = stream.Pipeline._normalize_lines

        def normalize(self, raw, health, a, mask, acc):
            if self.counters.lines >= 2000:
                raise Boom("line pass")
            return real(self, raw, health, a, mask, acc)

        monkeypatch.setattr(stream.Pipeline, "_normalize_lines", normalize)
    elif where == "stitching":
        real_track = stitch.K.track_chunk

        def track(m8, first_line, *args):
            if first_line >= 2000:
                raise Boom("stitching")
            return real_track(m8, first_line, *args)

        monkeypatch.setattr(stitch.K, "track_chunk", track)
    with pytest.raises((Boom, OSError)):
        run_loop(replay(rec.lines, rec.line_rate_hz, CHUNK), pipe, log=Log())


# ------------------------------------------------------------------ the stitcher's own fallback
def test_a_component_whose_split_raises_comes_out_whole(monkeypatch):
    """Two discs joined by a neck split in two; when the split raises, the component comes
    out as one particle flagged with the error, and a rock beside it is untouched."""
    yy, xx = np.mgrid[:24, :60]
    necked = ((yy - 12) ** 2 + (xx - 11) ** 2 < 100) | ((yy - 12) ** 2 + (xx - 29) ** 2 < 100)
    mask = np.zeros((40, 60), bool)
    mask[4:28] = necked
    mask[8:20, 46:56] = True  # a rock on its own (a rectangle: no split to try)
    config = SegmentConfig(min_area_mm2=0.0)

    def stream_of(mask):
        seg = stitch.StreamSegmenter(60, None, 1.0, 1.0, config)
        out = [*seg.push(100, mask[:16]), *seg.push(116, mask[16:]), *seg.flush()]
        return seg, sorted(out, key=lambda p: (p.col0, p.line0))

    seg, parts = stream_of(mask)
    assert seg.errors == 0 and [p.split for p in parts] == [True, True, False]
    real = stitch.pieces

    def pieces(m, line0, col0, *args, **kwargs):
        if col0 < 40:
            raise Boom("split")
        return real(m, line0, col0, *args, **kwargs)

    monkeypatch.setattr(stitch, "pieces", pieces)
    seg, broken = stream_of(mask)
    assert seg.errors == 1 and len(broken) == 2
    whole, rock = broken
    assert whole.error == "splitting: Boom" and not whole.split
    rows, cols = np.nonzero(necked)  # stream line 100 + 4 + row, detector column col
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    assert (whole.line0, whole.line1, whole.col0, whole.col1) == (104 + r0, 104 + r1, c0, c1)
    np.testing.assert_array_equal(whole.mask, necked[r0:r1 + 1, c0:c1 + 1])
    assert whole.area_px == necked.sum() == parts[0].area_px + parts[1].area_px
    assert whole.centroid_line == pytest.approx(104 + rows.mean())
    assert whole.centroid_px == pytest.approx(cols.mean())
    assert rock.error is None and not rock.split
    assert (rock.line0, rock.line1, rock.col0, rock.col1, rock.area_px) == (108, 119, 46, 55, 120)
    np.testing.assert_array_equal(rock.mask, parts[2].mask)
