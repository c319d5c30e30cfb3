"""State and action normalization, as openpi does it for pi0 (z-score) and pi0.5 (quantiles).

    z-score:   y = (x - mean) / (std + eps)                x = y * (std + eps) + mean
    quantile:  y = (x - q01) / (q99 - q01 + eps) * 2 - 1   x = (y + 1) / 2 * (q99 - q01 + eps) + q01

eps = 1e-6, no clipping. Statistics longer than the data are cut to the data's dimension. When
un-normalizing data wider than the statistics (actions padded to 32 dims, statistics of 7), only
the first dims are mapped; the padding dims pass through unchanged (they are cut away afterwards).
"""

from __future__ import annotations

import enum

import numpy as np

from latentpi.server.norm_stats import NormStats, NormStatsError

EPS = 1e-6


class Normalization(enum.StrEnum):
    ZSCORE = "zscore"  # pi0
    QUANTILE = "quantile"  # pi0.5


def check_stats(stats: NormStats, mode: Normalization, name: str) -> None:
    """Raises NormStatsError unless `stats` has what `mode` needs (pi0.5 needs the quantiles)."""
    if mode is Normalization.QUANTILE:
        _quantiles(stats, name)


def normalize(x: np.ndarray, stats: NormStats, mode: Normalization, name: str) -> np.ndarray:
    """Maps raw values into the model's normalized space (last axis = feature dims)."""
    dim = np.shape(x)[-1]
    if mode is Normalization.ZSCORE:
        mean, std = _cut(stats.mean, dim, name), _cut(stats.std, dim, name)
        return (x - mean) / (std + EPS)
    q01, q99 = _quantiles(stats, name)
    q01, q99 = _cut(q01, dim, name), _cut(q99, dim, name)
    return (x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0


def unnormalize(x: np.ndarray, stats: NormStats, mode: Normalization, name: str) -> np.ndarray:
    """Inverse of `normalize`; dims beyond the statistics pass through unchanged."""
    x = np.asarray(x)
    if mode is Normalization.ZSCORE:
        dim = min(x.shape[-1], np.shape(stats.mean)[-1])
        mean, std = _cut(stats.mean, dim, name), _cut(stats.std, dim, name)
        head = x[..., :dim] * (std + EPS) + mean
    else:
        q01, q99 = _quantiles(stats, name)
        dim = min(x.shape[-1], q01.shape[-1])
        q01, q99 = _cut(q01, dim, name), _cut(q99, dim, name)
        head = (x[..., :dim] + 1.0) / 2.0 * (q99 - q01 + EPS) + q01
    if dim == x.shape[-1]:
        return head
    return np.concatenate([head, x[..., dim:].astype(head.dtype)], axis=-1)


def _quantiles(stats: NormStats, name: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [field for field in ("q01", "q99") if getattr(stats, field) is None]
    if missing:
        raise NormStatsError(
            f"norm stats {name!r}: quantile normalization (pi0.5) needs q01 and q99, "
            f"but {' and '.join(missing)} missing (null in norm_stats.json?)"
        )
    return np.asarray(stats.q01), np.asarray(stats.q99)


def _cut(values: np.ndarray, dim: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape[-1] < dim:
        raise NormStatsError(
            f"norm stats {name!r}: expected at least {dim} dims for data of {dim} dims, "
            f"received {values.shape[-1]}"
        )
    return values[..., :dim]
