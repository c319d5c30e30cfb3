"""Representation metrics recover effects planted in synthetic data (drift, CKA, RSA, attention)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentpi.client.analysis import metrics
from latentpi.protocol.errors import ValidationError

S, L, P, D = 12, 3, 7, 16
VALID = 5  # positions 5 and 6 are padding
RATES = np.array([0.0, 0.05, 0.2])  # planted drift per sample, per layer


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def _drifting_prompt(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt states whose valid-token mean moves along a unit direction orthogonal to it at
    RATES[layer] per sample; padding is junk that changes every sample. Returns states, mask and
    the norm of each layer's mean."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(L, P, D))
    mean = base[:, :VALID].mean(axis=1)  # (L, D)
    direction = rng.normal(size=(L, D))
    direction -= (
        np.sum(direction * mean, axis=1, keepdims=True)
        / np.sum(mean * mean, axis=1, keepdims=True)
        * mean
    )
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    t = np.arange(S)[:, None, None, None]
    states = base[None] + t * RATES[None, :, None, None] * direction[None, :, None, :]
    states = np.repeat(states, 1, axis=0).copy()
    states[:, :, VALID:] = rng.normal(scale=10.0, size=(S, L, P - VALID, D))
    mask = np.zeros((S, P), bool)
    mask[:, :VALID] = True
    return states, mask, np.linalg.norm(mean, axis=1)


def test_language_drift_recovers_planted_rate_and_magnitude() -> None:
    states, mask, norms = _drifting_prompt()
    drift = metrics.language_drift(states, mask)
    assert drift.relative_l2.shape == (S, L)
    t = np.arange(S)[:, None]
    np.testing.assert_allclose(drift.relative_l2, t * RATES / norms, atol=1e-12)
    expected_cos = 1 - norms / np.sqrt(norms**2 + (t * RATES) ** 2)
    np.testing.assert_allclose(drift.cosine_distance, expected_cos, atol=1e-12)
    assert np.all(np.diff(drift.cosine_distance[:, 2]) > 0)  # monotone where drift is planted
    np.testing.assert_allclose(drift.cosine_distance[:, 0], 0, atol=1e-12)  # layer 0 does not drift
    rate = metrics.drift_rate(drift.relative_l2, timesteps=np.arange(S) * 5)
    np.testing.assert_allclose(rate, RATES / norms / 5, rtol=1e-9, atol=1e-15)


def test_padding_positions_change_nothing() -> None:
    states, mask, _ = _drifting_prompt()
    other = states.copy()
    other[:, :, VALID:] = np.random.default_rng(9).normal(scale=1e3, size=other[:, :, VALID:].shape)
    for fn in (metrics.language_drift, metrics.token_drift):
        a, b = fn(states, mask), fn(other, mask)
        np.testing.assert_array_equal(a.cosine_distance, b.cosine_distance)
        np.testing.assert_array_equal(a.relative_l2, b.relative_l2)
    tokens = metrics.token_drift(states, mask)
    assert tokens.cosine_distance.shape == (S, L, P)
    assert np.isnan(tokens.cosine_distance[:, :, VALID:]).all()
    assert np.isfinite(tokens.cosine_distance[:, :, :VALID]).all()


def test_drift_accepts_one_dimensional_mask_pooled_states_and_bfloat16() -> None:
    states, mask, _ = _drifting_prompt()
    full = metrics.language_drift(states, mask)
    np.testing.assert_array_equal(
        metrics.language_drift(states, mask[0]).relative_l2, full.relative_l2
    )
    pooled = metrics.prompt_mean(states, mask)
    np.testing.assert_allclose(
        metrics.language_drift(pooled).relative_l2, full.relative_l2, atol=1e-12
    )
    half = metrics.language_drift(states.astype(ml_dtypes.bfloat16), mask.astype(np.uint8))
    np.testing.assert_allclose(half.relative_l2, full.relative_l2, atol=0.02)
    last = metrics.language_drift(states, mask, reference=-1)
    np.testing.assert_allclose(last.relative_l2[-1], 0, atol=1e-12)


def test_token_drift_needs_validity_in_both_sample_and_reference() -> None:
    states, mask, _ = _drifting_prompt()
    mask = mask.copy()
    mask[0, 4] = False  # padding in the reference only
    tokens = metrics.token_drift(states, mask)
    assert np.isnan(tokens.relative_l2[:, :, 4]).all()
    assert np.isfinite(tokens.relative_l2[:, :, :4]).all()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s, m: metrics.language_drift(s, m[:, :3]), "prompt_mask"),
        (lambda s, m: metrics.language_drift(s, np.zeros_like(m)), "prompt_mask"),
        (lambda s, m: metrics.language_drift(s, m * 2), "prompt_mask"),
        (lambda s, m: metrics.language_drift(s, None), "prompt_mask"),
        (lambda s, m: metrics.language_drift(s[..., 0, 0], m), "text_only_hidden_states"),
        (lambda s, m: metrics.language_drift(s, m, reference=S), "reference"),
        (
            lambda s, m: metrics.language_drift(np.where(s > 2, np.nan, s), m),
            "text_only_hidden_states",
        ),
        (lambda s, m: metrics.drift_rate(np.zeros((S, L)), np.zeros(S)), "timesteps"),
    ],
)
def test_bad_input_names_the_field(call, field: str) -> None:
    states, mask, _ = _drifting_prompt()
    with pytest.raises(ValidationError) as info:
        call(states, mask)
    assert info.value.field == field
    assert "expected" in str(info.value) and "received" in str(info.value)


# -- CKA --------------------------------------------------------------------------------------


def _reference_biased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space form ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖) — independent of the Gram code under test."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _reference_unbiased_hsic(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out term by term."""
    n = k.shape[0]
    k, m = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
    ones = np.ones(n)
    return (
        np.trace(k @ m)
        + (ones @ k @ ones) * (ones @ m @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * ones @ k @ m @ ones
    ) / (n * (n - 3))


def test_cka_matches_independent_reference_formulas() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 12)), rng.normal(size=(30, 5)) + rng.normal(size=(30, 1))
    assert metrics.linear_cka(x, y, debiased=False) == pytest.approx(
        _reference_biased_cka(x, y), rel=1e-10
    )
    kx, ky = x @ x.T, y @ y.T
    expected = _reference_unbiased_hsic(kx, ky) / np.sqrt(
        _reference_unbiased_hsic(kx, kx) * _reference_unbiased_hsic(ky, ky)
    )
    assert metrics.linear_cka(x, y) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_is_one_for_rotated_scaled_copy_and_invariant(debiased: bool) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 24))
    assert metrics.linear_cka(
        x, 7.5 * x @ _orthogonal(rng, 24) + 3.0, debiased=debiased
    ) == pytest.approx(1, abs=1e-10)
    y = x[:, :10] @ rng.normal(size=(10, 10)) + rng.normal(size=(40, 10))
    base = metrics.linear_cka(x, y, debiased=debiased)
    moved = metrics.linear_cka(0.01 * x @ _orthogonal(rng, 24), 40 * y, debiased=debiased)
    assert moved == pytest.approx(base, abs=1e-10)
    # but not invariant to an anisotropic scaling (CKA is not invertible-linear invariant)
    stretch = x * np.r_[100.0, np.ones(23)]
    assert abs(metrics.linear_cka(stretch, y, debiased=debiased) - base) > 0.05


def test_cka_independent_data_debiased_is_near_zero_where_biased_is_not() -> None:
    rng = np.random.default_rng(3)
    wide = [
        metrics.linear_cka(rng.normal(size=(40, 256)), rng.normal(size=(40, 128))) for _ in range(5)
    ]
    assert abs(np.mean(wide)) < 0.03
    biased = metrics.linear_cka(
        rng.normal(size=(40, 256)), rng.normal(size=(40, 128)), debiased=False
    )
    assert biased > 0.8  # features ≫ items: plain CKA is close to 1 for unrelated data
    tall = metrics.linear_cka(
        rng.normal(size=(2000, 8)), rng.normal(size=(2000, 4)), debiased=False
    )
    assert tall < 0.02  # items ≫ features: both agree


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(5, 30),
    widths=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    scale=st.floats(1e-3, 1e3),
    debiased=st.booleans(),
)
def test_cka_properties_hold_for_any_data(
    seed: int, n: int, widths: tuple[int, int], scale: float, debiased: bool
) -> None:
    rng = np.random.default_rng(seed)
    x, y = (
        rng.normal(size=(n, widths[0])),
        rng.normal(size=(n, widths[1])) + rng.normal(size=(n, 1)),
    )
    value = metrics.linear_cka(x, y, debiased=debiased)
    assert -1 - 1e-9 <= value <= 1 + 1e-9
    assert metrics.linear_cka(y, x, debiased=debiased) == pytest.approx(value, abs=1e-9)
    moved = scale * x @ _orthogonal(rng, widths[0]) + rng.normal(size=widths[0])
    assert metrics.linear_cka(moved, y, debiased=debiased) == pytest.approx(value, abs=1e-7)
    assert metrics.linear_cka(x, x, debiased=debiased) == pytest.approx(1, abs=1e-9)


def test_cka_across_widths_like_the_two_experts() -> None:
    """Expert 0 (width 64 here, 2048 real) and expert 1 (32, 1024 real) both read one 4-dim
    latent (plus noise); a third representation is unrelated."""
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(50, 4))
    expert_0 = latent @ rng.normal(size=(4, 64)) + 0.3 * rng.normal(size=(50, 64))
    expert_1 = latent @ rng.normal(size=(4, 32)) + 0.3 * rng.normal(size=(50, 32))
    unrelated = rng.normal(size=(50, 32))
    assert metrics.linear_cka(expert_0, expert_1) > 0.8
    assert abs(metrics.linear_cka(expert_0, unrelated)) < 0.1
    with pytest.raises(ValidationError, match="linear_cka"):
        metrics.cosine_similarity(expert_0, expert_1)
    with pytest.raises(ValidationError) as info:
        metrics.linear_cka(expert_0, expert_1[:-1])
    assert info.value.field == "y"


def test_cka_matrices_layer_by_layer_and_expert_by_expert() -> None:
    rng = np.random.default_rng(5)
    n, layers = 60, 4
    x0 = rng.normal(size=(n, 32))
    # each layer: the previous one rotated, plus fresh noise -> similarity decays with distance
    stack = [x0]
    for _ in range(layers - 1):
        stack.append(stack[-1] @ _orthogonal(rng, 32) + 0.8 * rng.normal(size=(n, 32)))
    stack = np.stack(stack)
    matrix = metrics.cka_matrix(stack)
    assert matrix.shape == (layers, layers)
    np.testing.assert_allclose(np.diag(matrix), 1, atol=1e-10)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    assert np.all(np.diff(matrix[0]) < 0)  # monotone decay from layer 0
    expert_1 = [layer @ rng.normal(size=(32, 16)) for layer in stack]  # narrower, layer-aligned
    cross = metrics.cka_matrix(stack, expert_1)
    assert cross.shape == (layers, layers)
    assert np.all(np.argmax(cross, axis=1) == np.arange(layers))
    with pytest.raises(ValidationError):
        metrics.cka_matrix(stack, [layer[:-1] for layer in expert_1])


def test_rsa_recovers_shared_geometry() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 20))
    assert metrics.rsa(x, 4 * x @ _orthogonal(rng, 20), metric="euclidean") == pytest.approx(
        1, abs=1e-12
    )
    latent = rng.normal(size=(30, 3))
    shared = [latent @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(30, d)) for d in (20, 8)]
    assert metrics.rsa(*shared) > 0.7
    assert abs(metrics.rsa(x, rng.normal(size=(30, 8)))) < 0.15


def test_layer_similarity_within_one_expert() -> None:
    rng = np.random.default_rng(7)
    first = rng.normal(size=(S, P, D))
    states = np.stack(
        [first, 2 * first, -first, rng.normal(size=(S, P, D))], axis=1
    )  # (S, L, P, D)
    sim = metrics.layer_similarity(states)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim[0, :3], [1, 1, -1], atol=1e-12)
    assert abs(sim[0, 3]) < 0.1


def test_step_similarity_sees_convergence_over_denoising_steps() -> None:
    rng = np.random.default_rng(8)
    steps = 5
    final = rng.normal(size=(80, 1, 2, 3, 8))  # (S, 1, L, P, D)
    noise = rng.normal(size=(80, steps, 2, 3, 8))
    remaining = (steps - 1 - np.arange(steps))[None, :, None, None, None]
    states = final + 0.3 * remaining * noise
    result = metrics.step_similarity(states)
    assert result.cka.shape == (2, steps, steps)
    assert result.cosine_to_last.shape == (2, steps)
    np.testing.assert_allclose(result.cosine_to_last[:, -1], 1, atol=1e-12)
    assert np.all(np.diff(result.cosine_to_last, axis=1) > 0)
    assert np.all(np.diff(result.cka[:, :, -1], axis=1) > 0)


# -- attention --------------------------------------------------------------------------------

QUERIES = ("state", "actions")
KEYS = ("base_0_rgb", "left_wrist_0_rgb", "prompt", "state", "actions")


def test_attention_share_recovers_planted_decline_of_prompt_attention() -> None:
    rng = np.random.default_rng(10)
    samples, steps, layers = 8, 3, 4
    share = (
        np.linspace(0.6, 0.1, samples)[:, None, None] * np.linspace(1, 0.5, layers)[None, None, :]
    )
    share = np.broadcast_to(share, (samples, steps, layers))
    rest = rng.dirichlet(np.ones(len(KEYS) - 1), size=(samples, steps, layers))
    actions_row = np.insert(rest * (1 - share)[..., None], 2, share, axis=-1)
    mass = np.stack(
        [rng.dirichlet(np.ones(len(KEYS)), size=(samples, steps, layers)), actions_row], axis=-2
    )
    got = metrics.attention_share(mass, QUERIES, KEYS, query="actions")
    np.testing.assert_allclose(got, share, atol=1e-12)
    both = metrics.attention_share(
        mass, QUERIES, KEYS, query="actions", keys=("prompt", "base_0_rgb")
    )
    np.testing.assert_allclose(both, share + actions_row[..., 0], atol=1e-12)
    assert np.all(np.diff(got[:, 0, 0]) < 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"query": "nope"}, "query"),
        ({"query": "actions", "keys": ("image",)}, "keys"),
        ({"query": "actions", "key_segments": KEYS[:-1]}, "attention_mass"),
    ],
)
def test_attention_share_bad_names(kwargs: dict, field: str) -> None:
    mass = np.full((2, 3, len(QUERIES), len(KEYS)), 1 / len(KEYS))
    args = {"query_segments": QUERIES, "key_segments": KEYS} | kwargs
    with pytest.raises(ValidationError) as info:
        metrics.attention_share(mass, **args)
    assert info.value.field == field
