"""`sorting bench --json` on a given recording: the bench keys of docs/cli.md, and the
derived numbers consistent with the measured ones (the speed itself is never asserted)."""
from __future__ import annotations

import json

import pytest

from sorting.cli import main
from sorting.io import read_belt_recording


def test_bench_keys_and_ratios(small_belt, small_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--recording", str(small_belt), "--model", str(small_model), "--workers", "1",
                 "--repeats", "3", "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    rec = read_belt_recording(small_belt)
    # a short reading on stdout, every number in the file only
    assert "{" not in printed and len(printed.splitlines()) <= 12
    assert f"= {r['realtime_factor']:.2f}x the line rate" in printed and "target 10x" in printed
    lat = r["latency_ms"]
    assert f"p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p999']:.2f}  max {lat['max']:.2f} ms" in printed
    assert f"late: {r['late']} (" in printed and f"CPU {r['cpu_fraction']:.2f}" in printed
    # the deadline from the reference sorter by hand: (300 - 5 - L) mm / 3 m/s - 3 ms
    assert r["budget_ms"] == {"rock_10mm": pytest.approx(92.0), "rock_100mm": pytest.approx(62.0)}
    assert "92 ms for a 10 mm rock, 62 ms for a 100 mm rock" in printed
    for key in ("line_rate_hz", "pixels", "lines", "particles", "throughput_lines_s", "realtime_factor",
                "latency_ms", "late", "cpu_fraction"):
        assert key in r, key
    assert set(r["latency_ms"]) >= {"p50", "p99", "p999", "max"}
    assert r["lines"] == rec.n_lines and r["pixels"] == rec.lines.shape[1]
    assert r["line_rate_hz"] == pytest.approx(rec.line_rate_hz)
    assert r["realtime_factor"] == pytest.approx(r["throughput_lines_s"] / r["line_rate_hz"])
    assert r["pipeline_over_floor"] == pytest.approx(r["throughput_lines_s"] / r["floor_throughput_lines_s"])
    # the reported run is the median of the three
    runs = sorted(r["realtime_factor_runs"])
    assert len(runs) == 3 and r["realtime_factor"] == pytest.approx(runs[1], abs=1e-3)
    assert r["floor_realtime_factor"] == pytest.approx(sorted(r["floor_realtime_factor_runs"])[1], abs=1e-2)
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"] + 0.01
    # every rock of the recording is a particle, paced or not (the twin lays them apart)
    assert r["particles"] == r["paced_particles"] == len(rec.truth)
    assert r["late"] == r["late_ejects"] + r["undecided"]
    # the paced run's decomposition: intake lag and step time, each a distribution
    for key in ("intake_lag_ms", "step_ms"):
        assert 0 <= r[key]["p50"] <= r[key]["p999"] <= r[key]["max"] + 0.01
    assert "dense" not in r  # only on a belt the bench simulates itself


def test_bench_workers_keys(small_belt, small_model, tmp_path, capsys):
    """The particle-parallel runs under ``workers``: against the one-worker runs of the same
    bench, the events compared, and the paced run beside one worker's paced run."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--recording", str(small_belt), "--model", str(small_model), "--workers", "2",
                 "--repeats", "1", "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "lanes" not in r
    w = r["workers"]
    assert (f"workers: 2 processes (particle-parallel), unpaced {w['realtime_factor']:.2f}x the line rate = "
            f"{w['speedup_over_one_worker']:.2f}x one worker (target 1.8x for 2: ") in printed
    assert f"CPU {w['cpu_s']:.2f} s (one worker {w['one_worker_cpu_s']:.2f} s)" in printed
    assert w["mode"] == "particle-parallel"
    assert w["count"] == 2 and w["particles"] == r["particles"]
    assert w["speedup_over_one_worker"] == pytest.approx(w["throughput_lines_s"] / r["throughput_lines_s"])
    assert w["realtime_factor"] == pytest.approx(w["throughput_lines_s"] / r["line_rate_hz"])
    assert len(w["worker_cpu_s"]) == len(w["worker_chunks"]) == 1
    assert w["cpu_s"] == pytest.approx(w["loop_cpu_s"] + sum(w["worker_cpu_s"]), abs=1e-3)
    assert w["one_worker_cpu_s"] > 0 and w["worker_chunks"][0] + w["local_chunks"] > 0
    # every chunk of the stream classified once, by the worker or by the loop (a chunk with no
    # completed particle sends nothing)
    chunks = -(-r["lines"] // r["chunk_lines"])
    assert w["worker_chunks"][0] + w["local_chunks"] <= chunks
    # the workers decide as one worker does (tests/test_workers.py checks it event by event)
    assert w["events_equal_one_worker"] is True and "events equal one worker's: yes" in printed
    # paced with 2 processes, next to the one-worker paced run of the same bench
    p, one = w["paced"], w["one_worker_paced"]
    assert p["paced_particles"] == len(read_belt_recording(small_belt).truth)
    assert p["late"] == p["late_ejects"] + p["undecided"]
    lat = p["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"] + 0.01
    assert one == {k: r[k] for k in ("latency_ms", "late", "late_ejects", "undecided", "cpu_fraction")}
    lat, lat1 = p["latency_ms"], one["latency_ms"]
    assert (f"workers, paced: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  p99.9 {lat['p999']:.2f} ms, late {p['late']} "
            f"(one worker: p50 {lat1['p50']:.2f}  p99 {lat1['p99']:.2f}  p99.9 {lat1['p999']:.2f} ms, "
            f"late {one['late']})") in printed


def test_same_events_leaves_out_the_wall_clock_only():
    import dataclasses

    from sorting.cli.bench import same_events
    from sorting.realtime.events import Event

    a = [Event(0, 10, 19, 5, 9, 14.5, 7.0, 40.0, 0.9, "eject", [1], 0.3, 0.31, 3.1, 80.0, False, "sc")]
    b = [dataclasses.replace(a[0], latency_ms=9.7, slack_ms=70.2, late=True)]
    assert same_events(a, b)
    assert not same_events(a, [dataclasses.replace(b[0], decision="pass")])
    assert not same_events(a, [dataclasses.replace(b[0], score=0.8)])
    assert not same_events(a, a + a)
