"""Real policy servers on loopback for the server tests, shared across modules.

Building and compiling a tiny engine costs ~30 s on 2 cores, so each tiny config gets one engine
per session; servers with other settings (API key, small frames, a long batch window) reuse it
through `lambda: engine`, which costs no compile. Results are per engine, not per server, so a
request gives the same answer from every server built on the same engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.engine import PolicyEngine
from latentpi.server.settings import ServerSettings

ENGINE_SETTINGS = ServerSettings(port=0)  # batch sizes 1, 2, 4, 8
API_KEY = "test-key-4d1f"
SMALL_FRAME_BYTES = 64 * 1024  # admits 64x64 images, refuses 224x224 ones (~300 KB a request)
PROMPTS = (
    "put the black bowl on the plate",
    "open the top drawer of the cabinet",
    "pick up the ketchup and place it in the basket",
    "turn on the stove",
)
# openpi-client 0.1.2 calls websockets.sync.client.connect outside a context manager.
STOCK_CLIENT_WARNING = "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"

ObservationFactory = Callable[..., dict[str, Any]]


def observation(
    seed: int = 0, *, side: int = 224, prompt: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A LIBERO observation in openpi's wire keys; each seed gives other images, state and prompt."""
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": prompt if prompt is not None else PROMPTS[seed % len(PROMPTS)],
        **extra,
    }


@pytest.fixture(scope="session")
def make_observation() -> ObservationFactory:
    return observation


def _build(config: str) -> PolicyEngine:
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config

    return build_engine(serving_config(config), ENGINE_SETTINGS)


@pytest.fixture(scope="session")
def pi0_engine() -> PolicyEngine:
    return _build("pi0_tiny")


@pytest.fixture(scope="session")
def pi05_engine() -> PolicyEngine:
    return _build("pi05_tiny")


@pytest.fixture(scope="session")
def pi0_server(pi0_engine: PolicyEngine) -> Iterator[RunningServer]:
    with start_server(lambda: pi0_engine, ServerSettings(port=0)) as server:
        yield server


@pytest.fixture(scope="session")
def pi05_server(pi05_engine: PolicyEngine) -> Iterator[RunningServer]:
    with start_server(lambda: pi05_engine, ServerSettings(port=0)) as server:
        yield server


@pytest.fixture(scope="session")
def guarded_server(pi0_engine: PolicyEngine) -> Iterator[RunningServer]:
    """pi0_tiny behind an API key and a 64 KiB frame limit."""
    settings = ServerSettings(port=0, api_key=API_KEY, max_frame_bytes=SMALL_FRAME_BYTES)
    with start_server(lambda: pi0_engine, settings) as server:
        yield server


@pytest.fixture
def stock_client() -> Iterator[Callable[..., Any]]:
    """Opens the unmodified openpi-client WebsocketClientPolicy; closes them after the test."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    opened: list[Any] = []

    def connect(server: RunningServer, **kwargs: Any) -> Any:
        policy = WebsocketClientPolicy(server.url, **kwargs)
        opened.append(policy)
        return policy

    yield connect
    for policy in opened:
        policy._ws.close()  # the stock client has no close(); its connection is `_ws`


class CodecClient:
    """A websocket client on latentpi's own codec (bfloat16 latents stay bfloat16)."""

    def __init__(self, server: RunningServer, **connect_kwargs: Any) -> None:
        from websockets.sync.client import connect

        from latentpi.protocol.codec import unpackb

        self.connection = connect(server.url, compression=None, max_size=None, **connect_kwargs)
        self.metadata = unpackb(self.connection.recv(timeout=60))

    def send(self, frame: bytes | str) -> bytes | str:
        self.connection.send(frame)
        return self.connection.recv(timeout=120)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        from latentpi.protocol.codec import packb, unpackb

        reply = self.send(packb(obs))
        if isinstance(reply, str):
            raise RuntimeError(reply)
        return unpackb(reply)

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def codec_client() -> Iterator[Callable[..., CodecClient]]:
    opened: list[CodecClient] = []

    def connect(server: RunningServer, **kwargs: Any) -> CodecClient:
        opened.append(CodecClient(server, **kwargs))
        return opened[-1]

    yield connect
    for client in opened:
        client.close()
