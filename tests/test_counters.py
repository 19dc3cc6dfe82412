"""Run counters: latency percentiles in fixed memory agree with numpy's on the raw values."""
import numpy as np
import pytest

from sorting.realtime.counters import LatencyHistogram


@pytest.mark.parametrize("scale", [0.5, 5.0, 80.0])
def test_histogram_percentiles_match_numpy(scale):
    x = np.random.default_rng(1).exponential(scale, 20_000)
    h = LatencyHistogram()
    for v in x:
        h.add(float(v))
    got = h.summary()
    for key, q in (("p50", 50), ("p99", 99), ("p999", 99.9)):
        want = np.percentile(x, q, method="inverted_cdf")  # the smallest value with CDF >= q
        # reported as the upper edge of a 10 us bin: never below, at most one bin above
        assert want - 1e-9 <= got[key] <= want + LatencyHistogram.BIN_MS + 1e-9
    assert got["max"] == pytest.approx(x.max())


def test_empty_and_overflow():
    h = LatencyHistogram()
    assert h.summary() == {"p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    h.add(5000.0)  # beyond the last bin: the percentile is capped by the true maximum, not lost
    assert h.summary()["max"] == 5000.0
    assert h.percentile(50) <= 5000.0


def test_add_many_is_add_for_each():
    """A chunk's latencies added at once: the same bins, count and maximum as one by one."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.exponential(5.0, 500), [0.0, -1.0, 1e6, 0.005, 1999.999]])
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values.tolist():
        one.add(v)
    for part in np.array_split(values, 7):
        many.add_many(part)
    many.add_many(np.zeros(0))
    np.testing.assert_array_equal(one.counts, many.counts)
    assert (one.n, one.max_ms) == (many.n, many.max_ms)


def test_event_rounding_is_numpy_round():
    """The event log's numbers are rounded all columns at once, compiled: the same floats as
    np.round column by column, ties (half to even) and large and tiny values included."""
    from sorting.realtime.stream import _LOG_DECIMALS, _LOG_SCALE, _round_rows

    rng = np.random.default_rng(5)
    n = 4000
    cols = np.array([rng.normal(0.0, 1.0, n) * rng.choice([1e-4, 1.0, 1e3, 1e6], n) for _ in _LOG_DECIMALS])
    for col, d in zip(cols, _LOG_DECIMALS):
        col[:200] = (np.arange(200) + 0.5) / 10.0**d  # exact ties where binary allows
    got = cols.copy()
    _round_rows(got, _LOG_SCALE)
    for col, d, row in zip(cols, _LOG_DECIMALS, got):
        np.testing.assert_array_equal(row, np.round(col, d))


def test_chunk_numbers_are_the_event_formulas():
    """The loop's compiled per-chunk numbers against the formulas written out in numpy: the
    column centroid from its integer sum, area, score, air window,
    latency from each particle's last line, slack to its command, then rounded as np.round."""
    from sorting.realtime.stream import _LOG_DECIMALS, _LOG_SCALE, _chunk_numbers

    rng = np.random.default_rng(8)
    n, ring = 300, 1024
    first = rng.integers(0, 10**6, n)
    last = first + rng.integers(0, 200, n)
    area = rng.integers(1, 4000, n)
    ints = np.column_stack((first, rng.integers(0, 800, n), last, rng.integers(0, 800, n), area)).astype(np.int64)
    # centroids from integer sums, as the stitcher makes them (ties in the rounding included)
    cents = np.column_stack(((first + 0.5 * (last - first)), rng.integers(0, 800 * 4000, n) / area))
    scores = rng.random(n).astype(np.float32)
    times = np.sort(rng.random((4, n)) * 100.0, axis=0)
    arrival = rng.random(ring) * 100.0
    t_out, resp_s, rate, px_area = 101.5, 0.004, 3750.0, 0.64
    got = _chunk_numbers(ints, cents, scores, times, arrival, ring - 1, t_out, resp_s, rate, px_area, _LOG_SCALE)
    latency = (t_out - arrival[last & (ring - 1)]) * 1000.0
    slack = (times[0] - resp_s - last / rate) * 1000.0 - latency
    cx = np.rint(cents[:, 1] * area) / np.maximum(area, 1)
    want = (cents[:, 0], cx, area * px_area, scores.astype(np.float64), times[0], times[1], latency, slack)
    for row, (col, d) in enumerate(zip(want, _LOG_DECIMALS)):
        np.testing.assert_array_equal(got[row], np.round(col, d))
    np.testing.assert_array_equal(got[len(_LOG_DECIMALS)], latency)
    np.testing.assert_array_equal(got[len(_LOG_DECIMALS) + 1], slack)
