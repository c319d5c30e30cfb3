"""Prometheus metrics of one server, in a registry of its own (no process-global state, so several
servers can live in one process, as tests and the embedded mode do)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "latentpi_requests", "Inference requests answered", ["kind"], registry=r
        )
        self.errors = Counter(
            "latentpi_errors", "Requests answered with an error, by kind", ["kind"], registry=r
        )
        self.latency = Histogram(
            "latentpi_request_latency_seconds",
            "Time from a request frame to its response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.infer_latency = Histogram(
            "latentpi_batch_infer_seconds",
            "Model time of one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "latentpi_batch_size", "Requests per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.latent_bytes = Counter(
            "latentpi_latent_bytes", "Bytes of latent arrays sent", registry=r
        )
        self.response_bytes = Counter(
            "latentpi_response_bytes", "Bytes of response frames sent", registry=r
        )
        self.queue_depth = Gauge(
            "latentpi_queue_depth", "Requests waiting for the model", registry=r
        )
        self.clients = Gauge("latentpi_connected_clients", "Open websocket connections", registry=r)
        self.connections_dropped = Counter(
            "latentpi_connections_dropped",
            "Connections refused, timed out or cut off by the connection limits, by reason",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_device(self, report: Callable[[], DeviceReport]) -> None:
        """Export the device's parameter bytes and memory counters, read at every scrape."""
        self.registry.register(_DeviceCollector(report))


@dataclass(frozen=True)
class DeviceReport:
    device: str
    param_bytes: Mapping[tuple[str, str], int]  # (device, memory kind) -> bytes
    memory: Mapping[str, int] = field(default_factory=dict)  # bytes_in_use, peak_bytes_in_use, ...


class _DeviceCollector(Collector):
    def __init__(self, report: Callable[[], DeviceReport]) -> None:
        self._report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._report()
        params = GaugeMetricFamily(
            "latentpi_param_bytes",
            "Bytes of model parameters, by device and memory kind",
            labels=["device", "memory_kind"],
        )
        for (device, kind), nbytes in sorted(report.param_bytes.items()):
            params.add_metric([device, kind], nbytes)
        yield params
        memory = GaugeMetricFamily(
            "latentpi_device_memory_bytes",
            "The serving device's memory counters, where the backend reports them",
            labels=["device", "stat"],
        )
        for stat, nbytes in sorted(report.memory.items()):
            memory.add_metric([report.device, stat], nbytes)
        yield memory
