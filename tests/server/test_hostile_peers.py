"""Hostile peers against a real pi0_tiny server on loopback, while the stock openpi-client keeps
being served the same answer: a peer that never reads, half-open connections, hundreds of idle
connections beyond --max-connections, a flood of connection attempts, a frame dribbled byte by
byte, pings from a peer that never reads, and a server stopping under a peer that never reads.
Each server gets short timeouts so that each limit shows within seconds; bench/hostile_peers.py
runs the same at scale."""

from __future__ import annotations

import argparse
import re
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostile import (
    SteadyClient,
    closed_by_server,
    frame,
    handshake,
    open_idle,
    raise_file_limit,
    read_frames,
    read_until_closed,
    sockets,
    tcp,
    upgrade_request,
)
from loopback import STOCK_CLIENT_WARNING, observation, serving, tiny_engine
from websockets.exceptions import InvalidStatus

from latentpi.protocol.codec import packb, unpackb
from latentpi.server.cli import serve
from latentpi.server.connections import PONG_ROOM, raise_open_file_limit
from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.settings import ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)

SMALL_OBS = {"side": 64}  # small images: the hostile peers' requests cost little to build
# Every latent in float32: ~1.2 MB a response, so a few fill the kernel's buffers (~4 MB here).
FULL_FLOAT32 = {"preset": "full", "dtype": "float32"}


@pytest.fixture(scope="module")
def engine() -> Any:
    return tiny_engine("pi0_tiny")


def dropped(server: RunningServer) -> dict[str, float]:
    """latentpi_connections_dropped_total by reason, from /metrics."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = r'^latentpi_connections_dropped_total\{reason="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def open_connections(server: RunningServer) -> int:
    return len(server.server.server_state.connections)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def assert_served(steady: SteadyClient, calls: int = 3) -> None:
    steady.calls_after(calls)
    assert not steady.errors, steady.errors


# -- a peer that never reads ------------------------------------------------------------------------
def flood_requests_without_reading(server: RunningServer, seconds: float) -> socket.socket:
    """Handshake with a tiny receive window, then send requests for big answers, never reading."""
    sock = tcp(server.host, server.port, rcvbuf=4096)
    assert handshake(sock, server.host, server.port).status == 101
    request = frame(packb(observation(1, **SMALL_OBS, latent_spec=FULL_FLOAT32)))
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(request)
        except (TimeoutError, ConnectionError):
            break  # the server stopped reading (or cut us off)
    return sock


def test_a_peer_that_never_reads_is_cut_off_and_others_are_served(engine: Any) -> None:
    with (
        serving(engine, send_timeout_s=1.0, idle_timeout_s=None) as server,
        SteadyClient(server.url, observation(0)) as steady,
    ):
        sock = flood_requests_without_reading(server, seconds=20)
        wait_until(lambda: dropped(server).get("send_timeout", 0) >= 1, 60, "send timeout drop")
        wait_until(lambda: open_connections(server) == 1, 30, "only the steady client left")
        assert_served(steady)
        sock.close()


def test_pings_from_a_peer_that_never_reads_buffer_at_most_one_pong(engine: Any) -> None:
    with (
        serving(engine, idle_timeout_s=None) as server,
        SteadyClient(server.url, observation(0)) as steady,
    ):
        sock = tcp(server.host, server.port, rcvbuf=4096)
        assert handshake(sock, server.host, server.port).status == 101
        pings = frame(b"p" * 125, opcode=0x9) * 1000
        for _ in range(100):  # 100,000 pings: 13 MB of pongs, far beyond the kernel's buffers
            sock.sendall(pings)
        time.sleep(1.0)  # the server reads them all (pings never pause its reading)
        buffered = [
            connection.transport.get_write_buffer_size()
            for connection in list(server.server.server_state.connections)
        ]
        # uvicorn alone buffers every pong the kernel cannot take (~130 bytes each)
        assert max(buffered) <= PONG_ROOM + 2 * 127, buffered
        assert_served(steady)
        sock.close()


def test_stopping_the_server_does_not_wait_for_a_peer_that_never_reads(engine: Any) -> None:
    settings = ServerSettings(port=0, send_timeout_s=2.0, idle_timeout_s=None)
    server = start_server(lambda: engine, settings)
    try:
        sock = flood_requests_without_reading(server, seconds=20)
        wait_until(
            lambda: any(
                c.transport.get_write_buffer_size() > 0
                for c in list(server.server.server_state.connections)
            ),
            30,
            "bytes buffered for the peer",
        )
    finally:
        start = time.monotonic()
        server.stop(timeout_s=60)
    assert not server.thread.is_alive(), "the server waits forever for the peer to read"
    assert time.monotonic() - start < 60
    sock.close()


# -- half-open connections --------------------------------------------------------------------------
def dribble_request_head(server: RunningServer, sock: socket.socket) -> None:
    """A slow-loris: the upgrade request one byte every 0.25 s, never finished."""
    request = upgrade_request(server.host, server.port)
    for index in range(len(request) - 1):
        try:
            sock.sendall(request[index : index + 1])
        except OSError:
            return  # cut off
        time.sleep(0.25)


def test_half_open_connections_are_timed_out(engine: Any) -> None:
    with serving(engine, handshake_timeout_s=1.0, idle_timeout_s=2.0) as server:
        with SteadyClient(server.url, observation(0)) as steady, sockets() as opened:
            silent_tcp = [tcp(server.host, server.port) for _ in range(20)]
            opened += silent_tcp
            slow_head = tcp(server.host, server.port)
            opened.append(slow_head)
            dribbler = threading.Thread(target=dribble_request_head, args=(server, slow_head))
            dribbler.start()
            silent_ws = []
            for _ in range(20):
                sock = tcp(server.host, server.port)
                opened.append(sock)
                assert handshake(sock, server.host, server.port).status == 101
                silent_ws.append(sock)
            dribbler.join()
            for sock in silent_tcp:
                assert closed_by_server(sock, 15)
            assert closed_by_server(slow_head, 15)
            for sock in silent_ws:
                code, reason = read_until_closed(sock, 15)
                assert code == 1000 and b"idle" in reason, (code, reason)
            counts = dropped(server)
            assert counts.get("handshake_timeout", 0) >= 21
            assert counts.get("idle_timeout", 0) >= 20
            assert_served(steady)
        wait_until(lambda: open_connections(server) == 0, 30, "every connection closed")


def test_connections_waiting_for_their_handshake_are_capped_too(engine: Any) -> None:
    with (
        serving(engine, max_connections=5, handshake_timeout_s=60.0) as server,
        sockets() as opened,
    ):
        opened += [tcp(server.host, server.port) for _ in range(5)]
        wait_until(lambda: open_connections(server) == 5, 10, "five connections")
        extra = tcp(server.host, server.port)
        opened.append(extra)
        assert closed_by_server(extra, 10)  # reset at once: nothing can be answered yet
        assert not any(closed_by_server(sock, 0.2) for sock in opened[:5])
        for sock in opened[:5]:
            sock.close()
        wait_until(lambda: open_connections(server) == 0, 10, "closed")  # /metrics gets a slot
        assert dropped(server)["pending_limit"] == 1


# -- idle connections beyond the limit --------------------------------------------------------------
MAX_CONNECTIONS = 200
BEYOND = 300


@pytest.fixture(scope="module")
def limited_server(engine: Any) -> Iterator[RunningServer]:
    raise_file_limit(4 * (MAX_CONNECTIONS + BEYOND))
    with serving(engine, max_connections=MAX_CONNECTIONS, idle_timeout_s=None) as server:
        yield server


def test_idle_connections_beyond_the_limit_are_refused_with_503(
    limited_server: RunningServer,
) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server = limited_server
    with SteadyClient(server.url, observation(0)) as steady, sockets() as opened:
        admitted = open_idle(server.host, server.port, MAX_CONNECTIONS - 1, opened)
        assert set(admitted) == {101}
        sock = tcp(server.host, server.port)
        opened.append(sock)
        refusal = handshake(sock, server.host, server.port)
        assert refusal.status == 503
        assert b"--max-connections" in refusal.body and b"200" in refusal.body
        refused = open_idle(server.host, server.port, BEYOND, opened)
        assert set(refused) == {503}
        with pytest.raises(InvalidStatus, match="503"):
            WebsocketClientPolicy(server.url)
        assert_served(steady)
        for idle in opened[:10]:
            idle.close()
        del opened[:10]
        wait_until(lambda: server.policy_server.metrics.clients._value.get() <= 190, 30, "freed")
        late = WebsocketClientPolicy(server.url)  # gets through once slots are free
        assert late.infer(observation(2))["actions"].shape == (50, 7)
        late._ws.close()
        assert dropped(server)["limit"] >= BEYOND + 2
        assert_served(steady)


# -- a flood of connection attempts -----------------------------------------------------------------
def test_a_flood_of_connection_attempts_leaves_nothing_behind(engine: Any) -> None:
    with (
        serving(engine, handshake_timeout_s=2.0) as server,
        SteadyClient(server.url, observation(0)) as steady,
    ):
        stop = time.monotonic() + 3.0
        attempts = [0, 0]

        def connect_and_close(with_handshake: bool) -> None:
            while time.monotonic() < stop:
                sock = tcp(server.host, server.port)
                if with_handshake:
                    handshake(sock, server.host, server.port)
                sock.close()
                attempts[with_handshake] += 1

        floods = [
            threading.Thread(target=connect_and_close, args=(with_handshake,))
            for with_handshake in (False, True)
        ]
        for flood in floods:
            flood.start()
        for flood in floods:
            flood.join()
        assert attempts[0] > 100 and attempts[1] > 0, attempts
        wait_until(lambda: open_connections(server) == 1, 30, "only the steady client left")
        assert_served(steady)


# -- a frame dribbled byte by byte ------------------------------------------------------------------
def test_a_dribbled_frame_is_closed_after_the_frame_timeout(engine: Any) -> None:
    with (
        serving(engine, frame_timeout_s=1.0, idle_timeout_s=None) as server,
        SteadyClient(server.url, observation(0)) as steady,
    ):
        sock = tcp(server.host, server.port)
        assert handshake(sock, server.host, server.port).status == 101
        whole = frame(packb(observation(3, **SMALL_OBS)))
        closed = threading.Event()

        def dribble() -> None:
            for byte in whole:
                if closed.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        code, reason = read_until_closed(sock, 20)
        closed.set()
        assert code == 1008 and b"frame" in reason, (code, reason)
        assert dropped(server)["frame_timeout"] == 1
        assert_served(steady)
        sock.close()


def test_a_request_arriving_slowly_is_not_idle(engine: Any) -> None:
    """A frame taking longer than the idle timeout (but within the frame timeout) is answered."""
    with serving(engine, idle_timeout_s=1.0, frame_timeout_s=30.0) as server:
        sock = tcp(server.host, server.port)
        assert handshake(sock, server.host, server.port).status == 101
        whole = frame(packb(observation(3, **SMALL_OBS)))
        pieces = 10
        for index in range(pieces):  # over ~2.5 s: the idle timeout passes mid-frame
            sock.sendall(whole[index * len(whole) // pieces : (index + 1) * len(whole) // pieces])
            time.sleep(0.25)
        [(opcode, payload)] = read_frames(sock, 1, timeout_s=60)  # the metadata came before
        assert opcode == 0x2, payload
        assert unpackb(payload)["actions"].shape == (50, 7)
        sock.close()


def test_settings_refuse_bad_limits() -> None:
    with pytest.raises(ValueError, match=r"max_connections: expected 1\.\.65536, received 0"):
        ServerSettings(max_connections=0)
    for name in ("handshake_timeout_s", "frame_timeout_s", "send_timeout_s", "idle_timeout_s"):
        with pytest.raises(ValueError, match=f"{name}: expected seconds in"):
            ServerSettings(**{name: -1.0})
    assert ServerSettings(idle_timeout_s=None).idle_timeout_s is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-connections", "0"], "--max-connections: expected 1..65536, received 0"),
        (["--handshake-timeout-s", "0"], "--handshake-timeout-s: expected seconds in (0, 86400]"),
        (["--idle-timeout-s", "-5"], "--idle-timeout-s: expected seconds in (0, 86400]"),
        (["--frame-timeout-s", "nan"], "--frame-timeout-s: expected seconds in (0, 86400]"),
        (["--send-timeout-s", "1e9"], "--send-timeout-s: expected seconds in (0, 86400]"),
    ],
)
def test_serve_refuses_bad_connection_limits(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args(["--config", "pi0_tiny", *argv])) == 2
    assert message in capsys.readouterr().err


def test_serve_idle_timeout_zero_means_never() -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--config", "pi0_tiny", "--idle-timeout-s", "0"])
    assert args.idle_timeout_s == 0  # run() turns 0 into None: ServerSettings(idle_timeout_s=None)
    defaults = parser.parse_args(["--config", "pi0_tiny"])
    assert (defaults.max_connections, defaults.idle_timeout_s) == (256, 600.0)


def test_the_open_file_limit_is_raised_for_max_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 100 + 256:
        pytest.skip(f"hard open-file limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        raise_open_file_limit(100)  # 2 x 100 + 256 = 456 descriptors
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 456
        raise_open_file_limit(10)  # never lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 456
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
