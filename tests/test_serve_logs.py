"""The service's rotating event log and its audit log (no service needed)."""
from __future__ import annotations

import json

from sorting.realtime.events import Event
from sorting.realtime.service.audit import AuditLog
from sorting.realtime.service.rotate import RotatingEventLog


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def _event(i: int, score: float = 0.5) -> Event:
    """Particle ``i``: passed, late by 1 ms (its log line is ~400 bytes)."""
    return Event(i, 10 * i, 10 * i + 9, 100, 140, 10 * i + 4.5, 120.0, 350.0, score, "pass", [], None, None, 2.0,
                 -1.0, True, "waste")


def _lines(paths):
    return [json.loads(x) for p in paths for x in p.read_text().splitlines()]


def test_rotation_by_size_keeps_every_line_whole_and_in_order(tmp_path):
    clock = Clock(1_700_000_000.0)
    log = RotatingEventLog(tmp_path / "events.jsonl", max_bytes=5000, clock=clock)
    events = [_event(i, i / 1000) for i in range(300)]
    for k in range(0, 300, 7):  # chunks of 7 particles
        log.write(events[k:k + 7])
        clock.t += 1.0
    log.write_record({"change": "threshold", "old": 0.1, "new": 0.2})
    log.close()
    files = log.rotations + [log.path]
    assert len(files) > 5
    assert all(p.stat().st_size <= 5000 for p in files)
    got = _lines(files)
    assert [e["particle"] for e in got if "particle" in e] == list(range(300))
    assert got[-1]["change"] == "threshold"
    assert log.count == 300
    # the rotated files are named by the time they were opened (UTC) and sort in order
    assert sorted(p.name for p in log.rotations) == [p.name for p in log.rotations]
    assert log.rotations[0].name.startswith("events.20231114T")


def test_rotation_on_the_hour_and_an_old_log_is_kept(tmp_path):
    old = tmp_path / "events.jsonl"
    old.write_text('{"particle": 0}\n')
    clock = Clock(3600.0 * 500_000 + 3590.0)  # ten seconds before the hour
    log = RotatingEventLog(old, hourly=True, clock=clock)
    assert len(list(tmp_path.glob("events.*.jsonl"))) == 1  # the earlier run's log, renamed
    log.write([_event(1)])
    clock.t += 5.0
    log.write([_event(2)])  # same hour: same file
    clock.t += 10.0
    log.write([_event(3)])  # the hour changed: a new file
    log.close()
    assert len(log.rotations) == 1
    assert [e["particle"] for e in _lines(log.rotations)] == [1, 2]
    assert [e["particle"] for e in _lines([log.path])] == [3]


def test_audit_log_appends(tmp_path):
    for value in (0.1, 0.2):
        a = AuditLog(tmp_path / "audit.jsonl")
        a.write({"who": "http 127.0.0.1", "what": "threshold", "old": None, "new": value, "result": "applied"})
        a.close()
    got = _lines([tmp_path / "audit.jsonl"])
    assert [g["new"] for g in got] == [0.1, 0.2]
    assert all(g["time"].endswith("Z") for g in got)
