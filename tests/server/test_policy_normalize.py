"""pi0 z-score and pi0.5 quantile normalization: hand-computed values, inverses, cuts, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latentpi.server.norm_stats import NormStats, NormStatsError
from latentpi.server.policy.normalize import EPS, Normalization, check_stats, normalize, unnormalize

STATS = NormStats(
    mean=np.array([0.0, 1.0, -2.0]),
    std=np.array([2.0, 4.0, 0.0]),
    q01=np.array([-1.0, 0.0, 5.0]),
    q99=np.array([1.0, 10.0, 5.0]),
)


def test_zscore_matches_hand_computation_and_keeps_zero_std_finite():
    x = np.array([1.0, 2.0, -2.0])
    y = normalize(x, STATS, Normalization.ZSCORE, "state")
    # float64 stats (as openpi keeps them): std + eps is exact to float64 rounding.
    np.testing.assert_array_equal(y, [1 / (2 + EPS), 1 / (4 + EPS), 0.0])
    assert np.isfinite(normalize(np.array([0.0, 0.0, 1.0]), STATS, Normalization.ZSCORE, "s")).all()


def test_quantile_maps_q01_to_minus_one_q99_to_one_and_does_not_clip():
    y = normalize(np.array([-1.0, 10.0, 5.0]), STATS, Normalization.QUANTILE, "state")
    np.testing.assert_allclose(y, [-1.0, 1.0 - 2 * EPS / (10 + EPS), -1.0], atol=1e-12)
    np.testing.assert_allclose(y[0], -1.0)
    beyond = normalize(np.array([3.0, 20.0, 5.0]), STATS, Normalization.QUANTILE, "state")
    np.testing.assert_allclose(beyond[:2], [(4 / (2 + EPS)) * 2 - 1, (20 / (10 + EPS)) * 2 - 1])
    assert beyond[0] > 1 and beyond[1] > 1


def test_stats_are_cut_to_the_data_dimension():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    for mode in Normalization:
        cut = NormStats(*(getattr(STATS, f)[:2] for f in ("mean", "std", "q01", "q99")))
        np.testing.assert_array_equal(normalize(x, STATS, mode, "a"), normalize(x, cut, mode, "a"))


def test_normalize_refuses_stats_shorter_than_the_data():
    with pytest.raises(NormStatsError, match="'state': expected at least 4 dims"):
        normalize(np.zeros(4), STATS, Normalization.ZSCORE, "state")


def test_unnormalize_maps_the_stats_dims_of_wider_data_and_keeps_the_rest():
    actions = np.arange(2 * 32, dtype=np.float32).reshape(2, 32) / 10
    for mode in Normalization:
        out = unnormalize(actions, STATS, mode, "actions")
        assert out.shape == (2, 32)
        np.testing.assert_array_equal(out[:, 3:], actions[:, 3:])
        # Dim 2 has a zero range, so float32 cannot invert it; the hand check below covers it.
        np.testing.assert_allclose(
            normalize(out[:, :3], STATS, mode, "actions")[:, :2], actions[:, :2], rtol=1e-5
        )
    out = unnormalize(actions, STATS, Normalization.QUANTILE, "actions")
    np.testing.assert_allclose(
        out[0, :3], [EPS / 2, 0.55 * (10 + EPS), 5 + 0.6 * EPS], rtol=1e-6, atol=1e-7
    )


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float64, (5, 3), elements=st.floats(-100, 100)),
    mode=st.sampled_from(list(Normalization)),
)
def test_unnormalize_inverts_normalize(x: np.ndarray, mode: Normalization):
    y = normalize(x, STATS, mode, "state")
    np.testing.assert_allclose(unnormalize(y, STATS, mode, "state"), x, rtol=1e-9, atol=1e-9)


def test_missing_quantiles_are_a_clear_error():
    no_quantiles = NormStats(mean=STATS.mean, std=STATS.std)
    with pytest.raises(NormStatsError, match=r"'actions'.*q01 and q99.*missing"):
        check_stats(no_quantiles, Normalization.QUANTILE, "actions")
    with pytest.raises(NormStatsError, match="'state': quantile normalization"):
        normalize(np.zeros(3), no_quantiles, Normalization.QUANTILE, "state")
    with pytest.raises(NormStatsError, match="'state': quantile normalization"):
        unnormalize(np.zeros(3), no_quantiles, Normalization.QUANTILE, "state")
    check_stats(no_quantiles, Normalization.ZSCORE, "actions")  # pi0 does not need them
