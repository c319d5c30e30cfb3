"""Per-episode features across task files, and the probes on them: does a representation predict
success, and at which depth does it carry the task?

Success ends an episode, so any feature that depends on its length leaks the label; features here
use a fixed window: the first `window` samples of every episode (default: the shortest episode's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from latentpi.client.analysis import metrics, probes
from latentpi.client.analysis.api import ExpertType, TaskData, sample_vectors
from latentpi.protocol.errors import ValidationError

Feature = Literal["mean", "drift"]


@dataclass(frozen=True)
class EpisodeFeatures:
    """One row per episode (over all task files given).

    mean: (E, L, D) the per-sample vector averaged over the window; drift: (E, L, window) cosine
    drift from the episode's first sample; at_samples: (E, len(samples), L, D) the vectors at the
    chosen sample indices (for the task probe per rollout step)."""

    mean: np.ndarray
    drift: np.ndarray
    at_samples: np.ndarray
    samples: tuple[int, ...]
    success: np.ndarray
    task: np.ndarray
    episodes: list[tuple[int, int]]  # (task_id, episode_idx)
    layers: list[int]
    window: int


def episode_features(
    datas: Sequence[TaskData],
    expert_type: ExpertType = "text_only",
    window: int | None = None,
    samples: Sequence[int] = (0,),
) -> EpisodeFeatures:
    episodes = [(data, episode) for data in datas for episode in data.episodes]
    if not episodes:
        raise ValidationError("task files", "at least one recorded episode", 0)
    shortest = min(episode.num_samples for _, episode in episodes)
    window = shortest if window is None else window
    if not 1 <= window <= shortest:
        raise ValidationError(
            "window", f"a sample count in [1, {shortest}] (the shortest episode)", window
        )
    if not all(0 <= k < window for k in samples):
        raise ValidationError(
            "samples", f"sample indices in [0, {window - 1}] (inside the window)", list(samples)
        )
    rows, layers = [], []
    for data, episode in episodes:
        vectors, layers = sample_vectors(data, episode.index, expert_type, first=window)
        drift = metrics.language_drift(vectors).cosine_distance.T  # (L, window)
        rows.append((vectors.mean(axis=0), drift, vectors[list(samples)]))
    mean, drift, at_samples = (np.stack(parts) for parts in zip(*rows, strict=True))
    return EpisodeFeatures(
        mean=mean,
        drift=drift,
        at_samples=at_samples,
        samples=tuple(samples),
        success=np.array([episode.success for _, episode in episodes]),
        task=np.array([data.task_id for data, _ in episodes]),
        episodes=[(data.task_id, episode.index) for data, episode in episodes],
        layers=layers,
        window=window,
    )


def success_by_layer(
    features: EpisodeFeatures, feature: Feature = "mean", config: probes.ProbeConfig | None = None
) -> list[probes.ProbeResult]:
    """Cross-validated AUROC of success from each layer's `feature` ("mean" state or "drift"
    trajectory over the window), one result per layer."""
    if feature not in ("mean", "drift"):
        raise ValidationError("feature", "mean or drift", feature)
    values = features.mean if feature == "mean" else features.drift
    return probes.probe_by_layer(values, features.success, "success", config)


def task_by_layer(
    features: EpisodeFeatures, config: probes.ProbeConfig | None = None
) -> list[list[probes.ProbeResult]]:
    """Task-identity accuracy per rollout sample (rows: `features.samples`) and layer (columns).
    One item per episode in each cell, so no episode is on both sides of a fold."""
    return [
        probes.probe_by_layer(features.at_samples[:, i], features.task, "task", config)
        for i in range(len(features.samples))
    ]
