"""Latent capture inside the compiled sampler, checked against the full capture and numpy.

Uses the pi0 reference file's params and inputs: batch 2 with different prompt lengths and a masked
right-wrist slot, so padding and masked slots are exercised."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from latentpi.protocol.latent_layout import ModelShape, latent_layouts
from latentpi.protocol.latent_spec import LatentSpec
from latentpi.server import parity
from latentpi.server.model import capture
from latentpi.server.model.checkpoint import load_params_npz
from latentpi.server.model.configs import token_layout
from latentpi.server.model.pi0 import param_shapes

PATH = Path("/work/shared/reference/pi0_tiny.npz")


@pytest.fixture(scope="module")
def setup():
    reference = parity.read_reference(PATH)
    config = reference.config
    params = load_params_npz(PATH, dtype="float32", expected=param_shapes(config))
    obs = capture.observation_from_arrays(reference.inputs, config)
    sampler = capture.CompiledSampler(config)
    return sampler, params, obs, reference.inputs["noise"], reference


@pytest.fixture(scope="module")
def full(setup):
    sampler, params, obs, noise, _ = setup
    return sampler.sample_actions(params, obs, noise, LatentSpec(attention="per_head"))


@pytest.fixture(scope="module")
def plain(setup):
    sampler, params, obs, noise, _ = setup
    return sampler.sample_actions(params, obs, noise, None)


def test_full_capture_shapes_and_layout(setup, full) -> None:
    sampler, _, _, _, reference = setup
    config, layout = sampler.config, token_layout(sampler.config)
    actions, latents = full
    batch, depth, steps = 2, config.depth, config.num_steps
    assert actions.shape == (batch, config.action_horizon, config.action_dim)
    assert latents["expert_0_hidden_states"].shape == (
        batch,
        depth + 1,
        layout.length(0),
        config.expert_0.width,
    )
    assert latents["expert_1_hidden_states"].shape == (
        batch,
        steps,
        depth + 1,
        layout.length(1),
        config.expert_1.width,
    )
    assert latents["text_only_hidden_states"].shape == (
        batch,
        depth + 1,
        config.max_token_len,
        config.expert_0.width,
    )
    np.testing.assert_array_equal(latents["prompt_mask"], reference.inputs["tokenized_prompt_mask"])
    start, stop = layout.span(0, "prompt")
    np.testing.assert_array_equal(
        latents["text_only_hidden_states"], latents["expert_0_hidden_states"][:, :, start:stop]
    )
    heads, segments_0, segments_1 = (
        config.expert_0.num_heads,
        len(layout.expert_0),
        len(layout.expert_1),
    )
    assert latents["attention_mass_expert_0"].shape == (batch, depth, heads, segments_0, segments_0)
    assert latents["attention_mass_expert_1"].shape == (
        batch,
        steps,
        depth,
        heads,
        segments_1,
        segments_0 + segments_1,
    )
    assert all(
        value.dtype == np.float32 for name, value in latents.items() if name.endswith("states")
    )


def test_shapes_match_the_protocol_layouts(setup, full, pooled_mean) -> None:
    """The arrays are what latentpi.protocol.latent_layout promises to clients (batch axis aside)."""
    config = setup[0].config
    widths = (config.expert_0.width, config.expert_1.width)
    shape = ModelShape(
        token_layout(config), config.depth, widths, config.expert_0.num_heads, config.num_steps
    )
    full_spec = LatentSpec(attention="per_head")
    mean_spec = LatentSpec(pooling="mean", dtype="bfloat16", attention="head_mean")
    for (_, latents), spec in ((full, full_spec), (pooled_mean, mean_spec)):
        layouts = latent_layouts(spec, shape)
        assert set(layouts) == set(latents)
        for name, layout in layouts.items():
            dtype = ml_dtypes.bfloat16 if layout.dtype == "bfloat16" else layout.dtype
            assert latents[name].shape[1:] == layout.shape, name
            assert latents[name].dtype == np.dtype(dtype), name


def test_plain_and_capture_actions_identical(setup, full, plain) -> None:
    sampler, params, obs, noise, _ = setup
    np.testing.assert_array_equal(plain[0], full[0])
    assert plain[1] == {}
    # No capture code in the plain function: its only output is the actions.
    compiled = sampler.compiled(params, obs, noise, None)
    assert len(jax.tree.leaves(compiled.out_info)) == 1


def test_selection_equals_slicing_full(setup, full) -> None:
    sampler, params, obs, noise, _ = setup
    layout = token_layout(sampler.config)
    spec = LatentSpec(
        layers=(0, -1, 2),
        segments_0=("prompt", "base_0_rgb"),
        segments_1=("actions",),
        steps=(-1, 0),
        dtype="float16",
    )
    _, latents = sampler.sample_actions(params, obs, noise, spec)
    _, reference = full
    layers, steps = [0, 3, 2], [9, 0]
    e0 = reference["expert_0_hidden_states"][:, layers]
    want_0 = np.concatenate(
        [
            e0[:, :, slice(*layout.span(0, "prompt"))],
            e0[:, :, slice(*layout.span(0, "base_0_rgb"))],
        ],
        axis=2,
    )
    np.testing.assert_array_equal(latents["expert_0_hidden_states"], want_0.astype(np.float16))
    want_1 = reference["expert_1_hidden_states"][:, steps][:, :, layers][
        :, :, :, slice(*layout.span(1, "actions"))
    ]
    np.testing.assert_array_equal(latents["expert_1_hidden_states"], want_1.astype(np.float16))
    np.testing.assert_array_equal(
        latents["text_only_hidden_states"],
        reference["text_only_hidden_states"][:, layers].astype(np.float16),
    )
    assert set(latents) == {
        "expert_0_hidden_states",
        "expert_1_hidden_states",
        "text_only_hidden_states",
        "prompt_mask",
    }


def _numpy_pool(states: np.ndarray, spans, valid: np.ndarray, pooling: str) -> np.ndarray:
    """states (B, layer, L, D), valid (B, L) -> (B, layer, segment, D)."""
    out = np.zeros((*states.shape[:2], len(spans), states.shape[-1]), np.float64)
    for b in range(states.shape[0]):
        for s, (start, stop) in enumerate(spans):
            index = np.flatnonzero(valid[b, start:stop]) + start
            if index.size == 0:
                continue  # a masked slot pools to zeros
            chosen = states[b, :, index] if pooling == "mean" else states[b, :, index[-1:]]
            out[b, :, s] = np.asarray(chosen, np.float64).mean(axis=0)
    return out


@pytest.fixture(scope="module")
def pooled_mean(setup):
    """Mean pooling in bfloat16, with the head-averaged attention read-out (one compile for both)."""
    sampler, params, obs, noise, _ = setup
    return sampler.sample_actions(
        params, obs, noise, LatentSpec(pooling="mean", dtype="bfloat16", attention="head_mean")
    )


@pytest.mark.parametrize("pooling, dtype", [("mean", "bfloat16"), ("last", "float32")])
def test_pooling_matches_numpy(setup, full, pooled_mean, pooling: str, dtype: str) -> None:
    sampler, params, obs, noise, reference = setup
    layout = token_layout(sampler.config)
    if pooling == "mean":
        _, latents = pooled_mean
    else:
        _, latents = sampler.sample_actions(
            params, obs, noise, LatentSpec(pooling=pooling, dtype=dtype)
        )
    _, ref = full
    valid = parity.valid_prefix_positions(sampler.config, reference.inputs)
    assert not valid[
        :, slice(*layout.span(0, "right_wrist_0_rgb"))
    ].any()  # a masked slot is exercised
    spans_0 = [(a, b) for _, a, b in layout.expert_0]
    want_0 = _numpy_pool(ref["expert_0_hidden_states"], spans_0, valid, pooling)
    got_0 = latents["expert_0_hidden_states"]
    assert got_0.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    tolerance = (
        {"rtol": 1e-2, "atol": 1e-2} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-6}
    )
    np.testing.assert_allclose(got_0.astype(np.float64), want_0, **tolerance)
    assert not np.any(got_0[:, :, 2].astype(np.float32))  # the masked right-wrist slot
    prompt = layout.span(0, "prompt")
    want_text = _numpy_pool(ref["expert_0_hidden_states"], [prompt], valid, pooling)[:, :, 0]
    np.testing.assert_allclose(
        latents["text_only_hidden_states"].astype(np.float64), want_text, **tolerance
    )
    # Padding is excluded: the rows' prompt lengths differ, and so must mean/last vs a naive reduction.
    lengths = valid[:, prompt[0] : prompt[1]].sum(axis=1)
    assert lengths[0] != lengths[1] and lengths.max() < prompt[1] - prompt[0]
    suffix = ref["expert_1_hidden_states"].reshape((-1, *ref["expert_1_hidden_states"].shape[2:]))
    want_1 = _numpy_pool(
        suffix,
        [(a, b) for _, a, b in layout.expert_1],
        np.ones((suffix.shape[0], layout.length(1)), bool),
        pooling,
    )
    got_1 = latents["expert_1_hidden_states"].reshape(
        (-1, *latents["expert_1_hidden_states"].shape[2:])
    )
    np.testing.assert_allclose(got_1.astype(np.float64), want_1, **tolerance)


def test_attention_mass(setup, full, pooled_mean) -> None:
    sampler, _params, _obs, _noise, reference = setup
    layout = token_layout(sampler.config)
    _, latents = full
    valid = parity.valid_prefix_positions(sampler.config, reference.inputs)
    has_queries = np.array(
        [[valid[b, a:z].any() for _, a, z in layout.expert_0] for b in range(2)]
    )  # (B, seg)
    mass_0 = latents["attention_mass_expert_0"]  # (B, layer, head, q, k)
    rows_0 = mass_0.sum(axis=-1)
    np.testing.assert_allclose(
        rows_0[has_queries[:, None, None, :].repeat(3, 1).repeat(4, 2)], 1.0, atol=1e-5
    )
    assert not np.any(
        mass_0[~has_queries[:, None, None, :].repeat(3, 1).repeat(4, 2)]
    )  # masked slot: zero row
    assert not np.any(mass_0[..., 2])  # nobody attends to the masked right-wrist keys
    mass_1 = latents["attention_mass_expert_1"]  # (B, step, layer, head, q, k)
    np.testing.assert_allclose(mass_1.sum(axis=-1), 1.0, atol=1e-5)
    state, actions = layout.names(1).index("state"), layout.names(1).index("actions")
    offset = len(layout.expert_0)
    assert not np.any(
        mass_1[..., state, offset + actions]
    )  # the state token never sees the actions
    assert np.all(mass_1[..., actions, offset + actions] > 0)
    # head_mean is the mean of per_head.
    _, head_mean = pooled_mean
    np.testing.assert_allclose(head_mean["attention_mass_expert_0"], mass_0.mean(axis=2), atol=1e-6)
    np.testing.assert_allclose(head_mean["attention_mass_expert_1"], mass_1.mean(axis=3), atol=1e-6)


def test_cache_keys_and_compiles_do_not_block(setup, full) -> None:
    sampler, params, obs, noise, _ = setup
    depth = sampler.config.depth
    before = len(sampler.cached_keys())
    # Specs that resolve equal share one compiled function.
    assert sampler.compiled(
        params, obs, noise, LatentSpec(attention="per_head", layers=tuple(range(depth + 1)))
    ) is (sampler.compiled(params, obs, noise, LatentSpec(attention="per_head")))
    assert len(sampler.cached_keys()) == before
    # While a new spec compiles (held inside _compile), a cached spec is served.
    gate, entered = threading.Event(), threading.Event()
    original = sampler._compile

    def slow_compile(*args):
        entered.set()
        assert gate.wait(60)
        return original(*args)

    sampler._compile = slow_compile
    new_spec = LatentSpec(
        expert_0=False,
        expert_1=False,
        text_only=False,
        attention="head_mean",
        layers=(1, 3),
        steps=(2,),
    )
    results = []
    worker = threading.Thread(
        target=lambda: results.append(sampler.sample_actions(params, obs, noise, new_spec))
    )
    worker.start()
    try:
        assert entered.wait(60)
        actions, _ = sampler.sample_actions(params, obs, noise, LatentSpec(attention="per_head"))
        np.testing.assert_array_equal(actions, full[0])
        assert worker.is_alive()  # still compiling
    finally:
        gate.set()
        worker.join(120)
        sampler._compile = original
    assert len(sampler.cached_keys()) == before + 1
    # That spec keeps attention only; residual entry 3 (= depth) has no attention layer.
    latents = results[0][1]
    assert set(latents) == {"attention_mass_expert_0", "attention_mass_expert_1"}
    assert latents["attention_mass_expert_0"].shape == (2, 1, 4, 4)
    assert latents["attention_mass_expert_1"].shape == (2, 1, 1, 2, 6)
    np.testing.assert_allclose(
        latents["attention_mass_expert_1"][:, 0, 0],
        full[1]["attention_mass_expert_1"][:, 2, 1].mean(axis=1),
        atol=1e-6,
    )


def test_the_program_cache_is_bounded_least_recently_used_first(setup, full) -> None:
    """A client sending ever new specs cannot grow the server's compiled programs without bound:
    beyond max_programs the least recently used is dropped (and recompiled if asked again)."""
    sampler, params, obs, noise, _ = setup
    bounded = capture.CompiledSampler(sampler.config, max_programs=2)
    specs = [LatentSpec(attention="per_head"), None, LatentSpec(pooling="mean")]
    first = bounded.compiled(params, obs, noise, specs[0])
    bounded.compiled(params, obs, noise, specs[1])
    assert bounded.compiled(params, obs, noise, specs[0]) is first  # a hit: now the most recent
    bounded.compiled(params, obs, noise, specs[2])  # evicts specs[1], the least recently used
    assert len(bounded.cached_keys()) == 2
    assert bounded.is_compiled(2, str(next(iter(obs.images.values())).dtype), specs[0])
    assert not bounded.is_compiled(2, str(next(iter(obs.images.values())).dtype), specs[1])
    actions, _ = bounded.sample_actions(params, obs, noise, specs[0])
    np.testing.assert_array_equal(actions, full[0])
