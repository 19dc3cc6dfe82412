"""The live digital-twin source: the belt generated on the fly sorts like its recording."""
from __future__ import annotations

from loop_helpers import run_loop

from sorting.config import CONFIG_DIR, load_machine, load_ore, load_sorter
from sorting.io import read_belt_recording
from sorting.physics import load_materials
from sorting.realtime.runner import build_pipeline, timing_of
from sorting.realtime.sources import rechunk, replay
from sorting.stages.inference import load_model
from sorting.twin import BeltTwin, simulate_belt

SORTER = CONFIG_DIR / "sorter_reference.yaml"
WALL_CLOCK = ("latency_ms", "slack_ms", "late")


def test_live_twin_gives_the_recordings_events(tmp_path, small_model):
    machine, ore, lib = load_machine(), load_ore(), load_materials()
    model, sorter = load_model(small_model), load_sorter(SORTER)
    rec = read_belt_recording(simulate_belt(tmp_path / "belt", 0.6, 31, machine, ore, lib, progress=False))
    timing = timing_of(rec.meta)
    recorded = run_loop(replay(rec.lines, timing.line_rate_hz, 32),
                        build_pipeline(rec.calibration, model, sorter, timing, str(SORTER)))
    twin = BeltTwin(0.6, 31, machine, ore, lib)  # blocks of 2048 lines, re-cut into 32-line chunks
    live = run_loop(rechunk(twin.chunks(), machine.belt.line_rate_hz, 32),
                    build_pipeline(twin.calibration_scans(), model, sorter, timing, str(SORTER)))
    strip = lambda evs: [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in evs]  # noqa: E731
    assert len(recorded.events) > 50
    assert strip(live.events) == strip(recorded.events)
    assert len(twin.truth) == len(rec.truth)
