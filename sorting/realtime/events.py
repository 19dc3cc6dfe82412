"""The loop's decision about one particle: a typed event, written to the event log as one JSON
object (docs/cli.md, the event log) by :meth:`Event.to_json`.

"Late" has one meaning per name:

- :attr:`Event.late` (the log's ``late``): no valve command could be sent in time for this
  particle, because its slack was negative or it was left undecided (shed on overload);
- :attr:`Event.late_eject`: an eject that is late; it is logged but never sent to the valves
  (the run summary's ``late_ejects``);
- the benchmark's ``late`` counts both late ejects and undecided particles: every particle
  whose deadline was missed (:func:`missed_deadlines`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=True)
class Event:
    """One particle's decision. The fields are the event log's keys (``class_`` is ``class``);
    ``error`` is only written when set."""

    particle: int
    first_line: int
    last_line: int
    x_min_px: int
    x_max_px: int
    centroid_line: float
    centroid_px: float
    area_mm2: float
    score: float
    decision: str  # "eject" or "pass"
    valves: list[int]
    open_s: float | None
    close_s: float | None
    latency_ms: float
    slack_ms: float
    late: bool
    class_: str  # "sc" or "waste"
    cut: bool = False
    too_long: bool = False
    split: bool = False
    touches_border: bool = False
    fault: bool = False
    undecided: bool = False
    kind: str = "rock"  # "rock" or "tramp"
    over_cap: bool = False
    splice: bool = False
    error: str | None = field(default=None)

    @property
    def ejected(self) -> bool:
        """The loop decided to eject it (sent to the valves unless it is a :attr:`late_eject`)."""
        return self.decision == "eject"

    @property
    def late_eject(self) -> bool:
        """An eject whose command could not be sent in time: logged, never sent."""
        return self.late and self.decision == "eject"

    @property
    def sent(self) -> bool:
        """Its valve command goes to the valves: an eject in time."""
        return self.decision == "eject" and not self.late

    def to_json(self) -> dict:
        """The event log's JSON object, keys in the log's order."""
        out = {
            "particle": self.particle, "first_line": self.first_line, "last_line": self.last_line,
            "x_min_px": self.x_min_px, "x_max_px": self.x_max_px,
            "centroid_line": self.centroid_line, "centroid_px": self.centroid_px, "area_mm2": self.area_mm2,
            "score": self.score, "decision": self.decision, "valves": self.valves,
            "open_s": self.open_s, "close_s": self.close_s, "latency_ms": self.latency_ms,
            "slack_ms": self.slack_ms, "late": self.late, "class": self.class_,
            "cut": self.cut, "too_long": self.too_long, "split": self.split,
            "touches_border": self.touches_border, "fault": self.fault, "undecided": self.undecided,
            "kind": self.kind, "over_cap": self.over_cap, "splice": self.splice,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def missed_deadlines(late_ejects: int, undecided: int) -> int:
    """The benchmark's ``late``: particles whose deadline was missed, late ejects and the
    particles left undecided together."""
    return int(late_ejects) + int(undecided)
