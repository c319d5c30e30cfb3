"""Per-episode features across task files, and the probes on them: does a representation predict
success, and at which depth does it carry the task?

Success ends an episode, so any feature that depends on its length leaks the label; features here
use a fixed window: the first `window` samples of every episode (default: the shortest episode's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from latentpi.client.analysis import metrics, probes
from latentpi.client.analysis.api import ExpertType, TaskData, sample_vectors
from latentpi.client.storage import EpisodeView
from latentpi.protocol.errors import ValidationError

Feature = Literal["mean", "drift"]


# Continuous quantities the files hold per sample (docs/data-format.md: `states` is the state sent
# to the policy: eef position (3), eef axis-angle (3), gripper qpos (2)).
TARGETS: dict[str, str] = {
    "eef_position": "end-effector position (states[:, 0:3])",
    "gripper": "gripper finger positions (states[:, 6:8])",
    "time_to_end": "env steps until the episode ended (total_steps − timestep)",
}


@dataclass(frozen=True)
class EpisodeFeatures:
    """One row per episode (over all task files given).

    mean: (E, L, D) the per-sample vector averaged over the window; drift: (E, L, window) cosine
    drift from the episode's first sample; at_samples: (E, len(samples), L, D) the vectors at the
    chosen sample indices (task probe per rollout sample, continuous probes); targets: name ->
    (E, len(samples), c) the continuous quantities at those samples (`TARGETS`); source: which
    representation (expert and segment)."""

    mean: np.ndarray
    drift: np.ndarray
    at_samples: np.ndarray
    samples: tuple[int, ...]
    success: np.ndarray
    task: np.ndarray
    episodes: list[tuple[int, int]]  # (task_id, episode_idx)
    layers: list[int]
    window: int
    source: str = "text_only"
    targets: dict[str, np.ndarray] = field(default_factory=dict)


def spread_samples(window: int, count: int = 3) -> tuple[int, ...]:
    """`count` sample indices spread over the window (first, middle, last)."""
    return tuple(sorted({round(i * (window - 1) / max(1, count - 1)) for i in range(count)}))


def episode_features(
    datas: Sequence[TaskData],
    expert_type: ExpertType = "text_only",
    window: int | None = None,
    samples: Sequence[int] = (0,),
    segment: str | None = None,
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
        vectors, layers = sample_vectors(
            data, episode.index, expert_type, first=window, segment=segment
        )
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
        source=expert_type if segment is None else f"{expert_type}:{segment}",
        targets=_targets([episode for _, episode in episodes], list(samples)),
    )


def _targets(episodes: Sequence[EpisodeView], samples: list[int]) -> dict[str, np.ndarray]:
    """The `TARGETS` at the chosen samples, for the episodes that stored `states`."""
    if not all("states" in episode and "timesteps" in episode for episode in episodes):
        return {}
    states = np.stack([np.asarray(e["states"][samples], np.float64) for e in episodes])
    steps = np.stack([np.asarray(e["timesteps"][samples], np.float64) for e in episodes])
    total = np.array([e.total_steps for e in episodes], np.float64)[:, None]
    return {
        "eef_position": states[..., 0:3],
        "gripper": states[..., 6:8],
        "time_to_end": (total - steps)[..., None],
    }


def success_by_layer(
    features: EpisodeFeatures, feature: Feature = "mean", config: probes.ProbeConfig | None = None
) -> list[probes.ProbeResult]:
    """Cross-validated AUROC of success from each layer's `feature` ("mean" state or "drift"
    trajectory over the window), one result per layer, STRATIFIED by task: features centred within
    task, labels permuted within task, AUROC over within-task pairs (tasks with one outcome are
    skipped and named) — so knowing the task, whose success rates differ, is not a finding."""
    if feature not in ("mean", "drift"):
        raise ValidationError("feature", "mean or drift", feature)
    values = features.mean if feature == "mean" else features.drift
    return probes.probe_by_layer(values, features.success, "success", config, strata=features.task)


def task_by_layer(
    features: EpisodeFeatures, config: probes.ProbeConfig | None = None
) -> list[list[probes.ProbeResult]]:
    """Task-identity accuracy per rollout sample (rows: `features.samples`) and layer (columns).
    One item per episode in each cell, so no episode is on both sides of a fold. Probe a source
    that does not simply contain the prompt (expert 1, image tokens): on the prompt's own states
    the task is given away (entry 0, the embedded prompt tokens, is the trivial ceiling)."""
    return [
        probes.probe_by_layer(features.at_samples[:, i], features.task, "task", config)
        for i in range(len(features.samples))
    ]


def regression_by_layer(
    features: EpisodeFeatures, target: str, config: probes.ProbeConfig | None = None
) -> list[probes.ProbeResult]:
    """Out-of-fold R² of a continuous `target` (`TARGETS`) from each layer's vectors at the chosen
    samples: items are (episode, sample), grouped by episode (one fold per episode, shuffles move
    whole episodes)."""
    if target not in features.targets:
        raise ValidationError("target", f"one of {sorted(features.targets)}", target)
    e, k = features.at_samples.shape[:2]
    states = features.at_samples.reshape(e * k, *features.at_samples.shape[2:])
    values = features.targets[target].reshape(e * k, -1)
    groups = np.repeat(np.arange(e), k)
    return probes.probe_by_layer(states, values, "regression", config, groups=groups)
