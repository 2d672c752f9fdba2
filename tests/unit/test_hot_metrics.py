"""Lock-free instruments (gateway/hot_metrics.py) expose what prometheus-client's would."""

from __future__ import annotations

import gc
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.hot_metrics import CounterFamily, HistogramFamily

BUCKETS = (0.005, 0.01, 0.1, 1.0)
VALUES = (0.001, 0.005, 0.0051, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_samples_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = CounterFamily("x_requests", "Requests.", ["route", "status"], ours)
    histogram = HistogramFamily("x_seconds", "Seconds.", ["route"], ours, buckets=BUCKETS)
    reference_counter = Counter("x_requests", "Requests.", ["route", "status"], registry=theirs)
    reference_histogram = Histogram(
        "x_seconds", "Seconds.", ["route"], buckets=BUCKETS, registry=theirs
    )
    for value in VALUES:
        histogram.labels("api").observe(value)
        reference_histogram.labels("api").observe(value)
        counter.labels("api", "200").inc()
        reference_counter.labels("api", "200").inc()
    counter.labels("api", "404").inc(2)
    reference_counter.labels("api", "404").inc(2)
    histogram.labels("idle")  # bound, never observed: zeros, as prometheus-client shows them
    reference_histogram.labels("idle")
    assert _samples(ours) == _samples(theirs)
    assert _samples(ours)[("x_seconds_bucket", (("le", "0.005"), ("route", "api")))] == 2
    assert _samples(ours)[("x_seconds_bucket", (("le", "+Inf"), ("route", "api")))] == len(VALUES)


class _Cyclic:
    """Garbage whose collection runs Python code (``__del__``): a thread switch mid-C-loop."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(10))


def test_scrape_from_another_thread_while_children_are_added() -> None:
    thresholds = gc.get_threshold()
    gc.set_threshold(20)  # collections (and __del__ calls) all the time
    try:
        _scrape_while_adding()
    finally:
        gc.set_threshold(*thresholds)


def _scrape_while_adding() -> None:
    registry = CollectorRegistry()
    counter = CounterFamily("y_requests", "Requests.", ["status"], registry)
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        try:
            while not done.is_set():
                generate_latest(registry)
        except BaseException as exc:  # pragma: no cover - what the test looks for
            errors.append(exc)

    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for status in range(20_000):
            counter.labels(str(status)).inc()
            _Cyclic()
    finally:
        done.set()
        thread.join(timeout=10)
    assert errors == []
    assert _samples(registry)[("y_requests_total", (("status", "19999"),))] == 1


@pytest.mark.parametrize("value", [0.0, 0.005, 1e9])
def test_bucket_edges_are_less_or_equal(value: float) -> None:
    registry = CollectorRegistry()
    histogram = HistogramFamily("z_seconds", "Seconds.", [], registry, buckets=BUCKETS)
    histogram.labels().observe(value)
    samples = _samples(registry)
    expected = {le: float(value <= float(le)) for le in ("0.005", "0.01", "0.1", "1.0")}
    for le, count in expected.items():
        assert samples[("z_seconds_bucket", (("le", le),))] == count
    assert samples[("z_seconds_count", ())] == 1 and samples[("z_seconds_sum", ())] == value
