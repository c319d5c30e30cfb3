"""The network's pieces (masks, positions, embeddings) and whole-model properties: masked inputs
change nothing, rows of a batch are independent, float and uint8 images agree, bfloat16 serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from latentpi.protocol.latent_spec import preset
from latentpi.server import parity
from latentpi.server.model import capture, configs
from latentpi.server.model.checkpoint import load_params_npz
from latentpi.server.model.gemma import apply_rope
from latentpi.server.model.pi0 import fake_inputs, make_attn_mask, param_shapes, posemb_sincos

PATH = Path("/work/shared/reference/pi0_tiny.npz")


def test_prefix_lm_mask() -> None:
    # Prefix of 3 (last one padding), state token, 2 action tokens.
    valid = jnp.array([[True, True, False, True, True, True]])
    ar = np.array([False, False, False, True, True, False])
    mask = np.asarray(make_attn_mask(valid, ar))[0]
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0],  # prefix sees the valid prefix only
            [1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],  # padding attends to nothing and is never attended to
            [1, 1, 0, 1, 0, 0],  # the state token sees the prefix and itself
            [1, 1, 0, 1, 1, 1],  # action tokens see everything valid
            [1, 1, 0, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_time_embedding() -> None:
    emb = np.asarray(posemb_sincos(jnp.array([0.0, 0.5]), 8))
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(
        emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7
    )  # sin half, then cos half
    periods = 4e-3 * (4.0 / 4e-3) ** np.linspace(0, 1, 4)
    np.testing.assert_allclose(
        emb[1, :4], np.sin(0.5 * 2 * np.pi / periods), atol=1e-4
    )  # float32 angles up to 250 pi


def test_rope_rotates_by_relative_position() -> None:
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(pos_q: int, pos_k: int) -> float:
        rq = apply_rope(q, jnp.array([[pos_q]]))
        rk = apply_rope(k, jnp.array([[pos_k]]))
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)  # depends on the offset only
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, jnp.array([[7]]))), jnp.linalg.norm(q), rtol=1e-6
    )


@pytest.fixture(scope="module")
def reference():
    return parity.read_reference(PATH)


def test_one_row_with_float_images_and_masked_inputs(reference) -> None:
    """Row 1 alone, images as floats in [-1, 1], reproduces openpi's row-1 actions; then the masked
    right-wrist image and the padded prompt tokens are changed, and nothing moves."""
    config = reference.config
    params = load_params_npz(PATH, dtype="float32", expected=param_shapes(config))
    row = {name: value[1:2] for name, value in reference.inputs.items()}
    for slot in config.image_slots:
        row[f"image/{slot}"] = row[f"image/{slot}"].astype(np.float32) / 255.0 * 2.0 - 1.0
    sampler = capture.CompiledSampler(config)
    actions, _ = sampler.sample_actions(
        params, capture.observation_from_arrays(row, config), row["noise"]
    )
    np.testing.assert_allclose(
        actions[0], reference.expected["actions"][1], atol=parity.ACTIONS_TOLERANCE
    )

    assert not row["image_mask/right_wrist_0_rgb"][0]
    row["image/right_wrist_0_rgb"] = np.ones_like(row["image/right_wrist_0_rgb"])
    padding = ~row["tokenized_prompt_mask"]
    assert padding.any()
    row["tokenized_prompt"] = np.where(padding, 1234, row["tokenized_prompt"]).astype(np.int32)
    moved, _ = sampler.sample_actions(
        params, capture.observation_from_arrays(row, config), row["noise"]
    )
    np.testing.assert_array_equal(moved, actions)
    # ... while a change to a valid prompt token does move them.
    row["tokenized_prompt"][0, 1] += 1
    changed, _ = sampler.sample_actions(
        params, capture.observation_from_arrays(row, config), row["noise"]
    )
    assert np.max(np.abs(changed - actions)) > 1e-4


def test_bfloat16_serving(reference) -> None:
    config = reference.config.with_dtype("bfloat16")
    params = load_params_npz(PATH, dtype="bfloat16", expected=param_shapes(config))
    obs = capture.observation_from_arrays(reference.inputs, config)
    actions, latents = capture.CompiledSampler(config).sample_actions(
        params, obs, reference.inputs["noise"], preset("default")
    )
    assert actions.dtype == np.float32 and np.all(np.isfinite(actions))
    # bfloat16 rounding, not a different model: close to openpi's float32 actions.
    np.testing.assert_allclose(actions, reference.expected["actions"], atol=0.05)
    assert latents["text_only_hidden_states"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert latents["expert_1_hidden_states"].shape == (
        2,
        1,
        config.depth + 1,
        config.suffix_len,
        config.expert_1.width,
    )


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_full_size_traces_with_capture(name: str) -> None:
    """The full-size models trace end to end (bfloat16, `default` and attention capture) without
    allocating: shape errors between 2048- and 1024-wide experts would show here."""
    config = configs.NAMED[name]("bfloat16")
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), param_shapes(config)
    )
    obs, noise = jax.eval_shape(lambda: fake_inputs(config, 2))
    spec = dataclasses.replace(preset("default"), attention="head_mean")
    plan = capture.CapturePlan(config, capture.CompiledSampler(config).resolve(spec))
    lowered = jax.jit(lambda p, o, n: capture.run_sampler(config, plan, p, o, n)).lower(
        params, obs, noise
    )
    actions, latents = lowered.out_info
    assert actions.shape == (2, config.action_horizon, 32)
    depth, segments_0 = config.depth, 4
    assert latents["text_only_hidden_states"].shape == (2, depth + 1, config.max_token_len, 2048)
    assert latents["text_only_hidden_states"].dtype == jnp.bfloat16
    assert latents["expert_1_hidden_states"].shape == (2, 1, depth + 1, config.suffix_len, 1024)
    segments_1 = len(configs.token_layout(config).expert_1)
    assert latents["attention_mass_expert_1"].shape == (
        2,
        1,
        depth,
        segments_1,
        segments_0 + segments_1,
    )
