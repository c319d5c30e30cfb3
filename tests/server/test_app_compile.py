"""A request with a latent spec the server has not compiled yet compiles on its own thread: requests
whose function is already compiled keep being answered meanwhile."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from loopback import STOCK_CLIENT_WARNING, observation, serving, tiny_engine
from openpi_client.websocket_client_policy import WebsocketClientPolicy

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


def fresh_spec() -> dict[str, object]:
    """A spec no earlier run compiled (the XLA cache persists across runs): random step order."""
    steps = random.sample(range(10), 6)
    return {"expert_0": False, "text_only": False, "steps": steps, "attention": "per_head"}


def test_a_new_spec_compiles_while_cached_requests_are_served() -> None:
    engine = tiny_engine("pi0_tiny")
    with serving(engine, batch_window_ms=1.0) as server:
        slow = WebsocketClientPolicy(server.url)
        fast = WebsocketClientPolicy(server.url)
        fast.infer(observation(1))  # plain inference is compiled at start-up
        new_spec_done = threading.Event()
        answered: dict[str, object] = {}

        def ask_new_spec() -> None:
            answered["response"] = slow.infer(observation(0, latent_spec=fresh_spec()))
            new_spec_done.set()

        thread = threading.Thread(target=ask_new_spec)
        thread.start()
        time.sleep(0.2)  # the new spec's request is in: its compile has started
        served_meanwhile = 0
        while not new_spec_done.is_set() and served_meanwhile < 50:
            fast.infer(observation(2))
            served_meanwhile += not new_spec_done.is_set()
        thread.join(timeout=300)

    response = answered["response"]
    assert isinstance(response, dict)
    # steps, then the layers that have an attention (entries 0..depth-1)
    assert response["attention_mass_expert_1"].shape[:2] == (6, engine.model.depth)
    assert np.isfinite(response["actions"]).all()
    # Without a separate compile thread every one of these would wait behind the compile.
    assert served_meanwhile >= 3


def test_engine_compile_is_what_run_batch_then_uses() -> None:
    from latentpi.protocol.latent_spec import LatentSpec
    from latentpi.protocol.messages import PolicyRequest
    from latentpi.server.engine import PreparedRequest

    engine = tiny_engine("pi0_tiny")
    obs = observation(3)
    request = PolicyRequest(
        obs["observation/image"],
        obs["observation/wrist_image"],
        obs["observation/state"],
        obs["prompt"],
    )
    prepared = engine.prepare(request)
    spec = LatentSpec(steps=tuple(random.sample(range(10), 3)), pooling="last")
    items = [PreparedRequest(prepared.inputs, prepared.noise, engine.sampler.resolve(spec))] * 3
    assert not engine.is_compiled(items)
    engine.compile(items)
    assert engine.is_compiled(items)  # padded to 4: 3 and 4 rows share it, 2 rows do not
    assert not engine.is_compiled(items[:2])
    compiled = len(engine.sampler.cached_keys())
    engine.run_batch(items)
    assert len(engine.sampler.cached_keys()) == compiled
