"""Real policy servers on loopback for the server tests, and clients for them.

Building and compiling a tiny engine costs ~15-30 s on 2 cores, so `tiny_engine` builds each tiny
config once per test session (cached); every test module starts the servers it needs around it
(`serving`, no compile), with its own settings (API key, small frames, a long batch window).
Results belong to the engine, so a request gets the same answer from every server built on it.

Imported as `from loopback import ...` (not a conftest: two conftest modules would both be named
`conftest`, and `from conftest import` in another folder's tests would find the wrong one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

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


@functools.cache
def tiny_engine(config: str) -> PolicyEngine:
    """The engine of `pi0_tiny` or `pi05_tiny`, built and compiled once per process."""
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config

    return build_engine(serving_config(config), ENGINE_SETTINGS)


@contextlib.contextmanager
def serving(engine: Any, **settings: Any) -> Iterator[RunningServer]:
    """An in-process server on a free loopback port around an already built engine."""
    with start_server(lambda: engine, ServerSettings(port=0, **settings)) as server:
        yield server


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


class Clients:
    """Opens stock openpi-clients and codec clients; closes them all on exit."""

    def __init__(self) -> None:
        self._closers: list[Any] = []

    def stock(self, server: RunningServer, **kwargs: Any) -> Any:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        policy = WebsocketClientPolicy(server.url, **kwargs)
        self._closers.append(policy._ws.close)  # the stock client has no close()
        return policy

    def codec(self, server: RunningServer, **kwargs: Any) -> CodecClient:
        client = CodecClient(server, **kwargs)
        self._closers.append(client.close)
        return client

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *_: object) -> None:
        for close in self._closers:
            close()
