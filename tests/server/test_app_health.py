"""Health while loading, Prometheus metrics that move with the traffic, and a clean shutdown of the
in-process server (thread ended, port free, clients told)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from loopback import API_KEY, STOCK_CLIENT_WARNING, Clients, CodecClient, observation, tiny_engine
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.latent_layout import LATENT_NAMES
from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.engine import PolicyEngine
from latentpi.server.settings import ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


@pytest.fixture(scope="module")
def pi0_engine() -> PolicyEngine:
    return tiny_engine("pi0_tiny")


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(server: RunningServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body); HTTP errors are answers here, not exceptions."""
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def wait_for_http(server: RunningServer, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            http_get(server, "/healthz")
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("the server never answered HTTP")


def scrape(server: RunningServer) -> Samples:
    status, content_type, text = http_get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def poll(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- health -------------------------------------------------------------------------------------
def test_healthz_is_503_while_loading_then_200(pi0_engine: PolicyEngine) -> None:
    release = threading.Event()

    def slow_factory() -> PolicyEngine:
        assert release.wait(60)
        return pi0_engine

    server = start_server(slow_factory, ServerSettings(port=0), wait=False)
    try:
        wait_for_http(server)
        assert http_get(server, "/healthz")[::2] == (503, "loading")
        assert http_get(server, "/metrics")[0] == 200  # metrics answer while loading
        early: list[CodecClient] = []  # a client connecting now waits for the model
        connecting = threading.Thread(target=lambda: early.append(CodecClient(server)))
        connecting.start()
        time.sleep(0.5)
        assert not early and http_get(server, "/healthz")[0] == 503
        release.set()
        server.wait_ready(30)
        assert http_get(server, "/healthz")[::2] == (200, "OK")
        connecting.join(30)
        assert early and early[0].metadata["model"] == "pi0"
        assert early[0].infer(observation(0))["actions"].shape == (50, 7)
        early[0].close()
    finally:
        release.set()
        server.stop()


def test_failed_load_is_503_and_refuses_connections() -> None:
    def broken_factory() -> PolicyEngine:
        raise FileNotFoundError("no checkpoint at /nowhere")

    server = start_server(broken_factory, ServerSettings(port=0), wait=False)
    try:
        wait_for_http(server)
        assert poll(lambda: http_get(server, "/healthz")[2] != "loading")
        with pytest.raises(RuntimeError, match="model failed to load: FileNotFoundError"):
            server.wait_ready(5)
        status, _, body = http_get(server, "/healthz")
        # the HTTP endpoints need no API key: the reason names its kind, never a path
        assert status == 503 and "model failed to load (FileNotFoundError" in body
        assert "/nowhere" not in body
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url, open_timeout=10)
        assert refused.value.response.status_code == 503
        assert value(scrape(server), "latentpi_errors_total", kind="unavailable") == 1
    finally:
        server.stop()


def test_stop_while_loading_does_not_wait_for_the_model() -> None:
    """A connection waiting for the model must not hold up shutdown."""
    release = threading.Event()

    def never_ready() -> PolicyEngine:
        release.wait(60)
        raise RuntimeError("released")

    server = start_server(never_ready, ServerSettings(port=0), wait=False)
    outcome: list[BaseException] = []

    def waiting_client() -> None:
        try:
            connect(server.url, open_timeout=30)
        except Exception as error:
            outcome.append(error)

    try:
        wait_for_http(server)
        client = threading.Thread(target=waiting_client)
        client.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.stop(timeout_s=20)
        assert not server.thread.is_alive()
        assert time.monotonic() - started < 10
        client.join(10)
        assert outcome and not client.is_alive()  # refused, not connected
    finally:
        release.set()


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_follow_the_traffic(pi0_engine: PolicyEngine) -> None:
    settings = ServerSettings(port=0, api_key=API_KEY)
    auth = {"Authorization": f"Api-Key {API_KEY}"}
    with start_server(lambda: pi0_engine, settings) as server:
        before = scrape(server)
        assert value(before, "latentpi_connected_clients") == 0
        assert value(before, "latentpi_request_latency_seconds_count") == 0

        client = CodecClient(server, additional_headers=auth)
        plain = client.send(packb(observation(0)))
        latent = client.send(packb(observation(1, collect_latents=True)))
        assert isinstance(plain, bytes) and isinstance(latent, bytes)
        latents = unpackb(latent)
        latent_bytes = sum(latents[name].nbytes for name in LATENT_NAMES if name in latents)
        assert isinstance(client.send(packb({**observation(2), "prompt": 5})), str)
        assert isinstance(client.send("not binary"), str)
        with pytest.raises(InvalidStatus):
            connect(server.url, open_timeout=10)  # no key
        second = CodecClient(server, additional_headers=auth)

        after = scrape(server)
        assert value(after, "latentpi_requests_total", kind="plain") == 1
        assert value(after, "latentpi_requests_total", kind="latents") == 1
        assert value(after, "latentpi_errors_total", kind="bad_request") == 1
        assert value(after, "latentpi_errors_total", kind="bad_frame") == 1
        assert value(after, "latentpi_errors_total", kind="unauthorized") == 1
        assert value(after, "latentpi_latent_bytes_total") == latent_bytes > 0
        assert value(after, "latentpi_response_bytes_total") == len(plain) + len(latent)
        # Every answered frame has a latency, errors too; only served requests reach the model.
        assert value(after, "latentpi_request_latency_seconds_count") == 4
        assert value(after, "latentpi_request_latency_seconds_sum") > 0
        assert value(after, "latentpi_batch_infer_seconds_count") == 2
        assert value(after, "latentpi_batch_size_count") == 2
        assert value(after, "latentpi_batch_size_bucket", le="1.0") == 2
        assert value(after, "latentpi_queue_depth") == 0
        assert value(after, "latentpi_connected_clients") == 2

        second.close()
        client.close()
        assert poll(lambda: value(scrape(server), "latentpi_connected_clients") == 0)


# -- shutdown -----------------------------------------------------------------------------------
def test_stop_ends_the_thread_frees_the_port_and_closes_clients(
    pi0_engine: PolicyEngine, clients: Clients
) -> None:
    server = start_server(lambda: pi0_engine, ServerSettings(port=0))
    policy = clients.stock(server)
    assert np.isfinite(policy.infer(observation(0))["actions"]).all()
    started = time.monotonic()
    server.stop()
    assert not server.thread.is_alive()
    assert time.monotonic() - started < 10
    with pytest.raises(ConnectionClosed):
        policy.infer(observation(1))
    with socket.socket() as probe:  # the port is free again: a new server (SO_REUSEADDR) binds it
        # The server closes first at shutdown, so its side of the connection may sit in TIME_WAIT
        # (a race with the client's own close): a bind without SO_REUSEADDR then fails, though
        # nothing listens there any more.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, server.port))
        probe.listen()
