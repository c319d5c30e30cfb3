"""PolicyRequest / PolicyResponse / ServerMetadata: round trips through the codec and validation
errors that name the field."""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import libero_wire, pi0_metadata, pi05_metadata

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import ArrayLayout, latent_layouts
from latentpi.protocol.latent_spec import DEFAULT_PRESET, PRESETS, LatentSpec, preset
from latentpi.protocol.messages import (
    PROTOCOL_VERSION,
    PolicyRequest,
    PolicyResponse,
    ServerMetadata,
)


def fake_latents(
    spec: LatentSpec, metadata: ServerMetadata, seed: int = 0
) -> dict[str, np.ndarray]:
    """Arrays of the shapes and dtypes the layout promises (values random)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, entry in latent_layouts(spec, metadata.shape).items():
        if entry.dtype == "bool":
            out[name] = rng.random(entry.shape) > 0.3
        else:
            values = np.resize(
                (np.arange(97, dtype=np.float32) - 48) / 7 + seed, np.prod(entry.shape)
            )
            out[name] = values.reshape(entry.shape).astype(
                getattr(ml_dtypes, entry.dtype, entry.dtype)
            )
    return out


def response_for(spec: LatentSpec | None, metadata: ServerMetadata | None = None) -> PolicyResponse:
    metadata = metadata or pi0_metadata()
    actions = np.linspace(-1, 1, metadata.action_horizon * metadata.action_dim).reshape(
        metadata.action_horizon, -1
    )
    if spec is None:
        return PolicyResponse(
            actions=actions, server_timing={"infer_ms": 12.5}, policy_timing={"infer_ms": 10.0}
        )
    return PolicyResponse(
        actions=actions,
        latents=fake_latents(spec, metadata),
        latent_layout=latent_layouts(spec, metadata.shape),
        latent_spec=spec,
        server_timing={"infer_ms": 12.5, "prev_total_ms": 20.0},
        policy_timing={"infer_ms": 10.0},
    )


def expect_error(field: str, function: Any, *args: Any) -> ValidationError:
    with pytest.raises(ValidationError, match=f"^{re.escape(field)}: expected") as info:
        function(*args)
    assert info.value.field == field
    return info.value


# -- requests -----------------------------------------------------------------------------------


def test_request_round_trips_through_the_codec(wire: dict) -> None:
    request = PolicyRequest.from_wire(unpackb(packb(wire)))
    assert (
        request.prompt == wire["prompt"]
        and not request.collect_latents
        and request.latent_spec is None
    )
    np.testing.assert_array_equal(request.image, wire["observation/image"])
    again = PolicyRequest.from_wire(unpackb(packb(request.to_wire())))
    np.testing.assert_array_equal(again.state, wire["observation/state"])
    assert again.to_wire().keys() == wire.keys()


def test_bare_collect_latents_means_the_default_preset(wire: dict) -> None:
    request = PolicyRequest.from_wire(wire | {"collect_latents": True})
    assert request.collect_latents and request.latent_spec == PRESETS[DEFAULT_PRESET]
    assert (
        PolicyRequest.from_wire(unpackb(packb(request.to_wire()))).latent_spec
        == PRESETS[DEFAULT_PRESET]
    )


@pytest.mark.parametrize(
    "spec", ["text", {"preset": "pooled", "layers": [-1]}, {"expert_1": False, "dtype": "float16"}]
)
def test_latent_spec_in_a_request_implies_collection(wire: dict, spec: Any) -> None:
    request = PolicyRequest.from_wire(wire | {"latent_spec": spec})
    assert request.collect_latents and request.latent_spec == LatentSpec.from_wire(spec)
    assert (
        PolicyRequest.from_wire(unpackb(packb(request.to_wire()))).latent_spec
        == request.latent_spec
    )


def test_extra_keys_are_ignored_and_noise_seed_is_kept(wire: dict) -> None:
    request = PolicyRequest.from_wire(
        wire | {"observation/extra": np.zeros(3), "episode": 4, "noise_seed": 7}
    )
    assert request.noise_seed == 7 and request.to_wire()["noise_seed"] == 7


def test_noise_travels_as_given(wire: dict) -> None:
    noise = np.random.default_rng(0).standard_normal((50, 32), dtype=np.float32)
    request = PolicyRequest.from_wire(unpackb(packb(wire | {"noise": noise})))
    assert request.noise is not None and request.noise.dtype == np.float32
    np.testing.assert_array_equal(request.noise, noise)
    np.testing.assert_array_equal(unpackb(packb(request.to_wire()))["noise"], noise)
    assert "noise" not in PolicyRequest.from_wire(wire).to_wire()


def test_float_and_channels_first_images_pass_the_protocol(wire: dict) -> None:
    """openpi's LIBERO policy accepts them (the server converts): float pixels in [0, 1] and
    (3, H, W)."""
    for image in (np.zeros((224, 224, 3), np.float32), np.zeros((3, 480, 640), np.uint8)):
        assert PolicyRequest.from_wire(wire | {"observation/image": image}).image is image


def test_any_image_size_within_the_bound(wire: dict) -> None:
    for shape in ((256, 256, 3), (1, 2048, 3), (480, 640, 3)):
        request = PolicyRequest.from_wire(wire | {"observation/image": np.zeros(shape, np.uint8)})
        assert request.image.shape == shape  # accepted as is: the server resizes with padding


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("observation/image", np.zeros((224, 224, 3), np.int16), "observation/image"),
        ("observation/image", np.zeros((4, 224, 224), np.uint8), "observation/image"),
        ("observation/image", np.zeros((3, 3000, 224), np.float32), "observation/image"),
        ("observation/image", np.zeros((224, 224), np.uint8), "observation/image"),
        ("observation/image", np.zeros((2049, 224, 3), np.uint8), "observation/image"),
        ("observation/image", np.zeros((0, 224, 3), np.uint8), "observation/image"),
        ("observation/wrist_image", [[0, 0, 0]], "observation/wrist_image"),
        ("observation/state", np.zeros(7), "observation/state"),
        ("observation/state", np.zeros(8, np.int64), "observation/state"),
        ("observation/state", np.array([0, 0, 0, np.nan, 0, 0, 0, 0]), "observation/state"),
        (
            "observation/state",
            np.array([0, 0, 0, 0, 0, np.inf, 0, 0], np.float32),
            "observation/state",
        ),
        ("prompt", b"bytes", "prompt"),
        ("prompt", 5, "prompt"),
        ("prompt", "x" * 5000, "prompt"),
        ("collect_latents", 1, "collect_latents"),
        ("noise_seed", -1, "noise_seed"),
        ("noise_seed", 2**63, "noise_seed"),
        ("noise_seed", 1.5, "noise_seed"),
        ("noise_seed", True, "noise_seed"),
        ("noise", np.zeros((50, 32), np.int32), "noise"),
        ("noise", np.zeros(32, np.float32), "noise"),
        ("noise", np.zeros((1, 2**17), np.float32), "noise"),
        ("noise", np.full((50, 32), np.inf, np.float32), "noise"),
        ("noise", [[0.0] * 32] * 50, "noise"),
        ("latent_spec", "everything", "latent_spec"),
        ("latent_spec", 3, "latent_spec"),
        ("latent_spec", {"pooling": "max"}, "latent_spec.pooling"),
        ("latent_spec", {"layerz": [1]}, "latent_spec.layerz"),
        ("latent_spec", {"layers": []}, "latent_spec.layers"),
        ("latent_spec", {"dtype": "int8"}, "latent_spec.dtype"),
    ],
)
def test_bad_request_fields_are_named(wire: dict, key: str, value: Any, field: str) -> None:
    expect_error(field, PolicyRequest.from_wire, wire | {key: value})


@pytest.mark.parametrize(
    "key", ["observation/image", "observation/wrist_image", "observation/state", "prompt"]
)
def test_missing_request_field_is_named(wire: dict, key: str) -> None:
    wire.pop(key)
    error = expect_error(key, PolicyRequest.from_wire, wire)
    assert "missing" in str(error)


def test_contradicting_collect_flag_is_rejected(wire: dict) -> None:
    expect_error(
        "collect_latents",
        PolicyRequest.from_wire,
        wire | {"collect_latents": False, "latent_spec": "text"},
    )


def test_non_map_request_is_rejected() -> None:
    expect_error("request", PolicyRequest.from_wire, [1, 2])


def test_errors_describe_arrays_by_dtype_and_shape_not_data(wire: dict) -> None:
    image = np.zeros((5, 5, 4), np.uint8)
    error = expect_error(
        "observation/image", PolicyRequest.from_wire, wire | {"observation/image": image}
    )
    assert "dtype uint8 and shape (5, 5, 4)" in str(error) and len(str(error)) < 300
    state = np.array([0, 1, 2, np.nan, 4, 5, 6, 7])
    error = expect_error(
        "observation/state", PolicyRequest.from_wire, wire | {"observation/state": state}
    )
    assert "finite" in str(error) and "nan" in str(error)


# -- responses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, *PRESETS])
def test_response_round_trips_for_every_preset(name: str | None) -> None:
    response = response_for(None if name is None else preset(name))
    decoded = PolicyResponse.from_wire(unpackb(packb(response.to_wire())))
    assert (
        decoded.latent_spec == response.latent_spec
        and decoded.latent_layout == response.latent_layout
    )
    assert (
        decoded.server_timing == response.server_timing
        and decoded.policy_timing == response.policy_timing
    )
    np.testing.assert_array_equal(decoded.actions, response.actions)
    assert decoded.latents.keys() == response.latents.keys()
    for key, array in response.latents.items():
        assert decoded.latents[key].dtype == array.dtype
        assert np.array_equal(decoded.latents[key].view(np.uint8), array.view(np.uint8))


def test_latents_travel_at_the_top_level_under_the_seed_names() -> None:
    wire = unpackb(packb(response_for(preset("default")).to_wire()))
    assert {"expert_1_hidden_states", "text_only_hidden_states", "prompt_mask"} <= wire.keys()
    assert wire["text_only_hidden_states"].dtype == ml_dtypes.bfloat16
    layout = wire["latent_layout"]["expert_1_hidden_states"]
    assert layout["axes"] == ["step", "layer", "position", "hidden"] and layout["steps"] == [9]
    assert (
        layout["segments"] == [["state", 0, 1], ["actions", 1, 51]]
        and layout["dtype"] == "bfloat16"
    )


def test_stock_openpi_client_decodes_a_default_latent_response() -> None:
    from openpi_client import msgpack_numpy as openpi

    response = response_for(preset("default"))
    stock = openpi.unpackb(packb(response.to_wire()))
    assert stock["text_only_hidden_states"].dtype == np.uint16  # raw bfloat16 bit patterns
    restored = stock["text_only_hidden_states"].view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        restored.astype(np.float32), response.latents["text_only_hidden_states"].astype(np.float32)
    )
    np.testing.assert_array_equal(stock["actions"], response.actions)
    assert stock["latent_layout"]["prompt_mask"]["axes"] == ["position"]


def bad_response_cases() -> list[tuple[str, Any, str]]:
    return [
        ("actions", np.zeros((50, 7), np.int32), "actions"),
        ("actions", np.zeros(50), "actions"),
        (
            "expert_1_hidden_states",
            np.zeros((1, 19, 51, 1023), ml_dtypes.bfloat16),
            "expert_1_hidden_states",
        ),
        (
            "expert_1_hidden_states",
            np.zeros((1, 19, 51, 1024), np.float32),
            "expert_1_hidden_states",
        ),
        ("server_timing", {"infer_ms": "slow"}, "server_timing"),
        ("policy_timing", [1.0], "policy_timing"),
        (
            "latent_layout",
            {"prompt_mask": {"axes": ["position"], "shape": [48], "dtype": "int4"}},
            "latent_layout.prompt_mask.dtype",
        ),
        (
            "latent_layout",
            {"prompt_mask": {"axes": ["a", "b"], "shape": [48], "dtype": "bool"}},
            "latent_layout.prompt_mask.axes",
        ),
        (
            "latent_layout",
            {"prompt_mask": {"axes": ["position"], "shape": [-1], "dtype": "bool"}},
            "latent_layout.prompt_mask.shape",
        ),
        ("latent_layout", 5, "latent_layout"),
        ("latent_spec", {"pooling": "max"}, "latent_spec.pooling"),
    ]


@pytest.mark.parametrize(("key", "value", "field"), bad_response_cases())
def test_bad_response_fields_are_named(key: str, value: Any, field: str) -> None:
    wire = unpackb(packb(response_for(preset("default")).to_wire())) | {key: value}
    expect_error(field, PolicyResponse.from_wire, wire)


def test_latent_without_layout_and_layout_without_latent_are_rejected() -> None:
    wire = response_for(preset("default")).to_wire()
    layout = {k: v for k, v in wire["latent_layout"].items() if k != "prompt_mask"}
    expect_error(
        "latent_layout.prompt_mask", PolicyResponse.from_wire, wire | {"latent_layout": layout}
    )
    without = {k: v for k, v in wire.items() if k != "prompt_mask"}
    expect_error("prompt_mask", PolicyResponse.from_wire, without)
    expect_error("actions", PolicyResponse.from_wire, {"server_timing": {}})


# -- server metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [pi0_metadata(), pi05_metadata()])
def test_metadata_round_trips(metadata: ServerMetadata) -> None:
    from openpi_client import msgpack_numpy as openpi

    frame = packb(metadata.to_wire())
    assert ServerMetadata.from_wire(unpackb(frame)) == metadata
    assert openpi.unpackb(frame)["protocol_version"] == PROTOCOL_VERSION
    assert set(ServerMetadata.from_wire(unpackb(frame)).presets) == set(PRESETS)


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("protocol_version", "2.0", "protocol_version"),
        ("model", "", "model"),
        ("depth", {"expert_0": 18}, "depth"),
        ("width", {"expert_0": 2048, "expert_1": 0}, "width"),
        ("num_heads", "8", "num_heads"),
        ("action_horizon", 0, "action_horizon"),
        ("num_steps", True, "num_steps"),
        ("default_preset", "nope", "default_preset"),
        ("latent_presets", {"x": {"pooling": "max"}}, "latent_spec.pooling"),
        (
            "token_layout",
            {"expert_0": {"prompt": [0]}, "expert_1": {}},
            "token_layout.expert_0.prompt",
        ),
        ("config", [1], "config"),
    ],
)
def test_bad_metadata_fields_are_named(key: str, value: Any, field: str) -> None:
    expect_error(field, ServerMetadata.from_wire, pi0_metadata().to_wire() | {key: value})


def test_missing_metadata_key_is_named() -> None:
    wire = pi0_metadata().to_wire()
    del wire["num_steps"]
    expect_error("num_steps", ServerMetadata.from_wire, wire)


def test_layout_entries_check_their_own_arity() -> None:
    with pytest.raises(ValidationError, match=r"latent_layout\.axes"):
        ArrayLayout(("layer",), (1, 2), "float32")


def test_request_helper_builds_a_valid_request() -> None:
    assert PolicyRequest.from_wire(libero_wire(3)).prompt


@pytest.mark.parametrize("prompt", ["", "   "])
def test_the_null_prompt_is_a_prompt(wire: dict, prompt: str) -> None:
    """openpi tokenizes "" like any prompt; null-prompt studies send it."""
    assert PolicyRequest.from_wire({**wire, "prompt": prompt}).prompt == prompt
