"""Plain and latent requests from the stock openpi-client (and our codec) against real tiny servers
on loopback, for both model variants; shapes are checked against the numbers in the metadata."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from loopback import STOCK_CLIENT_WARNING, Clients, observation, serving, tiny_engine

from latentpi.protocol.latent_layout import LATENT_NAMES
from latentpi.protocol.messages import ServerMetadata
from latentpi.server.embedded import RunningServer

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


@pytest.fixture(scope="module")
def pi0_server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi0_tiny")) as server:
        yield server


@pytest.fixture(scope="module")
def pi05_server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi05_tiny")) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


HORIZON = {"pi0_tiny": 50, "pi05_tiny": 10}
SERVERS = {"pi0_tiny": "pi0_server", "pi05_tiny": "pi05_server"}


@pytest.fixture(params=sorted(SERVERS))
def config(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(config: str, request: pytest.FixtureRequest) -> RunningServer:
    return request.getfixturevalue(SERVERS[config])


def latents_of(result: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: result[name] for name in LATENT_NAMES if name in result}


def check_layout_entries(result: dict[str, Any]) -> None:
    """Every latent array matches its own `latent_layout` entry, and nothing is left unexplained."""
    latents = latents_of(result)
    assert set(result["latent_layout"]) == set(latents)
    for name, array in latents.items():
        entry = result["latent_layout"][name]
        assert list(array.shape) == entry["shape"], name
        assert len(entry["axes"]) == array.ndim, name


def test_metadata_describes_the_tiny_model(
    config: str, server: RunningServer, clients: Clients
) -> None:
    metadata = ServerMetadata.from_wire(clients.stock(server).get_server_metadata())
    assert metadata.model == config.removesuffix("_tiny")
    assert metadata.action_horizon == HORIZON[config]
    assert metadata.config["name"] == config
    prompt = metadata.token_layout.span(0, "prompt")
    assert prompt[1] - prompt[0] == metadata.config["max_token_len"]
    assert metadata.token_layout.length(0) == metadata.config["prefix_len"]
    assert metadata.token_layout.length(1) == metadata.config["suffix_len"]


def test_plain_request_answers_libero_actions_and_timing(
    config: str,
    server: RunningServer,
    clients: Clients,
) -> None:
    policy = clients.stock(server)
    first = policy.infer(observation(1))
    assert first["actions"].shape == (HORIZON[config], 7)
    assert first["actions"].dtype.kind == "f" and np.isfinite(first["actions"]).all()
    assert not latents_of(first) and "latent_layout" not in first
    assert set(first["server_timing"]) == {"infer_ms"}
    assert first["server_timing"]["infer_ms"] > 0
    assert first["policy_timing"]["infer_ms"] > 0

    second = policy.infer(observation(2))
    assert second["server_timing"]["prev_total_ms"] >= first["server_timing"]["infer_ms"]
    assert not np.array_equal(first["actions"], second["actions"])


def test_default_latents_match_metadata_in_both_views(
    config: str,
    server: RunningServer,
    clients: Clients,
) -> None:
    """`collect_latents: True` is the default preset: the prompt's states at every layer and the
    action expert at the last step, bfloat16. openpi-client reads bfloat16 as uint16 (the protocol's
    extension); our codec restores bfloat16; both carry the same bits."""
    policy = clients.stock(server)
    metadata = ServerMetadata.from_wire(policy.get_server_metadata())
    obs = observation(3, collect_latents=True, noise_seed=7)
    stock = policy.infer(obs)
    ours = clients.codec(server).infer(obs)

    layers, (width_0, width_1) = metadata.depth[0] + 1, metadata.width
    prompt_start, prompt_stop = metadata.token_layout.span(0, "prompt")
    prompt_len, suffix_len = prompt_stop - prompt_start, metadata.token_layout.length(1)
    expected = {
        "text_only_hidden_states": (layers, prompt_len, width_0),
        "expert_1_hidden_states": (1, layers, suffix_len, width_1),
        "prompt_mask": (prompt_len,),
    }
    for result in (stock, ours):
        assert {name: a.shape for name, a in latents_of(result).items()} == expected
        check_layout_entries(result)
        assert result["latent_spec"]["steps"] == [metadata.num_steps - 1]
        assert result["actions"].shape == (HORIZON[config], 7)

    for name in ("text_only_hidden_states", "expert_1_hidden_states"):
        assert stock[name].dtype == np.uint16
        assert ours[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stock[name].view(ml_dtypes.bfloat16), ours[name])
        assert np.isfinite(ours[name].astype(np.float32)).all()
        assert np.abs(ours[name].astype(np.float32)).max() > 0
    mask = ours["prompt_mask"]
    assert mask.dtype == np.bool_ and mask[0] and not mask[-1]  # BOS valid, padding at the end
    np.testing.assert_array_equal(stock["actions"], ours["actions"])


def test_preset_by_name_equals_bare_collect_latents(
    server: RunningServer,
    clients: Clients,
) -> None:
    client = clients.codec(server)
    bare = client.infer(observation(4, collect_latents=True, noise_seed=11))
    named = client.infer(observation(4, latent_spec="default", noise_seed=11))
    assert named["latent_spec"] == bare["latent_spec"]
    assert set(latents_of(named)) == set(latents_of(bare))
    for name in latents_of(bare):
        np.testing.assert_array_equal(named[name], bare[name])


def test_spec_map_over_a_preset(
    server: RunningServer,
    clients: Clients,
) -> None:
    """A map that edits a preset: segment means of both experts plus per-head attention mass, at
    chosen layers and steps (negative indices count from the end)."""
    policy = clients.stock(server)
    metadata = ServerMetadata.from_wire(policy.get_server_metadata())
    depth, (width_0, width_1), heads = metadata.depth[0], metadata.width, metadata.num_heads
    segments_0 = len(metadata.token_layout.names(0))
    segments_1 = len(metadata.token_layout.names(1))
    spec = {"preset": "pooled", "attention": "per_head", "layers": [-1, 0], "steps": [0, -1]}

    result = policy.infer(observation(5, latent_spec=spec))
    # Residual entry `depth` (the last output) has no attention layer: attention keeps layer 0 only.
    assert {name: a.shape for name, a in latents_of(result).items()} == {
        "expert_0_hidden_states": (2, segments_0, width_0),
        "expert_1_hidden_states": (2, 2, segments_1, width_1),
        "attention_mass_expert_0": (1, heads, segments_0, segments_0),
        "attention_mass_expert_1": (2, 1, heads, segments_1, segments_0 + segments_1),
    }
    assert result["latent_spec"]["layers"] == [depth, 0]
    assert result["latent_spec"]["steps"] == [0, metadata.num_steps - 1]
    assert result["expert_0_hidden_states"].dtype == np.float32
    check_layout_entries(result)
    for name in ("attention_mass_expert_0", "attention_mass_expert_1"):
        rows = result[name].sum(axis=-1)  # mass over key segments: 1, or 0 for empty queries
        assert np.all(np.isclose(rows, 1.0, atol=1e-4) | np.isclose(rows, 0.0)), name
        assert np.isclose(rows, 1.0, atol=1e-4).any(), name


def test_float_channels_first_images_give_the_uint8_answer(
    server: RunningServer, clients: Clients
) -> None:
    """openpi's leniency over the wire: float [0, 1] channels-first pixels are served as the uint8
    image they quantize to, so the actions are bit-identical with the same noise."""
    obs = observation(2, noise_seed=9)
    as_uint8 = clients.stock(server).infer(obs)["actions"]
    lenient = dict(obs)
    for key in ("observation/image", "observation/wrist_image"):
        # +0.5 keeps (255 · x) clear of the integer below it, whatever the float rounding.
        pixels = np.minimum((obs[key] + 0.5) / 255, 1.0)
        lenient[key] = np.moveaxis(pixels, -1, 0).astype(np.float32)
    np.testing.assert_array_equal(clients.stock(server).infer(lenient)["actions"], as_uint8)
    assert as_uint8.dtype == np.float64  # as openpi's LIBERO policy returns them
