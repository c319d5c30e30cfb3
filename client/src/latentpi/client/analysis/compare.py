"""Conditions compared episode by episode: a baseline collection against collections run under an
intervention or another prompt (docs/analysis.md, "Comparing conditions").

    baseline = load_collection("runs/baseline")
    steered = load_collection("runs/steer_up")
    pairing = pair_collections(baseline, steered)        # refuses different episode arguments
    for pair in pairing.pairs:
        displacement(pair.baseline, pair.condition, tolerance=0.01).divergence_step
        action_difference(pair.baseline, pair.condition).arm          # (steps,) L2 of dims 0:6
    counterfactual_difference(episode)                   # other prompts vs the driving one

Episode k of every condition run with the same seed starts from the same init state with the same
env seed and noise seeds, so episodes pair by (suite, task_id, episode index). Everything a
comparison needs of an episode is small (states at the sampled queries, executed actions,
counterfactual chunks): it is read into memory once, latents are never touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.client.analysis.report import find_task_files
from latentpi.client.storage import EpisodeView, TaskFile
from latentpi.client.storage.condition import Condition
from latentpi.protocol.errors import ValidationError

# episode_arguments that do not change what the robot does (what is recorded, not what happens)
NON_DYNAMIC_ARGUMENTS = frozenset({"save_images", "stride"})
EEF = slice(0, 3)  # end-effector position in `states` (metres)
ARM = slice(0, 6)  # action dims moving the arm (OSC_POSE deltas); dim 6 is the gripper
GRIPPER = 6
COUNTERFACTUAL_ACTIONS = "replay/counterfactual_actions"
EXECUTED_ACTIONS = "replay/executed_actions"
QUERY_TIMESTEPS = "replay/query_timesteps"

TaskKey = tuple[str, int]  # (suite, task_id)
EpisodeKey = tuple[str, int, int]  # (suite, task_id, episode index)


def condition_identity(condition: Condition) -> str:
    """What must agree between the files of one collection (name, interventions' digest, prompts)."""
    return json.dumps(condition.record(), sort_keys=True)


@dataclass(frozen=True)
class Episode:
    """One episode's outcome and the small arrays a comparison needs."""

    index: int
    success: bool
    total_steps: int
    init_state_idx: int
    env_seed: int | None
    error: str | None
    timesteps: np.ndarray  # (samples,) policy step of each recorded state
    eef: np.ndarray  # (samples, 3) end-effector position sent with each sampled query
    executed: np.ndarray  # (total_steps, 7) the action executed at each policy step
    query_timesteps: np.ndarray  # (queries,)
    counterfactual: np.ndarray | None  # (queries, V, horizon, 7) other prompts' chunks
    counterfactual_prompts: tuple[str, ...]

    @classmethod
    def read(cls, view: EpisodeView) -> Episode:
        names = set(view.names)
        states = np.asarray(view["states"], np.float64) if "states" in names else np.zeros((0, 8))
        timesteps = (
            np.asarray(view["timesteps"], np.int64) if "timesteps" in names else np.zeros(0, int)
        )
        executed = (
            np.asarray(view[EXECUTED_ACTIONS], np.float64)
            if EXECUTED_ACTIONS in names
            else np.zeros((0, 7))
        )
        queries = (
            np.asarray(view[QUERY_TIMESTEPS], np.int64)
            if QUERY_TIMESTEPS in names
            else np.zeros(0, int)
        )
        counterfactual = (
            np.asarray(view[COUNTERFACTUAL_ACTIONS], np.float64)
            if COUNTERFACTUAL_ACTIONS in names
            else None
        )
        prompts = view.attrs.get("counterfactual_prompts") or []
        prompts = json.loads(prompts) if isinstance(prompts, str) else prompts
        env_seed = view.attrs.get("env_seed")
        return cls(
            index=view.index,
            success=view.success,
            total_steps=view.total_steps,
            init_state_idx=view.init_state_idx,
            env_seed=None if env_seed is None else int(env_seed),
            error=view.attrs.get("error"),
            timesteps=timesteps,
            eef=states[:, EEF],
            executed=executed,
            query_timesteps=queries,
            counterfactual=counterfactual,
            counterfactual_prompts=tuple(str(p) for p in prompts),
        )


@dataclass
class Task:
    """One task file of a collection, its episodes read."""

    path: Path
    suite: str
    task_id: int
    instruction: str
    attrs: dict[str, Any]
    condition: Condition
    episodes: dict[int, Episode]

    @property
    def key(self) -> TaskKey:
        return self.suite, self.task_id

    @property
    def episode_arguments(self) -> dict[str, Any]:
        return dict(self.attrs.get("episode_arguments") or {})


@dataclass
class Collection:
    """Every task file under one folder: one condition."""

    root: Path
    condition: Condition
    tasks: dict[TaskKey, Task]
    label: str = ""  # unique among the collections compared (set by `label_collections`)

    @property
    def episodes(self) -> int:
        return sum(len(t.episodes) for t in self.tasks.values())

    @property
    def random_weights(self) -> bool:
        return any(bool(t.attrs.get("random_weights")) for t in self.tasks.values())

    @property
    def warnings(self) -> list[str]:
        """The files' stored warnings (random weights, ...), each once."""
        seen: dict[str, None] = {}
        for task in self.tasks.values():
            for warning in task.attrs.get("warnings") or []:
                seen[str(warning)] = None
        return list(seen)


def load_collection(root: str | Path) -> Collection:
    """Read every task file under `root` (a folder, or one task file). Refused: a missing path, no
    task file, no finished episode, files of more than one condition, a task twice."""
    root = Path(root)
    if not root.exists():
        raise ValidationError("collection", "an existing folder of task files", str(root))
    paths = find_task_files(root)
    if not paths:
        raise ValidationError(
            "collection", "a folder holding task files (<suite>/task_<id>_<name>.h5)", str(root)
        )
    tasks: dict[TaskKey, Task] = {}
    for path in paths:
        task = _read_task(path)
        if task.key in tasks:
            raise ValidationError(
                f"{root}: task {task.key}", "one task file per suite and task", str(path)
            )
        tasks[task.key] = task
    conditions = {condition_identity(t.condition): t.condition for t in tasks.values()}
    if len(conditions) > 1:
        names = sorted({c.name for c in conditions.values()})
        raise ValidationError(
            f"{root}: condition",
            "one condition per folder (collect each into its own --out)",
            names,
        )
    collection = Collection(root, next(iter(conditions.values())), tasks)
    if collection.episodes == 0:
        raise ValidationError(f"{root}", "at least one finished episode", "none")
    return collection


def _read_task(path: Path) -> Task:
    with TaskFile(path) as file:
        attrs = dict(file.attrs)
        try:
            condition = file.condition  # its digest checked against its arrays
        except ValidationError as error:
            raise error.renamed(f"{path}: root attribute condition: {error.field}") from None
        return Task(
            path=path,
            suite=str(attrs.get("suite", "")),
            task_id=int(attrs.get("task_id", -1)),
            instruction=str(attrs.get("instruction", "")),
            attrs=attrs,
            condition=condition,
            episodes={view.index: Episode.read(view) for view in file.episodes},
        )


def label_collections(collections: Sequence[Collection]) -> None:
    """Give each collection a unique label: its condition's name, plus its folder when two share
    a name, plus its position when a folder is given twice."""
    counts: dict[str, int] = {}
    for collection in collections:
        counts[collection.condition.name] = counts.get(collection.condition.name, 0) + 1
    seen: set[str] = set()
    for i, collection in enumerate(collections):
        name = collection.condition.name
        label = name if counts[name] == 1 else f"{name} ({collection.root})"
        collection.label = label if label not in seen else f"{label} #{i}"  # one folder twice
        seen.add(collection.label)


# -- pairing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    key: EpisodeKey
    baseline: Episode
    condition: Episode


@dataclass
class Pairing:
    pairs: list[Pair]
    baseline_only: list[EpisodeKey] = field(default_factory=list)  # no partner in the condition
    condition_only: list[EpisodeKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def tasks(self) -> list[TaskKey]:
        return sorted({(p.key[0], p.key[1]) for p in self.pairs})

    def of_task(self, task: TaskKey | None) -> list[Pair]:
        return [p for p in self.pairs if task is None or (p.key[0], p.key[1]) == task]


def pair_collections(baseline: Collection, condition: Collection) -> Pairing:
    """Episodes of the two collections matched by (suite, task_id, episode index). Refused: tasks
    run with different episode arguments (seed, horizon, replan steps, …), paired episodes from
    different init states or env seeds, and no pair at all."""
    pairing = Pairing([])
    for key in sorted(set(baseline.tasks) | set(condition.tasks)):
        base, cond = baseline.tasks.get(key), condition.tasks.get(key)
        if base is None or cond is None:
            only = base or cond
            assert only is not None
            keys = [(*key, k) for k in sorted(only.episodes)]
            (pairing.baseline_only if cond is None else pairing.condition_only).extend(keys)
            continue
        _check_arguments(base, cond)
        _pair_task(base, cond, pairing)
        for name in ("model_config", "checkpoint"):
            if base.attrs.get(name) != cond.attrs.get(name):
                pairing.notes.append(
                    f"{key[0]} task {key[1]}: {name} differs ({base.attrs.get(name)!r} vs "
                    f"{cond.attrs.get(name)!r}): the difference includes the model's"
                )
    if not pairing.pairs:
        raise ValidationError(
            f"{condition.root}",
            f"episodes pairing with {baseline.root} (same suite, task and episode index)",
            "no pair",
        )
    return pairing


def _check_arguments(base: Task, cond: Task) -> None:
    """The same episode arguments (except what only changes the recording), so episode k is the
    same start under both conditions."""
    a, b = base.episode_arguments, cond.episode_arguments
    for name in sorted((set(a) | set(b)) - NON_DYNAMIC_ARGUMENTS):
        if a.get(name) != b.get(name):
            raise ValidationError(
                f"{cond.path}: episode_arguments.{name}",
                f"{a.get(name)!r} as in the baseline {base.path} (collect every condition with "
                "the same --seed, --max-steps, --replan-steps and --num-steps-wait)",
                b.get(name),
            )


def _pair_task(base: Task, cond: Task, pairing: Pairing) -> None:
    for index in sorted(set(base.episodes) | set(cond.episodes)):
        key = (base.suite, base.task_id, index)
        b, c = base.episodes.get(index), cond.episodes.get(index)
        if b is None or c is None:
            (pairing.condition_only if b is None else pairing.baseline_only).append(key)
            continue
        for name in ("init_state_idx", "env_seed"):
            if getattr(b, name) != getattr(c, name):
                raise ValidationError(
                    f"{cond.path}: episode {index} {name}",
                    f"{getattr(b, name)} as in the baseline (episodes pair only from the same start)",
                    getattr(c, name),
                )
        pairing.pairs.append(Pair(key, b, c))


# -- per pair ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Displacement:
    """The condition's end-effector path against its baseline partner's, at the policy steps where
    both recorded a state (the sampled queries, up to the shorter episode)."""

    timesteps: np.ndarray  # (k,)
    distance: np.ndarray  # (k,) metres
    final: float  # between the two episodes' last recorded positions, whatever their lengths
    divergence_step: int | None  # first common step with distance > tolerance; None: never

    @property
    def mean(self) -> float:
        return float(self.distance.mean()) if self.distance.size else math.nan

    @property
    def max(self) -> float:
        return float(self.distance.max()) if self.distance.size else math.nan


def displacement(base: Episode, cond: Episode, tolerance: float) -> Displacement:
    common, i, j = np.intersect1d(base.timesteps, cond.timesteps, return_indices=True)
    distance = np.linalg.norm(base.eef[i] - cond.eef[j], axis=1)
    final = (
        float(np.linalg.norm(base.eef[-1] - cond.eef[-1]))
        if len(base.eef) and len(cond.eef)
        else math.nan
    )
    beyond = np.flatnonzero(distance > tolerance)
    first = int(common[beyond[0]]) if beyond.size else None
    return Displacement(common.astype(np.int64), distance, final, first)


@dataclass(frozen=True)
class ActionDifference:
    """Per policy step (up to the shorter episode): L2 distance of the arm dims (0:6) and absolute
    difference of the gripper dim (6)."""

    arm: np.ndarray  # (steps,)
    gripper: np.ndarray  # (steps,)


def action_difference(base: Episode, cond: Episode) -> ActionDifference:
    steps = min(len(base.executed), len(cond.executed))
    delta = cond.executed[:steps] - base.executed[:steps]
    return ActionDifference(
        np.linalg.norm(delta[:, ARM], axis=1), np.abs(delta[:, GRIPPER]).astype(np.float64)
    )


@dataclass(frozen=True)
class CounterfactualDifference:
    """Per query: how far each counterfactual prompt's actions are from the actions executed (the
    driving prompt's, same observation and noise) over the steps executed from that chunk."""

    timesteps: np.ndarray  # (queries,) policy step of each query
    arm: np.ndarray  # (queries, V) mean over the executed steps of the arm dims' L2 distance
    gripper: np.ndarray  # (queries, V) mean absolute gripper difference


def counterfactual_difference(episode: Episode) -> CounterfactualDifference | None:
    """None when the episode recorded no counterfactual actions."""
    chunks = episode.counterfactual
    if chunks is None:
        return None
    queries, variants = chunks.shape[:2]
    if queries != len(episode.query_timesteps):
        raise ValidationError(
            f"episode {episode.index}: {COUNTERFACTUAL_ACTIONS}",
            f"one row per query ({len(episode.query_timesteps)})",
            chunks.shape,
        )
    arm = np.full((queries, variants), np.nan)
    gripper = np.full((queries, variants), np.nan)
    ends = [*episode.query_timesteps[1:], episode.total_steps]
    for q, (start, end) in enumerate(zip(episode.query_timesteps, ends, strict=True)):
        executed = episode.executed[start:end]  # what the driving prompt's chunk led to
        k = min(len(executed), chunks.shape[2])
        if k == 0:
            continue
        delta = chunks[q, :, :k] - executed[None, :k]  # (V, k, 7)
        arm[q] = np.linalg.norm(delta[..., ARM], axis=-1).mean(axis=1)
        gripper[q] = np.abs(delta[..., GRIPPER]).mean(axis=1)
    return CounterfactualDifference(episode.query_timesteps.astype(np.int64), arm, gripper)
