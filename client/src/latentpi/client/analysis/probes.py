"""Cross-validated linear probes, always with their uncertainty: does a representation predict an
episode's success (AUROC), does it carry the task's identity (accuracy against chance)?

Each probe is an L2 logistic regression on standardised features, scored out of fold over
stratified folds (grouped when items share an episode, so no episode sits on both sides), beside:
the per-fold spread, a bootstrap 95% interval over items, and the same cross-validation with
permuted labels (the shuffled baseline) with its permutation p-value. Degenerate data (one class,
a class smaller than two) gives NaN and a note saying why, never an exception or a bare number.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from latentpi.client.analysis.metrics import as_float64
from latentpi.protocol.errors import ValidationError

Metric = Literal["auroc", "accuracy"]


@dataclass(frozen=True)
class ProbeConfig:
    n_splits: int = 5
    n_shuffles: int = 50  # permuted-label repeats of the whole cross-validation
    n_bootstrap: int = 1000
    regularization: float = 1.0  # C of the logistic regression (inverse L2 strength)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_splits", "n_shuffles", "n_bootstrap"):
            value = getattr(self, name)
            low = 2 if name == "n_splits" else 0
            if not isinstance(value, int) or value < low:
                raise ValidationError(f"probe_config.{name}", f"an integer ≥ {low}", value)
        if not self.regularization > 0:
            raise ValidationError(
                "probe_config.regularization", "a positive number", self.regularization
            )


@dataclass(frozen=True)
class ProbeResult:
    """score: out-of-fold AUROC / accuracy pooled over all items (NaN when undefined, see note);
    ci: its bootstrap 95% interval; chance: 0.5 for AUROC, the majority-class share for accuracy;
    p_value: (1 + #shuffled ≥ score) / (1 + #shuffles)."""

    metric: Metric
    score: float
    ci: tuple[float, float]
    fold_scores: np.ndarray
    shuffled_scores: np.ndarray
    chance: float
    p_value: float
    n_splits: int
    class_counts: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def fold_mean(self) -> float:
        return _nan_stat(np.nanmean, self.fold_scores)

    @property
    def fold_std(self) -> float:
        return _nan_stat(np.nanstd, self.fold_scores)

    @property
    def shuffled_mean(self) -> float:
        return _nan_stat(np.nanmean, self.shuffled_scores)

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.class_counts.items())
        if np.isnan(self.score):
            return f"{self.metric} undefined ({self.note}); n = {sum(self.class_counts.values())} ({counts})"
        text = (
            f"{self.metric} {self.score:.3f} [95% CI {self.ci[0]:.3f}, {self.ci[1]:.3f}], "
            f"{self.n_splits}-fold {self.fold_mean:.3f} ± {self.fold_std:.3f}, "
            f"shuffled {self.shuffled_mean:.3f} (p = {self.p_value:.3f}), chance {self.chance:.3f}; "
            f"n = {sum(self.class_counts.values())} ({counts})"
        )
        return f"{text}; {self.note}" if self.note else text


def success_probe(
    features: np.ndarray,
    success: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
) -> ProbeResult:
    """Cross-validated AUROC of predicting `success` (n,) bool from `features` (n, ...)."""
    labels = np.asarray(success)
    if labels.dtype != np.bool_ and not np.isin(labels, (0, 1)).all():
        raise ValidationError("success", "booleans (or 0/1)", labels)
    return _probe(features, labels.astype(bool), config or ProbeConfig(), groups, "auroc")


def task_probe(
    features: np.ndarray,
    labels: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
) -> ProbeResult:
    """Cross-validated accuracy of decoding `labels` (n,) (task ids or instructions) from `features`.
    Pass `groups` (e.g. episode ids) when several items come from one episode."""
    return _probe(features, np.asarray(labels), config or ProbeConfig(), groups, "accuracy")


def probe_by_layer(
    states: np.ndarray,
    labels: np.ndarray,
    kind: Literal["success", "task"],
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
) -> list[ProbeResult]:
    """One probe per layer of `states` (n, L, ...): where in depth the information is."""
    x = np.asarray(states)
    if x.ndim < 3:
        raise ValidationError("states", "an array (item, layer, [position,] hidden)", x)
    run = success_probe if kind == "success" else task_probe
    return [run(x[:, layer], labels, config, groups) for layer in range(x.shape[1])]


# -- the cross-validation -----------------------------------------------------------------------


def _probe(
    features: np.ndarray,
    labels: np.ndarray,
    config: ProbeConfig,
    groups: np.ndarray | None,
    metric: Metric,
) -> ProbeResult:
    x = as_float64(features, "features", tuple(range(1, 6)))
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    if labels.shape != (n,):
        raise ValidationError("labels", f"one label per item, shape ({n},)", labels)
    if groups is not None and np.shape(groups) != (n,):
        raise ValidationError("groups", f"one group per item, shape ({n},)", groups)
    classes, y = np.unique(labels, return_inverse=True)
    counts = {str(c): int(k) for c, k in zip(classes, np.bincount(y), strict=True)}
    chance = 0.5 if metric == "auroc" else max(counts.values()) / n

    group_counts = None
    if groups is not None:
        group_counts = {
            str(c): len(np.unique(np.asarray(groups)[y == i])) for i, c in enumerate(classes)
        }
    n_splits, note = _fold_count(config.n_splits, counts, group_counts)
    if n_splits < 2:
        return _undefined(metric, chance, counts, note)

    # Hundreds of fits of tiny matrices: BLAS threads only add hand-off cost (several times slower
    # on a busy 2-core machine: bench/analysis_probes.py), so they run single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        return _evaluate(x, y, groups, n_splits, config, metric, chance, counts, note)


def _evaluate(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    n_splits: int,
    config: ProbeConfig,
    metric: Metric,
    chance: float,
    counts: dict[str, int],
    note: str,
) -> ProbeResult:
    classes = len(counts)
    rng = np.random.default_rng(config.seed)
    pred, folds = _cross_validate(x, y, classes, groups, n_splits, config)
    score = float(_score(metric, y[None], pred[None])[0])
    fold_scores = np.array([_score(metric, y[None, f], pred[None, f])[0] for f in folds])
    shuffled = np.array([
        _score(metric, yp[None], _cross_validate(x, yp, classes, groups, n_splits, config)[0][None])[0]
        for yp in (_permute(y, groups, rng) for _ in range(config.n_shuffles))
    ])  # fmt: skip
    p_value = (
        float((1 + np.sum(shuffled >= score)) / (1 + len(shuffled)))
        if len(shuffled)
        else float("nan")
    )
    ci = _bootstrap_ci(metric, y, pred, config.n_bootstrap, rng)
    return ProbeResult(
        metric, score, ci, fold_scores, shuffled, chance, p_value, n_splits, counts, note
    )


def _bootstrap_ci(
    metric: Metric, y: np.ndarray, pred: np.ndarray, repeats: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile 95% interval of the out-of-fold score over items resampled with replacement
    (resamples with one class only are skipped for AUROC)."""
    boot = rng.integers(0, len(y), size=(repeats, len(y)))
    values = _score(metric, y[boot], pred[boot])
    if not np.any(np.isfinite(values)):
        return (float("nan"), float("nan"))
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return (float(low), float(high))


def _fold_count(
    wanted: int, counts: dict[str, int], group_counts: dict[str, int] | None
) -> tuple[int, str]:
    if len(counts) < 2:
        ((label, count),) = counts.items()
        return 0, f"one class only: all {count} items are {label}"
    label, limit = min(counts.items(), key=lambda kv: kv[1])
    why = f"class {label} has {limit} item(s)"
    if (
        group_counts is not None
    ):  # folds split groups, so what counts is each class's number of groups
        label, limit = min(group_counts.items(), key=lambda kv: kv[1])
        why = f"class {label} spans {limit} group(s)"
    if limit < 2:
        return limit, f"{why}: cross-validation needs at least 2"
    if limit < wanted:
        return limit, f"folds reduced from {wanted} to {limit} ({why})"
    return wanted, ""


def _model(config: ProbeConfig, n_train: int, n_features: int) -> Pipeline:
    # Solved to convergence (Newton, tol 1e-6): lbfgs at its default tolerance stops early enough on
    # separable wide data to change a multinomial probe's accuracy (bench/analysis_probes.py).
    # Newton needs a (features × features) Hessian, so wide features are first projected on the
    # span of the (centred) training items — exact, as an L2 solution lies in that span.
    steps: list = [StandardScaler()]
    if n_features > n_train:
        steps.append(PCA(n_components=min(n_train, n_features), svd_solver="full"))
    steps.append(
        LogisticRegression(
            C=config.regularization, solver="newton-cholesky", tol=1e-6, max_iter=200
        )
    )
    return make_pipeline(*steps)


def _cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    groups: np.ndarray | None,
    n_splits: int,
    config: ProbeConfig,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Out-of-fold class probabilities (n, classes) and the test indices of each fold."""
    if groups is None:
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=config.seed).split(x, y)
    else:
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=config.seed).split(
            x, y, groups
        )
    pred = np.zeros((len(y), n_classes))
    folds = []
    for train, test in splits:
        if len(np.unique(y[train])) < 2:  # a grouped split can leave one class: predict the prior
            pred[test] = np.bincount(y[train], minlength=n_classes) / len(train)
        else:
            with warnings.catch_warnings():
                # On near-constant features (entry 0's zero drift) the Newton line search stalls
                # and sklearn falls back to lbfgs by itself; the warning says only that.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = _model(config, len(train), x.shape[1]).fit(x[train], y[train])
            pred[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
        folds.append(test)
    return pred, folds


def _score(metric: Metric, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Row-wise scores of labels y (B, m) against probabilities pred (B, m, classes)."""
    if metric == "accuracy":
        return np.mean(pred.argmax(axis=-1) == y, axis=-1)
    return auroc(y.astype(bool), pred[..., 1])


def auroc(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Row-wise AUROC (Mann–Whitney, ties counted half) of (B, m) labels and scores; NaN for a row
    with one class only."""
    positive = np.atleast_2d(positive)
    ranks = rankdata(np.atleast_2d(score), axis=-1)
    n_pos = positive.sum(axis=-1)
    n_neg = positive.shape[-1] - n_pos
    u = np.sum(ranks * positive, axis=-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _permute(y: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted across items — across groups when each group has one label, so the
    shuffled baseline keeps the episodes' structure."""
    if groups is None:
        return rng.permutation(y)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if np.all(y == y[first][inverse]):
        return rng.permutation(y[first])[inverse]
    return rng.permutation(y)


def _undefined(metric: Metric, chance: float, counts: dict[str, int], note: str) -> ProbeResult:
    empty = np.array([])
    return ProbeResult(
        metric, float("nan"), (np.nan, np.nan), empty, empty, chance, float("nan"), 0, counts, note
    )


def _nan_stat(stat, values: np.ndarray) -> float:
    return float(stat(values)) if np.any(np.isfinite(values)) else float("nan")


def scores(results: Sequence[ProbeResult]) -> np.ndarray:
    """The `score` of each result, e.g. of `probe_by_layer`, as an array."""
    return np.array([r.score for r in results])
