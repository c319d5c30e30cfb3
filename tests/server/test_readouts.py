"""Read-outs through the model's own heads: the logit lens equals PaliGemma's tied LM head computed
independently and finds a token planted in the residual stream; the action lens at the last entry is
the model's own velocity at every step (pi0 and pi0.5's adaptive norm); bad read-outs are named."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from loopback import observation, tiny_engine

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.messages import PolicyRequest
from latentpi.server.engine import PolicyEngine, _stack_observation

FULL_FLOAT32 = {"preset": "full", "dtype": "float32"}


def run(engine: PolicyEngine, **extra: object) -> dict:
    request = PolicyRequest.from_wire(observation(1, noise_seed=5, **extra))
    return engine.run_batch([engine.prepare(request)])[0]


def leaf(params: dict, *path: str) -> np.ndarray:
    for key in path:
        params = params[key]
    return np.asarray(params, np.float64)


def test_logit_lens_equals_the_tied_lm_head_computed_independently() -> None:
    engine = tiny_engine("pi0_tiny")
    result = run(
        engine,
        latent_spec={"preset": "text", "layers": [0, -1]},
        readouts={"logit_lens": {"top_k": 4}},
    )
    lens = result["readouts"]["logit_lens"]
    assert lens["source"] == "text_only_hidden_states" and lens["layers"] == [0, 3]
    params = jax.device_get(engine.params)
    scale = leaf(params, "PaliGemma", "llm", "final_norm", "scale")
    table = leaf(params, "PaliGemma", "llm", "embedder", "input_embedding")
    states = result["text_only_hidden_states"].astype(np.float64)  # (layer, position, width)
    normed = states / np.sqrt(np.mean(states**2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)
    logits = normed @ table.T
    expected = np.argsort(-logits, axis=-1)[..., :4]
    valid = result["prompt_mask"]
    np.testing.assert_array_equal(lens["token_ids"][:, valid], expected[:, valid])
    np.testing.assert_allclose(
        lens["logits"][:, valid],
        np.take_along_axis(logits, expected, -1)[:, valid],
        rtol=1e-4,
        atol=1e-5,
    )
    assert len(lens["tokens"][0][0]) == 4 and all(isinstance(t, str) for t in lens["tokens"][0][0])


def test_a_token_planted_in_the_residual_stream_comes_first() -> None:
    engine = tiny_engine("pi0_tiny")
    table = leaf(jax.device_get(engine.params), "PaliGemma", "llm", "embedder", "input_embedding")
    token, layer, position = 300, 2, 3
    planted = (8 * table[token] / np.linalg.norm(table[token])).astype(np.float32)
    patch = {
        "op": "set",
        "site": {"expert": 0, "point": "residual", "layers": [layer], "segment": "prompt", "positions": [position, position + 1]},
        "value": planted,
    }  # fmt: skip
    result = run(
        engine,
        latent_spec={"preset": "text", "layers": [layer]},
        readouts={"logit_lens": {"top_k": 1}},
        interventions=[patch],
    )
    assert result["readouts"]["logit_lens"]["token_ids"][0, position, 0] == token


@pytest.mark.parametrize("config", ["pi0_tiny", "pi05_tiny"])
def test_action_lens_at_the_last_entry_is_the_models_own_velocity(config: str) -> None:
    engine = tiny_engine(config)
    result = run(engine, latent_spec=FULL_FLOAT32, readouts={"action_lens": True})
    lens = result["readouts"]["action_lens"]
    depth = engine.model.depth
    assert lens["layers"] == list(range(depth + 1)) and lens["steps"] == list(
        range(engine.model.num_steps)
    )
    request = PolicyRequest.from_wire(observation(1, noise_seed=5))
    item = engine.prepare(request)
    _, traced = engine.sampler.sample_actions(
        engine.params,
        _stack_observation([item]),
        np.stack([item.noise]),
        engine.sampler.resolve(
            PolicyRequest.from_wire(observation(1, latent_spec=FULL_FLOAT32)).latent_spec
        ),
        trace=True,
    )
    velocity = traced["velocity"][0]  # (step, horizon, action_dim): the model's own
    np.testing.assert_allclose(lens["velocity"][:, -1], velocity, rtol=1e-4, atol=1e-5)
    # Earlier entries predict something else: the lens is not a constant. (Not in random pi0.5:
    # its adaRMS gates are zero-initialised, so no layer changes the action expert's stream.)
    if config == "pi0_tiny":
        assert not np.allclose(lens["velocity"][:, 0], velocity, atol=1e-3)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"readouts": {"logit_lens": {}}}, "readouts: expected a request that collects latents"),
        (
            {"latent_spec": "pooled", "readouts": {"logit_lens": {}}},
            "readouts.logit_lens: expected a latent_spec",
        ),
        (
            {"latent_spec": "text", "readouts": {"action_lens": True}},
            "readouts.action_lens: expected a latent_spec",
        ),
        (
            {"latent_spec": "text", "readouts": {"logit_lens": {"top_k": 0}}},
            "readouts.logit_lens.top_k",
        ),
        (
            {"latent_spec": "text", "readouts": {"lens": {}}},
            "readouts: expected a map with logit_lens",
        ),
    ],
    ids=["no latents", "pooled", "no expert 1", "top_k", "unknown"],
)
def test_bad_readouts_are_named(extra: dict, field: str) -> None:
    engine = tiny_engine("pi0_tiny")
    with pytest.raises(ValidationError, match=f"^{field}"):
        engine.prepare(PolicyRequest.from_wire(observation(0, **extra)))
