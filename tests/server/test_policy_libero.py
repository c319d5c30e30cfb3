"""LiberoPolicyTransform: one LIBERO request → model inputs, model actions → LIBERO actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentpi.protocol.errors import ValidationError
from latentpi.server.norm_stats import NormStats, NormStatsError, load_norm_stats, save_norm_stats
from latentpi.server.policy import (
    IMAGE_SLOTS,
    LiberoPolicyTransform,
    PolicyVariant,
    PromptTokenizer,
    resize_with_pad,
    train_tiny_tokenizer,
)
from latentpi.server.policy.normalize import EPS

PROMPT = "put the bowl on the plate"
RNG = np.random.default_rng(7)
# Shaped like LIBERO's statistics: 8 state dims, 7 action dims.
STATE_STATS = NormStats(
    mean=np.array([-0.05, 0.03, 1.0, 3.0, -0.1, -0.1, 0.03, -0.03]),
    std=np.array([0.1, 0.15, 0.1, 0.3, 0.4, 0.3, 0.01, 0.01]),
    q01=np.array([-0.3, -0.3, 0.9, 2.0, -1.0, -0.9, 0.0, -0.04]),
    q99=np.array([0.2, 0.3, 1.3, 3.3, 0.8, 0.5, 0.04, 0.0]),
)
ACTION_STATS = NormStats(
    mean=np.array([0.06, 0.08, -0.1, 0.0, 0.0, -0.005, -0.1]),
    std=np.array([0.3, 0.35, 0.4, 0.04, 0.06, 0.08, 1.0]),
    q01=np.array([-0.7, -0.7, -0.9, -0.1, -0.15, -0.2, -1.0]),
    q99=np.array([0.9, 0.9, 0.9, 0.1, 0.15, 0.2, 1.0]),
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def norm_stats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NormStats]:
    # Through a real checkpoint assets directory, as the server loads them.
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    save_norm_stats(checkpoint, {"state": STATE_STATS, "actions": ACTION_STATS})
    return load_norm_stats(checkpoint)


def make_transform(
    variant: str, model_path: Path, norm_stats: dict[str, NormStats], **options: object
) -> LiberoPolicyTransform:
    max_len = 48 if variant == "pi0" else 200
    tokenizer = PromptTokenizer.from_file(model_path, max_len)
    return LiberoPolicyTransform.create(variant, norm_stats, tokenizer, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def transform(
    request: pytest.FixtureRequest, model_path: Path, norm_stats: dict[str, NormStats]
) -> LiberoPolicyTransform:
    return make_transform(request.param, model_path, norm_stats)


def request_arrays(side: int = 224) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)
    wrist = RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)
    state = STATE_STATS.mean.astype(np.float64) + RNG.normal(size=8) * STATE_STATS.std
    return image, wrist, state


def test_inputs_have_openpi_observation_layout(transform: LiberoPolicyTransform):
    image, wrist, state = request_arrays()
    inputs = transform.inputs(image, wrist, state, PROMPT)
    assert set(inputs) == {
        "image",
        "image_mask",
        "state",
        "tokenized_prompt",
        "tokenized_prompt_mask",
    }
    assert tuple(inputs["image"]) == tuple(inputs["image_mask"]) == IMAGE_SLOTS
    np.testing.assert_array_equal(inputs["image"]["base_0_rgb"], image)
    np.testing.assert_array_equal(inputs["image"]["left_wrist_0_rgb"], wrist)
    right = inputs["image"]["right_wrist_0_rgb"]
    assert right.shape == (224, 224, 3) and right.dtype == np.uint8 and not right.any()
    assert [bool(inputs["image_mask"][slot]) for slot in IMAGE_SLOTS] == [True, True, False]
    tokens, mask = transform.tokenizer.tokenize(PROMPT)
    np.testing.assert_array_equal(inputs["tokenized_prompt"], tokens)
    np.testing.assert_array_equal(inputs["tokenized_prompt_mask"], mask)
    assert inputs["tokenized_prompt"].shape == (transform.max_token_len,)


def test_state_is_normalized_per_variant_then_zero_padded_to_32(transform: LiberoPolicyTransform):
    image, wrist, state = request_arrays()
    model_state = transform.inputs(image, wrist, state, PROMPT)["state"]
    assert model_state.shape == (32,) and model_state.dtype == np.float32
    s = STATE_STATS
    if transform.variant is PolicyVariant.PI0:
        expected = (state - s.mean) / (s.std + EPS)
    else:
        expected = (state - s.q01) / (s.q99 - s.q01 + EPS) * 2 - 1
    # float64 statistics, one cast at the end (as openpi): bit for bit, not merely close.
    np.testing.assert_array_equal(model_state[:8], expected.astype(np.float32))
    assert not model_state[8:].any()


def test_images_are_resized_with_padding_and_callers_arrays_untouched(
    transform: LiberoPolicyTransform,
):
    image, _, state = request_arrays(side=256)
    wide = RNG.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    before = (image.copy(), wide.copy(), state.copy())
    inputs = transform.inputs(image, wide, state, PROMPT)
    np.testing.assert_array_equal(inputs["image"]["base_0_rgb"], resize_with_pad(image))
    np.testing.assert_array_equal(inputs["image"]["left_wrist_0_rgb"], resize_with_pad(wide))
    assert not inputs["image"]["left_wrist_0_rgb"][:56].any()  # 112 rows centred in 224
    assert inputs["image"]["right_wrist_0_rgb"].shape == (224, 224, 3)
    for a, b in zip(before, (image, wide, state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_transforms_run_in_openpi_order(transform: LiberoPolicyTransform):
    names = [type(t).__name__ for t in transform.input_transforms()]
    assert names == [
        "InjectDefaultPrompt",
        "LiberoInputs",
        "Normalize",
        "ResizeImages",
        "TokenizePrompt",
        "PadState",
    ]
    outputs = [type(t).__name__ for t in transform.output_transforms()]
    delta = ["AbsoluteActions"] if transform.variant is PolicyVariant.PI0 else []
    assert outputs == ["Unnormalize", *delta, "CutActions"]


def test_pi0_delta_actions_round_trip(model_path: Path, norm_stats: dict[str, NormStats]):
    transform = make_transform("pi0", model_path, norm_stats)
    image, wrist, state = request_arrays()
    model_state = transform.inputs(image, wrist, state, PROMPT)["state"]
    # Absolute targets; the model predicts arm dims relative to the state, gripper absolute.
    target = ACTION_STATS.mean + RNG.normal(size=(50, 7)) * ACTION_STATS.std
    delta = target - np.concatenate([state[:6], [0.0]])
    model_actions = RNG.normal(size=(50, 32)).astype(np.float32)  # dims 7.. are padding noise
    model_actions[:, :7] = (delta - ACTION_STATS.mean) / (ACTION_STATS.std + EPS)
    actions = transform.outputs(model_actions, model_state)
    assert actions.shape == (50, 7) and actions.dtype == np.float64
    np.testing.assert_allclose(actions, target, atol=1e-5)
    # openpi's arithmetic exactly: float32 model values against float64 statistics.
    unnormalized = model_actions[:, :7] * (ACTION_STATS.std + EPS) + ACTION_STATS.mean
    state_64 = model_state[:8] * (STATE_STATS.std + EPS) + STATE_STATS.mean
    unnormalized[:, :6] += state_64[:6]
    np.testing.assert_array_equal(actions, unnormalized)
    # The gripper dim ignores the state; the arm dims follow it.
    shifted = transform.inputs(image, wrist, state + 0.5, PROMPT)["state"]
    moved = transform.outputs(model_actions, shifted) - actions
    np.testing.assert_allclose(moved[:, :6], 0.5, atol=1e-5)
    np.testing.assert_array_equal(moved[:, 6], 0.0)


def test_pi05_actions_are_absolute_quantile_unnormalized(
    model_path: Path, norm_stats: dict[str, NormStats]
):
    transform = make_transform("pi05", model_path, norm_stats)
    image, wrist, state = request_arrays()
    model_state = transform.inputs(image, wrist, state, PROMPT)["state"]
    model_actions = RNG.uniform(-1.2, 1.2, size=(10, 32)).astype(np.float32)
    actions = transform.outputs(model_actions, model_state)
    a = ACTION_STATS
    expected = (model_actions[:, :7] + 1) / 2 * (a.q99 - a.q01 + EPS) + a.q01
    assert actions.shape == (10, 7)
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)
    other_state = transform.inputs(image, wrist, state + 0.5, PROMPT)["state"]
    np.testing.assert_array_equal(transform.outputs(model_actions, other_state), actions)


def test_default_prompt_fills_a_missing_prompt(model_path: Path, norm_stats: dict[str, NormStats]):
    transform = make_transform("pi0", model_path, norm_stats, default_prompt=PROMPT)
    image, wrist, state = request_arrays()
    default = transform.inputs(image, wrist, state, None)
    explicit = transform.inputs(image, wrist, state, PROMPT)
    np.testing.assert_array_equal(default["tokenized_prompt"], explicit["tokenized_prompt"])
    other = transform.inputs(image, wrist, state, "turn on the stove")
    assert not np.array_equal(other["tokenized_prompt"], explicit["tokenized_prompt"])
    numpy_prompt = transform.inputs(image, wrist, state, np.asarray(PROMPT))  # type: ignore[arg-type]
    np.testing.assert_array_equal(numpy_prompt["tokenized_prompt"], explicit["tokenized_prompt"])


def test_float_and_channels_first_images_are_converted_as_openpi_does(
    transform: LiberoPolicyTransform,
):
    image, wrist, state = request_arrays()
    as_float = RNG.random((224, 224, 3), dtype=np.float32)
    channels_first = np.ascontiguousarray(np.moveaxis(wrist, -1, 0))
    inputs = transform.inputs(as_float, channels_first, state, PROMPT)
    # openpi: (255 * x).astype(uint8), truncating; then (c, h, w) -> (h, w, c).
    np.testing.assert_array_equal(inputs["image"]["base_0_rgb"], (255 * as_float).astype(np.uint8))
    np.testing.assert_array_equal(inputs["image"]["left_wrist_0_rgb"], wrist)
    both = np.moveaxis(image.astype(np.float64) / 255, -1, 0)
    lenient = transform.inputs(both, wrist, state, PROMPT)["image"]["base_0_rgb"]
    np.testing.assert_array_equal(lenient, (255 * (image / 255)).astype(np.uint8))


BAD_REQUESTS = [
    ("observation/image", {"image": np.full((224, 224, 3), 1.5, np.float32)}),
    ("observation/image", {"image": np.full((224, 224, 3), np.nan, np.float32)}),
    ("observation/image", {"image": np.zeros((224, 224, 3), np.int32)}),
    ("observation/image", {"image": np.zeros((4, 224, 224), np.uint8)}),
    ("observation/image", {"image": np.zeros((2000, 224, 3), np.uint8)}),
    ("observation/image", {"image": [[0, 1, 2]]}),
    ("observation/image", {"image": np.zeros((1, 300, 3), np.uint8)}),
    ("observation/image", {"image": np.zeros((0, 0, 3), np.uint8)}),
    ("observation/wrist_image", {"wrist_image": np.zeros((224, 224, 4), np.uint8)}),
    ("observation/state", {"state": np.zeros(7)}),
    ("observation/state", {"state": np.array([np.nan] * 8)}),
    ("observation/state", {"state": np.array(["a"] * 8)}),
    ("observation/state", {"state": "0 0 0 0 0 0 0 0"}),
    ("prompt", {"prompt": None}),
    ("prompt", {"prompt": 42}),
]


@pytest.mark.parametrize(("field", "change"), BAD_REQUESTS)
def test_bad_requests_name_the_field(
    transform: LiberoPolicyTransform, field: str, change: dict[str, object]
):
    image, wrist, state = request_arrays()
    request = {"image": image, "wrist_image": wrist, "state": state, "prompt": PROMPT, **change}
    with pytest.raises(ValidationError) as info:
        transform.inputs(**request)  # type: ignore[arg-type]
    assert info.value.field == field
    assert "expected" in str(info.value)


def test_bad_model_outputs_are_refused(transform: LiberoPolicyTransform):
    model_state = np.zeros(32, np.float32)
    with pytest.raises(ValidationError, match=r"actions: expected shape \("):
        transform.outputs(np.zeros((transform.action_horizon, 7), np.float32), model_state)
    with pytest.raises(ValidationError, match=r"model_state: expected shape \(32,\)"):
        transform.outputs(np.zeros((transform.action_horizon, 32), np.float32), np.zeros(8))


def test_configuration_errors_are_clear(model_path: Path, norm_stats: dict[str, NormStats]):
    no_quantiles = {k: NormStats(mean=v.mean, std=v.std) for k, v in norm_stats.items()}
    make_transform("pi0", model_path, no_quantiles)  # pi0 does not need them
    with pytest.raises(NormStatsError, match="'state': quantile normalization"):
        make_transform("pi05", model_path, no_quantiles)
    with pytest.raises(ValueError, match="norm_stats: expected keys 'state' and 'actions'"):
        make_transform("pi0", model_path, {"state": STATE_STATS})
    with pytest.raises(ValueError, match=r"tokenizer\.max_len: expected max_token_len 48"):
        LiberoPolicyTransform.create("pi0", norm_stats, PromptTokenizer.from_file(model_path, 200))
    with pytest.raises(ValueError, match="'pi1'"):
        make_transform("pi1", model_path, norm_stats)
