"""Memory over a long run: a recording looped into minutes of belt, RSS sampled as it runs.

    python benchmarks/bench_memory.py RECORDING --minutes 10 --out out/memory

The loop sees one continuous stream (line indices keep growing; each pass of the recording
follows the previous one), sorted unpaced with the shipped model; the event log is written
as in production. Writes ``memory.json`` (RSS samples, growth per stream minute) and
``memory.png``.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sorting.cli.demo import SHIPPED_MODEL  # noqa: E402
from sorting.config import CONFIG_DIR, load_sorter  # noqa: E402
from sorting.io import read_belt_recording  # noqa: E402
from sorting.realtime.runner import build_pipeline, run_loop, timing_of  # noqa: E402
from sorting.realtime.sinks import EventLog  # noqa: E402
from sorting.stages.inference import load_model


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def looped(lines: np.ndarray, passes: int, chunk: int, samples: list, rate: float):
    n = lines.shape[0] - lines.shape[0] % chunk  # whole chunks, so passes join without a gap
    next_sample = 0.0
    for k in range(passes):
        for first in range(0, n, chunk):
            line = k * n + first
            if line / rate >= next_sample:
                samples.append((line / rate, rss_mb()))
                next_sample += 10.0
            yield line, lines[first:first + chunk], time.perf_counter()
    samples.append((passes * n / rate, rss_mb()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording", type=Path)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("out/memory"))
    args = ap.parse_args()
    rec = read_belt_recording(args.recording)
    timing = timing_of(rec.meta)
    sorter_path = CONFIG_DIR / "sorter_reference.yaml"
    pipe = build_pipeline(rec.calibration, load_model(SHIPPED_MODEL), load_sorter(sorter_path), timing,
                          str(sorter_path))
    passes = max(1, int(np.ceil(args.minutes * 60 * timing.line_rate_hz / rec.n_lines)))
    args.out.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, float]] = []
    log = EventLog(args.out / "events.jsonl")
    summary = run_loop(looped(rec.lines, passes, 32, samples, timing.line_rate_hz), pipe, log,
                       keep_events=False).summary
    t = np.array([s[0] for s in samples]) / 60.0
    mb = np.array([s[1] for s in samples])
    late_half = t >= t[-1] / 2  # after warm-up: the slope that would matter over months
    slope = float(np.polyfit(t[late_half], mb[late_half], 1)[0]) if late_half.sum() > 2 else None
    result = {"stream_minutes": float(t[-1]), "particles": summary["particles"], "rss_mb_start": float(mb[0]),
              "rss_mb_end": float(mb[-1]), "rss_mb_max": float(mb.max()),
              "growth_mb_per_stream_minute_second_half": slope, "realtime_factor": summary["realtime_factor"],
              "samples": samples}
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(t, mb, ".-")
    ax.set_xlabel("stream minutes")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"{summary['particles']} particles, growth {slope:+.2f} MiB/min (second half)"
                 if slope is not None else "memory")
    fig.tight_layout()
    fig.savefig(args.out / "memory.png", dpi=100)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
