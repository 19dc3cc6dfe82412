"""Configs are checked where they are made: from code (ValueError) as from a YAML file (one
line naming the file, exit status 2 through the CLI, covered by test_bad_input)."""
from __future__ import annotations

import pytest

from sorting.config import EjectorConfig, Layer, SorterConfig, SortingConfig, TubeConfig


@pytest.mark.parametrize("make, match", [
    (lambda: EjectorConfig(valve_pitch_mm=-1.0), r"EjectorConfig\.valve_pitch_mm must be > 0"),
    (lambda: EjectorConfig(valves=0), r"EjectorConfig\.valves must be > 0"),
    (lambda: EjectorConfig(response_ms=-0.5), r"EjectorConfig\.response_ms must be >= 0"),
    (lambda: EjectorConfig(distance_mm=float("nan")), r"EjectorConfig\.distance_mm must be a finite number"),
    (lambda: SortingConfig(eject="both"), r"SortingConfig\.eject must be one of 'sc', 'waste', got 'both'"),
    (lambda: SortingConfig(threshold=7), r"SortingConfig\.threshold must be <= 1"),
    (lambda: SortingConfig(threshold=-0.1), r"SortingConfig\.threshold must be >= 0"),
    (lambda: Layer("iron", -2.0), r"Layer\.thickness_mm must be >= 0"),
])
def test_a_bad_value_is_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_good_values_and_defaults_construct():
    s = SorterConfig(EjectorConfig(valves=40, valve_pitch_mm=25.0), SortingConfig(eject="waste", threshold=0.0))
    assert s.ejector.valves * s.ejector.valve_pitch_mm == 1000.0 and s.sorting.threshold == 0.0
    assert SortingConfig(threshold=None).threshold is None and SortingConfig(threshold=1.0).threshold == 1.0
    assert TubeConfig(kvp=120.0).kvp == 120.0
    with pytest.raises(ValueError, match=r"TubeConfig\.kvp must be > 0"):
        TubeConfig(kvp=0.0)
