"""The seed's analysis API on recorded task files, reading lazily (one layer at a time).

    data = load_inference_task_data(task_id=3, data_dir="runs")        # or a task file's path
    loss = get_language_loss_trajectory(data, episode_idx=0, layer_idx=-1)
    sep = analyze_expert_separation(data, 0, rollout_step=20, layer_idx=10)
    states = get_hidden_states_for_dimensions(data, 0, 20, layer_idx=5, expert_type="expert_0")

`layer_idx` is a residual-stream entry as the model counts them (0 = embedded tokens, depth = last
output) and must be one that was recorded; a negative one counts from the end of the recorded
entries. `rollout_step` is an env step (the policy step `t` of `timesteps`); only sampled queries
hold latents, so the nearest sampled one is used and each result says which (`sample_index`,
`timestep`). Definitions of every quantity: docs/analysis.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
        self._geometry: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = {}

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

    def geometry(
        self, expert_type: ExpertType, layer_idx: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(centre (L, D), spread (L,)) of the task at the selected layers: the mean over every
        sample of every episode, and the between-episode spread (docs/analysis.md §1). Cached."""
        key = (expert_type, layer_idx)
        if key not in self._geometry:
            per_episode = [
                sample_vectors(self, e.index, expert_type, layer_idx)[0] for e in self.episodes
            ]
            centre = np.concatenate(per_episode).mean(axis=0)
            self._geometry[key] = (centre, metrics.between_episode_spread(per_episode))
        return self._geometry[key]

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


def load_inference_task_data(
    path: str | Path | None = None,
    *,
    task_id: int | None = None,
    data_dir: str | Path | None = None,
    suite: str | None = None,
) -> TaskData:
    """Open one task file for analysis (close it when done, or use `with`): by its path, or as the
    seed did, by `task_id` under `data_dir` (a collection folder `DIR/<suite>/task_<id>_*.h5`, or
    one suite's folder); `suite` is needed only when several suites hold that task id."""
    if path is not None:
        return TaskData(path)
    if task_id is None:
        raise ValidationError("task_id", "a task id (or a task file's path)", None)
    return TaskData(find_task_file(task_id, data_dir or ".", suite))


def find_task_file(task_id: int, data_dir: str | Path, suite: str | None = None) -> Path:
    """The task file of `task_id` under `data_dir`, refusing an ambiguous or missing match."""
    root = Path(data_dir)
    pattern = f"task_{int(task_id)}_*.h5"
    found = sorted({*root.glob(pattern), *root.glob(f"*/{pattern}")})
    if suite is not None:
        found = [p for p in found if suite in (p.parent.name, str(_suite_of(p)))]
    if len(found) == 1:
        return found[0]
    where = f"{root}" + (f" (suite {suite})" if suite else "")
    if not found:
        raise ValidationError("task_id", f"a task recorded under {where}", task_id)
    raise ValidationError(
        "suite",
        f"one of the suites holding task {task_id}: {[p.parent.name for p in found]}",
        suite,
    )


def _suite_of(path: Path) -> str:
    try:
        with TaskFile(path) as file:
            return str(file.attrs.get("suite", ""))
    except OSError:
        return ""


def nearest_sample(task_data: TaskData, episode_idx: int, rollout_step: int) -> tuple[int, int]:
    """(sample index, its env step) of the sampled query nearest to env step `rollout_step`
    (the earlier one on a tie)."""
    timesteps = np.asarray(task_data.episode(episode_idx)["timesteps"][()])
    if isinstance(rollout_step, bool) or not isinstance(rollout_step, int | np.integer):
        raise ValidationError("rollout_step", "an env step (int)", rollout_step)
    if rollout_step < 0 or len(timesteps) == 0:
        raise ValidationError(
            "rollout_step", f"an env step ≥ 0 (sampled: {timesteps.tolist()})", rollout_step
        )
    index = int(np.argmin(np.abs(timesteps - rollout_step)))
    return index, int(timesteps[index])


# -- per-sample vectors -----------------------------------------------------------------------


def sample_vectors(
    data: TaskData,
    episode_idx: int,
    expert_type: ExpertType = "text_only",
    layer_idx: int | None = None,
    step: int = -1,
    first: int | None = None,
    *,
    segment: str | None = None,
    exclude_bos: bool = True,
) -> tuple[np.ndarray, list[int]]:
    """One vector per recorded sample and layer, (S, L, D) float64, and the residual entries.

    text_only / expert_0: the mean over the prompt's VALID positions, BOS excluded (the first valid
    position: Gemma's BOS state has a huge norm and carries no prompt content) unless
    `exclude_bos=False` or the array was pooled on the device; expert_1: the mean over the `actions`
    segment at denoising step `step` (a recorded step's index, default the last). `segment`: another
    segment of that expert (e.g. "base_0_rgb": the image tokens of expert 0, "state" of expert 1),
    averaged over all its positions. `first`: read only the episode's first samples."""
    if expert_type not in EXPERT_TYPES:
        raise ValidationError("expert_type", f"one of {', '.join(EXPERT_TYPES)}", expert_type)
    episode = data.episode(episode_idx)
    name = ARRAY_NAMES[expert_type]
    array = data.array(episode, name)
    positions = data.layer_positions(array, name, layer_idx)
    recorded = data.layers(array, name)
    source = _Source(expert_type, segment or _default_segment(expert_type), step, exclude_bos)
    read = _reader(data, episode, array, name, source, slice(first))
    return np.stack([read(p) for p in positions], axis=1), [recorded[p] for p in positions]


@dataclass(frozen=True)
class _Source:
    expert_type: str
    segment: str
    step: int
    exclude_bos: bool


def _default_segment(expert_type: str) -> str:
    return ACTIONS_SEGMENT if expert_type == "expert_1" else PROMPT_SEGMENT


def _reader(
    data: TaskData,
    episode: EpisodeView,
    array: LazyArray,
    name: str,
    source: _Source,
    samples: slice,
) -> Callable[[int], np.ndarray]:
    """A function: layer position -> (S, D) vectors, reading only that layer."""
    labels = data.labels(array, name)
    lead: tuple[Any, ...] = (samples,)
    if source.expert_type == "expert_1":
        steps = array.shape[1]
        if not -steps <= source.step < steps:
            raise ValidationError(
                "step", f"a recorded denoising step index in [{-steps}, {steps - 1}]", source.step
            )
        lead = (samples, source.step % steps)
    axes = data.axes(array, name)
    if axes[-2:] == ("segment", "hidden"):  # device-pooled
        names = segment_names(labels)
        if source.segment not in names:
            raise ValidationError(f"{name} segments", f"a '{source.segment}' segment", names)
        index = names.index(source.segment)
        return lambda p: np.asarray(array[(*lead, p, index)], np.float64)
    if axes[-1:] == ("hidden",) and "position" not in axes:  # pooled text_only
        return lambda p: np.asarray(array[(*lead, p)], np.float64)
    start, stop = _span(labels, name, source.segment, array.shape[axes.index("position")])
    if source.segment != PROMPT_SEGMENT:
        return lambda p: np.asarray(array[(*lead, p, slice(start, stop))], np.float64).mean(axis=1)
    mask = np.asarray(data.array(episode, "prompt_mask")[samples], bool)
    if mask.shape[1] != stop - start:
        raise ValidationError(
            "prompt_mask", f"{stop - start} positions (the prompt segment of {name})", mask
        )
    if source.exclude_bos:
        mask = metrics.without_bos(mask)
    return lambda p: metrics.prompt_mean(array[(*lead, p, slice(start, stop))][:, None], mask)[:, 0]


def bos_included(data: TaskData, episode_idx: int, expert_type: ExpertType) -> bool:
    """True when the prompt vectors had to keep BOS: the array was pooled on the device."""
    episode = data.episode(episode_idx)
    name = ARRAY_NAMES[expert_type]
    return "position" not in data.axes(data.array(episode, name), name)


def segment_names(labels: Mapping[str, Any]) -> list[str]:
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
    """Drift of one episode's representation from its first sample: (S,) for one layer, (S, L) for
    all (docs/analysis.md §1). cosine_distance / relative_l2: raw; centred_cosine_distance: about
    the task's mean at each layer; normalised_l2: in units of the between-episode spread at the
    same layer (NaN for a task with one episode). bos_excluded: False when the array was pooled on
    the device (BOS inside the mean)."""

    timesteps: np.ndarray
    layers: list[int]
    cosine_distance: np.ndarray
    relative_l2: np.ndarray
    centred_cosine_distance: np.ndarray
    normalised_l2: np.ndarray
    bos_excluded: bool = True
    note: str = ""


def get_language_loss_trajectory(
    task_data: TaskData,
    episode_idx: int,
    expert_type: ExpertType = "text_only",
    layer_idx: int | None = None,
) -> LanguageLoss:
    vectors, layers = sample_vectors(task_data, episode_idx, expert_type, layer_idx)
    raw = metrics.language_drift(vectors)
    centre, spread = task_data.geometry(expert_type, layer_idx)
    centred = metrics.centred_drift(vectors, centre, spread)
    timesteps = np.asarray(task_data.episode(episode_idx)["timesteps"][()])
    squeeze = (lambda a: a[:, 0]) if layer_idx is not None else (lambda a: a)
    bos_kept = bos_included(task_data, episode_idx, expert_type) and expert_type != "expert_1"
    notes = ["pooled on the device: BOS inside the prompt mean"] if bos_kept else []
    if len(task_data.episodes) < 2:
        notes.append("one episode: no between-episode spread to normalise by")
    return LanguageLoss(
        timesteps, layers, squeeze(raw.cosine_distance), squeeze(raw.relative_l2),
        squeeze(centred.cosine_distance), squeeze(centred.relative_l2),
        bos_excluded=not bos_kept, note="; ".join(notes),
    )  # fmt: skip


@dataclass(frozen=True)
class ExpertSeparation:
    """Expert 0 (prompt mean) against expert 1 (action mean, last recorded denoising step) over one
    episode's samples: width-free CKA / RSA at one layer and as a layer × layer matrix, plus each
    expert's own cosine drift at the sample nearest env step `rollout_step` (`sample_index`, its
    env step `timestep`). NaN with a note when the episode is too short."""

    layer: int
    rollout_step: int
    sample_index: int
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
    task_data: TaskData, episode_idx: int, rollout_step: int = 0, layer_idx: int = -1
) -> ExpertSeparation:
    episode = task_data.episode(episode_idx)
    sample, timestep = nearest_sample(task_data, episode_idx, rollout_step)
    first = "text_only" if ARRAY_NAMES["text_only"] in episode else "expert_0"
    v0, layers_0 = sample_vectors(task_data, episode_idx, first)
    v1, layers_1 = sample_vectors(task_data, episode_idx, "expert_1")
    s = v0.shape[0]
    p0 = _layer_position(task_data, episode, first, layer_idx)
    p1 = _layer_position(task_data, episode, "expert_1", layer_idx)
    matrix, rsa, notes = np.full((len(layers_0), len(layers_1)), np.nan), float("nan"), []
    if s >= MIN_CKA_SAMPLES:
        matrix = metrics.cka_matrix(list(np.moveaxis(v0, 1, 0)), list(np.moveaxis(v1, 1, 0)))
        rsa = metrics.rsa(v0[:, p0], v1[:, p1])
    else:
        notes.append(f"episode {episode_idx} has {s} samples; CKA needs at least {MIN_CKA_SAMPLES}")
    if timestep != rollout_step:
        notes.append(f"env step {rollout_step} was not sampled: nearest sampled step {timestep}")
    return ExpertSeparation(
        layer=layers_0[p0], rollout_step=rollout_step, sample_index=sample, timestep=timestep,
        cka=float(matrix[p0, p1]), rsa=rsa, cka_layers=matrix, layers_0=layers_0,
        layers_1=layers_1,
        drift_expert_0=float(metrics.language_drift(v0).cosine_distance[sample, p0]),
        drift_expert_1=float(metrics.language_drift(v1).cosine_distance[sample, p1]),
        n_samples=s, note="; ".join(notes),
    )  # fmt: skip


def _layer_position(data: TaskData, episode: EpisodeView, expert_type: str, layer_idx: int) -> int:
    name = ARRAY_NAMES[expert_type]
    return data.layer_positions(data.array(episode, name), name, layer_idx)[0]


@dataclass(frozen=True)
class HiddenStates:
    """One sample's stored states at one layer: `states` with the axes `axes` (e.g. position,
    hidden — or segment, hidden for a pooled capture), `dimensions` = {axis: size}; `positions`:
    the token segments [name, start, stop) along the position axis; which sample and env step."""

    states: np.ndarray
    axes: tuple[str, ...]
    dimensions: dict[str, int]
    positions: list[Any]
    expert_type: str
    layer: int
    rollout_step: int
    sample_index: int
    timestep: int
    step: int | None  # denoising step index (expert 1)


def get_hidden_states_for_dimensions(
    task_data: TaskData,
    episode_idx: int,
    rollout_step: int,
    layer_idx: int = -1,
    expert_type: ExpertType = "text_only",
    step: int = -1,
) -> HiddenStates:
    """The seed's call: the hidden states of one sample (nearest env step `rollout_step`) at one
    layer, every position and hidden unit, float64, with their dimensions. Expert 1: denoising
    step `step` (a recorded step's index, default the last)."""
    if expert_type not in EXPERT_TYPES:
        raise ValidationError("expert_type", f"one of {', '.join(EXPERT_TYPES)}", expert_type)
    episode = task_data.episode(episode_idx)
    name = ARRAY_NAMES[expert_type]
    array = task_data.array(episode, name)
    sample, timestep = nearest_sample(task_data, episode_idx, rollout_step)
    position = task_data.layer_positions(array, name, layer_idx)[0]
    axes = task_data.axes(array, name)
    key: list[Any] = [sample]
    denoising = None
    if "step" in axes:
        denoising = _check_step(array.shape[axes.index("step")], step)
        key.append(denoising)
    key.append(position)
    states = np.asarray(array[tuple(key)], np.float64)
    rest = tuple(a for a in axes[1:] if a not in ("step", "layer"))
    return HiddenStates(
        states=states, axes=rest, dimensions=dict(zip(rest, states.shape, strict=True)),
        positions=list(task_data.labels(array, name).get("segments", [])), expert_type=expert_type,
        layer=task_data.layers(array, name)[position], rollout_step=rollout_step,
        sample_index=sample, timestep=timestep, step=denoising,
    )  # fmt: skip


def _check_step(steps: int, step: int) -> int:
    if not -steps <= step < steps:
        raise ValidationError(
            "step", f"a recorded denoising step index in [{-steps}, {steps - 1}]", step
        )
    return step % steps


def get_hidden_units_trajectory(
    task_data: TaskData,
    episode_idx: int,
    dimensions: Sequence[int],
    expert_type: ExpertType = "text_only",
    layer_idx: int = -1,
) -> np.ndarray:
    """(S, len(dimensions)): chosen hidden units of the per-sample vector (prompt mean, or action
    mean for expert 1) at one layer, over the episode — e.g. to follow single units in time.
    (This was `get_hidden_states_for_dimensions` before it took the seed's arguments.)"""
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
    per_head: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """Share of attention that `query` tokens pay to `keys`, (S, T, L) for expert 1 (S, L for
    expert 0), heads averaged — or, with `per_head`, one value per head (…, L, H), which needs a
    capture with `attention="per_head"`; and the attention layers."""
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
    if per_head and "head" not in axes:
        raise ValidationError(
            "per_head", f"a capture with attention='per_head' ({name} holds the head mean)", True
        )
    if "head" in axes:
        head_axis = axes.index("head")
        mass = np.moveaxis(mass, head_axis, -3) if per_head else mass.mean(axis=head_axis)
    share = metrics.attention_share(
        mass, labels["query_segments"], labels["key_segments"], query, keys
    )
    return share, list(labels.get("layers", range(share.shape[-2 if per_head else -1])))


def has_head_axis(task_data: TaskData, episode_idx: int, expert: int = 1) -> bool:
    name = f"attention_mass_expert_{expert}"
    episode = task_data.episode(episode_idx)
    return "head" in task_data.axes(task_data.array(episode, name), name)


def get_step_similarity(task_data: TaskData, episode_idx: int) -> metrics.StepSimilarity:
    """Expert 1's action mean across the recorded denoising steps (docs/analysis.md §3)."""
    array = task_data.array(task_data.episode(episode_idx), ARRAY_NAMES["expert_1"])
    per_step = [
        sample_vectors(task_data, episode_idx, "expert_1", step=k)[0] for k in range(array.shape[1])
    ]
    return metrics.step_similarity(np.stack(per_step, axis=1))
