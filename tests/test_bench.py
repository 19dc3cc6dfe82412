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
    """The particle-parallel runs, under the ``lanes`` key readers of the bench JSON know."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--recording", str(small_belt), "--model", str(small_model), "--workers", "2",
                 "--repeats", "1", "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    lanes = r["lanes"]
    assert (f"workers: 2 processes (particle-parallel) {lanes['realtime_factor']:.2f}x = "
            f"{lanes['speedup_over_one_worker']:.2f}x one worker (target 1.7x for 2: ") in capsys.readouterr().out
    assert lanes["mode"] == "particle-parallel"
    assert lanes["workers"] == 2 and lanes["particles"] == r["particles"]
    assert lanes["speedup_over_one_worker"] == pytest.approx(lanes["throughput_lines_s"] / r["throughput_lines_s"])
    assert lanes["realtime_factor"] == pytest.approx(lanes["throughput_lines_s"] / r["line_rate_hz"])
    assert len(lanes["worker_cpu_s"]) == len(lanes["worker_chunks"]) == 1
    assert lanes["cpu_s"] == pytest.approx(lanes["loop_cpu_s"] + sum(lanes["worker_cpu_s"]), abs=1e-3)
    assert lanes["one_worker_cpu_s"] > 0 and lanes["worker_chunks"][0] + lanes["local_chunks"] > 0
