"""One task's trials into its one HDF5 file: each episode reproducible on its own.

One environment per task, reused across trials; trial k starts from init state k after
`env.seed(episode_seed(seed, suite, task, k))` right before its own reset, and sends per-query
noise seeds (collect/seeding.py), so an episode is the same whether it runs first, after a resume,
after a retry or in another worker. Completed episodes (the published files, never the index) are
skipped. An episode cut by a lost connection is dropped (its temporary file deleted) and redone
once the client has reconnected; one whose simulation raised is redone on a fresh environment
`error_retries` times and then recorded as a failed episode with the error (openpi counts it as a
failure), so one bad episode never stops the run or blocks a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event, TaskDone
from latentpi.client.collect.options import CollectOptions, episode_range
from latentpi.client.collect.seeding import SEEDING_SCHEME, episode_seed, query_noise_seed
from latentpi.client.collect.video import EpisodeVideo, video_path
from latentpi.client.libero_env import TaskInfo, close_env, load_init_states, make_env
from latentpi.client.policy_client import ConnectionLost, ServerUnavailable
from latentpi.client.rollout import (
    EpisodeResult,
    Policy,
    QueryCondition,
    Sample,
    SimulationError,
    run_episode,
)
from latentpi.client.storage import TaskHeader, TaskWriter, task_path
from latentpi.protocol.latent_spec import LatentSpec

logger = logging.getLogger(__name__)

EnvFactory = Callable[[TaskInfo], Any]


@dataclass(frozen=True)
class TaskJob:
    """Everything a worker needs for one task (picklable)."""

    task: TaskInfo
    header: TaskHeader
    options: CollectOptions

    @property
    def spec(self) -> LatentSpec:
        return self.header.latent_spec

    def query_condition(self) -> QueryCondition:
        """The run's condition rendered for this task (what every query carries)."""
        condition = self.header.condition
        prompt, counterfactual = condition.render(self.task.instruction)
        return QueryCondition(prompt, counterfactual, tuple(condition.wire_interventions()))

    @property
    def path(self) -> str:
        t = self.task
        return str(task_path(self.options.out, t.suite, t.task_id, t.name))


class TaskEnv:
    """The task's one environment, built on first use and rebuilt after a simulation error (the
    failed env may be left in any state)."""

    def __init__(self, task: TaskInfo, factory: EnvFactory = make_env) -> None:
        self.task, self._factory, self._env = task, factory, None

    @property
    def env(self) -> Any:
        if self._env is None:
            self._env = self._factory(self.task)
        return self._env

    def rebuild(self) -> None:
        self.close()

    def close(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            close_env(env)


def collect_task(
    job: TaskJob,
    policy: Policy,
    report: Callable[[Event], None],
    *,
    env_factory: EnvFactory = make_env,
) -> None:
    """Run every trial of the task not yet in its file, then consolidate the file."""
    options = job.options
    with TaskWriter(job.path, job.header, compression=options.compression) as writer:
        pending = [k for k in episode_range(options) if k not in writer.completed]
        if pending:
            env = TaskEnv(job.task, env_factory)
            try:
                init_states = load_init_states(job.task)
                for k in pending:
                    _episode_with_retries(job, writer, env, init_states, k, policy, report)
            finally:
                env.close()
        writer.close(consolidate=True)
    report(TaskDone(job.task.task_id, job.path))


def _episode_with_retries(
    job: TaskJob,
    writer: TaskWriter,
    env: TaskEnv,
    init_states: np.ndarray,
    k: int,
    policy: Policy,
    report: Callable[[Event], None],
) -> EpisodeResult:
    options, task_id = job.options, job.task.task_id
    lost, errors = 0, 0
    while True:
        record_failure = errors >= options.error_retries
        try:
            result = _episode(job, writer, env.env, init_states, k, policy, record_failure)
        except ConnectionLost as error:
            lost += 1
            if lost > options.episode_retries:
                raise ServerUnavailable(
                    f"task {task_id} episode {k}: the connection dropped in each of "
                    f"{options.episode_retries + 1} attempts"
                ) from error
            _redo(report, task_id, k, str(error), lost + errors, options)
            continue
        except SimulationError as error:
            errors += 1
            env.rebuild()
            _redo(report, task_id, k, f"simulation error: {error}", lost + errors, options)
            continue
        if result.error is not None:
            env.rebuild()
        env_steps = result.total_steps + options.num_steps_wait
        report(EpisodeDone(task_id, k, result.success, env_steps, result.duration_s, result.error))
        return result


def _redo(
    report: Callable[[Event], None],
    task_id: int,
    k: int,
    reason: str,
    attempt: int,
    options: CollectOptions,
) -> None:
    logger.warning(
        "task %d episode %d: %s; redoing the episode (attempt %d of at most %d)",
        task_id,
        k,
        reason,
        attempt + 1,
        options.episode_retries + options.error_retries + 1,
    )
    report(EpisodeRedone(task_id, k, reason))


def episode_attrs(options: CollectOptions, task: TaskInfo, k: int) -> dict[str, Any]:
    """The attributes episode k is written with (besides its index, init state and run seed)."""
    attrs = {**options.episode_arguments(), "seeding": SEEDING_SCHEME}
    attrs.pop("seed")
    return {**attrs, "env_seed": episode_seed(options.seed, task.suite, task.task_id, k)}


def run_one_episode(
    job: TaskJob,
    env: Any,
    init_states: np.ndarray,
    k: int,
    policy: Policy,
    on_sample: Callable[[Sample], None],
    on_frame: Callable[[np.ndarray], None] | None = None,
) -> EpisodeResult:
    """Episode k of the job's task as every backend runs it: seeded from what it is."""
    options, task = job.options, job.task

    def noise_seed(query: int) -> int:
        return query_noise_seed(options.seed, task.suite, task.task_id, k, query)

    return run_episode(
        env,
        task,
        k,
        policy,
        max_steps=options.horizon,
        stride=options.stride,
        replan_steps=options.replan_steps,
        num_steps_wait=options.num_steps_wait,
        latent_spec=job.spec,
        record_images=options.save_images,
        on_sample=on_sample,
        init_states=init_states,
        env_seed=episode_seed(options.seed, task.suite, task.task_id, k),
        noise_seed=noise_seed,
        on_frame=on_frame,
        condition=job.query_condition(),
    )


def _episode(
    job: TaskJob,
    writer: TaskWriter,
    env: Any,
    init_states: np.ndarray,
    k: int,
    policy: Policy,
    record_failure: bool,
) -> EpisodeResult:
    """One attempt at episode k; a simulation error is recorded (failed episode) or re-raised."""
    options, task = job.options, job.task
    attrs = episode_attrs(options, task, k)
    video = EpisodeVideo(video_path(options.out, task.suite, task.task_id, k))
    with video, writer.episode(k, init_state_idx=k, seed=options.seed, attrs=attrs) as episode:
        on_frame = video.add if options.video else None
        try:
            result = run_one_episode(job, env, init_states, k, policy, episode.add, on_frame)
        except SimulationError as error:
            if not record_failure:
                raise  # the episode's .tmp is dropped; it is redone from scratch
            logger.warning(
                "task %d episode %d: %s; recorded as a failed episode", task.task_id, k, error
            )
            result = error.result
        episode.finish(result)  # an exception before this drops the episode's .tmp
        video.publish()
    return result
