"""Cross-validated linear probes with honest uncertainty: does a representation predict success
(AUROC), carry the task's identity (accuracy against chance), or a continuous quantity such as the
end-effector position (out-of-fold R²)?

The probe is a ridge regression in its kernel (Gram-matrix) form on standardised features: for fixed
folds its out-of-fold predictions are a LINEAR map of the training labels, so every shuffled-label
repeat of the whole cross-validation is one matrix product, and one permutation scores every layer.
That makes the statistics below cheap enough to run at full strength (bench/analysis_probes.py):

- the permutation p-value (the primary test): ≥ 200 shuffles of the labels — of whole groups
  (episodes), within strata (tasks) when given — with the folds held fixed;
- a family-wise p-value over layers: the same shuffle scores every layer, and each layer's score is
  compared with the shuffle's MAXIMUM over layers (Westfall–Young max-statistic);
- a bootstrap interval of the WHOLE cross-validation: groups resampled with replacement (within
  stratum and class), folds re-drawn, every fit redone — never items of fixed predictions.

Degenerate data (one class, a class in fewer than two groups) gives NaN and a note saying why,
never an exception or a bare number. Definitions: docs/analysis.md §5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from latentpi.client.analysis.metrics import as_float64
from latentpi.protocol.errors import ValidationError

Metric = Literal["auroc", "accuracy", "r2"]
Kind = Literal["success", "task", "regression"]
_TINY = 1e-12


@dataclass(frozen=True)
class ProbeConfig:
    n_splits: int = 5
    n_shuffles: int = 200  # permuted-label repeats of the whole cross-validation
    n_bootstrap: int = 200  # group-resampled repeats of the whole cross-validation
    ridge: float = 1.0  # L2 strength, as a multiple of the training Gram matrix's mean diagonal
    seed: int = 0
    level: float = 0.95  # of the bootstrap interval

    def __post_init__(self) -> None:
        for name, low in (("n_splits", 2), ("n_shuffles", 0), ("n_bootstrap", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValidationError(f"probe_config.{name}", f"an integer ≥ {low}", value)
        if not self.ridge > 0:
            raise ValidationError("probe_config.ridge", "a positive number", self.ridge)
        if not 0 < self.level < 1:
            raise ValidationError("probe_config.level", "a number in (0, 1)", self.level)


@dataclass(frozen=True)
class ProbeResult:
    """score: out-of-fold AUROC / accuracy / R² over all items (NaN when undefined, see note);
    ci: percentile interval of the score over group-bootstrapped repeats of the whole
    cross-validation; chance: 0.5 (AUROC), the majority share (accuracy), 0 (R²); p_value:
    (1 + #shuffled ≥ score) / (1 + #shuffles); p_value_family: the same against each shuffle's
    maximum over the layers probed together (= p_value for a single probe); within: the score per
    stratum (task) for a stratified probe; skipped: strata left out (one class only)."""

    metric: Metric
    score: float
    ci: tuple[float, float]
    fold_scores: np.ndarray
    shuffled_scores: np.ndarray
    chance: float
    p_value: float
    p_value_family: float
    n_splits: int
    n_items: int
    n_groups: int
    class_counts: dict[str, int] = field(default_factory=dict)
    within: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
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

    @property
    def shuffled_q95(self) -> float:
        """The 95th percentile of the shuffled scores: what a score must beat at p < 0.05."""
        return _nan_stat(lambda v: np.nanpercentile(v, 95), self.shuffled_scores)

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.class_counts.items())
        size = f"n = {self.n_items} in {self.n_groups} groups" + (f" ({counts})" if counts else "")
        if np.isnan(self.score):
            return f"{self.metric} undefined ({self.note}); {size}"
        text = (
            f"{self.metric} {self.score:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}], "
            f"shuffled {self.shuffled_mean:.3f} (p = {self.p_value:.4f}, "
            f"family-wise p = {self.p_value_family:.4f}), chance {self.chance:.3f}; {size}"
        )
        return f"{text}; {self.note}" if self.note else text


# -- public entry points ----------------------------------------------------------------------


def success_probe(
    features: np.ndarray,
    success: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> ProbeResult:
    """Cross-validated AUROC of predicting `success` (n,) bool from `features` (n, ...).

    strata (e.g. the task of each episode): features are centred within stratum, labels permuted
    within stratum, and the AUROC counts within-stratum pairs only, so a representation that only
    knows the task (whose success rates differ) scores chance."""
    return probe_by_layer(
        np.asarray(features)[:, None], success, "success", config, groups, strata
    )[0]


def task_probe(
    features: np.ndarray,
    labels: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
) -> ProbeResult:
    """Cross-validated accuracy of decoding `labels` (n,) (task ids or instructions) from `features`.
    Pass `groups` (e.g. episode ids) when several items come from one episode."""
    return probe_by_layer(np.asarray(features)[:, None], labels, "task", config, groups)[0]


def regression_probe(
    features: np.ndarray,
    targets: np.ndarray,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> ProbeResult:
    """Cross-validated R² of predicting continuous `targets` (n,) or (n, c) from `features`
    (mean R² over the c outputs). Items of one group (episode) stay in one fold; shuffles move whole
    groups' target blocks, so every group needs the same number of items."""
    return probe_by_layer(
        np.asarray(features)[:, None], targets, "regression", config, groups, strata
    )[0]


def probe_by_layer(
    states: np.ndarray,
    labels: np.ndarray,
    kind: Kind,
    config: ProbeConfig | None = None,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> list[ProbeResult]:
    """One probe per layer of `states` (n, L, ...), sharing folds, shuffles and bootstrap draws, so
    `p_value_family` controls the family-wise error over the layers."""
    config = config or ProbeConfig()
    x = as_float64(states, "states", tuple(range(3, 8)))
    x = x.reshape(x.shape[0], x.shape[1], -1)
    design = _design(x.shape[0], labels, kind, groups, strata)
    if design.note_only:
        return [_undefined(design) for _ in range(x.shape[1])]
    x = x[design.keep]
    # Thousands of solves of tiny matrices: BLAS threads only add hand-off cost (several times
    # slower on a busy 2-core machine), so they run single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        grams = np.stack([_gram(x[:, layer], design.strata) for layer in range(x.shape[1])])
        return _evaluate(grams, design, config)


def scores(results: Sequence[ProbeResult]) -> np.ndarray:
    """The `score` of each result, e.g. of `probe_by_layer`, as an array."""
    return np.array([r.score for r in results])


# -- the design: labels, groups, strata, what is kept -----------------------------------------


@dataclass
class _Design:
    metric: Metric
    y: np.ndarray  # (n, c) float targets; class codes for classification (c = 1)
    codes: np.ndarray | None  # (n,) int class codes (classification)
    n_classes: int
    groups: np.ndarray  # (n,) int
    strata: np.ndarray  # (n,) int
    strata_names: list[str]
    keep: np.ndarray  # (n_input,) bool: items kept (one-class strata dropped)
    n_splits: int
    chance: float
    class_counts: dict[str, int]
    skipped: tuple[str, ...]
    note: str
    fold_reason: str = ""  # what limits the number of folds
    note_only: bool = False

    @property
    def one_per_group(self) -> bool:
        return len(np.unique(self.groups)) == len(self.groups)

    @property
    def members(self) -> np.ndarray:
        """(G, size) item indices of each group (an object array when sizes differ)."""
        order = np.argsort(self.groups, kind="stable")
        sizes = np.bincount(self.groups)
        if np.all(sizes == sizes[0]):
            return order.reshape(len(sizes), sizes[0])
        split = np.split(order, np.cumsum(sizes)[:-1])
        out = np.empty(len(split), object)
        out[:] = split
        return out

    @property
    def groups_by_block(self) -> list[np.ndarray]:
        first = np.unique(self.groups, return_index=True)[1]
        block = _blocks(self)[first]
        return [np.flatnonzero(block == b) for b in np.unique(block)]


def _design(
    n: int, labels: np.ndarray, kind: Kind, groups: np.ndarray | None, strata: np.ndarray | None
) -> _Design:
    labels = np.asarray(labels)
    if labels.shape[:1] != (n,) or (kind != "regression" and labels.ndim != 1):
        raise ValidationError("labels", f"one label per item, shape ({n},)", labels)
    groups_in = np.arange(n) if groups is None else np.asarray(groups)
    if groups_in.shape != (n,):
        raise ValidationError("groups", f"one group per item, shape ({n},)", groups)
    strata_in = np.zeros(n, int) if strata is None else np.asarray(strata)
    if strata_in.shape != (n,):
        raise ValidationError("strata", f"one stratum per item, shape ({n},)", strata)
    if kind == "success":
        if labels.dtype != np.bool_ and not np.isin(labels, (0, 1)).all():
            raise ValidationError("success", "booleans (or 0/1)", labels)
        labels = labels.astype(bool)
    if kind == "regression":
        return _regression_design(labels, groups_in, strata_in)
    return _class_design(labels, kind, groups_in, strata_in)


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names, codes = np.unique(values, return_inverse=True)
    return names, codes.reshape(-1)


def _class_design(
    labels: np.ndarray, kind: Kind, groups: np.ndarray, strata: np.ndarray
) -> _Design:
    metric: Metric = "auroc" if kind == "success" else "accuracy"
    stratum_names, stratum_codes = _codes(strata)
    keep = np.ones(len(labels), bool)
    skipped = []
    if metric == "auroc" and len(stratum_names) > 1:  # a one-class task has no within-task pair
        for s, name in enumerate(stratum_names):
            values = np.unique(labels[stratum_codes == s])
            if len(values) < 2:
                keep &= stratum_codes != s
                skipped.append(f"{name} (all {values[0]})")
    names, codes = _codes(labels[keep])
    group_codes = _codes(groups[keep])[1]
    counts = {str(c): int(k) for c, k in zip(names, np.bincount(codes), strict=True)}
    n_splits, reason = _fold_count(counts, codes, group_codes)
    skip_note = f"skipped (one class): {', '.join(skipped)}" if skipped else ""
    note = "; ".join(filter(None, [skip_note, reason if n_splits < 2 else ""]))
    chance = 0.5 if metric == "auroc" else max(counts.values(), default=0) / max(1, keep.sum())
    return _Design(
        metric=metric, y=codes[:, None].astype(float), codes=codes, n_classes=len(names),
        groups=group_codes, strata=_codes(stratum_codes[keep])[1],
        strata_names=[str(stratum_names[s]) for s in np.unique(stratum_codes[keep])], keep=keep,
        n_splits=n_splits, chance=chance, class_counts=counts, skipped=tuple(skipped), note=note,
        fold_reason=reason, note_only=n_splits < 2,
    )  # fmt: skip


def _regression_design(labels: np.ndarray, groups: np.ndarray, strata: np.ndarray) -> _Design:
    y = as_float64(labels, "targets", (1, 2))
    y = y.reshape(len(y), -1)
    group_codes = _codes(groups)[1]
    sizes = np.bincount(group_codes)
    n_groups = len(sizes)
    note, n_splits = "", n_groups
    if len(np.unique(sizes)) > 1:
        raise ValidationError("groups", "groups of equal size (whole groups are shuffled)", sizes)
    if n_groups < 2:
        note, n_splits = f"{n_groups} group(s): cross-validation needs at least 2", 0
    elif np.all(y.std(axis=0) < _TINY):
        note, n_splits = "constant target: R² undefined", 0
    return _Design(
        metric="r2", y=y, codes=None, n_classes=0, groups=group_codes,
        strata=_codes(strata)[1], strata_names=[str(s) for s in np.unique(strata)],
        keep=np.ones(len(y), bool), n_splits=n_splits, chance=0.0, class_counts={}, skipped=(),
        note=note, fold_reason=f"{n_groups} groups", note_only=n_splits < 2,
    )  # fmt: skip


def _fold_count(counts: dict[str, int], codes: np.ndarray, groups: np.ndarray) -> tuple[int, str]:
    if len(counts) < 2:
        if not counts:
            return 0, "no item left"
        ((label, count),) = counts.items()
        return 0, f"one class only: all {count} items are {label}"
    per_class = {
        label: len(np.unique(groups[codes == i])) for i, label in enumerate(counts)
    }  # folds split groups, so what counts is each class's number of groups
    label, limit = min(per_class.items(), key=lambda kv: kv[1])
    grouped = len(np.unique(groups)) < len(groups)
    why = (
        f"class {label} spans {limit} group(s)" if grouped else f"class {label} has {limit} item(s)"
    )
    if limit < 2:
        return limit, f"{why}: cross-validation needs at least 2"
    return limit, why  # the caller caps the fold count at config.n_splits


def _undefined(design: _Design) -> ProbeResult:
    empty = np.array([])
    nan = float("nan")
    return ProbeResult(
        design.metric, nan, (nan, nan), empty, empty, design.chance, nan, nan, 0,
        int(design.keep.sum()), len(np.unique(design.groups)), design.class_counts, {},
        design.skipped, design.note,
    )  # fmt: skip


# -- kernels and folds --------------------------------------------------------------------------


def _gram(x: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """Linear kernel of the standardised features, centred within stratum (the task's mean
    removed: only within-task differences remain). Centring is label-free, so it leaks nothing."""
    x = _centre_within(x, strata)
    scale = x.std(axis=0)
    x = x / np.where(scale > _TINY, scale, 1.0)
    return x @ x.T


def _centre_within(x: np.ndarray, strata: np.ndarray) -> np.ndarray:
    out = x - x.mean(axis=0)
    if len(np.unique(strata)) > 1:
        for s in np.unique(strata):
            rows = strata == s
            out[rows] = x[rows] - x[rows].mean(axis=0)
    return out


def _assign_folds(
    groups: np.ndarray, blocks: np.ndarray, n_splits: int, rng: np.random.Generator
) -> np.ndarray:
    """Fold of each item: each block's (stratum × class) groups shuffled and dealt round-robin,
    continuing where the previous block stopped, so folds stay balanced in size and in classes.
    A group belongs to the block of its first item."""
    _, first, groups = np.unique(groups, return_index=True, return_inverse=True)
    group_block = blocks[first]
    fold_of_group = np.empty(len(first), int)
    start = 0
    for block in np.unique(group_block):
        members = rng.permutation(np.flatnonzero(group_block == block))
        fold_of_group[members] = (start + np.arange(len(members))) % n_splits
        start = (start + len(members)) % n_splits
    return fold_of_group[groups]


def _fold_maps(
    gram: np.ndarray, folds: np.ndarray, n_splits: int, ridge: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold (train, test, M): kernel ridge with intercept predicts ŷ_test = M y_train."""
    maps = []
    for f in range(n_splits):
        test, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if len(test) == 0:
            continue
        maps.append((train, test, _ridge_map(gram, train, test, ridge)))
    return maps


def _ridge_map(gram: np.ndarray, train: np.ndarray, test: np.ndarray, ridge: float) -> np.ndarray:
    """M with ŷ_test = M y_train = ȳ_train + C (HKH + λI)⁻¹ H y_train: kernel ridge with an
    intercept, linear in the training labels (K: training kernel, H: centring over the training
    items, C: test-against-train kernel with the training mean removed on both sides). As H
    commutes with (HKH + λI)⁻¹ and C = C H, M = C (HKH + λI)⁻¹ + 1/n_train."""
    k_aa, k_ba = gram[np.ix_(train, train)], gram[np.ix_(test, train)]
    column_mean = k_aa.mean(axis=0)
    k_centred = k_aa - column_mean[:, None] - column_mean[None, :] + column_mean.mean()
    cross = k_ba - column_mean[None, :]
    cross -= cross.mean(axis=1, keepdims=True)
    diag = float(np.mean(np.diag(k_centred)))
    lam = ridge * diag if diag > _TINY else 1.0
    k_centred[np.diag_indices_from(k_centred)] += lam
    return np.linalg.solve(k_centred, cross.T).T + 1.0 / len(train)


def _predict(maps: list[tuple[np.ndarray, np.ndarray, np.ndarray]], y: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions of every column of y (n, C) at once."""
    out = np.empty_like(y)
    for train, test, m in maps:
        out[test] = m @ y[train]
    return out


# -- scores, vectorised over columns (permutations) ---------------------------------------------


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


def stratified_auroc(
    positive: np.ndarray, score: np.ndarray, strata: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC over within-stratum pairs only, for (m, B) columns: the per-stratum AUROCs (S, B) and
    their pooled value (B,), weighted by each stratum's n₊·n₋ (its number of comparable pairs)."""
    per, weights = [], []
    for s in np.unique(strata):
        rows = strata == s
        per.append(auroc(positive[rows].T, score[rows].T))
        n_pos = positive[rows].sum(axis=0)
        weights.append(n_pos * (rows.sum() - n_pos))
    per_arr, w = np.array(per), np.array(weights, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.nansum(np.nan_to_num(per_arr) * w, axis=0) / w.sum(axis=0)
    return per_arr, np.where(w.sum(axis=0) > 0, pooled, np.nan)


def _scores(design: _Design, truth: np.ndarray, pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Score of each column: truth and pred (n, C) (classification: truth codes (n, B), pred
    (n, B, classes)), over `rows`, within strata for AUROC."""
    if design.metric == "accuracy":
        return np.mean(pred[rows].argmax(axis=-1) == truth[rows], axis=0)
    if design.metric == "auroc":
        return stratified_auroc(truth[rows] > 0.5, pred[rows, :, 0], design.strata[rows])[1]
    y, p = truth[rows], pred[rows]
    total = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - np.sum((y - p) ** 2, axis=0) / total
    c = design.y.shape[1]
    return np.nanmean(r2.reshape(-1, c), axis=1)  # mean over outputs, per permutation


def _targets(design: _Design, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(truth, regression targets) for label orders (B, n): truth as scores expect it, targets
    (n, B·c) — one-hot for a multi-class probe, the 0/1 label for AUROC."""
    if design.metric == "r2":
        y = design.y[order.T]  # (n, B, c)
        return y.reshape(len(y), -1), y.reshape(len(y), -1)
    codes = design.codes[order.T]  # (n, B)
    if design.metric == "auroc":
        return codes, codes.astype(float)
    onehot = (codes[..., None] == np.arange(design.n_classes)).astype(float)
    return codes, onehot.reshape(len(codes), -1)


def _score_orders(design: _Design, maps: list, order: np.ndarray) -> np.ndarray:
    truth, y = _targets(design, order)
    return _score_columns(design, truth, _predict(maps, y))


def _score_columns(design: _Design, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Scores of B label columns: truth (n, B) codes or (n, B·c) targets, pred (n, B·width)."""
    width = design.n_classes if design.metric == "accuracy" else 1
    if design.metric != "r2":
        pred = pred.reshape(len(pred), truth.shape[1], width)
    return _scores(design, truth, pred, np.arange(len(pred)))


# -- permutations and the bootstrap -------------------------------------------------------------


def _permutations(design: _Design, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) item orders: whole groups exchanged with groups of the same stratum (their items
    matched by position inside the group), so episodes and task success rates are kept."""
    n = len(design.groups)
    out = np.empty((count, n), int)
    members = [np.flatnonzero(design.groups == g) for g in range(design.groups.max() + 1)]
    by_stratum: dict[int, list[int]] = {}
    for g, items in enumerate(members):
        by_stratum.setdefault(int(design.strata[items[0]]), []).append(g)
    for b in range(count):
        for same in by_stratum.values():
            for g, source in zip(same, rng.permutation(same), strict=True):
                out[b, members[g]] = _matched(members[g], members[source])
    return out


def _matched(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    if len(target) == len(source):
        return source
    return np.resize(source, len(target))  # classification: labels are constant in a group


class _Drawer:
    """Draws the items of one resample: groups with replacement within stratum × class (so every
    resample keeps each task's class counts). A group drawn twice keeps its id, so its copies
    share a fold (else a copy would be tested on its own twin)."""

    def __init__(self, design: _Design) -> None:
        self.members = design.members
        self.by_block = design.groups_by_block
        self.one_per_group = design.one_per_group

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        chosen = np.concatenate([rng.choice(same, size=len(same)) for same in self.by_block])
        if self.one_per_group:
            return self.members[chosen, 0]
        return np.concatenate([np.asarray(self.members[g]) for g in chosen])


def _blocks(design: _Design) -> np.ndarray:
    if design.codes is None:
        return design.strata
    return design.strata * max(1, design.n_classes) + design.codes


def _evaluate(grams: np.ndarray, design: _Design, config: ProbeConfig) -> list[ProbeResult]:
    rng = np.random.default_rng(config.seed)
    n_splits = min(config.n_splits, design.n_splits)
    note = design.note
    if n_splits < config.n_splits:
        reduced = f"folds reduced from {config.n_splits} to {n_splits} ({design.fold_reason})"
        note = "; ".join(filter(None, [note, reduced]))
    folds = _assign_folds(design.groups, _blocks(design), n_splits, rng)
    orders = np.vstack([np.arange(len(folds)), _permutations(design, config.n_shuffles, rng)])
    per_layer = []
    for gram in grams:
        maps = _fold_maps(gram, folds, n_splits, config.ridge)
        all_scores = _score_orders(design, maps, orders)
        per_layer.append((maps, all_scores))
    shuffled = np.array([s[1:] for _, s in per_layer])  # (L, P)
    family_max = np.nanmax(shuffled, axis=0) if shuffled.size else np.array([])
    replicates = _bootstrap_scores(grams, design, config, n_splits, rng)
    return [
        _result(
            design, maps, folds, all_scores, family_max,
            percentile_interval(replicates[:, layer], config.level),
            n_splits, note,
        )
        for layer, (maps, all_scores) in enumerate(per_layer)
    ]  # fmt: skip


def _result(
    design: _Design,
    maps: list,
    folds: np.ndarray,
    all_scores: np.ndarray,
    family_max: np.ndarray,
    interval: tuple[float, float],
    n_splits: int,
    note: str,
) -> ProbeResult:
    score, shuffled = float(all_scores[0]), all_scores[1:]
    identity = np.arange(len(folds))[None]
    truth, y = _targets(design, identity)
    pred = _predict(maps, y)
    if design.metric != "r2":
        pred = pred.reshape(len(pred), 1, -1)
    fold_scores = np.array([_scores(design, truth, pred, folds == f)[0] for f in range(n_splits)])
    within = {}
    if design.metric == "auroc" and len(design.strata_names) > 1:
        per, _ = stratified_auroc(truth > 0.5, pred[:, :, 0], design.strata)
        within = {name: float(v) for name, v in zip(design.strata_names, per[:, 0], strict=True)}
    return ProbeResult(
        design.metric, score, interval, fold_scores, shuffled, design.chance,
        _p_value(score, shuffled), _p_value(score, family_max), n_splits, len(folds),
        len(np.unique(design.groups)), design.class_counts, within, design.skipped, note,
    )  # fmt: skip


def _p_value(score: float, null: np.ndarray) -> float:
    if len(null) == 0 or np.isnan(score):
        return float("nan")
    return float((1 + np.sum(null >= score - 1e-12)) / (1 + len(null)))


def _bootstrap_scores(
    grams: np.ndarray, design: _Design, config: ProbeConfig, n_splits: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, L): the score of the whole cross-validation (folds re-drawn, every fit redone) on each
    resample of the groups. Predictions of all resamples are scored together, per layer."""
    draw = _Drawer(design)
    if config.n_bootstrap == 0:
        return np.full((0, len(grams)), np.nan)
    draws = [draw(rng) for _ in range(config.n_bootstrap)]
    folds = [
        _assign_folds(design.groups[items], _blocks(design)[items], n_splits, rng)
        for items in draws
    ]
    values = np.empty((config.n_bootstrap, len(grams)))
    for layer, gram in enumerate(grams):
        truths, preds = [], []
        for items, fold in zip(draws, folds, strict=True):
            sub = _subset(design, items)
            truth, y = _targets(sub, np.arange(len(items))[None])
            truths.append(truth)
            preds.append(
                _predict(_fold_maps(gram[np.ix_(items, items)], fold, n_splits, config.ridge), y)
            )
        values[:, layer] = _score_stacked(design, draws, truths, preds)
    return values


def _score_stacked(
    design: _Design, draws: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray]
) -> np.ndarray:
    """Score each resample; resamples of equal size are scored as the columns of one matrix."""
    if len({len(items) for items in draws}) > 1:
        return np.array([
            _score_columns(_subset(design, items), t, p)[0]
            for items, t, p in zip(draws, truths, preds, strict=True)
        ])  # fmt: skip
    strata = design.strata[draws[0]]  # resampling within stratum keeps each stratum's size
    sub = _subset(design, draws[0])
    sub.strata = strata
    return _score_columns(sub, np.hstack(truths), np.hstack(preds))


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the resampled scores (NaN when none is defined)."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return (float(low), float(high))


def _subset(design: _Design, items: np.ndarray) -> _Design:
    return _Design(
        metric=design.metric, y=design.y[items],
        codes=None if design.codes is None else design.codes[items], n_classes=design.n_classes,
        groups=design.groups[items], strata=design.strata[items], strata_names=design.strata_names,
        keep=np.ones(len(items), bool), n_splits=design.n_splits, chance=design.chance,
        class_counts=design.class_counts, skipped=design.skipped, note=design.note,
        fold_reason=design.fold_reason,
    )  # fmt: skip


def _nan_stat(stat, values: np.ndarray) -> float:
    return float(stat(values)) if np.any(np.isfinite(values)) else float("nan")
