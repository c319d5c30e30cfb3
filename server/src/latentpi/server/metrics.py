"""Prometheus metrics of one server, in a registry of its own (no process-global state, so several
servers can live in one process, as tests and the embedded mode do)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
