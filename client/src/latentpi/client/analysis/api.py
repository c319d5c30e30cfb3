"""The seed's analysis API on recorded task files, reading lazily (one layer at a time).

    data = load_inference_task_data("runs/libero_object/task_3_pick_up_the_milk.h5")
    loss = get_language_loss_trajectory(data, episode_idx=0, layer_idx=-1)
    sep = analyze_expert_separation(data, episode_idx=0, rollout_step=5, layer_idx=10)

`layer_idx` is a residual-stream entry as the model counts them (0 = embedded tokens, depth = last
output) and must be one that was recorded; a negative one counts from the end of the recorded
entries. `rollout_step` is the index of a recorded sample in its episode (its env step is in
`timesteps`). Definitions of every quantity: docs/analysis.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentpi.client.analysis import metrics
from latentpi.client.closing import ClosesOnExit
from latentpi.client.storage import EpisodeView, LazyArray, TaskFile
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.latent_spec import PROMPT_SEGMENT
from latentpi.protocol.messages import ServerMetadata

ExpertType = Literal["text_only", "expert_0", "expert_1"]
EXPERT_TYPES: tuple[str, ...] = ("text_only", "expert_0", "expert_1")
ARRAY_NAMES = {kind: f"{kind}_hidden_states" for kind in EXPERT_TYPES}
ACTIONS_SEGMENT = "actions"
MIN_CKA_SAMPLES = 4  # the debiased estimator's minimum


# -- the task file with its labels ------------------------------------------------------------


class TaskData(ClosesOnExit):
    """An opened task file and, per latent array, its labels (recorded layers, steps, segments):
    from the file's own per-array layout, else recomputed from its server metadata and spec."""

    def __init__(self, path: str | Path) -> None:
        self.file = TaskFile(path)
        self.path = self.file.path
        self.attrs: dict[str, Any] = self.file.attrs
        self._derived = _derived_layouts(self.file)

    @property
    def instruction(self) -> str:
        return str(self.attrs.get("instruction", ""))

    @property
    def task_id(self) -> int:
        return int(self.attrs.get("task_id", -1))

    @property
    def episodes(self) -> list[EpisodeView]:
        return self.file.episodes

    def episode(self, episode_idx: int) -> EpisodeView:
        try:
            return self.file.episode(episode_idx)
        except KeyError:
            have = [e.index for e in self.file.episodes]
            raise ValidationError(
                "episode_idx", f"an episode of {self.path.name}: {have}", episode_idx
            ) from None

    def array(self, episode: EpisodeView, name: str) -> LazyArray:
        if name not in episode:
            raise ValidationError(
                name,
                f"an array recorded in episode {episode.index} (it has {', '.join(episode.names)})",
                "nothing",
            )
        return episode[name]

    def labels(self, array: LazyArray, name: str) -> Mapping[str, Any]:
        return array.layout or self._derived.get(name, {})

    def axes(self, array: LazyArray, name: str) -> tuple[str, ...]:
        """Axis names, "sample" first (from the labels when the file stored none)."""
        stored = self.labels(array, name).get("axes")
        return ("sample", *stored) if stored and len(stored) + 1 == array.ndim else array.axes

    def layers(self, array: LazyArray, name: str) -> list[int]:
        """The residual entries held along the array's layer axis."""
        axes = self.axes(array, name)
        if "layer" not in axes:
            raise ValidationError(f"{name} axes", "a layer axis", axes)
        return list(self.labels(array, name).get("layers", range(array.shape[axes.index("layer")])))

    def layer_positions(self, array: LazyArray, name: str, layer_idx: int | None) -> list[int]:
        recorded = self.layers(array, name)
        if layer_idx is None:
            return list(range(len(recorded)))
        if layer_idx < 0 and -len(recorded) <= layer_idx:
            return [layer_idx % len(recorded)]
        if layer_idx in recorded:
            return [recorded.index(layer_idx)]
        raise ValidationError(
            "layer_idx", f"a recorded residual entry {recorded} or -1..-{len(recorded)}", layer_idx
        )

    def close(self) -> None:
        self.file.close()


def _derived_layouts(file: TaskFile) -> dict[str, Mapping[str, Any]]:
    """Labels recomputed from the root attributes, for files whose arrays carry none."""
    try:
        metadata = ServerMetadata.from_wire(file.attrs.get("server_metadata"))
        layouts = latent_layouts(file.latent_spec, metadata.shape)
    except (ValidationError, KeyError, TypeError):
        return {}
    return {name: layout.to_wire() for name, layout in layouts.items()}


def load_inference_task_data(path: str | Path) -> TaskData:
    """Open one task file (`DIR/<suite>/task_<id>_<name>.h5`) for analysis; close it when done."""
    return TaskData(path)


# -- per-sample vectors -----------------------------------------------------------------------


def sample_vectors(
    data: TaskData,
    episode_idx: int,
    expert_type: ExpertType = "text_only",
    layer_idx: int | None = None,
    step: int = -1,
    first: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """One vector per recorded sample and layer, (S, L, D) float64, and the residual entries.

    text_only / expert_0: the mean over the VALID prompt positions (or the device-pooled prompt
    segment); expert_1: the mean over the `actions` segment at denoising step `step` (a recorded
    step's index, default the last). `first`: read only the episode's first samples."""
    if expert_type not in EXPERT_TYPES:
        raise ValidationError("expert_type", f"one of {', '.join(EXPERT_TYPES)}", expert_type)
    episode = data.episode(episode_idx)
    name = ARRAY_NAMES[expert_type]
    array = data.array(episode, name)
    positions = data.layer_positions(array, name, layer_idx)
    recorded = data.layers(array, name)
    read = _reader(data, episode, array, name, expert_type, step, slice(first))
    return np.stack([read(p) for p in positions], axis=1), [recorded[p] for p in positions]


def _reader(
    data: TaskData,
    episode: EpisodeView,
    array: LazyArray,
    name: str,
    expert_type: str,
    step: int,
    samples: slice,
):
    """A function: layer position -> (S, D) vectors, reading only that layer."""
    labels = data.labels(array, name)
    lead: tuple[Any, ...] = (samples,)
    if expert_type == "expert_1":
        steps = array.shape[1]
        if not -steps <= step < steps:
            raise ValidationError(
                "step", f"a recorded denoising step index in [{-steps}, {steps - 1}]", step
            )
        lead = (samples, step % steps)
    segment = ACTIONS_SEGMENT if expert_type == "expert_1" else PROMPT_SEGMENT
    axes = data.axes(array, name)
    if axes[-2:] == ("segment", "hidden"):  # device-pooled
        names = _segment_names(labels)
        if segment not in names:
            raise ValidationError(f"{name} segments", f"a '{segment}' segment", names)
        index = names.index(segment)
        return lambda p: np.asarray(array[(*lead, p, index)], np.float64)
    if axes[-1:] == ("hidden",) and "position" not in axes:  # pooled text_only
        return lambda p: np.asarray(array[(*lead, p)], np.float64)
    start, stop = _span(labels, name, segment, array.shape[axes.index("position")])
    if expert_type == "expert_1":
        return lambda p: np.asarray(array[(*lead, p, slice(start, stop))], np.float64).mean(axis=1)
    mask = np.asarray(data.array(episode, "prompt_mask")[samples], bool)
    if mask.shape[1] != stop - start:
        raise ValidationError(
            "prompt_mask", f"{stop - start} positions (the prompt segment of {name})", mask
        )
    return lambda p: metrics.prompt_mean(array[(*lead, p, slice(start, stop))][:, None], mask)[:, 0]


def _segment_names(labels: Mapping[str, Any]) -> list[str]:
    return [s if isinstance(s, str) else s[0] for s in labels.get("segments", [])]


def _span(labels: Mapping[str, Any], name: str, segment: str, positions: int) -> tuple[int, int]:
    for entry in labels.get("segments", []):
        if not isinstance(entry, str) and entry[0] == segment:
            return int(entry[1]), int(entry[2])
    if name == "text_only_hidden_states":  # every position is the prompt's
        return 0, positions
    raise ValidationError(
        f"{name} segments",
        f"a '{segment}' segment among the recorded positions",
        labels.get("segments"),
    )


# -- the seed's questions ---------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageLoss:
    """Drift of one episode's representation from its first sample: (S,) for one layer, (S, L) for all."""

    timesteps: np.ndarray
    layers: list[int]
    cosine_distance: np.ndarray
    relative_l2: np.ndarray


def get_language_loss_trajectory(
    task_data: TaskData,
    episode_idx: int,
    expert_type: ExpertType = "text_only",
    layer_idx: int | None = None,
) -> LanguageLoss:
    vectors, layers = sample_vectors(task_data, episode_idx, expert_type, layer_idx)
    drift = metrics.language_drift(vectors)
    timesteps = np.asarray(task_data.episode(episode_idx)["timesteps"][()])
    squeeze = (lambda a: a[:, 0]) if layer_idx is not None else (lambda a: a)
    return LanguageLoss(
        timesteps, layers, squeeze(drift.cosine_distance), squeeze(drift.relative_l2)
    )


@dataclass(frozen=True)
class ExpertSeparation:
    """Expert 0 (prompt mean) against expert 1 (action mean, last recorded denoising step) over one
    episode's samples: width-free CKA / RSA at one layer and as a layer × layer matrix, plus each
    expert's own cosine drift at `rollout_step`. NaN with a note when the episode is too short."""

    layer: int
    rollout_step: int
    timestep: int
    cka: float
    rsa: float
    cka_layers: np.ndarray  # (L0, L1): expert-0 entry × expert-1 entry
    layers_0: list[int]
    layers_1: list[int]
    drift_expert_0: float
    drift_expert_1: float
    n_samples: int
    note: str = ""


def analyze_expert_separation(
    task_data: TaskData, episode_idx: int, rollout_step: int, layer_idx: int
) -> ExpertSeparation:
    episode = task_data.episode(episode_idx)
    first = "text_only" if ARRAY_NAMES["text_only"] in episode else "expert_0"
    v0, layers_0 = sample_vectors(task_data, episode_idx, first)
    v1, layers_1 = sample_vectors(task_data, episode_idx, "expert_1")
    s = v0.shape[0]
    if not -s <= rollout_step < s:
        raise ValidationError(
            "rollout_step", f"a recorded sample index in [{-s}, {s - 1}]", rollout_step
        )
    p0 = _layer_position(task_data, episode, first, layer_idx)
    p1 = _layer_position(task_data, episode, "expert_1", layer_idx)
    matrix, rsa, note = np.full((len(layers_0), len(layers_1)), np.nan), float("nan"), ""
    if s >= MIN_CKA_SAMPLES:
        matrix = metrics.cka_matrix(list(np.moveaxis(v0, 1, 0)), list(np.moveaxis(v1, 1, 0)))
        rsa = metrics.rsa(v0[:, p0], v1[:, p1])
    else:
        note = f"episode {episode_idx} has {s} samples; CKA needs at least {MIN_CKA_SAMPLES}"
    return ExpertSeparation(
        layer=layers_0[p0],
        rollout_step=rollout_step % s,
        timestep=int(episode["timesteps"][rollout_step % s]),
        cka=float(matrix[p0, p1]),
        rsa=rsa,
        cka_layers=matrix,
        layers_0=layers_0,
        layers_1=layers_1,
        drift_expert_0=float(metrics.language_drift(v0).cosine_distance[rollout_step, p0]),
        drift_expert_1=float(metrics.language_drift(v1).cosine_distance[rollout_step, p1]),
        n_samples=s,
        note=note,
    )


def _layer_position(data: TaskData, episode: EpisodeView, expert_type: str, layer_idx: int) -> int:
    name = ARRAY_NAMES[expert_type]
    return data.layer_positions(data.array(episode, name), name, layer_idx)[0]


def get_hidden_states_for_dimensions(
    task_data: TaskData,
    episode_idx: int,
    dimensions: Sequence[int],
    expert_type: ExpertType = "text_only",
    layer_idx: int = -1,
) -> np.ndarray:
    """(S, len(dimensions)): chosen hidden units of the per-sample vector (prompt mean, or action
    mean for expert 1) at one layer, over the episode — e.g. to follow single units in time."""
    vectors, _ = sample_vectors(task_data, episode_idx, expert_type, layer_idx)
    width = vectors.shape[-1]
    dims = np.asarray(dimensions)
    if (
        dims.ndim != 1
        or dims.dtype.kind not in "iu"
        or dims.size == 0
        or np.any((dims < -width) | (dims >= width))
    ):
        raise ValidationError(
            "dimensions",
            f"a non-empty list of hidden indices in [{-width}, {width - 1}]",
            dimensions,
        )
    return vectors[:, 0, dims]


def get_attention_share(
    task_data: TaskData,
    episode_idx: int,
    query: str = ACTIONS_SEGMENT,
    keys: Sequence[str] = (PROMPT_SEGMENT,),
    expert: int = 1,
) -> tuple[np.ndarray, list[int]]:
    """Share of attention that `query` tokens pay to `keys`, (S, T, L) for expert 1 (S, L for
    expert 0), heads averaged; and the attention layers."""
    name = f"attention_mass_expert_{expert}"
    episode = task_data.episode(episode_idx)
    array = task_data.array(episode, name)
    labels = task_data.labels(array, name)
    if "query_segments" not in labels:
        raise ValidationError(
            f"{name} labels", "query_segments and key_segments (the file's layout)", dict(labels)
        )
    mass = np.asarray(array[()], np.float64)
    axes = task_data.axes(array, name)
    if "head" in axes:
        mass = mass.mean(axis=axes.index("head"))
    share = metrics.attention_share(
        mass, labels["query_segments"], labels["key_segments"], query, keys
    )
    return share, list(labels.get("layers", range(share.shape[-1])))


def get_step_similarity(task_data: TaskData, episode_idx: int) -> metrics.StepSimilarity:
    """Expert 1's action mean across the recorded denoising steps (docs/analysis.md §3)."""
    array = task_data.array(task_data.episode(episode_idx), ARRAY_NAMES["expert_1"])
    per_step = [
        sample_vectors(task_data, episode_idx, "expert_1", step=k)[0] for k in range(array.shape[1])
    ]
    return metrics.step_similarity(np.stack(per_step, axis=1))
