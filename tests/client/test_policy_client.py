"""LatentpiPolicyClient against real websocket servers on loopback speaking our codec: bfloat16
round trip, refusals (401, text frames) as ServerRejected, reconnect with bounded backoff, a lost
request as ConnectionLost, a changed model as ServerChanged, bounded frames."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from websockets.sync.server import Server, ServerConnection, serve

from latentpi.client.policy_client import (
    Backoff,
    ConnectionLost,
    LatentpiPolicyClient,
    ServerChanged,
    ServerRejected,
    ServerUnavailable,
)
from latentpi.protocol import ValidationError, packb, unpackb
from latentpi.protocol.codec import Limits
from latentpi.protocol.errors import ProtocolError

METADATA = {"model": "pi0", "config": {"name": "echo"}}
FAST = Backoff(attempts=4, first_s=0.05, max_delay_s=0.1, max_total_s=2.0)


class EchoServer:
    """A policy server on a fixed loopback port: metadata frame, then one answer per request.

    `answer(request) -> bytes | str | None`: None drops the connection mid-request."""

    def __init__(
        self,
        port: int,
        answer: Callable[[dict[str, Any]], bytes | str | None],
        *,
        metadata: dict[str, Any] = METADATA,
        api_key: str | None = None,
    ) -> None:
        self.answer, self.metadata, self.api_key = answer, metadata, api_key
        self.connections = 0
        self._server: Server = serve(
            self._handle, "127.0.0.1", port, process_request=self._check_key, compression=None
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _check_key(self, connection: ServerConnection, request: Any) -> Any:
        if self.api_key and request.headers.get("Authorization") != f"Api-Key {self.api_key}":
            return connection.respond(401, "invalid or missing API key\n")
        return None

    def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        connection.send(packb(self.metadata))
        for frame in connection:
            reply = self.answer(unpackb(frame))
            if reply is None:
                connection.close()
                return
            connection.send(reply)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def echo(request: dict[str, Any]) -> bytes:
    """actions from the state; a bfloat16 latent when asked for."""
    response: dict[str, Any] = {"actions": np.tile(request["state"], (4, 1))}
    if request.get("collect_latents"):
        response["text_only_hidden_states"] = np.arange(6, dtype=np.float32).astype(
            ml_dtypes.bfloat16
        )
    return packb(response)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def server(port: int) -> Iterator[EchoServer]:
    running = EchoServer(port, echo)
    yield running
    running.stop()


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}"


def test_infer_round_trip_restores_bfloat16(server: EchoServer, port: int) -> None:
    with LatentpiPolicyClient(url(port)) as client:
        assert client.get_server_metadata() == METADATA == client.metadata
        state = np.linspace(0, 1, 7)
        response = client.infer({"state": state, "collect_latents": True})
        np.testing.assert_array_equal(response["actions"], np.tile(state, (4, 1)))
        latent = response["text_only_hidden_states"]
        assert latent.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(latent.astype(np.float32), np.arange(6))
        client.reset()  # openpi's interface: a no-op, the connection stays usable
        assert "text_only_hidden_states" not in client.infer({"state": state})


def test_error_text_frame_is_server_rejected_with_its_text(port: int) -> None:
    message = "bad request: latent_spec: expected a preset name, received 'nope' (str)"
    server = EchoServer(
        port, lambda request: message if "latent_spec" in request else echo(request)
    )
    try:
        client = LatentpiPolicyClient(url(port), backoff=FAST)
        with pytest.raises(ServerRejected) as caught:
            client.infer({"state": np.zeros(7), "latent_spec": "nope"})
        assert str(caught.value) == message
        # the refusal concerns that request only: the connection still answers others
        assert client.infer({"state": np.ones(7)})["actions"].shape == (4, 7)
        assert server.connections == 1
    finally:
        server.stop()


def test_bad_api_key_is_rejected_at_once_with_the_servers_text(port: int) -> None:
    server = EchoServer(port, echo, api_key="right")
    try:
        start = time.monotonic()
        with pytest.raises(ServerRejected, match=r"HTTP 401: invalid or missing API key"):
            LatentpiPolicyClient(url(port), api_key="wrong", backoff=Backoff(first_s=1.0))
        assert time.monotonic() - start < 1.0  # no retries on a refusal
        with pytest.raises(ServerRejected, match="401"):
            LatentpiPolicyClient(url(port), backoff=FAST)  # no key at all
        with LatentpiPolicyClient(url(port), api_key="right") as client:
            assert client.infer({"state": np.zeros(7)})["actions"].shape == (4, 7)
    finally:
        server.stop()


def test_no_server_is_unavailable_within_the_backoff_bounds(port: int) -> None:
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"after 4 attempts"):
        LatentpiPolicyClient(url(port), backoff=FAST)
    # delays 0.05 + 0.1 + 0.1 (capped) between four tries
    assert 0.2 < time.monotonic() - start < 2.0
    bounded = Backoff(attempts=100, first_s=0.2, max_delay_s=0.2, max_total_s=0.5)
    start = time.monotonic()
    with pytest.raises(ServerUnavailable):
        LatentpiPolicyClient(url(port), backoff=bounded)
    assert time.monotonic() - start < 1.5  # the time bound, not 100 attempts


def test_connection_lost_mid_request_reconnects_and_says_so(port: int) -> None:
    calls = {"n": 0}

    def drop_second(request: dict[str, Any]) -> bytes | None:
        calls["n"] += 1
        return None if calls["n"] == 2 else echo(request)

    server = EchoServer(port, drop_second)
    try:
        client = LatentpiPolicyClient(url(port), backoff=FAST)
        client.infer({"state": np.zeros(7)})
        with pytest.raises(ConnectionLost):
            client.infer({"state": np.zeros(7)})  # dropped: not resent by default
        assert calls["n"] == 2 and server.connections == 2  # already reconnected
        assert client.reconnects == 0  # a first-try reconnect is not a retry
        assert client.infer({"state": np.ones(7)})["actions"][0, 0] == 1.0
        resending = LatentpiPolicyClient(url(port), backoff=FAST, resend=True)
        calls["n"] = 1  # the next call is dropped, then resent on a new connection
        assert resending.infer({"state": np.ones(7)})["actions"].shape == (4, 7)
        assert calls["n"] == 3
    finally:
        server.stop()


def test_server_restart_is_waited_for(port: int) -> None:
    server = EchoServer(port, echo)
    client = LatentpiPolicyClient(url(port), backoff=Backoff(first_s=0.1, max_delay_s=0.3))
    server.stop()
    restarted: list[EchoServer] = []
    timer = threading.Timer(0.5, lambda: restarted.append(EchoServer(port, echo)))
    timer.start()
    try:
        with pytest.raises(ConnectionLost):
            client.infer({"state": np.zeros(7)})  # the request in flight is lost ...
        assert client.infer({"state": np.ones(7)})["actions"].shape == (4, 7)  # ... not the next
        assert client.reconnects == 1
    finally:
        timer.join()
        for running in restarted:
            running.stop()


def test_a_different_model_after_reconnect_is_refused(port: int) -> None:
    server = EchoServer(port, echo)
    client = LatentpiPolicyClient(url(port), backoff=FAST)
    server.stop()
    other = EchoServer(port, echo, metadata={"model": "pi05", "config": {"name": "other"}})
    try:
        with pytest.raises(ServerChanged, match=r"pi0 \(echo\) before, pi05 \(other\) now"):
            client.infer({"state": np.zeros(7)})
    finally:
        other.stop()


def test_frames_are_bounded_both_ways(server: EchoServer, port: int) -> None:
    limits = Limits(max_frame_bytes=4096)
    client = LatentpiPolicyClient(url(port), limits=limits, backoff=FAST)
    with pytest.raises(ValidationError, match=r"request: expected a frame of at most 4096 bytes"):
        client.infer({"state": np.zeros(1000)})
    # a response over the limit: the websocket refuses it (the connection closes, not resent)
    with pytest.raises(ConnectionLost):
        client.infer({"state": np.zeros(300)})  # 300*4 float64 actions = 9600 bytes > 4096
    strict = LatentpiPolicyClient(url(port), limits=Limits(max_array_elements=10), backoff=FAST)
    with pytest.raises(ProtocolError):
        strict.infer({"state": np.zeros(7)})  # 28 action elements > 10


def test_bad_url_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"url: expected a ws:// or wss:// URL"):
        LatentpiPolicyClient("http://127.0.0.1:1")


def test_a_server_that_stops_answering_is_unavailable_after_the_request_timeout(port: int) -> None:
    hung = threading.Event()

    def answer_once(request: dict[str, Any]) -> bytes:
        if request["state"][0] > 0:
            hung.wait(10)  # connected, metadata sent, but no answer
        return echo(request)

    server = EchoServer(port, answer_once)
    try:
        client = LatentpiPolicyClient(url(port), backoff=FAST, request_timeout_s=0.5)
        assert client.infer({"state": np.zeros(7)})["actions"].shape == (4, 7)
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match=r"did not answer a request within 0.5 s"):
            client.infer({"state": np.ones(7)})
        assert 0.4 < time.monotonic() - start < 5
        hung.set()
        # the connection was dropped: the next request gets its own answer on a new one
        assert client.infer({"state": np.zeros(7)})["actions"][0, 0] == 0
        assert server.connections == 2
        with pytest.raises(ValidationError, match="request_timeout_s"):
            LatentpiPolicyClient(url(port), request_timeout_s=0)
    finally:
        hung.set()
        server.stop()
