"""The stock openpi-client's WebsocketClientPolicy against a loopback websocket server that speaks
this protocol (metadata frame on connect, one binary response per request, errors as text)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
from conftest import libero_wire, pi0_metadata
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.server import ServerConnection, serve

from latentpi.protocol.codec import ProtocolError, packb, unpackb
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.messages import PolicyRequest, PolicyResponse, ServerMetadata

METADATA = pi0_metadata()
# openpi-client 0.1.2 calls websockets.sync.client.connect outside a context manager.
pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"
)


def answer(request: PolicyRequest) -> PolicyResponse:
    """Actions that depend on the request (state and image), latents of the requested spec whose
    values encode the request's noise seed, so the test sees its own request come back."""
    base = float(request.state.sum()) + float(request.image[0, 0, 0])
    actions = np.full((METADATA.action_horizon, METADATA.action_dim), base)
    if request.latent_spec is None:
        return PolicyResponse(actions=actions, policy_timing={"infer_ms": 1.0})
    layouts = latent_layouts(request.latent_spec, METADATA.shape)
    latents = {
        name: np.full(
            entry.shape,
            request.noise_seed or 0,
            dtype=ml_dtypes.bfloat16 if entry.dtype == "bfloat16" else entry.dtype,
        )
        for name, entry in layouts.items()
    }
    return PolicyResponse(
        actions, latents, layouts, request.latent_spec, {"infer_ms": 2.0}, {"infer_ms": 1.0}
    )


def handle(connection: ServerConnection) -> None:
    connection.send(packb(METADATA.to_wire()))
    for frame in connection:
        try:
            request = PolicyRequest.from_wire(unpackb(frame))
        except (ProtocolError, ValidationError) as error:
            connection.send(f"bad request: {error}")
            connection.close()
            return
        connection.send(packb(answer(request).to_wire()))


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with serve(handle, "127.0.0.1", 0, compression=None, max_size=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.socket.getsockname()[1]
        server.shutdown()
    thread.join(timeout=5)


def test_stock_client_reads_metadata_and_plain_actions(port: int) -> None:
    policy = WebsocketClientPolicy("127.0.0.1", port)
    assert ServerMetadata.from_wire(policy.get_server_metadata()) == METADATA
    obs = libero_wire(5)
    result = policy.infer(obs)
    expected = float(obs["observation/state"].sum()) + float(obs["observation/image"][0, 0, 0])
    assert result["actions"].shape == (50, 7)
    np.testing.assert_allclose(result["actions"], expected)
    assert result["policy_timing"] == {"infer_ms": 1.0}
    assert "latent_layout" not in result


def test_stock_client_decodes_a_default_latent_response(port: int) -> None:
    policy = WebsocketClientPolicy("127.0.0.1", port)
    result = policy.infer(libero_wire(6) | {"collect_latents": True, "noise_seed": 3})
    text = result["text_only_hidden_states"]
    assert text.dtype == np.uint16 and text.shape == (19, 48, 2048)  # bfloat16 bit patterns
    assert np.all(text.view(ml_dtypes.bfloat16) == 3)
    assert result["latent_layout"]["text_only_hidden_states"]["dtype"] == "bfloat16"
    assert result["latent_spec"]["dtype"] == "bfloat16"


def test_stock_client_sees_validation_errors_as_runtime_errors(port: int) -> None:
    policy = WebsocketClientPolicy("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="observation/state: expected finite values"):
        policy.infer(libero_wire(7) | {"observation/state": np.full(8, np.nan)})
