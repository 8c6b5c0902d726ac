"""Prometheus metrics for the broker and the nodes (``--metrics-port``): off unless asked for.

Nothing on the hot path touches prometheus-client. The processes keep plain counters and
`Latencies` (fixed buckets, one increment per observation); at each scrape, the HTTP server's
thread calls a snapshot function and turns its numbers into metric families. A snapshot only
reads ints and copies dicts, which the GIL makes safe against the routing thread.

Every metric is named ``fedptr_...``; a process's metrics are labelled ``process`` (``broker``
or the node's name). The process collector adds ``process_resident_memory_bytes`` and friends.
"""

from __future__ import annotations

import argparse
import bisect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from fedptr import limits
from fedptr.errors import FedptrError

if TYPE_CHECKING:  # prometheus-client loads with the first scrape or `serve`: ~1.4 MiB a process without
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.samples import Sample

log = logging.getLogger("fedptr.metrics")

Metric: TypeAlias = "CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily"
F = TypeVar("F", "CounterMetricFamily", "GaugeMetricFamily")


class MetricsError(FedptrError):
    """Raised when the metrics endpoint cannot listen (the port is taken, say)."""


@dataclass
class Histogram:
    """Counts of observations per bucket of `limits.LATENCY_BUCKETS_S` (the last: above them all)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(limits.LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(limits.LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations at or below it), ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        bounds = [*(repr(b) for b in limits.LATENCY_BUCKETS_S), "+Inf"]
        for bound, n in zip(bounds, list(self.counts), strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class Latencies:
    """One `Histogram` per key (a request kind, a broker command)."""

    def __init__(self) -> None:
        self.by_key: dict[str, Histogram] = {}

    def observe(self, key: str, seconds: float) -> None:
        hist = self.by_key.get(key)
        if hist is None:
            hist = self.by_key[key] = Histogram()
        hist.observe(seconds)

    def family(self, name: str, documentation: str, label: str, process: str) -> HistogramMetricFamily:
        """These histograms as one Prometheus family, labelled `label` = key and ``process``."""
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(name, documentation, labels=["process", label])
        # by key, not by first observation: which kind of request finished first is timing,
        # and a scrape shows no timing beyond the histograms' own buckets
        for key, hist in sorted(self.by_key.copy().items()):
            fam.add_metric([process, key], hist.cumulative(), hist.total)
        return fam


def counter(name: str, documentation: str, process: str, value: float) -> CounterMetricFamily:
    """A counter family with one sample for `process`."""
    from prometheus_client.core import CounterMetricFamily

    fam = CounterMetricFamily(name, documentation, labels=["process"])
    fam.add_metric([process], value)
    return fam


def gauge(name: str, documentation: str, process: str, value: float) -> GaugeMetricFamily:
    """A gauge family with one sample for `process`."""
    from prometheus_client.core import GaugeMetricFamily

    fam = GaugeMetricFamily(name, documentation, labels=["process"])
    fam.add_metric([process], value)
    return fam


def labelled_counter(
    name: str, documentation: str, process: str, label: str, values: Mapping[str, float]
) -> CounterMetricFamily:
    """A counter family with one sample per `label` value."""
    from prometheus_client.core import CounterMetricFamily

    return _labelled(CounterMetricFamily(name, documentation, labels=["process", label]), process, values)


def labelled_gauge(
    name: str, documentation: str, process: str, label: str, values: Mapping[str, float]
) -> GaugeMetricFamily:
    """A gauge family with one sample per `label` value."""
    from prometheus_client.core import GaugeMetricFamily

    return _labelled(GaugeMetricFamily(name, documentation, labels=["process", label]), process, values)


def _labelled(fam: F, process: str, values: Mapping[str, float]) -> F:
    for key, value in sorted(dict(values).items()):  # by key, as `Latencies.family`
        fam.add_metric([process, key], value)
    return fam


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--metrics-port`` and ``--metrics-host`` flags of the broker and the node."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (0: a free one); off if unset",
    )
    parser.add_argument("--metrics-host", default=limits.METRICS_HOST, help="address the metrics endpoint listens on")


class _Snapshot:
    """A collector as the registry calls it (it only needs `collect`)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:  # a scrape must never take the process down; say so, serve nothing
            log.exception("metrics snapshot failed")
            return []


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """What a scrape reads: the process's families from `collect` (called at each scrape),
    and the process collector's."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot(collect))
    ProcessCollector(registry=reg)
    return reg


def serve(port: int, host: str, collect: Callable[[], Iterable[Metric]]) -> int:
    """Serve ``/metrics`` on `host`:`port` (0: a free port) from a daemon thread; `collect`
    gives the process's families at each scrape. Returns the port bound."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, host, registry=registry(collect))
    except OSError as e:
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def samples(text: str) -> dict[str, float]:
    """Parse a scrape (the text format) into ``name{labels}`` -> value, for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[_key(s)] = s.value
    return out


def _key(s: Sample) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
    return f"{s.name}{{{labels}}}" if labels else s.name
