"""The loop as the tests drive it: its events in the form the event log writes them."""
from __future__ import annotations

import dataclasses

from sorting.realtime import parallel, runner
from sorting.realtime.runner import RunResult


def logged(events) -> list[dict]:
    """Typed events (:class:`sorting.realtime.events.Event`) as the event log's JSON objects."""
    return [e.to_json() for e in events]


def run_loop(*args, **kwargs) -> RunResult:
    """:func:`sorting.realtime.runner.run_loop`, its kept events as the log's JSON objects (the
    contract's form, which the tests check)."""
    result = runner.run_loop(*args, **kwargs)
    return dataclasses.replace(result, events=logged(result.events))


def run_recording(*args, **kwargs) -> RunResult:
    """:func:`sorting.realtime.parallel.run_recording`, its events as the log's JSON objects."""
    result = parallel.run_recording(*args, **kwargs)
    return dataclasses.replace(result, events=logged(result.events))
