"""The digital twin: Crater Lake ore, rock shapes, belt scenes and the sorter's detector."""
from __future__ import annotations

from sorting.twin.belt import BeltTwin, simulate_belt
from sorting.twin.ore import mineral_list, sample_composition
from sorting.twin.render import Renderer
from sorting.twin.rocks import make_rock, simulate_rocks

__all__ = ["BeltTwin", "Renderer", "make_rock", "mineral_list", "sample_composition", "simulate_belt", "simulate_rocks"]

