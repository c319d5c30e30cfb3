"""Dynamic batching end to end: concurrent stock openpi-clients with different observations, prompts
and noise seeds each get exactly their own rows back; different latent specs in one window are
grouped; noise_seed makes a request reproducible alone and inside a batch.

A vectorized batch is not bit-identical to batch 1 on every CPU (XLA picks matmul blockings by
shape: ~1e-7 apart on this AMD EPYC). On CPU the server runs batches row by row (batch_invariant,
auto), so batched rows are compared to the same request served alone with exact equality.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from loopback import STOCK_CLIENT_WARNING, Clients, observation, serving, tiny_engine
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from prometheus_client.parser import text_string_to_metric_families

from latentpi.protocol.latent_layout import LATENT_NAMES
from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.engine import PolicyEngine
from latentpi.server.settings import ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


@pytest.fixture(scope="module")
def pi0_engine() -> PolicyEngine:
    return tiny_engine("pi0_tiny")


@pytest.fixture(scope="module")
def pi0_server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi0_tiny")) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


CLIENTS = 4
# A long window: concurrent requests released by a barrier always meet in one batch; the gather
# ends as soon as max_batch requests are in, so a full batch does not wait it out.
WINDOW_MS = 1500.0


@pytest.fixture(scope="module")
def batching_server(pi0_engine: PolicyEngine) -> Iterator[RunningServer]:
    settings = ServerSettings(port=0, max_batch=CLIENTS, batch_window_ms=WINDOW_MS)
    with start_server(lambda: pi0_engine, settings) as server:
        yield server


def batch_sizes(server: RunningServer) -> tuple[float, float, float]:
    """(model calls, requests in them, calls of exactly one request) so far."""
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return (
        samples[("latentpi_batch_size_count", None)],
        samples[("latentpi_batch_size_sum", None)],
        samples[("latentpi_batch_size_bucket", "1.0")],
    )


def concurrently(server: RunningServer, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each request from its own thread and its own stock client, released together."""
    policies = [WebsocketClientPolicy(server.url) for _ in requests]
    barrier = threading.Barrier(len(requests))
    results: list[Any] = [None] * len(requests)

    def call(index: int) -> None:
        barrier.wait(30)
        try:
            results[index] = policies[index].infer(requests[index])
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for policy in policies:
        policy._ws.close()  # the stock client has no close()
    assert all(isinstance(result, dict) for result in results), results
    return results


def alone(server: RunningServer, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    policy = WebsocketClientPolicy(server.url)
    try:
        return [policy.infer(request) for request in requests]
    finally:
        policy._ws.close()


def assert_same_rows(got: dict[str, Any], expected: dict[str, Any]) -> None:
    np.testing.assert_array_equal(got["actions"], expected["actions"])
    names = [name for name in LATENT_NAMES if name in expected]
    assert [name for name in LATENT_NAMES if name in got] == names
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name])


def test_concurrent_clients_each_get_their_own_rows(
    batching_server: RunningServer, pi0_server: RunningServer
) -> None:
    requests = [observation(i, noise_seed=100 + i) for i in range(CLIENTS)]
    assert len({r["prompt"] for r in requests}) == CLIENTS
    calls_before, rows_before, _ = batch_sizes(batching_server)
    batched = concurrently(batching_server, requests)
    calls, rows, _ = batch_sizes(batching_server)
    assert rows - rows_before == CLIENTS
    assert calls - calls_before == 1  # one model call for all four

    for got, expected in zip(batched, alone(pi0_server, requests), strict=True):
        assert_same_rows(got, expected)
    actions = [result["actions"] for result in batched]
    assert all(not np.array_equal(actions[0], other) for other in actions[1:])


def test_different_specs_in_one_window_are_grouped(
    batching_server: RunningServer, pi0_server: RunningServer
) -> None:
    """Three plain requests and one with the default latents arrive together: two model calls
    (one per compiled function), and every client gets its own answer of its own kind."""
    requests = [observation(i, noise_seed=200 + i) for i in range(CLIENTS - 1)]
    requests.append(observation(9, noise_seed=209, collect_latents=True))
    calls_before, rows_before, singles_before = batch_sizes(batching_server)
    batched = concurrently(batching_server, requests)
    calls, rows, singles = batch_sizes(batching_server)
    assert (calls - calls_before, rows - rows_before, singles - singles_before) == (2, 4, 1)

    for got, expected in zip(batched, alone(pi0_server, requests), strict=True):
        assert_same_rows(got, expected)
    assert "text_only_hidden_states" in batched[-1]
    assert not any(name in result for result in batched[:-1] for name in LATENT_NAMES)


def test_batch_size_histogram_shows_batches_over_one(batching_server: RunningServer) -> None:
    calls, rows, singles = batch_sizes(batching_server)
    assert calls > singles  # some model call served more than one request
    assert rows > calls


def test_a_lone_client_does_not_wait_out_the_window(batching_server: RunningServer) -> None:
    """The window waits only while another open connection could still send: alone, a request
    goes straight to the model; with an idle second connection open, it waits the window."""
    policy = WebsocketClientPolicy(batching_server.url)
    request = observation(5, noise_seed=1)
    policy.infer(request)
    started = time.monotonic()
    policy.infer(request)
    alone_s = time.monotonic() - started
    idle = WebsocketClientPolicy(batching_server.url)
    started = time.monotonic()
    policy.infer(request)
    with_idle_s = time.monotonic() - started
    for client in (policy, idle):
        client._ws.close()
    assert alone_s < WINDOW_MS / 1000 / 2
    assert with_idle_s >= WINDOW_MS / 1000


# -- noise_seed ---------------------------------------------------------------------------------
@pytest.fixture
def policy(pi0_server: RunningServer, clients: Clients) -> Any:
    return clients.stock(pi0_server)


def test_same_seed_same_actions_and_latents(policy: Any) -> None:
    request = observation(3, noise_seed=42, collect_latents=True)
    assert_same_rows(policy.infer(request), policy.infer(request))


def test_different_seeds_differ(policy: Any) -> None:
    first = policy.infer(observation(3, noise_seed=42))["actions"]
    second = policy.infer(observation(3, noise_seed=43))["actions"]
    assert not np.allclose(first, second)


def test_without_a_seed_every_call_draws_new_noise(policy: Any) -> None:
    first = policy.infer(observation(3))["actions"]
    second = policy.infer(observation(3))["actions"]
    assert not np.allclose(first, second)


# -- noise (openpi A/B) -------------------------------------------------------------------------
def given_noise(seed: int) -> np.ndarray:
    """The (action_horizon, action_dim) noise the server would draw for `noise_seed=seed`."""
    return np.random.default_rng(seed).standard_normal((50, 32), dtype=np.float32)


def test_given_noise_reproduces_actions_bit_for_bit_alone_and_in_a_batch(
    policy: Any, batching_server: RunningServer
) -> None:
    noise = given_noise(7)
    request = observation(3, noise=noise, collect_latents=True)
    first = policy.infer(request)
    assert_same_rows(first, policy.infer(request))
    # The same noise by seed: the field carries exactly what the server feeds the model.
    assert_same_rows(first, policy.infer(observation(3, noise_seed=7, collect_latents=True)))
    # float64 noise is cast once, as openpi's jnp.asarray casts it.
    np.testing.assert_array_equal(
        policy.infer(observation(3, noise=noise.astype(np.float64)))["actions"], first["actions"]
    )
    others = [observation(i, noise=given_noise(20 + i), collect_latents=True) for i in range(3)]
    batched = concurrently(batching_server, [*others, request])
    assert_same_rows(batched[-1], first)
    assert not np.array_equal(
        policy.infer(observation(3, noise=given_noise(8)))["actions"], first["actions"]
    )


@pytest.mark.parametrize(
    ("noise", "message"),
    [
        (np.zeros((10, 32), np.float32), "noise: expected a float32 array of shape (50, 32)"),
        (np.zeros((50, 32), np.int32), "noise: expected a finite float32 array"),
        (np.full((50, 32), np.nan, np.float32), "received 'an array with NaN or infinity'"),
        (np.zeros((50, 32, 1), np.float32), "noise: expected a finite float32 array"),
    ],
    ids=["shape", "dtype", "nan", "rank"],
)
def test_bad_noise_is_named_and_the_connection_survives(
    policy: Any, noise: np.ndarray, message: str
) -> None:
    with pytest.raises(RuntimeError, match="bad request: ") as error:
        policy.infer(observation(1, noise=noise))
    assert message in str(error.value)
    assert policy.infer(observation(1))["actions"].shape == (50, 7)


def test_noise_and_noise_seed_together_are_refused(policy: Any) -> None:
    with pytest.raises(RuntimeError, match="noise: expected absent when noise_seed is given"):
        policy.infer(observation(1, noise=given_noise(1), noise_seed=1))


def test_batch_invariance_is_on_for_cpu_by_default_and_can_be_turned_off(
    pi0_engine: PolicyEngine,
) -> None:
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config

    assert pi0_engine.sampler.by_row and pi0_engine.metadata()["config"]["batch_invariant"]
    vectorized = build_engine(
        serving_config("pi0_tiny"), ServerSettings(batch_invariant=False), warmup=False
    )
    assert not vectorized.sampler.by_row
    assert vectorized.metadata()["config"]["batch_invariant"] is False
