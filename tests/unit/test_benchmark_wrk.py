"""benchmarks/wrk.py: per-request latencies recovered from wrk's corrected histogram."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from benchmarks.wrk import LoadError, per_request, percentile


def _wrk_correct(measured: dict[int, int], interval: int) -> dict[int, int]:
    """wrk 4's stats_correct, transcribed: for each value n >= 2 intervals, add its count at
    n - interval, n - 2 intervals, ... while above one interval (ascending over n, reading
    each count before anything is added at it)."""
    data = Counter(measured)
    for n in range(2 * interval, max(measured) + 1):
        count = data[n]
        m = n - interval
        while count and m > interval:
            data[m] += count
            m -= interval
    return {value: count for value, count in data.items() if count}


def _histogram(values: list[int]) -> dict[int, int]:
    return dict(Counter(values))


def test_a_rare_stall_dominates_wrk_p99_and_not_the_per_request_one() -> None:
    # One connection, 8,000 answers of ~500 µs and 2 of 90 ms: the shape seen at 1 MiB.
    rng = random.Random(7)
    values = [rng.randint(450, 650) for _ in range(7998)] + [90_000, 88_000]
    duration = sum(values)
    interval = duration // len(values)
    corrected = _wrk_correct(_histogram(values), interval)
    assert percentile(sorted(corrected.items()), 99) > 10_000  # what wrk reported

    recovered = per_request(
        sorted(corrected.items()), requests=len(values), duration_us=duration, connections=1
    )

    assert recovered == sorted(_histogram(values).items())
    assert 600 <= percentile(recovered, 99) <= 650
    assert percentile(recovered, 50) == sorted(values)[len(values) // 2]


@pytest.mark.parametrize("connections", [1, 16, 64])
def test_recovery_is_exact_for_any_shape(connections: int) -> None:
    rng = random.Random(connections)
    values = [int(rng.lognormvariate(7, 1)) + 1 for _ in range(5000)]
    duration = sum(values) // connections
    interval = duration // (len(values) // connections)
    corrected = _wrk_correct(_histogram(values), interval)

    recovered = per_request(
        sorted(corrected.items()),
        requests=len(values),
        duration_us=duration,
        connections=connections,
    )

    assert recovered == sorted(_histogram(values).items())
    assert sum(count for _, count in recovered) == len(values)


def test_nothing_is_undone_when_wrk_corrected_nothing() -> None:
    histogram = [(100, 3), (250, 1)]
    assert per_request(histogram, requests=0, duration_us=1_000, connections=1) == histogram


def test_a_histogram_wrk_cannot_have_left_is_refused() -> None:
    # interval 100 µs: 300 answers at 150 µs cannot be fewer than the 500 at 250 µs.
    with pytest.raises(LoadError, match="not what its correction"):
        per_request([(150, 300), (250, 500)], requests=10, duration_us=1_000, connections=1)


def test_percentile_ranks_as_wrk_does() -> None:
    # wrk's rank: round(p / 100 * count + 0.5), half away from zero: 51 of 100 for the p50.
    histogram = [(1, 51), (2, 48), (3, 1)]
    assert percentile(histogram, 50) == 1
    assert percentile([(1, 50), (2, 50)], 50) == 2
    assert percentile(histogram, 98) == 2
    assert percentile(histogram, 99) == 3
    assert percentile([], 99) == 0


def test_values_at_one_and_two_intervals_are_taken_as_wrk_leaves_them() -> None:
    # interval 100 µs: wrk adds nothing at or below one interval, and an answer of exactly two
    # intervals adds nothing (its only candidate, 100 µs, is not above one interval).
    measured = {50: 2, 100: 5, 200: 2, 300: 1}
    corrected = _wrk_correct(measured, 100)
    assert corrected == {50: 2, 100: 5, 200: 3, 300: 1}

    recovered = per_request(
        sorted(corrected.items()), requests=10, duration_us=1_000, connections=1
    )

    assert recovered == sorted(measured.items())
