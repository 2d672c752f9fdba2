"""Counters and histograms cheap enough for every request, exported through prometheus-client.

prometheus-client's instruments take a lock on every increment and walk the buckets in Python:
recording one proxied request (a counter, two histograms, a cache counter) cost ~12 µs, a fifth
of the gateway's own work per request (benchmarks/README.md). These keep plain numbers instead
(the gateway mutates them from its event loop only) and become metric families when scraped,
through a collector registered on the gateway's registry. A scrape from the metrics thread reads
a snapshot: a number written meanwhile shows up in the next scrape. Adding a child (a new label
set: rare, then cached by the caller) and taking the snapshot share a lock: even ``list(d.items())``
is not atomic, since a garbage collection during it can run Python code and switch threads.

Same names, labels and samples as prometheus-client's Counter and Histogram (``_total``,
``_bucket``/``_count``/``_sum``), without ``_created``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class FastCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class FastHistogram:
    """``counts[i]``: observations in bucket ``i`` alone (the last is +Inf); cumulated when
    scraped."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    """Children by label values, created on first use like prometheus-client's ``labels``."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # unchecked names: these families never clash with the gateway's others

    def _child(self, values: tuple[str, ...], make: Callable[[], object]) -> object:
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, make())
        return child

    def _snapshot(self) -> list[tuple[tuple[str, ...], object]]:
        with self._lock:
            return list(self._children.items())


class CounterFamily(_Family):
    def labels(self, *values: str) -> FastCounter:
        child = self._child(values, FastCounter)
        assert isinstance(child, FastCounter)
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in self._snapshot():
            assert isinstance(child, FastCounter)
            family.add_metric(list(values), child.value)
        yield family


class HistogramFamily(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        *,
        buckets: tuple[float, ...],
    ) -> None:
        self._bounds = tuple(sorted(buckets))
        self._le = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> FastHistogram:
        child = self._child(values, lambda: FastHistogram(self._bounds))
        assert isinstance(child, FastHistogram)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in self._snapshot():
            assert isinstance(child, FastHistogram)
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, total)
        yield family
