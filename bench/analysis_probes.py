"""Time of one cross-validated probe on pi0-wide features, against sklearn's defaults.

What probes.py does and why, measured here: the hundreds of tiny fits run with single-threaded BLAS
(threads only add hand-off cost on small matrices); each fit is solved to convergence (Newton on the
span of the training items, exact) rather than lbfgs at its default tolerance, whose early stop can
change a multinomial probe's score (the last column). Each variant runs the same probe (same folds,
shuffles, bootstrap) on the same data; the table shows median seconds over repeats and the ratio to
the baseline measured in this run.

    .venv/bin/python bench/analysis_probes.py [--episodes 40] [--width 2048] [--shuffles 10] [--repeats 3] [--classes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from latentpi.client.analysis import probes


def _plain_model(config: probes.ProbeConfig, n_train: int, n_features: int):
    del n_train, n_features
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=config.regularization, max_iter=2000)
    )


def _no_limit(*args: object, **kwargs: object) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


VARIANTS: dict[str, list[tuple[str, Callable]]] = {
    "baseline: lbfgs on all features, BLAS threads": [
        ("_model", _plain_model),
        ("threadpool_limits", _no_limit),
    ],
    "lbfgs on all features, 1 BLAS thread": [("_model", _plain_model)],
    "span projection + Newton, BLAS threads": [("threadpool_limits", _no_limit)],
    "span projection + Newton, 1 BLAS thread (shipped)": [],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--shuffles", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2, help="2: success probe; more: task probe")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = np.arange(args.episodes) % args.classes
    features = rng.normal(size=(args.episodes, args.width)) + 0.3 * labels[:, None]
    run = (
        (lambda: probes.success_probe(features, labels == 1, config))
        if args.classes == 2
        else (lambda: probes.task_probe(features, labels, config))
    )
    config = probes.ProbeConfig(n_shuffles=args.shuffles, n_bootstrap=1000)

    times: dict[str, float] = {}
    scores: dict[str, float] = {}
    for name, patches in VARIANTS.items():
        runs = []
        with contextlib.ExitStack() as stack:
            for attribute, replacement in patches:
                stack.enter_context(mock.patch.object(probes, attribute, replacement))
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = run()
                runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
        scores[name] = result.score

    baseline = times[next(iter(VARIANTS))]
    fits = (1 + args.shuffles) * config.n_splits
    print(
        f"{'success' if args.classes == 2 else f'{args.classes}-task'} probe: {args.episodes} episodes × {args.width} features, {fits} fits, median of {args.repeats}"
    )
    print("| variant | seconds | speed-up vs baseline | score |\n| --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {baseline / seconds:.1f}× | {scores[name]:.3f} |")


if __name__ == "__main__":
    main()
