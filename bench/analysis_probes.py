"""Cost of the probes' statistics on pi0-wide features, against the previous per-fit approach.

The baseline is what shipped before: every shuffled-label repeat refits a logistic regression per
fold (Newton on the span of the training items, 1 BLAS thread) — 5 fits per shuffle, per layer. The
kernel ridge probe (probes.py) computes each fold's map once per layer, so ALL shuffles are one
matrix product and one shuffle scores every layer; its interval refits the whole cross-validation
on each resample of the episodes. Same data, same shuffle count; median seconds over repeats and
the ratio to the baseline measured in this run.

    .venv/bin/python bench/analysis_probes.py [--episodes 40] [--width 2048] [--layers 19] \
        [--shuffles 200] [--bootstrap 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from latentpi.client.analysis import probes


def logistic_permutation_test(x: np.ndarray, y: np.ndarray, shuffles: int) -> float:
    """The previous probe: out-of-fold AUROC with a refit per fold for every shuffle."""
    rng = np.random.default_rng(0)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))

    def score(labels: np.ndarray) -> float:
        pred = np.zeros(len(labels))
        for train, test in folds:
            model = make_pipeline(
                StandardScaler(),
                PCA(n_components=len(train), svd_solver="full"),
                LogisticRegression(solver="newton-cholesky", tol=1e-6, max_iter=200),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                pred[test] = model.fit(x[train], labels[train]).predict_proba(x[test])[:, 1]
        return float(probes.auroc(labels[None].astype(bool), pred[None])[0])

    with threadpool_limits(limits=1, user_api="blas"):
        real = score(y)
        null = [score(rng.permutation(y)) for _ in range(shuffles)]
    return (1 + sum(s >= real for s in null)) / (1 + shuffles)


def timed(run: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--shuffles", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    success = np.arange(args.episodes) % 2 == 0
    states = (
        rng.normal(size=(args.episodes, args.layers, args.width)) + 0.3 * success[:, None, None]
    )
    one = probes.ProbeConfig(n_shuffles=args.shuffles, n_bootstrap=0)
    full = probes.ProbeConfig(n_shuffles=args.shuffles, n_bootstrap=args.bootstrap)
    variants: dict[str, tuple[int, Callable[[], object]]] = {
        "baseline: logistic refit per shuffle and fold, 1 layer": (
            1, lambda: logistic_permutation_test(states[:, 0], success, args.shuffles)
        ),
        "kernel ridge, all shuffles as one product, 1 layer": (
            1, lambda: probes.success_probe(states[:, 0], success, one)
        ),
        f"kernel ridge, {args.layers} layers (family-wise max)": (
            args.layers, lambda: probes.probe_by_layer(states, success, "success", one)
        ),
        f"+ interval: {args.bootstrap} episode resamples, {args.layers} layers": (
            args.layers, lambda: probes.probe_by_layer(states, success, "success", full)
        ),
    }  # fmt: skip
    times = {name: timed(run, args.repeats) for name, (_, run) in variants.items()}
    baseline = times[next(iter(variants))]
    print(
        f"success probe: {args.episodes} episodes × {args.width} features, {args.shuffles} "
        f"shuffles, 5 folds, median of {args.repeats}"
    )
    print("| variant | layers | seconds | s / layer | speed-up per layer vs baseline |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in times.items():
        layers = variants[name][0]
        ratio = baseline / (seconds / layers)
        print(f"| {name} | {layers} | {seconds:.2f} | {seconds / layers:.3f} | {ratio:.1f}× |")


if __name__ == "__main__":
    main()
