"""Probes recover planted signals, stay at chance on noise, and say why when data are degenerate."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from latentpi.client.analysis import probes
from latentpi.protocol.errors import ValidationError

FAST = probes.ProbeConfig(n_splits=5, n_shuffles=20, n_bootstrap=300, seed=0)


def _episodes(n: int, d: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode features whose mean moves by `shift` along one direction when successful."""
    rng = np.random.default_rng(seed)
    success = rng.permutation(np.arange(n) % 2 == 0)
    direction = rng.normal(size=d)
    features = rng.normal(size=(n, d)) + shift * success[:, None] * direction / np.linalg.norm(
        direction
    )
    return features, success


def test_success_probe_separable_data_gives_auroc_near_one_beside_shuffled_baseline() -> None:
    features, success = _episodes(40, 12, shift=6.0, seed=0)
    result = probes.success_probe(features, success, FAST)
    assert result.metric == "auroc"
    assert result.score > 0.97
    assert result.ci[0] > 0.9 and result.ci[0] <= result.score <= result.ci[1]
    assert len(result.fold_scores) == 5 and result.fold_mean > 0.9
    assert abs(result.shuffled_mean - 0.5) < 0.15
    assert result.p_value == pytest.approx(1 / 21)  # no shuffle reached the real score
    assert result.class_counts == {"False": 20, "True": 20}
    assert (
        "auroc 1.000 [95% CI 1.000, 1.000]" in result.summary() and "shuffled" in result.summary()
    )


def test_success_probe_noise_stays_at_chance_with_an_honest_interval() -> None:
    results = [
        probes.success_probe(*_episodes(40, 12, shift=0.0, seed=seed), FAST) for seed in range(4)
    ]
    assert abs(np.mean([r.score for r in results]) - 0.5) < 0.12
    assert all(r.ci[0] < 0.5 < r.ci[1] or r.ci[0] < r.score < r.ci[1] for r in results)
    assert np.mean([r.p_value for r in results]) > 0.2
    assert all(abs(r.shuffled_mean - 0.5) < 0.15 for r in results)


def test_success_probe_wider_than_items_uses_exact_span_projection() -> None:
    """Features ≫ episodes (2048-wide states, tens of episodes): the PCA shortcut must give the
    same predictions as the plain logistic regression, and still find a planted signal."""
    features, success = _episodes(30, 400, shift=8.0, seed=1)
    y = success.astype(int)
    fast = probes._model(FAST, 30, 400).fit(features, y)
    plain = probes._model(FAST, 30, 10).fit(features, y)  # n_features ≤ n_train: no projection
    assert len(fast.steps) == 3 and len(plain.steps) == 2
    np.testing.assert_allclose(
        fast.predict_proba(features), plain.predict_proba(features), atol=1e-6
    )
    assert probes.success_probe(features, success, FAST).score > 0.9


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random((6, 25)) < 0.4
    scores = rng.integers(0, 5, size=(6, 25)).astype(float)  # many ties
    expected = [roc_auc_score(y, s) for y, s in zip(labels, scores, strict=True)]
    np.testing.assert_allclose(probes.auroc(labels, scores), expected, atol=1e-12)
    assert np.isnan(probes.auroc(np.ones((1, 5), bool), np.arange(5.0)))[0]


def test_task_probe_finds_the_layer_that_carries_the_task() -> None:
    """Four tasks; only layer 1 of three encodes the task id."""
    rng = np.random.default_rng(3)
    tasks = np.repeat(np.arange(4), 10)
    states = rng.normal(size=(40, 3, 16))
    states[:, 1] += 3.0 * rng.normal(size=(4, 16))[tasks]
    results = probes.probe_by_layer(states, tasks, "task", FAST)
    accuracy = probes.scores(results)
    assert results[0].chance == pytest.approx(0.25)
    assert accuracy[1] > 0.9
    assert accuracy[0] < 0.5 and accuracy[2] < 0.5
    assert results[1].p_value < 0.05
    assert all(abs(r.shuffled_mean - 0.25) < 0.12 for r in results)


def test_task_probe_with_groups_does_not_leak_episodes() -> None:
    """Many steps per episode, each episode with its own fingerprint and no task signal at all:
    splitting steps of one episode across folds fakes a high accuracy; grouping by episode does not."""
    rng = np.random.default_rng(4)
    episodes, steps, d = 12, 8, 24
    episode = np.repeat(np.arange(episodes), steps)
    task = episode % 2
    features = 4.0 * rng.normal(size=(episodes, d))[episode] + 0.3 * rng.normal(
        size=(episodes * steps, d)
    )
    leaky = probes.task_probe(features, task, FAST)
    grouped = probes.task_probe(features, task, FAST, groups=episode)
    assert leaky.score > 0.95
    assert grouped.score < 0.8
    assert abs(grouped.shuffled_mean - 0.5) < 0.15


@pytest.mark.parametrize(
    ("success", "note"),
    [
        (np.ones(12, bool), "one class only: all 12 items are True"),
        (np.r_[np.ones(11, bool), False], "class False has 1 item(s)"),
    ],
)
def test_degenerate_success_labels_give_nan_and_say_why(success: np.ndarray, note: str) -> None:
    features = np.random.default_rng(5).normal(size=(len(success), 4))
    result = probes.success_probe(features, success, FAST)
    assert np.isnan(result.score) and np.isnan(result.ci[0]) and np.isnan(result.p_value)
    assert note in result.note
    assert "undefined" in result.summary()


def test_small_class_reduces_folds_and_says_so() -> None:
    features, success = _episodes(16, 6, shift=6.0, seed=6)
    success[np.flatnonzero(~success)[3:]] = True  # 3 failures among 16
    result = probes.success_probe(features, success, FAST)
    assert result.n_splits == 3 and len(result.fold_scores) == 3
    assert "folds reduced from 5 to 3" in result.note
    assert np.isfinite(result.score)


def test_probe_is_deterministic_for_a_seed() -> None:
    features, success = _episodes(30, 8, shift=1.0, seed=7)
    a, b = (
        probes.success_probe(features, success, FAST),
        probes.success_probe(features, success, FAST),
    )
    assert a.score == b.score and a.ci == b.ci
    np.testing.assert_array_equal(a.shuffled_scores, b.shuffled_scores)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda x, y: probes.success_probe(x, y[:-1]), "labels"),
        (lambda x, y: probes.success_probe(x, y.astype(int) * 2), "success"),
        (lambda x, y: probes.success_probe(np.where(x > 1, np.inf, x), y), "features"),
        (lambda x, y: probes.task_probe(x, y, groups=np.arange(3)), "groups"),
        (lambda x, y: probes.probe_by_layer(x, y, "task"), "states"),
        (lambda x, y: probes.ProbeConfig(n_splits=1), "probe_config.n_splits"),
        (lambda x, y: probes.ProbeConfig(regularization=0.0), "probe_config.regularization"),
    ],
)
def test_bad_input_names_the_field(call, field: str) -> None:
    features, success = _episodes(20, 4, shift=1.0, seed=8)
    with pytest.raises(ValidationError) as info:
        call(features, success)
    assert info.value.field == field
