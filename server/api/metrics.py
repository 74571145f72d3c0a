"""Prometheus metrics on their own HTTP port.

Per call (interceptor): ``loraloom_requests_total{method,code}`` and
``loraloom_request_duration_seconds{method}``. Per generation (a service observer):
``loraloom_queue_wait_seconds``, ``loraloom_swap_duration_seconds``,
``loraloom_adapter_requests_total{adapter}``. At scrape time, from the engine's and
scheduler's own ``stats()``: queue depth, running requests, generations by outcome
(``loraloom_generations_total{outcome}``: GetServerInfo's QueueStats counters, the server's
own warm-up left out), swaps and swap time, adapter
cache hits/misses/evictions/bytes, the S3 blob cache's when the store uses one, and
``loraloom_adapter_load_failures_total{reason}`` (stored versions that failed to load:
``sha256_mismatch``, ``missing``, ``undecodable``; from the store's own counts).
Each server has its own registry, so several servers may share a process (tests).

Label policy: every label takes values from a small fixed set, never raw client text.
``method`` and ``code`` are the service's methods and gRPC's codes; ``reason`` is one of
three; ``outcome`` one of ``OUTCOMES``. ``adapter`` counts successful generations only, by the
names of the adapters actually applied (versions that exist in the store, as the result reports them; a
request's raw references never become labels, so unknown names add no series). The
first ``MAX_ADAPTER_SERIES`` (50) distinct names a server applies get a series of their
own for the server's lifetime; every later name counts under ``adapter="_other"`` (no
adapter can be named so: names start with a letter or digit). Series never move between
names, so ``rate()`` stays right; a restart starts the count afresh.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.api.errors import ServiceInterceptor, rewrap

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
MAX_ADAPTER_SERIES = 50
OTHER_ADAPTERS = "_other"
# The QueueStats counters of finished or refused generation requests.
OUTCOMES = ("completed", "failed", "cancelled", "deadline_exceeded", "invalid", "rejected")


class Metrics:
    """The server's metrics; ``attach(service)`` once the service exists, ``serve(host, port)`` to expose."""

    def __init__(self, *, max_adapter_series: int = MAX_ADAPTER_SERIES) -> None:
        self.registry = CollectorRegistry()
        self.max_adapter_series = max_adapter_series
        self._adapter_labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self.requests = Counter(
            "loraloom_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraloom_request_duration_seconds",
            "gRPC call latency by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "loraloom_queue_wait_seconds",
            "Time generation requests waited in the queue.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swap_time = Histogram(
            "loraloom_swap_duration_seconds",
            "Time spent swapping adapter blends in, per request that swapped.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.adapter_requests = Counter(
            "loraloom_adapter_requests",
            f"Successful generations per applied adapter name (the first {max_adapter_series} "
            f"names; later ones under {OTHER_ADAPTERS!r}).",
            ["adapter"],
            registry=self.registry,
        )
        self.service = None
        self.registry.register(_StatsCollector(self))
        self.http = None
        self.port: int | None = None

    def attach(self, service) -> None:
        """Read ``service``'s engine and scheduler at scrape time; observe its finished generations."""
        self.service = service
        observers = getattr(service, "observers", None)
        if observers is not None:
            observers.append(self.observe)

    def observe(self, request, result=None, error: BaseException | None = None) -> None:
        if result is None:  # failed: its references may name nothing; they never become labels
            return
        for name in {applied.name for applied in result.parameters.adapters}:
            self.adapter_requests.labels(adapter=self._adapter_label(name)).inc()
        self.queue_wait.observe(result.timings.queue_ms / 1000.0)
        if result.timings.swap_ms > 0:
            self.swap_time.observe(result.timings.swap_ms / 1000.0)

    def _adapter_label(self, name: str) -> str:
        """``name`` while it is among the first ``max_adapter_series`` names seen, else ``_other``."""
        with self._labels_lock:
            if name in self._adapter_labels:
                return name
            if len(self._adapter_labels) < self.max_adapter_series:
                self._adapter_labels.add(name)
                return name
        return OTHER_ADAPTERS

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on a daemon thread; the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.http = server
        self.port = int(server.server_address[1])
        return self.port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)


class _StatsCollector:
    """Gauges and counters read from the engine's and scheduler's ``stats()`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self) -> Iterator:
        service = self.metrics.service
        if service is None:
            return
        queue = service.scheduler.stats()
        yield GaugeMetricFamily("loraloom_queue_depth", "Requests waiting in the queue.", value=queue.queued)
        yield GaugeMetricFamily("loraloom_requests_running", "Requests being generated.", value=queue.running)
        yield GaugeMetricFamily(
            "loraloom_queue_capacity", "Most requests the queue holds.", value=queue.max_queue
        )
        yield CounterMetricFamily(
            "loraloom_queue_rejected", "Requests refused because the queue was full.", value=queue.rejected
        )
        outcomes = CounterMetricFamily(
            "loraloom_generations",
            "Generation requests by outcome (rejected: queue full; invalid: INVALID_ARGUMENT; the "
            "server's own warm-up is not counted).",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], getattr(queue, outcome))
        yield outcomes
        engine = service.engine.stats()
        yield CounterMetricFamily("loraloom_swaps", "Adapter blend swaps.", value=engine.swaps)
        yield CounterMetricFamily(
            "loraloom_swap_seconds", "Total time spent in blend swaps.", value=engine.swap_ms_total / 1000.0
        )
        yield CounterMetricFamily("loraloom_adapter_cache_hits", "Adapter cache hits.", value=engine.hits)
        yield CounterMetricFamily(
            "loraloom_adapter_cache_misses", "Adapter cache misses.", value=engine.misses
        )
        yield CounterMetricFamily(
            "loraloom_adapter_cache_evictions", "Adapters evicted from the cache.", value=engine.evictions
        )
        yield GaugeMetricFamily(
            "loraloom_adapter_cache_bytes", "Bytes in the adapter cache.", value=engine.used_bytes
        )
        yield GaugeMetricFamily(
            "loraloom_adapter_cache_capacity_bytes", "Adapter cache budget.", value=engine.capacity_bytes
        )
        yield GaugeMetricFamily(
            "loraloom_adapter_cache_entries", "Adapters in the cache.", value=engine.entries
        )
        failures = getattr(service.store, "load_failures", None)
        if failures is not None:
            family = CounterMetricFamily(
                "loraloom_adapter_load_failures",
                "Stored adapter versions that failed to load, by reason (the server's data is damaged: "
                "run `loraloom adapters verify`).",
                labels=["reason"],
            )
            for reason, count in failures.snapshot().items():
                family.add_metric([reason], count)
            yield family
        blob_stats = getattr(service.store.blobs, "cache_stats", None)
        if blob_stats is not None:
            stats = blob_stats()
            for key in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(
                    f"loraloom_blob_cache_{key}", f"Local cache of S3 blobs: {key}.", value=stats[key]
                )
            yield GaugeMetricFamily(
                "loraloom_blob_cache_bytes", "Bytes in the S3 blob cache.", value=stats["bytes"]
            )


class MetricsInterceptor(ServiceInterceptor):
    """Counts loraloom.v1 calls by method and final status code and times them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return _measured(handler, details.method.rsplit("/", 1)[-1], self.metrics)


def _code_of(context, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions report the raw integer
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return grpc.StatusCode.UNKNOWN.name if error is not None else grpc.StatusCode.OK.name


def _measured(handler: grpc.RpcMethodHandler, method: str, metrics: Metrics) -> grpc.RpcMethodHandler:
    def record(context, started: float, error: BaseException | None) -> None:
        metrics.requests.labels(method=method, code=_code_of(context, error)).inc()
        metrics.latency.labels(method=method).observe(time.perf_counter() - started)

    def unary(behaviour):
        async def wrapped(request, context):
            started, error = time.perf_counter(), None
            try:
                return await behaviour(request, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                record(context, started, error)

        return wrapped

    def streaming(behaviour):
        async def wrapped(request, context):
            started, error = time.perf_counter(), None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                record(context, started, error)

        return wrapped

    return rewrap(handler, unary=unary, stream=streaming)
